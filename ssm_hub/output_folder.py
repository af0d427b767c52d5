"""Where ssm-hub's commands write: one output-folder policy, shared by every command that writes a folder.

    with claim_output_folder("out", "convert", overwrite=args.overwrite, staged=True) as folder:
        convert_checkpoint(source, folder.staging)     # the files reach out/ only if this returns

- A folder that holds anything is refused before any work unless the command is told what to do with it:
  ``overwrite`` (or, for a command that can continue a run, ``resume``). The refusal names the folder and the flag.
- Each command records the top-level files and folders it wrote in ``MANIFEST``. ``overwrite`` removes only what an
  earlier run of the same command recorded there, never anything else. A model that no such record covers
  (``config.json``, safetensors, ``checkpoint-*``) is refused even with ``overwrite``: removing it is not ours to do,
  and writing beside it would mix two models.
- Staged (``staged=True``): the command writes into a temporary folder inside the output; when it returns, the
  earlier run's entries are removed and the new ones renamed into place, ``config.json`` first out and last in, so
  an interrupted run leaves the earlier result, or no folder that loads, never a half-written model. If the command
  fails, the temporary folder is removed and the output is as it was.
- Unstaged (train, distill, demo: their checkpoints must land in place to be resumed), the manifest is written before
  the work, listing what the folder held, and completed after it, even when the work fails or is interrupted, so
  that what a run wrote is known to the next one. Their final files can still be staged, with
  :meth:`OutputFolder.commit` or :func:`staged_model_folder`, and so can each checkpoint, with
  :func:`move_into_place` (a staging folder's name is ignored by Trainer's search for checkpoints and by the
  manifest, and the next claim removes it).
- The Python functions that write a model folder (ssm_hub.conversion's, called by the commands with the staging
  folder and by Python programs with theirs) stage their writes the same way, without a manifest, so that an
  interrupted call leaves the folder as it was: :func:`staged_model_folder`.

    with staged_model_folder(output_dir) as staging:
        model.save_pretrained(staging)                 # the files reach output_dir only if this returns
"""

import fnmatch
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

MANIFEST = ".ssm-hub-manifest.json"
"""The record of what a command wrote into its output folder: {"command", "state", "before", "written", ...}."""
STAGING_PREFIX = ".ssm-hub-staging-"
MODEL_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json", "adapter_config.json", "checkpoint-*")
"""Entries that make a folder a model or a run: never removed or written over unless a manifest says they are ours."""
_LAST = ("config.json",)  # out first, in last: a folder without it does not load
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json")
"""A model's weights: a new model in a folder replaces the earlier one's (staged_model_folder), never mixes with it."""


def _entries(folder: Path) -> set[str]:
    """The folder's top-level entries, less ssm-hub's own bookkeeping (the manifest, staging folders)."""
    if not folder.is_dir():
        return set()
    return {entry.name for entry in folder.iterdir()
            if entry.name != MANIFEST and not entry.name.startswith(STAGING_PREFIX)}


