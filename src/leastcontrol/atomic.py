"""Writing outputs without destroying what is at the path, and checking them before a run starts.

Every file the library writes for a user (result JSON, checkpoints, reports, plots, data files)
goes through :func:`write_bytes`:

- a regular file (or a new one) is replaced atomically: the bytes go to a temporary file beside
  it, which is then renamed onto it, so a reader never sees half a file and a failed write leaves
  the previous file; an existing file keeps its permission bits;
- a symbolic link is written through: its target is replaced as above, the link stays a link;
- anything else that exists at the path (a FIFO, a character device such as ``/dev/stdout``) is
  opened and written in place, as ``cat > path`` would; it is never replaced by a file;
- a directory is refused.

:func:`check_outputs` runs the same rules before any work (the path is not a directory, its folder
can be written, two outputs are not one file), so a run does not train for hours and then fail.
Failures raise :class:`~leastcontrol.errors.OutputError` with the option and the reason.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

from .errors import OutputError

PathLike = Union[str, "os.PathLike[str]"]


@contextlib.contextmanager
def atomic_target(path: PathLike, mode: int = 0o644, exclusive: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside the regular file ``path``; rename it onto ``path`` on success
    (``exclusive``: link it there, which fails with FileExistsError if ``path`` exists by then).

    The temporary file is removed if the body raises, so a failed write never leaves a partial file
    under the final name. For the library's own files (the data cache, the native build); user
    outputs go through :func:`write_bytes`.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, mode)
        if exclusive:
            os.link(tmp, path)
            tmp.unlink()
        else:
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _target(path: PathLike) -> Path:
    """The file a write to ``path`` lands in: a symbolic link's final target, else ``path``."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _descriptor(path: PathLike) -> Optional[int]:
    """The open file descriptor of this process that ``path`` names (``/dev/stdout``, ``/dev/stderr``,
    ``/dev/fd/N``, ``/proc/self/fd/N``, or a link to one), else ``None``. Such an output is written to
    the descriptor itself: reopening the path would truncate a file the shell redirected it to, or
    find no file at all for a pipe."""
    seen, current = 0, Path(path)
    while seen < 40:
        text = os.path.abspath(current)
        named = {"/dev/stdout": 1, "/dev/stderr": 2}.get(text)
        if named is not None:
            return named
        for prefix in ("/dev/fd/", "/proc/self/fd/", f"/proc/{os.getpid()}/fd/"):
            if text.startswith(prefix) and text[len(prefix):].isdigit():
                return int(text[len(prefix):])
        if not current.is_symlink():
            return None
        target = Path(os.readlink(current))
        current = target if target.is_absolute() else current.parent / target
        seen += 1
    return None


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def write_bytes(path: PathLike, data: bytes, what: str = "output", exclusive: bool = False) -> Path:
    """Write ``data`` to ``path`` by the rules of this module; return ``path``.

    Args:
        what: how the user named this output (``--json-out``, ``the checkpoint``), for messages.
        exclusive: create the file, never replace one (a run's first checkpoint: another run that
            claimed the path meanwhile keeps it).

    Raises:
        OutputError: ``path`` is a directory, exists where ``exclusive`` forbids it, or the write
            failed (the reason as the system gives it).
    """
    fd = _descriptor(path)
    if fd is not None:   # the process's own stream: appended to where it stands, never reopened
        try:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError as exc:
            raise OutputError(f"could not write {what} to {path}: {_reason(exc)}") from None
        return Path(path)
    target = _target(path)
    try:
        if target.is_dir():
            raise OutputError(f"{what} {path} is a directory; give a file path")
        if target.exists() and not target.is_file():
            with open(target, "wb") as fh:   # a FIFO or device: written in place, never replaced
                fh.write(data)
            return Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        mode = stat.S_IMODE(target.stat().st_mode) if target.exists() else 0o644
        with atomic_target(target, mode, exclusive) as tmp:
            tmp.write_bytes(data)
    except OutputError:
        raise
    except FileExistsError:
        raise OutputError(f"{what} {path} was created by another process while this run worked; it is left as it "
                          "is and this run's was not written: choose another path") from None
    except OSError as exc:
        raise OutputError(f"could not write {what} to {path}: {_reason(exc)}") from None
    return Path(path)


