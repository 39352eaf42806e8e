"""What every training loop shares: its outputs, the checkpoint it resumes from and saves to, its
progress bar, its warnings and the result it writes.

``leastcontrol train`` (epochs of batches) and ``leastcontrol meta`` (meta-steps over task batches)
differ in their loops, not in this: the outputs are checked before any work; a run is identified by
its format and configuration; an existing checkpoint is continued only on request and only by a run
with the same settings; a checkpoint is written atomically with the format and configuration beside
the loop's own state; warnings go to the user as they happen and into the result; the result JSON
is written at the end, and if it cannot be, the error carries the result.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional

from tqdm.auto import tqdm

from .atomic import check_outputs, write_json
from .checkpoint import resume_state, save_checkpoint
from .errors import OutputError, ResultNotWrittenError


_PACKAGE = Path(__file__).resolve().parent


class RunWarning(UserWarning):
    """A run that goes on but is likely not what was meant (a growing loss, solves that never settle)."""


class Run:
    """One training run's outputs, checkpoint, progress, warnings and result.

    Args:
        fmt: the checkpoint format (``TRAIN_FORMAT``, ``META_FORMAT``).
        config: the run's settings as plain data, saved in every checkpoint.
        free: the settings (dotted prefixes) a resumed run may change; may_grow: those that may
            only grow (a budget). Every other setting must equal the checkpoint's.
        checkpoint: where to save (``None``: never). resume: continue the run saved there.
        json_out: where the result goes (``None``: nowhere). progress: progress bars.

    Attributes:
        state: the checkpoint's state to continue from, or ``None`` for a fresh run.
        warnings: the messages :meth:`warn` gave, in order (also in the result).

    Raises:
        OutputError: an output that cannot be written (checked before any work).
        CheckpointError: a checkpoint that exists without ``resume`` or is missing with it, is
            unreadable, or belongs to a run with other settings.
    """

    def __init__(self, fmt: str, config: Mapping[str, Any], *, free: Iterable[str] = (), may_grow: Iterable[str] = (),
                 checkpoint: Optional[str] = None, resume: bool = False, json_out: Optional[str] = None,
                 progress: bool = True, complete=None):
        self.fmt, self.config, self.progress = fmt, dict(config), progress
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.json_out = json_out
        self.warnings: List[str] = []
        check_outputs({"--checkpoint": checkpoint, "--json-out": json_out}, regular=("--checkpoint",))
        self.state: Optional[Dict[str, Any]] = resume_state(self.checkpoint, resume, fmt, self.config,
                                                            free=free, may_grow=may_grow, complete=complete)
        if self.state is not None:   # the warnings of the run so far stay in its result
            self.warnings = list(self.state.get("warnings", []))
        # A new run claims its checkpoint path with its first save: a file another run put there
        # meanwhile (two runs started at one path) is never replaced.
        self._claimed = self.state is not None

    @contextlib.contextmanager
    def collecting(self):
        """Inside the block, a warning the library gives (a backend that falls back, a solve that settled
        where the dynamics leave it) is shown as usual and also kept for the result's ``warnings``."""
        original = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            text = str(message)
            if (not issubclass(category, RunWarning) and Path(filename).resolve().is_relative_to(_PACKAGE)
                    and text not in self.warnings):
                self.warnings.append(text)
            original(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        try:
            yield self
        finally:
            warnings.showwarning = original

    def bar(self, iterable, **options):
        """A progress bar over ``iterable`` (silent without ``progress``)."""
        return tqdm(iterable, disable=not self.progress, dynamic_ncols=True, **options)

    def warn(self, message: str, category=RunWarning) -> None:
        """Tell the user now (``warnings.warn``) and keep ``message`` for the result's ``warnings``."""
        self.warnings.append(message)
        warnings.warn(message, category, stacklevel=3)

    def save(self, **state) -> None:
        """Write a checkpoint of the loop's ``state`` (with the format and settings), atomically."""
        if self.checkpoint is not None:
            save_checkpoint(self.checkpoint, {"format": self.fmt, "config": self.config, "warnings": self.warnings,
                                              **state}, exclusive=not self._claimed)
            self._claimed = True

    def finish(self, result: Dict[str, Any]) -> Dict[str, Any]:
        """Add the warnings to ``result``, write it to ``json_out`` (atomically) and return it.

        Raises:
            ResultNotWrittenError: the JSON could not be written; the error holds ``result``.
        """
        result["warnings"] = list(self.warnings)
        if self.json_out:
            try:
                write_json(self.json_out, result)
            except OutputError as exc:
                raise ResultNotWrittenError(str(exc), result) from None
        return result
