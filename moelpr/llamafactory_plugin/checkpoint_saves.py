"""A ``checkpoint-N`` of a moelpr run is resumed from only once every file of it is written, and a full disk during
its save is one line.

Transformers writes ``checkpoint-N`` file by file, and LLaMA-Factory resumes a run started again with the same
command from the highest-numbered one (transformers' ``get_last_checkpoint``). A run killed inside a save leaves a
directory with the model files but no optimizer state, which would resume silently as another run. So a moelpr run
marks a checkpoint as being saved (a file beside it, :func:`saving_marker`) before it writes anything, and removes
the mark once every process has written its files; resuming skips marked checkpoints. The mark sits beside the
directory, not in it, so the directory never exists unmarked before it is complete. Runs of other fine-tuning types
write no mark, so they resume as LLaMA-Factory's own do.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from transformers.trainer_utils import sort_checkpoints

from moelpr.errors import MoELPRUserError

SAVING_SUFFIX = ".moelpr-saving"
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class CheckpointSaveError(MoELPRUserError):
    """A checkpoint that could not be written for want of disk space."""


def saving_marker(checkpoint_dir: str | os.PathLike) -> Path:
    """The file that says ``checkpoint_dir`` is being (or was being, when its run stopped) written."""
    path = Path(checkpoint_dir)
    return path.with_name(path.name + SAVING_SUFFIX)


def is_incomplete(checkpoint_dir: str | os.PathLike) -> bool:
    return saving_marker(checkpoint_dir).exists()


def last_complete_checkpoint(folder: str | os.PathLike) -> str | None:
    """The highest-numbered ``checkpoint-N`` in ``folder`` whose save finished (``None`` when there is none)."""
    complete = [path for path in sort_checkpoints(str(folder)) if not is_incomplete(path)]
    return complete[-1] if complete else None


def wrap_get_last_checkpoint(_get_last_checkpoint: Callable[[str], str | None]) -> Callable[[str], str | None]:
    return last_complete_checkpoint


@contextmanager
def marked_as_saving(checkpoint_dir: Path, main_process: bool, wait_for_everyone: Callable[[], None]) -> Iterator[None]:
    """Mark ``checkpoint_dir`` around its save (every process enters it; the main one writes the mark). A save that
    fails for want of space removes what it wrote and raises :class:`CheckpointSaveError`; any other failure, or a
    kill, leaves the directory marked."""
    marker = saving_marker(checkpoint_dir)
    if main_process:
        interrupted = marker.exists()
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        if interrupted:  # an earlier run stopped inside this very save: start it afresh
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
    wait_for_everyone()  # every process writes files of its own (RNG states) into the directory
    try:
        yield
    except OSError as error:
        if error.errno not in DISK_FULL_ERRNOS:
            raise
        if main_process:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
            marker.unlink(missing_ok=True)
        last = last_complete_checkpoint(checkpoint_dir.parent)
        resume = f"{last} is the last complete checkpoint" if last else "no checkpoint of this run is complete"
        raise CheckpointSaveError(
            f"no space left on the device while saving {checkpoint_dir} ({error.strerror}); the incomplete checkpoint "
            f"was removed and {resume}. Free some space and run the same command again to resume."
        ) from None
    wait_for_everyone()
    if main_process:
        marker.unlink()