def write_text(path: PathLike, text: str, what: str = "output") -> Path:
    """:func:`write_bytes` of ``text`` in UTF-8."""
    return write_bytes(path, text.encode("utf-8"), what)


def write_json(path: PathLike, obj: Any, what: str = "--json-out") -> Path:
    """:func:`write_bytes` of ``obj`` as indented JSON."""
    return write_text(path, json.dumps(obj, indent=2) + "\n", what)


def save_torch(path: PathLike, obj: Any, what: str = "the checkpoint", exclusive: bool = False) -> Path:
    """:func:`write_bytes` of ``torch.save(obj)`` (serialised in memory first, so a failing disk
    never leaves half a checkpoint)."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_bytes(path, buffer.getvalue(), what, exclusive)


def _nearest_folder(path: Path) -> Path:
    """The closest ancestor of ``path`` that exists (what must be writable to create it)."""
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_output(path: PathLike, what: str, *, regular: bool = False) -> None:
    """Check, before a run, that :func:`write_bytes` can write ``path``; creates nothing.

    Args:
        regular: the output must be a regular file (a checkpoint, which is read back).

    Raises:
        OutputError: ``path`` is a directory, not a regular file where one is needed, read-only,
            or in a folder that cannot be created or written.
    """
    fd = _descriptor(path)
    if fd is not None:
        if regular:
            raise OutputError(f"{what} {path} is a stream of this process, not a regular file; give a file path")
        try:
            os.fstat(fd)
        except OSError:
            raise OutputError(f"{what} {path}: this process has no open descriptor {fd}") from None
        return
    target = _target(path)
    if target.is_dir():
        raise OutputError(f"{what} {path} is a directory; give a file path")
    if target.exists() and not target.is_file():
        if regular:
            raise OutputError(f"{what} {path} is not a regular file; give a file path")
        if not os.access(target, os.W_OK):
            raise OutputError(f"{what} {path} cannot be written (permission denied)")
        return
    if target.exists() and not os.access(target, os.W_OK):
        raise OutputError(f"{what} {path} is read-only; make it writable or choose another path")
    folder = _nearest_folder(target)
    if not folder.is_dir():
        raise OutputError(f"{what} {path}: {folder} is not a folder; choose another path")
    try:   # a trial file tells what permission bits do not (read-only mounts, root, ACLs)
        fd, trial = tempfile.mkstemp(dir=folder, prefix=".leastcontrol-write-test.")
        os.close(fd)
        os.unlink(trial)
    except OSError as exc:
        raise OutputError(f"{what} {path} cannot be written: {folder} is not writable ({_reason(exc)}); "
                          "choose another path") from None


def check_inputs_kept(outputs: Mapping[str, Optional[PathLike]], inputs: Mapping[str, Optional[PathLike]]) -> None:
    """That no output is one of the files a run reads (a checkpoint to evaluate, a config file).

    Raises:
        OutputError: naming the output and the input it would destroy.
    """
    for what, path in inputs.items():
        for out, target in outputs.items():
            if path and target and os.path.exists(path) and os.path.exists(target) and os.path.samefile(path, target):
                raise OutputError(f"{out} {target} is the {what} this run reads; writing it would destroy it: "
                                  "give another path")


def check_outputs(outputs: Mapping[str, Optional[PathLike]], regular: tuple = (),
                  inputs: Optional[Mapping[str, Optional[PathLike]]] = None) -> None:
    """:func:`check_output` for each named output that is set, that no two of them are one file, and
    that none is one of the run's ``inputs`` (a checkpoint to evaluate, a config file).

    Args:
        outputs: option name (``--json-out``) -> path or ``None``.
        regular: the option names whose output must be a regular file.
        inputs: option name -> path or ``None``: files the run reads, never to be written.

    Raises:
        OutputError: an output that cannot be written, two outputs at one path, or an output at an input.
    """
    check_inputs_kept(outputs, inputs or {})
    seen = {}
    for what, path in outputs.items():
        if path is None or path == "":
            continue
        check_output(path, what, regular=what in regular)
        key = os.path.realpath(path)
        if key in seen:
            raise OutputError(f"{seen[key]} and {what} are the same file ({path}); one would overwrite the other: "
                              "give them different paths")
        seen[key] = what
