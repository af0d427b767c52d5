"""Decoding at long context: a hybrid with one attention layer in four against an all-attention transformers Llama
of the same width and depth, on one CUDA GPU, in bf16.

    python benchmarks/timing/long_context_decode.py               # 4K, 16K and 32K context, batch 1 and 16
    python benchmarks/timing/long_context_decode.py --contexts 4096 --batches 1 --output /tmp/out

Writes benchmarks/results/long_context_decode/<device>.{json,md}.

Both models: hidden 1024, 24 layers, 16 query heads and 4 key/value heads of 64, SwiGLU MLPs of 2816. The hybrid's
layers 3, 7, ... 23 are attention, the other 18 Mamba-2 (state 128, head 64). For each context length and batch,
each model prefills a random prompt into a transformers StaticCache sized for it plus the decoded tokens, then a
decode step (one token per row against the cache) is timed: replayed as a CUDA graph where the step can be
captured, else eagerly (the table says which; step_ms of benchmarks/common.py). The cache memory is the bytes of
every tensor the cache holds after the prefill (keys and values; conv and recurrent states).
"""

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

import ssm_hub
from ssm_hub.conversion.distillation.speed import cache_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
from common import decode_cache_len, result_stem, results_dir, step_ms

WIDTH = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=4,
             intermediate_size=2816, vocab_size=32000, tie_word_embeddings=False)


def build(name: str, device: str) -> torch.nn.Module:
    if name == "llama":
        model = LlamaForCausalLM(LlamaConfig(**WIDTH, head_dim=64, max_position_embeddings=65536))
    else:
        layers = WIDTH["num_hidden_layers"]
        config = ssm_hub.SsmHubHybridConfig(
            **WIDTH, head_dim=64, mixer_types=["attention" if i % 4 == 3 else "mamba2" for i in range(layers)],
            ffn_types=["mlp"] * layers, mamba_d_state=128, mamba_d_head=64, max_position_embeddings=65536,
        )
        model = ssm_hub.SsmHubHybridForCausalLM(config)
    return model.to(device, torch.bfloat16).eval()


def measure(model, batch: int, context: int, steps: int, device: str) -> dict:
    cache = StaticCache(config=model.config, max_cache_len=decode_cache_len(context, steps))
    prompt = torch.randint(1, model.config.vocab_size, (batch, context), device=device)
    tokens = torch.randint(1, model.config.vocab_size, (batch, 1), device=device)
    with torch.no_grad():
        for chunk in prompt.split(4096, dim=1):  # chunked prefill keeps the activations of a 32K prompt small
            model(input_ids=chunk, cache=cache, use_cache=True, logits_to_keep=1)
        memory = cache_bytes(cache)

        def step():
            model(input_ids=tokens, cache=cache, use_cache=True, logits_to_keep=1)

        step()  # warm-up outside any graph: kernel compilation and library handles
        milliseconds, mode = step_ms(step, device, steps)
    return {"cache_bytes": memory, "step_ms": milliseconds, "tokens_per_second": batch / milliseconds * 1e3,
            "timing": mode}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to try the script on tiny settings")
    parser.add_argument("--output", type=Path, default=results_dir(__file__))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    models = {"hybrid (1 attention layer in 4)": build("hybrid", args.device), "Llama": build("llama", args.device)}
    rows = []
    for context in args.contexts:
        for batch in args.batches:
            result = {name: measure(model, batch, context, args.steps, args.device) for name, model in models.items()}
            hybrid, llama = result.values()
            row = {"context": context, "batch": batch, **{f"{name}": r for name, r in result.items()},
                   "cache_ratio": hybrid["cache_bytes"] / llama["cache_bytes"],
                   "speedup": hybrid["tokens_per_second"] / llama["tokens_per_second"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.device == "cuda":
                torch.cuda.empty_cache()
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    report = {"benchmark": "long_context_decode", "device": device, "torch": torch.__version__,
              "transformers": transformers.__version__, "python": platform.python_version(), "width": WIDTH,
              "rows": rows}
    args.output.mkdir(parents=True, exist_ok=True)
    stem = result_stem(device)
    (args.output / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    names = list(models)
    lines = [
        f"Decode at long context, bf16, on {device}: {names[0]} against {names[1]}, hidden 1024, 24 layers "
        "(tokens/s = batch / decode-step time; cache = bytes the StaticCache holds after the prefill)", "",
        "| context | batch | hybrid cache (MiB) | Llama cache (MiB) | cache ratio | hybrid tokens/s | Llama tokens/s "
        "| speed-up | timing (hybrid / Llama) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        hybrid, llama = row[names[0]], row[names[1]]
        lines.append(
            f"| {row['context']} | {row['batch']} | {hybrid['cache_bytes'] / 2**20:.0f} | "
            f"{llama['cache_bytes'] / 2**20:.0f} | {row['cache_ratio']:.2f} | {hybrid['tokens_per_second']:.0f} | "
            f"{llama['tokens_per_second']:.0f} | {row['speedup']:.2f}x | {hybrid['timing']} / {llama['timing']} |"
        )
    lines += ["", "Command: `python benchmarks/timing/long_context_decode.py`"]
    (args.output / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
