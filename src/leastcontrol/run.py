"""What every training loop shares: the checkpoint it resumes from and saves to, its progress bar,
and the result it writes.

``leastcontrol train`` (epochs of batches) and ``leastcontrol meta`` (meta-steps over task batches)
differ in their loops, not in this: a run is identified by its format and configuration; an
existing checkpoint is continued only on request and only by a run with the same settings; a
checkpoint is written atomically with the format and configuration beside the loop's own state;
the result JSON is written atomically at the end.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional

from tqdm.auto import tqdm

from .atomic import write_json
from .checkpoint import resume_state, save_checkpoint


class Run:
    """One training run's checkpoint, progress and result.

    Args:
        fmt: the checkpoint format (``TRAIN_FORMAT``, ``META_FORMAT``).
        config: the run's settings as plain data, saved in every checkpoint.
        resume_keys: the settings (dotted paths) a resumed run must share with the checkpoint.
        checkpoint: where to save (``None``: never). resume: continue the run saved there.
        json_out: where the result goes (``None``: nowhere). progress: progress bars.

    Attributes:
        state: the checkpoint's state to continue from, or ``None`` for a fresh run.

    Raises:
        CheckpointError: a checkpoint that exists without ``resume``, is unreadable, or belongs
            to a run with other settings.
    """

    def __init__(self, fmt: str, config: Mapping[str, Any], resume_keys: Iterable[str], *,
                 checkpoint: Optional[str] = None, resume: bool = False, json_out: Optional[str] = None,
                 progress: bool = True):
        self.fmt, self.config, self.progress = fmt, dict(config), progress
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.json_out = json_out
        self.state: Optional[Dict[str, Any]] = resume_state(self.checkpoint, resume, fmt, self.config, resume_keys)

    def bar(self, iterable, **options):
        """A progress bar over ``iterable`` (silent without ``progress``)."""
        return tqdm(iterable, disable=not self.progress, dynamic_ncols=True, **options)

    def save(self, **state) -> None:
        """Write a checkpoint of the loop's ``state`` (with the format and settings), atomically."""
        if self.checkpoint is not None:
            save_checkpoint(self.checkpoint, {"format": self.fmt, "config": self.config, **state})

    def finish(self, result: Dict[str, Any]) -> Dict[str, Any]:
        """Write ``result`` to ``json_out`` (atomically) and return it."""
        if self.json_out:
            write_json(self.json_out, result)
        return result
