"""The mixture-of-experts feed-forward, forward + backward, against transformers' JambaSparseMoeBlock on the same
weights and tokens, on one CUDA GPU: 16 experts, top-2, hidden 1024, expert intermediate 4096, 8192 tokens, bf16.

    python benchmarks/timing/moe.py                       # writes benchmarks/results/moe/<device>.{json,md}
    python benchmarks/timing/moe.py --tokens 2048 --output /tmp/out

Candidates: ssm_hub's SparseMoE with each experts implementation ("auto": grouped_mm on CUDA in bf16, and "loop",
the reference), and transformers' Jamba block with each of its experts implementations ("grouped_mm", its default
where torch has it, and "eager", a loop over the experts hit). Each is timed eagerly (triton's do_bench median) for
the forward alone and for forward + backward against a fixed output gradient, after checking that its output
matches the first candidate's.
"""

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import transformers
from transformers import JambaConfig
from transformers.models.jamba.modeling_jamba import JambaSparseMoeBlock

from ssm_hub.layers.moe import SparseMoE

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
from common import result_stem, results_dir, time_ms


def jamba_block(config: JambaConfig, implementation: str) -> torch.nn.Module:
    block = JambaSparseMoeBlock(config)
    block.experts.config._experts_implementation = implementation
    return block


def ours_like(jamba: torch.nn.Module, config: JambaConfig, implementation: str) -> SparseMoE:
    """Our layer with the Jamba block's router and experts (the same names and 3-D layouts)."""
    moe = SparseMoE(config.hidden_size, config.num_experts, config.num_experts_per_tok, config.intermediate_size,
                    scoring="softmax", norm_topk_prob=False, implementation=implementation)
    moe.load_state_dict(jamba.state_dict(), strict=True)
    return moe


def candidates(config: JambaConfig) -> dict:
    torch.manual_seed(0)
    reference = jamba_block(config, "grouped_mm")
    for parameter in reference.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    blocks = {
        "ssm_hub SparseMoE (auto: grouped_mm)": ours_like(reference, config, "auto"),
        "ssm_hub SparseMoE (loop reference)": ours_like(reference, config, "loop"),
        "transformers JambaSparseMoeBlock (grouped_mm, its default)": reference,
        "transformers JambaSparseMoeBlock (eager loop)": jamba_block(config, "eager"),
    }
    blocks["transformers JambaSparseMoeBlock (eager loop)"].load_state_dict(reference.state_dict())
    return blocks


def output_of(block, hidden):
    out = block(hidden)
    return out[0] if isinstance(out, tuple) else out  # ours also returns the router logits


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--output", type=Path, default=results_dir(__file__))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    config = JambaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_experts=args.experts,
                         num_experts_per_tok=args.top_k)
    hidden = torch.randn(1, args.tokens, args.hidden, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn_like(hidden)
    rows, first = [], None
    for name, block in candidates(config).items():
        block = block.to("cuda", torch.bfloat16)
        leaf = hidden.detach().requires_grad_(True)
        row = {"candidate": name}
        try:
            with torch.no_grad():
                out = output_of(block, hidden)
            first = out if first is None else first
            row["max_abs_difference"] = (out.float() - first.float()).abs().max().item()
            row["forward_ms"] = time_ms(lambda: output_of(block, hidden))

            def forward_backward():
                output_of(block, leaf).backward(grad)

            row["forward_backward_ms"] = time_ms(forward_backward, grad_to_none=[leaf, *block.parameters()])
            row["status"] = "ok"
        except Exception as error:  # a candidate that cannot run here is kept with the reason
            row["status"] = f"{type(error).__name__}: {str(error)[:200]}"
        rows.append(row)
        print(row, flush=True)
    baseline = next(r for r in rows if r["candidate"].startswith("transformers") and r["status"] == "ok")
    for row in rows:
        if row["status"] == "ok":
            row["forward_backward_speedup_vs_transformers_default"] = (
                baseline["forward_backward_ms"] / row["forward_backward_ms"]
            )
    device = torch.cuda.get_device_name()
    report = {
        "benchmark": "moe", "device": device, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "tokens": args.tokens, "hidden": args.hidden,
        "intermediate": args.intermediate, "experts": args.experts, "top_k": args.top_k, "rows": rows,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    stem = result_stem(device)
    (args.output / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"MoE feed-forward, {args.experts} experts top-{args.top_k}, hidden {args.hidden}, expert intermediate "
        f"{args.intermediate}, {args.tokens} tokens, bf16, on {device} (do_bench medians; speed-up = transformers "
        f"default fwd+bwd time / the candidate's)", "",
        "| candidate | fwd ms | fwd+bwd ms | fwd+bwd speed-up | max abs diff vs first | status |", "|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["status"] == "ok":
            lines.append(f"| {row['candidate']} | {row['forward_ms']:.3f} | {row['forward_backward_ms']:.3f} | "
                         f"{row['forward_backward_speedup_vs_transformers_default']:.2f}x | "
                         f"{row['max_abs_difference']:.2e} | ok |")
        else:
            lines.append(f"| {row['candidate']} | - | - | - | - | {row['status']} |")
    lines += ["", f"Command: `python benchmarks/timing/moe.py --tokens {args.tokens}`"]
    (args.output / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
