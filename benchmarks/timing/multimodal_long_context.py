"""Long multimodal context: ssm_hub_multimodal (pure Mamba-2) against transformers' Fuyu (an attention VLM without a
vision encoder, randomly initialised) of the same width and depth, on one CUDA GPU, in bf16.

    python benchmarks/timing/multimodal_long_context.py             # 8K, 16K and 32K tokens, batch 1 and 8
    python benchmarks/timing/multimodal_long_context.py --contexts 2048 --batches 1 --device cpu --output /tmp/out

Writes benchmarks/results/multimodal_long_context/<device>.{json,md}; the second command is a smoke run on the CPU.

Both models: hidden 1024, 24 layers, vocabulary 32,000; Fuyu's Persimmon decoder has 16 heads of 64 and a relu^2
MLP of 4096, ours Mamba-2 layers (state 128, heads of 64) with SwiGLU MLPs of 2816. The prompt is 16 images of
16 x 16 patches (256 image tokens each; ours adds a row-end token per row of patches, Fuyu's processor a newline
token likewise, so 272 tokens an image) followed by text up to the context length. Prefill: each model embeds the
images with its own patch embedding (Fuyu's vision_embed_tokens, ours PatchEmbedding), puts them in place of the
image tokens, and runs the sequence into a transformers StaticCache in chunks of 4,096 tokens; it is timed from
the pixels to the filled cache. Decode: one text token per row against the cache, replayed as a CUDA graph where
the step captures, else eagerly (the table says which; see step_ms in benchmarks/common.py). Cache memory: the bytes
of every tensor the cache holds after the prefill.

Targets (issue "Multimodal SSM"): at least 5x less cache memory at 32K tokens and at least 3x the decode tokens/s.
"""

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import transformers
from transformers import FuyuConfig, FuyuForCausalLM, StaticCache

import ssm_hub
from ssm_hub.conversion.distillation.speed import cache_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
from common import decode_cache_len, result_stem, results_dir, step_ms, wall_seconds

HIDDEN, LAYERS, VOCAB = 1024, 24, 32000
IMAGES, GRID = 16, 16  # images in the prompt, and patches per image side
PATCH = 16  # ours; Fuyu's patch is its config's (30), the token count is the same
IMAGE_TOKEN, ROW_END_TOKEN = VOCAB - 2, VOCAB - 1
PREFILL_CHUNK = 4096


def build(name: str, device: str):
    if name == "fuyu":
        config = FuyuConfig(
            text_config=dict(model_type="persimmon", hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                             num_attention_heads=16, intermediate_size=4096, vocab_size=VOCAB,
                             max_position_embeddings=65536),
            image_token_id=IMAGE_TOKEN)
        model = FuyuForCausalLM(config)
    else:
        config = ssm_hub.SsmHubMultimodalConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, mixer_types=["mamba2"] * LAYERS,
            intermediate_size=2816, mamba_d_state=128, mamba_d_head=64, patch_size=PATCH,
            image_token_id=IMAGE_TOKEN, image_row_end_token_id=ROW_END_TOKEN, tie_word_embeddings=False)
        model = ssm_hub.SsmHubMultimodalForConditionalGeneration(config)
    return model.to(device, torch.bfloat16).eval()


def prompt_ids(batch: int, context: int, device: str) -> torch.Tensor:
    """16 images (rows of GRID image tokens, each row closed by a row-end token), then random text."""
    image = ([IMAGE_TOKEN] * GRID + [ROW_END_TOKEN]) * GRID
    images = torch.tensor(image * IMAGES, device=device)
    if context <= images.numel():
        raise ValueError(f"--contexts must exceed the images' {images.numel()} tokens, got {context}")
    text = torch.randint(1, VOCAB - 2, (batch, context - images.numel()), device=device)
    return torch.cat([images.expand(batch, -1), text], dim=1)


def embed(name: str, model, ids: torch.Tensor) -> torch.Tensor:
    """The prompt's input embeddings with each model's own patch embeddings in place of its image tokens."""
    batch = ids.shape[0]
    if name == "fuyu":
        side = model.config.patch_size
        patches = torch.randn(batch * IMAGES * GRID * GRID, side * side * model.config.num_channels,
                              device=ids.device, dtype=torch.bfloat16)
        embeddings = model.get_input_embeddings()(ids)
        patch_embeddings = model.model.vision_embed_tokens(patches)
        return embeddings.masked_scatter((ids == IMAGE_TOKEN)[..., None], patch_embeddings.to(embeddings.dtype))
    pixels = torch.randn(batch * IMAGES, 3, GRID * PATCH, GRID * PATCH, device=ids.device, dtype=torch.bfloat16)
    embeddings, _ = model.model.embed_inputs(ids, pixels, None)  # no routing: shared projections
    return embeddings


