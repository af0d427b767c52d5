"""Greedy decoding speed of ssm_hub (the backend SSM_HUB_BACKEND selects) against transformers' own pure-torch
Mamba-2, in the same process, on one CUDA GPU: a 130M-parameter Mamba-2 in bf16, batch 1, a 128-token prompt,
256 new tokens, with a plain ``generate`` (ssm_hub: each decode step replayed as one CUDA graph; transformers: its
dynamic cache), with ``cache_implementation="static"`` (which transformers compiles), with prompt lookup decoding
(``prompt_lookup_num_tokens=3``, speculative decoding with an n-gram draft), and for ssm_hub also with
``disable_compile=True`` (transformers' own decoding loop, eager). The timed call follows one untimed call.

    SSM_HUB_BACKEND=torch python benchmarks/timing/generation.py   # the torch reference
    python benchmarks/timing/generation.py                         # the default backend (Triton kernels on CUDA)
    python benchmarks/timing/generation.py --candidates ssm_hub    # ours alone

Writes benchmarks/results/generation/<device>_<backend>[_<candidates, when not both>].{json,md}.
"""

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
from common import CANDIDATES, OURS, build_mamba2_130m, candidate_label, result_stem, results_dir, wall_seconds


# (row label, generate keyword arguments) for each way of decoding that is timed
DECODE_MODES = {
    "default": {},
    "static": {"cache_implementation": "static"},
    "transformers' loop (disable_compile=True)": {"disable_compile": True},
    # transformers' assisted loop with an n-gram draft from the prompt: on random prompts it finds few matches, so
    # this is the worst case of prompt lookup against plain greedy.
    "prompt lookup (prompt_lookup_num_tokens=3)": {"prompt_lookup_num_tokens": 3},
}


def decode_tokens_per_second(model, prompt, new_tokens: int, mode_kwargs: dict) -> float:
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, **mode_kwargs)
    model.generate(prompt, **kwargs)  # warm-up: compilation, graph capture, autotuning
    seconds, out = wall_seconds(lambda: model.generate(prompt, **kwargs))
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return new_tokens / seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=50288)
    parser.add_argument("--output", type=Path, default=results_dir(__file__))
    parser.add_argument("--candidates", nargs="+", choices=CANDIDATES, default=CANDIDATES)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    prompt = torch.randint(1, args.vocab_size, (1, args.prompt_len), device="cuda")
    rows = []
    for candidate in args.candidates:
        model = build_mamba2_130m(candidate, args.vocab_size).to("cuda", torch.bfloat16).eval()
        modes = DECODE_MODES if candidate == OURS else {k: v for k, v in DECODE_MODES.items() if "disable_compile" not in v}
        for mode, mode_kwargs in modes.items():
            rate = decode_tokens_per_second(model, prompt, args.new_tokens, mode_kwargs)
            rows.append({"candidate": candidate_label(candidate), "cache": mode, "tokens_per_second": rate})
        del model
        torch.cuda.empty_cache()
    device = torch.cuda.get_device_name()
    report = {
        "benchmark": "generation", "device": device, "torch": torch.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "rows": rows,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    subset = "_".join(args.candidates) if tuple(args.candidates) != CANDIDATES else ""
    stem = result_stem(device, os.environ.get("SSM_HUB_BACKEND", "auto"), subset)
    (args.output / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"Mamba-2 130M greedy decoding, bf16, batch 1, prompt {args.prompt_len}, {args.new_tokens} new tokens, on {device}",
        "", "| candidate | decoding | tokens/s |", "|---|---|---|",
    ]
    lines += [f"| {r['candidate']} | {r['cache']} | {r['tokens_per_second']:.0f} |" for r in rows]
    table = "\n".join(lines) + "\n"
    (args.output / f"{stem}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
