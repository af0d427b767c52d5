"""The ops: pure-torch references (the spec) behind one dispatch point each (``backend="auto" | "triton" | "torch"``).

Layouts are time-second and channels-last. Varlen conventions (``seq_idx``, ``cu_seqlens``) are described in
``ssm_hub.ops.varlen``.
"""

from ssm_hub.ops.causal_conv1d import causal_conv1d, causal_conv1d_step
from ssm_hub.ops.cross_entropy import cross_entropy
from ssm_hub.ops.gated_rms_norm import gated_rms_norm
from ssm_hub.ops.selective_scan import selective_scan, selective_scan_step
from ssm_hub.ops.ssd import ssd_chunked_scan, ssd_step
from ssm_hub.ops.varlen import cu_seqlens_to_seq_idx, seq_idx_to_cu_seqlens

__all__ = [
    "causal_conv1d",
    "causal_conv1d_step",
    "cross_entropy",
    "gated_rms_norm",
    "selective_scan",
    "selective_scan_step",
    "ssd_chunked_scan",
    "ssd_step",
    "cu_seqlens_to_seq_idx",
    "seq_idx_to_cu_seqlens",
]
