"""What the benchmark scripts share: where their results go, the timers, the 130M-parameter Mamba-2 they compare on
and its timed training step.

A script in a room of benchmarks/ (timing/, profiles/, quality/, tools/) finds this module with one line at its top,

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py

and is run as a file from anywhere, e.g. ``python benchmarks/timing/training.py``. Never with ``python -m`` from the
repository root: that puts the root on sys.path, where the kernels/ folder shadows Hugging Face's ``kernels``
package, which transformers imports.
"""

import gc
import importlib.util
import os
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


# Results: benchmarks/results/<script>/<device>[_<variant>...].{json,md,png,txt}


def results_dir(script: str) -> Path:
    """``benchmarks/results/<script's file stem>/``: where a script writes unless ``--output`` says otherwise."""
    return RESULTS / Path(script).stem


def result_stem(device: str, *variants: str) -> str:
    """A results file's name without its suffix: the device, then the run's variants, empty ones left out, with
    spaces as underscores (``result_stem("NVIDIA H100 80GB HBM3", "generate")``: ``NVIDIA_H100_80GB_HBM3_generate``)."""
    return "_".join(part.replace(" ", "_") for part in (device, *variants) if part)


# Timers. An eager timing includes the Python and launch overhead a training loop pays; a CUDA-graph replay gives
# the device time alone.


def synchronize(device: str = "cuda") -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def wall_seconds(fn, device: str = "cuda"):
    """(seconds, what ``fn`` returned) of one call of ``fn``, the device synchronised before and after it."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def per_step_ms(step, steps: int, device: str = "cuda") -> float:
    """Milliseconds per call over ``steps`` calls of ``step`` in a row, the device synchronised before and after."""

    def run():
        for _ in range(steps):
            step()

    return wall_seconds(run, device)[0] / steps * 1e3


def time_ms(fn, grad_to_none=None) -> float:
    """Median milliseconds of eager calls of ``fn`` (triton's do_bench: 25 ms of warm-up, then 200 ms of calls);
    ``grad_to_none``: tensors whose gradients are reset before each call."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, grad_to_none=grad_to_none, return_mode="median")


def graph_ms(fn) -> float:
    """Median milliseconds of CUDA-graph replays of ``fn`` (triton's do_bench_cudagraph over 200 ms): the device time
    without the Python and launch overhead that :func:`time_ms` includes. ``fn`` runs once first, outside any graph.
    A function that cannot be captured (it syncs with the host or allocates outside the graph pool) raises, after
    the device has finished what was queued."""
    import triton.testing

    try:
        fn()
        torch.cuda.synchronize()
        return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")
    except Exception:
        torch.cuda.synchronize()
        raise


TIMING_WINDOWS = 7


def decode_cache_len(context: int, steps: int) -> int:
    """A static cache's length for a prefill of ``context`` tokens and every step that :func:`step_ms` runs (a
    captured step writes its token at the cache's own device-side position, which each replay advances)."""
    return context + (TIMING_WINDOWS + 1) * steps + 8


def step_ms(step, device: str, steps: int) -> tuple[float, str]:
    """(ms per decode step, how it was timed): a CUDA-graph replay where the step captures, else eager. The median
    of ``TIMING_WINDOWS`` timings of ``steps`` steps each, so that one slow window (a clock ramp, another process)
    does not set the number."""
    if device == "cuda":
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            run, mode = graph.replay, "CUDA graph"
        except RuntimeError as error:
            torch.cuda.synchronize()
            run, mode = step, f"eager (capture failed: {str(error)[:80]})"
    else:
        run, mode = step, "eager"
    run()
    return statistics.median(per_step_ms(run, steps, device) for _ in range(TIMING_WINDOWS)), mode


def measured_copy_bandwidth() -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy: the practical HBM ceiling."""
    source = torch.empty(2**28, dtype=torch.float32, device="cuda").normal_()
    target = torch.empty_like(source)
    ms = time_ms(lambda: target.copy_(source))
    return 2 * source.numel() * 4 / (ms * 1e-3)


def free_memory() -> None:
    """Drop unreferenced tensors, hand the cached blocks back to the device and restart the peak-memory count."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


# The 130M-parameter Mamba-2 the benchmarks compare on: ssm_hub's and transformers' own, built from one set of fields
# (hidden 768, 24 layers, state 128, head_dim 64, chunk 256, tied embeddings), and its timed training step.

OURS = "ssm_hub"
TRANSFORMERS = "transformers Mamba2ForCausalLM"
CANDIDATES = (OURS, TRANSFORMERS)


def transformers_fast_path() -> bool:
    """Whether transformers' Mamba2ForCausalLM runs on kernels: it needs mamba_ssm and causal_conv1d both importable,
    else it runs torch code."""
    return all(importlib.util.find_spec(name) is not None for name in ("mamba_ssm", "causal_conv1d"))


def candidate_label(candidate: str) -> str:
    """The candidate's name in result tables: ours names the backend it ran (SSM_HUB_BACKEND), transformers' the
    kernels it found (:func:`transformers_fast_path`)."""
    if candidate == OURS:
        backend = os.environ.get("SSM_HUB_BACKEND", "auto")
        return f"ssm_hub ({'torch reference' if backend == 'torch' else 'backend ' + backend})"
    return f"{candidate} ({'mamba_ssm + causal_conv1d kernels' if transformers_fast_path() else 'torch path'})"


def mamba2_130m_fields(vocab_size: int) -> dict:
    return dict(
        vocab_size=vocab_size, hidden_size=768, num_hidden_layers=24, state_size=128, expand=2, head_dim=64,
        n_groups=1, conv_kernel=4, chunk_size=256, tie_word_embeddings=True,
    )


def build_mamba2_130m(candidate: str, vocab_size: int) -> torch.nn.Module:
    import transformers

    import ssm_hub

    fields = mamba2_130m_fields(vocab_size)
    if candidate == OURS:
        return ssm_hub.SsmHubMamba2ForCausalLM(ssm_hub.SsmHubMamba2Config(**fields))
    if candidate == TRANSFORMERS:
        config = transformers.Mamba2Config(**fields, num_heads=fields["hidden_size"] * 2 // fields["head_dim"])
        return transformers.Mamba2ForCausalLM(config)
    raise ValueError(candidate)


def time_training_steps(model, input_ids: torch.Tensor, warmup: int, steps: int, run=None) -> tuple[float, float]:
    """(median seconds of the steps after ``warmup``, the last loss) of language-model training on ``input_ids``
    (labels = inputs), on one CUDA GPU: forward under bf16 autocast, loss, backward and a fused AdamW step. ``run``
    calls the model (default: the model itself; a ``torch.compile`` of it, say)."""
    run = run if run is not None else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    times = []
    for step in range(warmup + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = run(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {loss.item()}")
    return statistics.median(times), loss.item()
