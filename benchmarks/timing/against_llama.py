"""ssm_hub against a transformers Llama of the same size, on the paths users call by default, on one CUDA GPU.

    python benchmarks/timing/against_llama.py                  # everything
    python benchmarks/timing/against_llama.py --only generate  # or: --only train
    python benchmarks/timing/against_llama.py --quick          # small shapes and few repeats, to try the script

Writes benchmarks/results/against_llama/<device>[_quick][_generate | _train[_eager | _compiled]].{json,md}.

The models, in bf16 for generation and fp32 weights under bf16 autocast for training:
- ours: the 130M Mamba-2 of benchmarks/common.py (hidden 768, 24 layers, state 128);
- the baseline a user would otherwise pick: a transformers LlamaForCausalLM with hidden 768, 12 layers, 12 heads,
  intermediate 2048, tied embeddings and sdpa, on the same vocabulary;
- for long prompts, ours is the same stack with one layer in four attention (``ssm_hub_hybrid``: 18 Mamba-2 and 6
  attention layers of 12 heads).

Generation: ``model.generate(prompt, max_new_tokens=N)`` and nothing else (the "default" rows), then with
``cache_implementation="static"``, and ours with ``disable_compile=True`` (transformers' own loop, eager). The
models' generation configs have no EOS, so every call makes N tokens. Each setting is called once untimed (its
wall time is reported: that call compiles or captures), then timed over repeats; tokens/s = batch * N / median
wall time of a call, prefill included. Training: forward, loss, backward and a fused AdamW step at the given
batch x length, eager and under ``torch.compile(model)`` (inductor, default mode; its compilation happens in the
warm-up steps); tokens/s from the median step after warm-up, and peak memory.
"""

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import ssm_hub

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for common.py
from common import (OURS, build_mamba2_130m, free_memory, mamba2_130m_fields, result_stem, results_dir,
                    time_training_steps, wall_seconds)

VOCAB_SIZE = 50288
LLAMA = "transformers Llama"
HYBRID = "ssm_hub hybrid (1 attention layer in 4)"


def build(name: str) -> torch.nn.Module:
    if name == OURS:
        model = build_mamba2_130m(OURS, VOCAB_SIZE)
    elif name == LLAMA:
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=VOCAB_SIZE, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
            num_key_value_heads=12, intermediate_size=2048, tie_word_embeddings=True, max_position_embeddings=65536,
            attn_implementation="sdpa"))
    elif name == HYBRID:
        fields = mamba2_130m_fields(VOCAB_SIZE)
        layers = fields["num_hidden_layers"]
        model = ssm_hub.SsmHubHybridForCausalLM(ssm_hub.SsmHubHybridConfig(
            vocab_size=VOCAB_SIZE, hidden_size=fields["hidden_size"], num_hidden_layers=layers,
            mixer_types=["attention" if i % 4 == 3 else "mamba2" for i in range(layers)], ffn_types=["none"] * layers,
            num_attention_heads=12, num_key_value_heads=12, mamba_d_state=fields["state_size"],
            mamba_d_head=fields["head_dim"], mamba_chunk_size=fields["chunk_size"], tie_word_embeddings=True,
            max_position_embeddings=65536))
    else:
        raise ValueError(name)
    # No EOS: every call generates exactly max_new_tokens, so the candidates do the same work.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def time_generate(model, batch: int, prompt_len: int, new_tokens: int, repeats: int, **kwargs) -> dict:
    prompt = torch.randint(1, VOCAB_SIZE, (batch, prompt_len), device="cuda")

    def call() -> float:
        seconds, out = wall_seconds(lambda: model.generate(prompt, max_new_tokens=new_tokens, **kwargs))
        assert out.shape == (batch, prompt_len + new_tokens), out.shape
        return seconds

    first = call()
    seconds = statistics.median(call() for _ in range(repeats))
    return {"first_call_seconds": first, "call_seconds": seconds, "tokens_per_second": batch * new_tokens / seconds}


def generation_rows(args) -> list[dict]:
    # (row, ours, our generate kwargs, Llama's generate kwargs or None, batch, prompt length)
    settings = [(f"default, batch {b}", OURS, {}, {}, b, args.prompt_len) for b in args.batches]
    settings += [
        ("cache_implementation='static', batch 1", OURS, {"cache_implementation": "static"},
         {"cache_implementation": "static"}, 1, args.prompt_len),
        ("transformers' loop (disable_compile=True), batch 1", OURS, {"disable_compile": True}, None, 1,
         args.prompt_len),
        (f"default, batch 1, prompt {args.long_prompt}", HYBRID, {}, {}, 1, args.long_prompt),
    ]
    rows = []
    models = {}
    for row, ours, our_kwargs, llama_kwargs, batch, prompt_len in settings:
        result = {"row": row, "batch": batch, "prompt_len": prompt_len, "new_tokens": args.new_tokens}
        for name, kwargs in ((ours, our_kwargs), (LLAMA, llama_kwargs)):
            if kwargs is None:
                continue
            if name not in models:
                models[name] = build(name).to("cuda", torch.bfloat16).eval()
                result.setdefault("parameters", {})[name] = models[name].num_parameters()
            result[name] = time_generate(models[name], batch, prompt_len, args.new_tokens, args.repeats, **kwargs)
        if LLAMA in result:
            result["ratio"] = result[ours]["tokens_per_second"] / result[LLAMA]["tokens_per_second"]
        result["ours"] = ours
        rows.append(result)
        print(json.dumps(result), flush=True)
    return rows


