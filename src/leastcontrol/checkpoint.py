"""Checkpoints of long runs: atomic writes, validated reads, and the rules for resuming one."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional

import torch

from .atomic import save_torch
from .config import as_tree, diff_trees
from .errors import CheckpointError, ConfigError

TRAIN_FORMAT = "leastcontrol-checkpoint-1"
META_FORMAT = "leastcontrol-meta-checkpoint-1"


def save_checkpoint(path: str | Path, state: Dict[str, Any], exclusive: bool = False) -> None:
    """``torch.save`` of ``state`` to ``path``, atomically: a crash mid-write leaves the previous file.
    ``exclusive``: a new run's first save, which never replaces a file (another run's) at ``path``.

    Raises:
        OutputError: the file cannot be written (the reason as the system gives it), or it exists
            where ``exclusive`` forbids it.
    """
    save_torch(path, state, "the checkpoint", exclusive)


def load_checkpoint(path: str | Path, fmt: str = TRAIN_FORMAT, require: Iterable[str] = ()) -> Dict[str, Any]:
    """Read a checkpoint of format ``fmt`` (:func:`leastcontrol.train.train`'s by default) that holds
    ``config`` and the fields in ``require`` (e.g. ``("epoch", "system")`` to evaluate it).

    Raises:
        CheckpointError: missing, a directory, unreadable, or not a checkpoint of that format; or one
            written by another version of leastcontrol (another format version of the same kind, or
            no ``format``, ``config`` or required field), naming what is missing.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; point --checkpoint at the checkpoint file in it")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a leastcontrol checkpoint ({type(exc).__name__}); "
            "delete it to start afresh or point --checkpoint at another file"
        ) from None
    other_version = (f"checkpoint {path} was written by another version of leastcontrol ({{}}); use the version "
                     "that wrote it, or train the run again with this one")
    found = state.get("format") if isinstance(state, dict) else None
    family = fmt.rsplit("-", 1)[0] + "-"   # "leastcontrol-checkpoint-": the kind, without its version
    if isinstance(found, str) and found != fmt and found.startswith(family) and found[len(family):].isdigit():
        raise CheckpointError(other_version.format(f"format {found}; this version reads {fmt}"))
    if isinstance(state, dict) and found is None and {"config", "system"} <= set(state):
        raise CheckpointError(other_version.format("missing 'format'"))
    if not isinstance(state, dict) or found != fmt:
        what = "meta-training " if fmt == META_FORMAT else ""
        raise CheckpointError(f"{path} is not a leastcontrol {what}checkpoint; point --checkpoint at another file")
    missing = [key for key in ("config", *require) if key not in state]
    if missing:
        raise CheckpointError(other_version.format("missing " + ", ".join(repr(k) for k in missing)))
    return state


def check_resume(checkpoint: Optional[str], resume: bool) -> None:
    """Config check of a run's checkpoint settings: ``resume`` needs a ``checkpoint`` path."""
    if resume and not checkpoint:
        raise ConfigError("resume needs a checkpoint path (--checkpoint FILE)")


def _shown(value: Any) -> str:
    return "unset" if value is None else repr(value)


def resume_state(path: Optional[str | Path], resume: bool, fmt: str, config: Mapping[str, Any], *,
                 free: Iterable[str] = (), may_grow: Iterable[str] = (),
                 complete=None) -> Optional[Dict[str, Any]]:
    """The saved state to continue from, or ``None`` for a fresh run.

    A checkpoint that exists is only continued with ``resume`` (never overwritten by a new run);
    ``resume`` with no checkpoint at ``path`` is an error (a mistyped path must not restart a run).
    A run continues only with the settings it was started with: every setting of ``config`` must
    equal the saved one, except those under the dotted prefixes ``free`` (where results go, how
    often to save) and those in ``may_grow`` (a budget), which may be larger. A flat config of an
    earlier version is read as its tree; ``complete`` (tree -> tree), where given, fills the keys a
    saved tree lacks (settings this version added) with their defaults, so they are no difference.

    Raises:
        CheckpointError: the file exists without ``resume``, is missing with it, is unreadable, or
            is another run's (the message names each differing setting with both values).
    """
    if path is None:
        return None
    if Path(path).is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; give the checkpoint file's path")
    if not Path(path).exists():
        if resume:
            raise CheckpointError(f"--resume: checkpoint {path} does not exist; check the path, "
                                  "or leave out --resume to start a new run")
        return None
    if not resume:
        raise CheckpointError(f"checkpoint {path} already exists; pass --resume to continue that run "
                              "or choose another --checkpoint path")
    state = load_checkpoint(path, fmt)
    saved = as_tree(state["config"], f"checkpoint {path}") if fmt == TRAIN_FORMAT else state["config"]
    if complete is not None:
        saved = complete(saved)
    may_grow = set(may_grow)
    changed = [(key, old, new) for key, old, new in diff_trees(saved, config, ignore=tuple(free))
               if not (key in may_grow and isinstance(old, int) and isinstance(new, int) and new >= old)]
    if changed:
        listed = "; ".join(f"{key} = {_shown(old)} (asked: {_shown(new)})" for key, old, new in changed)
        raise CheckpointError(f"checkpoint {path} belongs to a run with other settings: {listed}. Continue it "
                              "with its own settings, or remove the file (or choose another --checkpoint path) to start afresh")
    return state
