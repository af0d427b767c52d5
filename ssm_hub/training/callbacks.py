"""Trainer callbacks of ``ssm-hub train``: tokens/s and peak memory in the logs, and the loss curve as a PNG.

Both are plain transformers ``TrainerCallback`` objects and work with any Trainer.
"""

import math
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

LOSS_CURVE_FILE = "loss_curve.png"


class ThroughputCallback(TrainerCallback):
    """Measures ``tokens_per_second`` (training tokens since the previous log, over the wall time) and, on CUDA,
    ``peak_memory_gib`` (the most memory allocated since the previous log). transformers copies a log into the
    history before callbacks see it, so the Trainer adds these fields itself by calling :meth:`measure` in its
    ``log`` (see ssm_hub.training.run.RecipeTrainer); the callback only starts the clock."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self._last = None  # (time, global_step)

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.perf_counter(), state.global_step)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def measure(self, global_step: int) -> dict:
        if self._last is None:
            return {}
        now = time.perf_counter()
        then, step = self._last
        fields = {}
        if global_step > step and now > then:
            fields["tokens_per_second"] = round((global_step - step) * self.tokens_per_step / (now - then), 1)
        if torch.cuda.is_available():
            fields["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            torch.cuda.reset_peak_memory_stats()
        self._last = (now, global_step)
        return fields


def smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (the first points are not pulled towards zero)."""
    average, out = 0.0, []
    for index, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**index))
    return out


def write_loss_curve(log_history: list[dict], path: Path) -> Path | None:
    """Training loss (raw and smoothed) and eval loss against the step, as a PNG; None when nothing was logged."""
    train = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry and "step" in entry]
    evaluation = [(entry["step"], entry["eval_loss"]) for entry in log_history if "eval_loss" in entry]
    if not train and not evaluation:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axis = pyplot.subplots(figsize=(7, 4))
    if train:
        steps, losses = zip(*train)
        axis.plot(steps, losses, alpha=0.35, label="train loss")
        axis.plot(steps, smoothed(list(losses)), label="train loss (smoothed)")
    if evaluation:
        steps, losses = zip(*evaluation)
        axis.plot(steps, losses, marker="o", label="eval loss")
    axis.set_xlabel("step")
    axis.set_ylabel("loss")
    finite = [loss for _, loss in train + evaluation if math.isfinite(loss)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 20:
        axis.set_yscale("log")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
    return path


class LossCurveCallback(TrainerCallback):
    """Writes ``loss_curve.png`` into the output folder at every save and at the end of training."""

    def _write(self, args, state):
        if state.is_world_process_zero:
            write_loss_curve(state.log_history, Path(args.output_dir) / LOSS_CURVE_FILE)

    def on_save(self, args, state, control, **kwargs):
        self._write(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        self._write(args, state)
