"""Mamba-2's training step on the kernels (ssm_hub.ops.mamba2_sequence) runs each forward kernel once (its backward
rebuilds nothing) and keeps no more than the plain chain of ops, with unchanged outputs and gradients: plain, with a padding mask, with packed documents, with out_proj left outside the node (hooked, as a PEFT
adapter would wrap it) and, on CUDA, under bf16 autocast; and it traces whole under torch.compile.

Runs the Triton kernels (on the GPU where there is one, else under TRITON_INTERPRET=1).
"""

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import randomised, tiny_config
from ssm_hub.backend import triton_available
from ssm_hub.layers.mamba2_mixer import Mamba2Mixer

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.fixture
def kernels(monkeypatch):
    monkeypatch.setenv("SSM_HUB_BACKEND", "triton")


def _mixer_and_inputs(seqlen=11):
    config = tiny_config("ssm_hub_mamba2")
    mixer = Mamba2Mixer(config, layer_idx=0)
    mixer.init_ssm_parameters(config)  # A_log, D and the dt parameters are allocated empty; the model's init fills them
    mixer = randomised(mixer).to(DEVICE).train()
    hidden = torch.randn(2, seqlen, config.hidden_size, device=DEVICE, requires_grad=True)
    return mixer, hidden


def _plain_chain(mixer, hidden, padding_mask=None, seq_idx=None):
    """The same layer as a plain chain of ops (the path inference takes), each op's backward left to autograd."""
    gate, xBC, dt = mixer.in_proj(hidden).split([mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1)
    if padding_mask is not None:
        xBC = xBC * padding_mask[..., None].to(xBC.dtype)
    return mixer._sequence(gate, xBC, dt, padding_mask, seq_idx, None, None, False, hidden.dtype)[0]


def _gradients(output, mixer, hidden):
    output.float().square().sum().backward()
    grads = [hidden.grad.clone(), *(p.grad.clone() for p in mixer.parameters())]
    hidden.grad = None
    mixer.zero_grad()
    return grads


def test_training_step_runs_each_forward_kernel_once(kernels):
    # A step of this size is bound by the host's launch rate: a rebuild in backward costs more than the memory
    # it saves.
    mixer, hidden = _mixer_and_inputs()
    with OpCounter() as counter:
        mixer(hidden).square().sum().backward()
    counted = ("ssm_hub.ssd_chunked_scan_fwd", "ssm_hub.causal_conv1d_fwd", "ssm_hub.gated_rms_norm_fwd")
    assert {name: counter.counts.get(name) for name in counted} == dict.fromkeys(counted, 1)


def _saved_bytes(function) -> int:
    """Bytes of the distinct storages autograd keeps for backward while ``function`` runs (parameters excluded)."""
    storages = {}

    def pack(tensor):
        if not isinstance(tensor, torch.nn.Parameter):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        function()
    return sum(storages.values())


def test_training_step_keeps_no_more_than_the_plain_chain(kernels):
    mixer, hidden = _mixer_and_inputs(seqlen=64)
    node = _saved_bytes(lambda: mixer(hidden))
    chain = _saved_bytes(lambda: _plain_chain(mixer, hidden))
    assert node <= chain


SETTINGS = ["plain", "padding_mask", "packed_documents", "out_proj_outside"] + (["bf16_autocast"] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("setting", SETTINGS)
def test_training_step_leaves_outputs_and_gradients_unchanged(kernels, setting):
    mixer, hidden = _mixer_and_inputs()
    padding_mask = seq_idx = None
    if setting == "padding_mask":
        padding_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=DEVICE)
        padding_mask[1, :4] = 0  # left padding in the second row
    if setting == "packed_documents":
        seq_idx = torch.tensor([[0] * 5 + [1] * 6, [0] * 11], dtype=torch.int32, device=DEVICE)
    if setting == "out_proj_outside":
        mixer.out_proj.register_forward_hook(lambda module, args, output: output)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if setting == "bf16_autocast"
                else contextlib.nullcontext())
    with autocast:
        out = mixer(hidden, padding_mask=padding_mask, seq_idx=seq_idx)
    node = _gradients(out, mixer, hidden)
    with autocast:
        plain = _plain_chain(mixer, hidden, padding_mask, seq_idx)
    # The same kernels on the same inputs in the same order: equal up to the last bits of fp32 sums.
    torch.testing.assert_close(out, plain)
    for got, expected in zip(node, _gradients(plain, mixer, hidden)):
        torch.testing.assert_close(got, expected)


class NormOutputs(TorchDispatchMode):
    """Records the dtype of every gated norm output and the shapes of every cast."""

    def __init__(self):
        super().__init__()
        self.norm_dtypes, self.cast_shapes = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.ssm_hub.gated_rms_norm_fwd.default:
            self.norm_dtypes.append(out[0].dtype)
        if func is torch.ops.aten._to_copy.default:
            self.cast_shapes.append(tuple(out.shape))
        return out


def test_under_autocast_the_normed_output_is_written_in_out_projs_compute_dtype(kernels):
    # out_proj reads the normed output in bf16 under autocast; writing it in float32 only to cast it was a
    # twentieth of the step's memory traffic.
    mixer, hidden = _mixer_and_inputs()
    with NormOutputs() as seen:
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out = mixer(hidden)
        out.float().square().sum().backward()
    assert seen.norm_dtypes == [torch.bfloat16]
    assert (*hidden.shape[:2], mixer.intermediate_size) not in seen.cast_shapes
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        plain = _plain_chain(mixer, hidden)
    # bf16 outputs of the same math; the interpreter truncates where the GPU rounds, so one bf16 step apart.
    torch.testing.assert_close(out, plain, atol=2e-2, rtol=2e-2)


def test_training_step_traces_under_torch_compile_without_graph_breaks(kernels):
    mixer, hidden = _mixer_and_inputs()
    compiled = torch.compile(mixer, fullgraph=True, backend="aot_eager")  # aot_eager: the trace, no codegen
    out = compiled(hidden)
    compiled_grads = _gradients(out, mixer, hidden)
    plain = _plain_chain(mixer, hidden)
    torch.testing.assert_close(out, plain)
    for got, expected in zip(compiled_grads, _gradients(plain, mixer, hidden)):
        torch.testing.assert_close(got, expected)
