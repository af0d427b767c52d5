"""Elementwise functions shared by the Triton kernels."""

# Imported inside try: transformers' trust_remote_code check then does not demand triton from a checkpoint's
# users on CPU-only machines, where ssm_hub.backend never dispatches to these kernels.
try:
    import triton
    import triton.language as tl
except ImportError as error:
    raise ImportError("ssm_hub's Triton kernels need triton: pip install triton") from error


@triton.jit
def softplus(x):
    # log(1 + exp(x)) without overflow: for large x it is x itself (torch's softplus uses the same threshold).
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))
