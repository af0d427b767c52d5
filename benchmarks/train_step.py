"""The timed training step the benchmarks share: forward under bf16 autocast, loss, backward and a fused AdamW step,
on one CUDA GPU."""

import statistics
import time

import torch


def time_training_steps(model, input_ids: torch.Tensor, warmup: int, steps: int, run=None) -> tuple[float, float]:
    """(median seconds of the steps after ``warmup``, the last loss) of language-model training on ``input_ids``
    (labels = inputs). ``run`` calls the model (default: the model itself; a ``torch.compile`` of it, say)."""
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