def measure(name: str, model, batch: int, context: int, steps: int, device: str) -> dict:
    cache = StaticCache(config=model.config, max_cache_len=decode_cache_len(context, steps))
    ids = prompt_ids(batch, context, device)
    tokens = torch.randint(1, VOCAB - 2, (batch, 1), device=device)
    with torch.no_grad():
        # Compilation and allocators, on two chunks: the second continues from a state, as the timed chunks do.
        warm = StaticCache(config=model.config, max_cache_len=2 * PREFILL_CHUNK + 8)
        warm_embeddings = embed(name, model, ids)[:, :2 * PREFILL_CHUNK]
        for start in range(0, warm_embeddings.shape[1], PREFILL_CHUNK):
            chunk = warm_embeddings[:, start:start + PREFILL_CHUNK]
            positions = torch.arange(start, start + chunk.shape[1], device=device)[None].expand(batch, -1)
            model(inputs_embeds=chunk, past_key_values=warm, use_cache=True, position_ids=positions, logits_to_keep=1)
        del warm, warm_embeddings

        def prefill_from_pixels():
            embeddings = embed(name, model, ids)
            for start in range(0, context, PREFILL_CHUNK):
                chunk = embeddings[:, start:start + PREFILL_CHUNK]
                positions = torch.arange(start, start + chunk.shape[1], device=device)[None].expand(batch, -1)
                model(inputs_embeds=chunk, past_key_values=cache, use_cache=True, position_ids=positions,
                      logits_to_keep=1)

        prefill, _ = wall_seconds(prefill_from_pixels, device)
        memory = cache_bytes(cache)
        position = torch.full((batch, 1), context, device=device)

        def step():
            model(input_ids=tokens, past_key_values=cache, use_cache=True, position_ids=position, logits_to_keep=1)

        step()  # warm-up outside any graph
        milliseconds, mode = step_ms(step, device, steps)
    return {"cache_bytes": memory, "prefill_tokens_per_second": batch * context / prefill, "step_ms": milliseconds,
            "decode_tokens_per_second": batch / milliseconds * 1e3, "timing": mode}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda", help="cuda; cpu only to try the script on small settings")
    parser.add_argument("--output", type=Path, default=results_dir(__file__))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    names = {"ssm_hub_multimodal (Mamba-2)": "ours", "Fuyu (attention)": "fuyu"}
    models = {label: build(kind, args.device) for label, kind in names.items()}
    rows = []
    for context in args.contexts:
        for batch in args.batches:
            result = {label: measure(names[label], model, batch, context, args.steps, args.device)
                      for label, model in models.items()}
            ours, fuyu = result.values()
            row = {"context": context, "batch": batch, **result,
                   "cache_ratio": fuyu["cache_bytes"] / ours["cache_bytes"],
                   "decode_speedup": ours["decode_tokens_per_second"] / fuyu["decode_tokens_per_second"],
                   "prefill_speedup": ours["prefill_tokens_per_second"] / fuyu["prefill_tokens_per_second"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.device == "cuda":
                torch.cuda.empty_cache()
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    report = {"benchmark": "multimodal_long_context", "device": device, "torch": torch.__version__,
              "transformers": transformers.__version__, "python": platform.python_version(),
              "parameters": {label: sum(p.numel() for p in model.parameters()) for label, model in models.items()},
              "rows": rows}
    args.output.mkdir(parents=True, exist_ok=True)
    stem = result_stem(device)
    (args.output / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    ours, fuyu = list(models)
    lines = [
        f"Long multimodal context ({IMAGES} images of {GRID * GRID} patches, then text), bf16, on {device}: {ours} "
        f"against {fuyu}, hidden {HIDDEN}, {LAYERS} layers", "",
        "| context | batch | our cache (MiB) | Fuyu cache (MiB) | Fuyu / ours | our decode tok/s | Fuyu decode tok/s "
        "| decode speed-up | prefill speed-up | timing (ours / Fuyu) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        a, b = row[ours], row[fuyu]
        lines.append(
            f"| {row['context']} | {row['batch']} | {a['cache_bytes'] / 2**20:.1f} | {b['cache_bytes'] / 2**20:.0f} | "
            f"{row['cache_ratio']:.0f}x | {a['decode_tokens_per_second']:.0f} | {b['decode_tokens_per_second']:.0f} | "
            f"{row['decode_speedup']:.2f}x | {row['prefill_speedup']:.2f}x | {a['timing']} / {b['timing']} |")
    lines += ["", "Command: `python benchmarks/timing/multimodal_long_context.py`"]
    (args.output / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
