"""What a student gains over its teacher at long context: prefill and decode tokens/s and the cache's memory, each
model on transformers' StaticCache.

    from ssm_hub.conversion.distillation.speed import speed_table
    rows = speed_table(teacher, student, contexts=[2048, 8192, 32768])

The prompt is prefilled in chunks of at most 4096 tokens (the activations of a 32K prompt stay small), then decode
steps of one token per row are timed against the filled cache (after an untimed warm-up of both on a small
cache), eagerly (as ``generate`` runs them without
compilation). The cache's memory is the bytes of every tensor it holds after the prefill (keys and values; conv and
recurrent states). Timings synchronise the GPU when there is one.
"""

import time

import torch
from transformers import StaticCache

from ssm_hub.progress import status

PREFILL_CHUNK = 4096
DECODE_STEPS = 16  # timed decode steps after the prompt, each one token past the context


def cache_bytes(cache) -> int:
    """Bytes of every tensor a transformers cache holds: attention layers' keys and values, SSM layers' conv and
    recurrent states."""
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            total += tensor.numel() * tensor.element_size() if isinstance(tensor, torch.Tensor) else 0
        for states in (getattr(layer, "conv_states", {}), getattr(layer, "recurrent_states", {})):
            total += sum(t.numel() * t.element_size() for t in states.values() if t is not None)
    return total


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_speed(model, context: int, batch: int = 1, decode_steps: int = DECODE_STEPS) -> dict:
    """{"context", "batch", "prefill_tokens_per_second", "decode_tokens_per_second", "cache_bytes"} for ``model``
    (in eval mode) on random token ids."""
    device = next(model.parameters()).device

    def positions(start: int, length: int) -> torch.Tensor:
        # Given, not left to the cache: a model without attention layers cannot read them from its cache.
        return torch.arange(start, start + length, device=device)[None].expand(batch, -1)

    warm_up = StaticCache(config=model.config, max_cache_len=16)  # kernel compilation and allocators, untimed
    model(input_ids=torch.ones(batch, 8, dtype=torch.long, device=device), cache=warm_up, use_cache=True,
          position_ids=positions(0, 8), logits_to_keep=1)
    model(input_ids=torch.ones(batch, 1, dtype=torch.long, device=device), cache=warm_up, use_cache=True,
          position_ids=positions(8, 1), logits_to_keep=1)
    cache = StaticCache(config=model.config, max_cache_len=context + decode_steps + 1)
    prompt = torch.randint(1, model.config.vocab_size, (batch, context), device=device)
    token = torch.randint(1, model.config.vocab_size, (batch, 1), device=device)
    _synchronize(device)
    started = time.perf_counter()
    for start, chunk in zip(range(0, context, PREFILL_CHUNK), prompt.split(PREFILL_CHUNK, dim=1)):
        model(input_ids=chunk, cache=cache, use_cache=True, position_ids=positions(start, chunk.shape[1]),
              logits_to_keep=1)
    _synchronize(device)
    prefill = time.perf_counter() - started
    memory = cache_bytes(cache)
    started = time.perf_counter()
    for step in range(decode_steps):
        model(input_ids=token, cache=cache, use_cache=True, position_ids=positions(context + step, 1),
              logits_to_keep=1)
    _synchronize(device)
    decode = time.perf_counter() - started
    return {"context": context, "batch": batch, "prefill_tokens_per_second": batch * context / prefill,
            "decode_tokens_per_second": batch * decode_steps / decode, "cache_bytes": memory}


def longest_context(*models, decode_steps: int = DECODE_STEPS) -> int | None:
    """The longest context :func:`measure_speed` can time on all of ``models``: learned absolute positions (GPT-2's,
    or an ssm_hub hybrid's ``absolute_position_embeddings``) end at ``max_position_embeddings``, and the decode steps
    go past the context; None where no model has such a limit (RoPE and SSM layers have none)."""
    limits = [model.config.max_position_embeddings - decode_steps for model in models
              if getattr(model.config, "absolute_position_embeddings", False) or model.config.model_type == "gpt2"]
    return min(limits) if limits else None


def speed_table(teacher, student, contexts: list[int], batch: int = 1) -> list[dict]:
    """One row per context: the teacher's and the student's measurements and the student's ratios to the teacher
    (``decode_speedup``, ``prefill_speedup``, ``cache_ratio``)."""
    rows = []
    for context in contexts:
        measured = {}
        for name, model in (("teacher", teacher), ("student", student)):
            status(f"speed: the {name}'s prefill and {DECODE_STEPS} decode steps at a context of {context:,} tokens")
            measured[name] = measure_speed(model.eval(), context, batch)
        teacher_row, student_row = measured["teacher"], measured["student"]
        rows.append({"context": context, "batch": batch, **measured,
                     "prefill_speedup": student_row["prefill_tokens_per_second"] / teacher_row["prefill_tokens_per_second"],
                     "decode_speedup": student_row["decode_tokens_per_second"] / teacher_row["decode_tokens_per_second"],
                     "cache_ratio": student_row["cache_bytes"] / teacher_row["cache_bytes"]})
        if next(student.parameters()).is_cuda:
            torch.cuda.empty_cache()
    return rows
