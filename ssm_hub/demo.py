"""The main job, ``ssm-hub demo``: build a small Mamba-2 through AutoModelForCausalLM, train it for about a
minute on the CPU on English text that ships with Python (``pydoc_data.topics``), save it, reload it, check the
reload is exact, generate, and report what happened. No network, no arguments needed.

    ssm-hub demo                      # ~1 minute, writes ./ssm-hub-demo
    ssm-hub demo --seconds 10 --output /tmp/demo
"""

import math
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import ssm_hub  # noqa: F401  (registers ssm_hub_mamba2 with the Auto classes)
from ssm_hub.training.data import train_tokenizer

PROMPT = "The import statement"


def load_corpus() -> str:
    """About 465k characters of Python's own documentation, in English."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def make_blocks(token_ids: list[int], block_size: int) -> torch.Tensor:
    usable = len(token_ids) // block_size * block_size
    return torch.tensor(token_ids[:usable]).view(-1, block_size)


@torch.no_grad()
def mean_loss(model, blocks: torch.Tensor, batch_size: int) -> float:
    model.eval()
    losses = [model(input_ids=b, labels=b, use_cache=False).loss.item() for b in blocks.split(batch_size)]
    model.train()
    return sum(losses) / len(losses)


def run_demo(output_dir: str = "ssm-hub-demo", train_seconds: float = 60.0, seed: int = 0, log=print) -> dict:
    torch.manual_seed(seed)
    started = time.perf_counter()
    text = load_corpus()
    tokenizer = train_tokenizer(text.split("\n\n"), vocab_size=2048)
    token_ids = tokenizer(text)["input_ids"]
    blocks = make_blocks(token_ids, block_size=128)
    blocks = blocks[torch.randperm(len(blocks))]
    held_out, train_blocks = blocks[:32], blocks[32:]
    log(f"corpus: {len(text):,} characters of pydoc_data.topics -> {len(token_ids):,} tokens "
        f"(byte-level BPE, vocabulary {len(tokenizer)}), {len(train_blocks)} training blocks of 128")

    config = AutoConfig.for_model(
        "ssm_hub_mamba2", vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=4, state_size=32,
        head_dim=32, chunk_size=64, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = AutoModelForCausalLM.from_config(config)
    log(f"model: {type(model).__name__} ({config.model_type}), {model.num_parameters():,} parameters, "
        f"{config.num_hidden_layers} layers x {config.num_heads} heads x {config.head_dim}, state {config.state_size}")

    batch_size, peak_lr, warmup = 16, 3e-3, 20
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.1, betas=(0.9, 0.95))
    loss_before = mean_loss(model, held_out, batch_size)
    log(f"held-out loss before training: {loss_before:.3f} (perplexity {math.exp(loss_before):.0f})")
    model.train()
    step, tokens_seen, train_start = 0, 0, time.perf_counter()
    while time.perf_counter() - train_start < train_seconds:
        rows = torch.randint(len(train_blocks), (batch_size,))
        batch = train_blocks[rows]
        elapsed = (time.perf_counter() - train_start) / train_seconds
        lr = peak_lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(elapsed, 1.0))))
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += batch.numel()
        if step % 25 == 0:
            log(f"  step {step:4d}  loss {loss.item():.3f}  lr {lr:.2e}  {time.perf_counter() - train_start:5.1f}s")
    train_time = time.perf_counter() - train_start
    loss_after = mean_loss(model, held_out, batch_size)
    log(f"trained {step} steps, {tokens_seen:,} tokens in {train_time:.0f}s ({tokens_seen / train_time:,.0f} tokens/s)")
    log(f"held-out loss after training: {loss_after:.3f} (perplexity {math.exp(loss_after):.0f})")

    output_path = Path(output_dir)
    model.save_pretrained(output_path)
    tokenizer.save_pretrained(output_path)
    reloaded = AutoModelForCausalLM.from_pretrained(output_path).eval()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(output_path)
    model.eval()
    with torch.no_grad():
        reload_exact = torch.equal(model(held_out[:2]).logits, reloaded(held_out[:2]).logits)
    log(f"saved to {output_path}/ ({', '.join(sorted(p.name for p in output_path.iterdir()))}); "
        f"reloaded logits identical: {reload_exact}")

    prompt = reloaded_tokenizer(PROMPT, return_tensors="pt")
    generated = reloaded.generate(**prompt, max_new_tokens=40, do_sample=False, repetition_penalty=1.2)
    completion = reloaded_tokenizer.decode(generated[0], skip_special_tokens=True)
    log(f"greedy generation from the reloaded model:\n  {completion!r}")
    log(f"done in {time.perf_counter() - started:.0f}s")
    return {
        "steps": step, "tokens": tokens_seen, "loss_before": loss_before, "loss_after": loss_after,
        "reload_exact": reload_exact, "completion": completion, "output_dir": str(output_path),
    }