def read_manifest(folder: str | Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return None  # unreadable: nothing in the folder counts as ours
    return manifest if isinstance(manifest, dict) and "command" in manifest else None


def written_by(folder: str | Path, command: str) -> set[str]:
    """The entries of ``folder`` that an earlier run of ``command`` wrote (an interrupted run: everything that
    appeared after it started)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None or manifest["command"] != command:
        return set()
    present = _entries(folder)
    written = set(manifest.get("written", []))
    if manifest.get("state") != "complete":
        written |= present - set(manifest.get("before", []))
    return written & present


def write_json_atomically(path: Path, value) -> None:
    """``value`` as JSON at ``path``, through a temporary name and a rename: a reader sees the old file or the new."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(value, file, indent=1)
            file.write("\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _remove(folder: Path, names) -> None:
    for name in sorted(names, key=lambda name: (name not in _LAST, name)):
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def move_into_place(staging: Path, folder: Path, replacing=()) -> list[str]:
    """Rename every entry of ``staging`` (a folder inside ``folder``, so on the same file system) into ``folder``,
    replacing the entries of the same names (and removing those named in ``replacing``), then remove ``staging``;
    return the names. ``config.json`` goes out first and comes in last, so that a folder interrupted on the way
    holds the earlier files, or no model that loads, never a half-written one."""
    new = sorted(entry.name for entry in staging.iterdir())
    _remove(folder, {*new, *replacing})
    for name in sorted(new, key=lambda name: (name in _LAST, name)):
        os.replace(staging / name, folder / name)
    staging.rmdir()
    return new


@contextmanager
def staged_into(folder: Path, commit=move_into_place):
    """A temporary folder inside ``folder``, whose entries are moved into ``folder`` by ``commit(staging, folder)``
    (:func:`move_into_place`) when the block returns; removed, with whatever was written in it, if the block raises."""
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    commit(staging, folder)


@contextmanager
def _created_if_missing(folder: Path):
    """Create ``folder`` (and its parents) if it does not exist; if the block raises, remove it again when this
    created it and it is still empty, so that a failed command leaves no trace."""
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        if created and not any(folder.iterdir()):
            folder.rmdir()
        raise


def _replace_model(staging: Path, folder: Path) -> list[str]:
    """:func:`move_into_place`, also removing the weights of the model that ``folder`` held: an earlier model's
    shards and index beside a new single file (or the reverse) would mix two models."""
    earlier = {name for name in _entries(folder) if any(fnmatch.fnmatch(name, p) for p in WEIGHT_PATTERNS)}
    return move_into_place(staging, folder, replacing=earlier)


@contextmanager
def staged_model_folder(folder: str | Path):
    """For a Python function that writes a model folder: a staging folder inside ``folder`` (created if need be),
    whose entries are moved into ``folder`` when the block returns, replacing the files of the same names and the
    weights of the model that was there; if the block raises, the staging folder is removed with what was written
    in it, and so is ``folder`` if it was created for this call. An interrupted or failed call leaves ``folder`` as
    it was, never a half-written model that loads. (The command line claims its output first:
    :func:`claim_output_folder`.)"""
    folder = Path(folder)
    with _created_if_missing(folder), staged_into(folder, commit=_replace_model) as staging:
        yield staging


def _listing(names, limit: int = 4) -> str:
    """Up to ``limit`` names, those of a model or a run first."""
    names = sorted(names, key=lambda name: (not any(fnmatch.fnmatch(name, p) for p in MODEL_PATTERNS), name))
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_output_folder(folder: str | Path, command: str, overwrite: bool = False, resume: bool = False,
                        overwrite_flag: str = "--overwrite", resume_flag: str | None = None) -> None:
    """Raise ValueError, naming the folder and the way out, unless ``command`` may write into ``folder`` (module
    docstring). Writes nothing: commands call it before any work (and again through :func:`claim_output_folder`)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"the output {folder} is a file, not a folder: choose a folder")
    present = _entries(folder)
    if not present:
        return
    ours = written_by(folder, command)
    if resume:
        if not ours:
            raise ValueError(f"{folder} holds no run of ssm-hub {command} to resume (no {MANIFEST} of one): "
                             f"leave out {resume_flag or 'resume'}, or give the folder an earlier run wrote")
    elif not overwrite:
        count = f"{len(present)} {'entry' if len(present) == 1 else 'entries'}"
        what = f"an earlier ssm-hub {command} run" if ours == present else count
        resuming = f", {resume_flag} to continue its run" if resume_flag and ours else ""
        raise ValueError(f"the output folder {folder} is not empty (it holds {what}: {_listing(present)}): give "
                         f"{overwrite_flag} to replace what an earlier ssm-hub {command} wrote there (nothing else "
                         f"is removed){resuming}, or choose an empty folder")
    foreign = sorted(name for name in present - ours if any(fnmatch.fnmatch(name, p) for p in MODEL_PATTERNS))
    if foreign:
        raise ValueError(f"{folder} holds {_listing(foreign)}, which no earlier ssm-hub {command} recorded writing "
                         f"(no {MANIFEST} lists them); ssm-hub never removes or writes over files it did not write: "
                         f"move them away or choose another folder")


class OutputFolder:
    """A claimed output folder (:func:`claim_output_folder`): ``path``, and ``staging`` where a staged command
    writes."""

    def __init__(self, path: Path, command: str, before: set[str], record: dict):
        self.path, self.command, self.before, self.record = path, command, before, record
        self.staging: Path | None = None

    def ours(self) -> set[str]:
        """The entries this command (this run or the earlier ones it continues) wrote."""
        return _entries(self.path) - self.before

    def write_manifest(self, state: str) -> None:
        write_json_atomically(self.path / MANIFEST, {
            "command": self.command, "state": state, "before": sorted(self.before),
            "written": sorted(self.ours()), **self.record})

    def commit(self, staging: Path, replace_all: bool = False) -> list[str]:
        """Move ``staging``'s entries into the folder and return their names. Entries of the same name that this
        command wrote are replaced (with ``replace_all``, every entry it wrote is removed first); one that it did not
        write stops the move before anything moves, naming it, and ``staging`` is left where it is."""
        new = sorted(entry.name for entry in staging.iterdir())
        clashing = sorted(set(new) & (_entries(self.path) - self.ours()))
        if clashing:
            raise ValueError(f"{self.path} holds {_listing(clashing)}, which ssm-hub {self.command} did not write and "
                             f"will not replace: move them away; the new files are in {staging}")
        self.write_manifest("running")  # from here on, anything new in the folder is known to be ours
        if replace_all:
            _remove(self.path, self.ours())
        move_into_place(staging, self.path)
        self.write_manifest("complete")
        return new

    @contextmanager
    def staged(self, replace_all: bool = False):
        """A temporary folder inside the output, committed (:meth:`commit`) when the block returns and removed if
        it raises."""
        with staged_into(self.path, commit=lambda staging, _: self.commit(staging, replace_all)) as staging:
            yield staging


@contextmanager
def claim_output_folder(folder: str | Path, command: str, overwrite: bool = False, resume: bool = False,
                        staged: bool = False, record: dict | None = None, overwrite_flag: str = "--overwrite",
                        resume_flag: str | None = None):
    """Check ``folder`` (:func:`check_output_folder`), remove what an earlier run of ``command`` wrote there when
    ``overwrite``, and yield an :class:`OutputFolder`; the manifest (with ``record`` added) tells what this run
    wrote once the block ends, however it ends. ``staged``: the command writes into ``OutputFolder.staging``,
    moved into place only when the block returns (module docstring)."""
    folder = Path(folder)
    check_output_folder(folder, command, overwrite, resume, overwrite_flag, resume_flag)
    with _created_if_missing(folder):
        _remove(folder, {entry.name for entry in folder.iterdir() if entry.name.startswith(STAGING_PREFIX)})
        earlier = written_by(folder, command)
        if overwrite and not resume and not staged:
            _remove(folder, earlier)  # a staged command removes them only once its new files are ready
            earlier = set()
        claimed = OutputFolder(folder, command, _entries(folder) - earlier, dict(record or {}))
        if staged:
            with claimed.staged(replace_all=True) as staging:
                claimed.staging = staging
                yield claimed
            return
        had_manifest = (folder / MANIFEST).is_file()
        claimed.write_manifest("running")
        try:
            yield claimed
        except BaseException:
            if claimed.ours() or had_manifest:
                claimed.write_manifest("complete")
            else:  # a run that failed before writing anything leaves nothing behind
                (folder / MANIFEST).unlink(missing_ok=True)
            raise
        claimed.write_manifest("complete")
