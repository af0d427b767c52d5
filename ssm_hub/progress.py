"""What a long command is doing, as it goes: status lines for ``ssm-hub train`` and ``ssm-hub distill`` (reading and
packing the data, training the tokenizer, each distillation stage, the evaluations, the speed timing), with the
counts that say how much there is, and bars for the loops that take a while.

    from ssm_hub.progress import progress_bar, status
    status(f"data: {len(documents):,} documents")
    for begin in progress_bar(range(0, rows, batch_size), "evaluating"):
        ...

Status lines are records of the ``ssm_hub.progress`` logger at INFO level, so a program that imports ssm_hub shows
them only if it configures logging, as with any library; the command line shows them on stderr, each with the time
since the command started (:func:`show_status`). Bars are transformers' tqdm, hidden as Trainer's are
(``transformers.utils.logging.disable_progress_bar()``, ``HF_HUB_DISABLE_PROGRESS_BARS=1``). The quiet mode is
transformers' too: with its verbosity above warnings (``TRANSFORMERS_VERBOSITY=error``), which turns Trainer's bars
off, these lines and bars are off as well. Under a distributed launcher only the first process reports, as Trainer
does. Showing and writing status lines imports nothing beyond the standard library, so that a command's first line
("ssm-hub train: loading torch and transformers") comes before those load.
"""

import logging
import os
import sys
import time

logger = logging.getLogger("ssm_hub.progress")


def _reports() -> bool:
    """Whether this process shows progress: the first one (or the only one), unless transformers is made quiet."""
    return os.environ.get("RANK", "0") == "0" and _transformers_verbosity() <= logging.WARNING


def _transformers_verbosity() -> int:
    """transformers' verbosity once it is imported; before, the level it starts from: TRANSFORMERS_VERBOSITY's (a
    logging level's name in lower case), or warnings without it or for a name it does not know, as transformers
    does."""
    transformers_logging = sys.modules.get("transformers.utils.logging")
    if transformers_logging is not None:
        return transformers_logging.get_verbosity()
    name = os.environ.get("TRANSFORMERS_VERBOSITY", "")
    level = logging.getLevelName(name.upper()) if name.islower() else None
    return level if isinstance(level, int) else logging.WARNING


def status(message: str) -> None:
    """One status line: ``"<what>: <what is happening, with counts>"``."""
    logger.info(message)


def progress_bar(iterable, description: str, total: int | None = None):
    """``iterable`` with a bar (transformers' tqdm) that disappears when the loop ends, the status lines staying."""
    from transformers.utils.logging import tqdm

    return tqdm(iterable, desc=description, total=total, leave=False, disable=not _reports())


class _StatusLines(logging.Handler):
    """Each record as one line on stderr, after the minutes and seconds since :func:`show_status` ("[0:03] data:
    ..."; not "ssm-hub: ...", which starts the one line of an error). sys.stderr is looked up at each line, so that a
    stream replaced after the command started (a test's capture) is written to."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.started = time.perf_counter()

    def emit(self, record: logging.LogRecord) -> None:
        minutes, seconds = divmod(int(time.perf_counter() - self.started), 60)
        try:
            sys.stderr.write(f"[{minutes}:{seconds:02d}] {record.getMessage()}\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def show_status() -> None:
    """Show the status lines on stderr from now on (the command line calls this once per command); the clock starts
    again at each call."""
    for handler in logger.handlers:
        if isinstance(handler, _StatusLines):
            logger.removeHandler(handler)
    if _reports():
        logger.addHandler(_StatusLines())
        logger.setLevel(logging.INFO)