def time_training(name: str, batch: int, seq_len: int, warmup: int, steps: int, compiled: bool) -> dict:
    free_memory()
    torch._dynamo.reset()
    result = {}
    model = None
    try:
        model = build(name).cuda().train()
        input_ids = torch.randint(0, VOCAB_SIZE, (batch, seq_len), device="cuda")
        median, _ = time_training_steps(model, input_ids, warmup, steps, torch.compile(model) if compiled else None)
        result.update(status="ok", step_seconds=median, tokens_per_second=batch * seq_len / median,
                      peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30)
    except torch.cuda.OutOfMemoryError:
        result.update(status="out of memory", peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30)
    del model
    free_memory()
    return result


def training_rows(args) -> list[dict]:
    rows = []
    for (batch, seq_len), compiled in ((shape, compiled) for compiled in args.train_compiled
                                       for shape in args.train_shapes):
        mode = "torch.compile(model)" if compiled else "eager"
        result = {"row": f"training step, B{batch} x L{seq_len}, {mode}", "batch": batch, "seq_len": seq_len,
                  "ours": OURS}
        for name in (OURS, LLAMA):
            result[name] = time_training(name, batch, seq_len, args.warmup, args.steps, compiled)
        if all(result[name]["status"] == "ok" for name in (OURS, LLAMA)):
            result["ratio"] = result[OURS]["tokens_per_second"] / result[LLAMA]["tokens_per_second"]
        rows.append(result)
        print(json.dumps(result), flush=True)
    return rows


def table(rows: list[dict], device: str) -> str:
    lines = [f"ssm_hub against a same-size transformers Llama (sdpa) on {device}; ratio = ours / Llama tokens/s", "",
             "| path | ours | ours: tokens/s (first call s) | Llama: tokens/s (first call s) | ratio |",
             "|---|---|---|---|---|"]
    for row in rows:
        cells = []
        for name in (row["ours"], LLAMA):
            result = row.get(name)
            if result is None:
                cells.append("-")
            elif "first_call_seconds" in result:
                cells.append(f"{result['tokens_per_second']:,.0f} ({result['first_call_seconds']:.1f} s)")
            elif result["status"] == "ok":
                cells.append(f"{result['tokens_per_second']:,.0f}, {result['peak_memory_gib']:.1f} GiB")
            else:
                cells.append(f"{result['status']}, {result['peak_memory_gib']:.1f} GiB")
        ratio = f"**{row['ratio']:.2f}x**" if "ratio" in row else "-"
        lines.append(f"| {row['row']} | {row['ours']} | {cells[0]} | {cells[1]} | {ratio} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["generate", "train"])
    parser.add_argument("--train-modes", nargs="+", choices=["eager", "compiled"], default=["eager", "compiled"])
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats")
    parser.add_argument("--output", type=Path, default=results_dir(__file__))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    quick = args.quick
    args.batches = [1, 4] if quick else [1, 16, 64]
    args.prompt_len, args.new_tokens, args.long_prompt = (64, 32, 1024) if quick else (512, 256, 32768)
    args.repeats, args.warmup, args.steps = (1, 1, 2) if quick else (3, 2, 5)
    args.train_shapes = [(2, 512)] if quick else [(8, 2048), (2, 16384)]
    args.train_compiled = [mode == "compiled" for mode in args.train_modes]
    rows = []
    if args.only != "train":
        rows += generation_rows(args)
        free_memory()
    if args.only != "generate":
        rows += training_rows(args)
    device = torch.cuda.get_device_name()
    report = {"benchmark": "against_llama", "device": device, "torch": torch.__version__,
              "transformers": transformers.__version__, "python": platform.python_version(), "quick": quick,
              "rows": rows}
    args.output.mkdir(parents=True, exist_ok=True)
    stem = result_stem(device, "quick" if quick else "", args.only or "",
                       args.train_modes[0] if args.only == "train" and len(args.train_modes) == 1 else "")
    (args.output / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.output / f"{stem}.md").write_text(table(rows, device))
    print(table(rows, device))


if __name__ == "__main__":
    main()
