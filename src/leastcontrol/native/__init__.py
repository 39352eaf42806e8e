"""C steps of the solver's ``native`` backend: Euler steps of a field, for the few samples of a solve's tail.

At a handful of active samples a step is one or two small matrix products and a few elementwise
passes, microseconds of arithmetic; in PyTorch each of its dozen operations costs a fixed few
microseconds of dispatch. The ``native`` backend (:class:`~leastcontrol.solvers.backends.Native`)
runs the steps between two convergence checks of the solver driver in C instead; the driver keeps
everything else (the checks, the stopping rule, freezing, the check-level mix).

The C code has three layers (``native.h`` states the interface between them):

* a *system* (``rnn.c``): a system's own kernels, its dynamics ``f(s)`` and state VJP ``(∂_s f)ᵀ a``,
  knowing nothing of learning rules. Registered here per flat operator class
  (:func:`register_native_system`): the recurrent network's :class:`~leastcontrol.systems.networks._RecurrentFlat`.
* the *fields* (``fields.c``): the learning rules' dynamics written against any system:
  ``free`` (``ż = f(z)``), ``adjoint`` (RBP) and ``controlled`` (LCP-DI/KP). Registered here by
  kind (:func:`register_native_field`).
* the *runner* (``euler.c``): ``n`` Euler steps of any field and each sample's residual of the last.

Methods ask for a field's kernel with :func:`field_kernel` and hand it to the solver through
:class:`~leastcontrol.solvers.Field`'s ``kernels``. The C sources ship with the package and are
compiled on first use with the system's C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``; the
same requirement as ``torch.compile`` on the CPU) into the user cache, once per source, compiler and
CPU, and loaded with :mod:`ctypes` (:func:`library`). Where they cannot be built or loaded, the
backend gives way to the solver's next one, with one warning naming why (:func:`usable`).

>>> from leastcontrol.solvers import Euler
>>> from leastcontrol.methods import get_method
>>> method = get_method("lcp-di", solver=Euler(backend=("native", "compile")))   # doctest: +SKIP
"""
from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Dict, Sequence, Tuple

import torch

from ..atomic import atomic_target
from ..errors import ConfigError
from ..paths import user_cache_dir

HERE = Path(__file__).parent
# Compiled together into one shared library; the headers are part of the cache key.
SOURCES = tuple(HERE / name for name in ("rnn.c", "fields.c", "euler.c"))
HEADERS = tuple(HERE / name for name in ("native.h", "precisions.h"))
# Optimise for the machine it runs on; keep IEEE semantics (no -ffast-math: sums are not reordered).
_FLAGS = ("-O3", "-fno-math-errno", "-shared", "-fPIC")
_DTYPES = {torch.float32: ("_f32", ctypes.c_float), torch.float64: ("_f64", ctypes.c_double)}
_FIX = "drop 'native' from the solver's backend (method.solver.backend)"


def _cpu() -> bytes:
    """What the ``-march=native`` build depends on: the CPU's model and flags where Linux says them."""
    try:
        with open("/proc/cpuinfo", "rb") as fh:
            return b"".join(line for line in fh if line.startswith((b"model name", b"flags")))[:4096]
    except OSError:
        return platform.processor().encode()


def _compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        path = name and shutil.which(name)
        if path:
            return path
    raise ConfigError("the native backend compiles its C steps on first use and found no C compiler "
                      f"(set $CC or put cc, gcc or clang on PATH); or {_FIX}")


class _CompileFailed(Exception):
    pass


def _digest_path(library_path: Path) -> Path:
    return library_path.with_name(library_path.name + ".sha256")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _intact(path: Path) -> bool:
    """Whether ``path`` holds the library as it was built: the digest written beside it after the build
    matches. The loader is never handed another file: on a truncated one it may crash the process
    (SIGBUS) instead of refusing it."""
    try:
        return _digest(path) == _digest_path(path).read_text().strip()
    except OSError:
        return False


def _build(cc: str, target: Path) -> None:
    """Compile :data:`SOURCES` into the shared library ``target``, atomically: ``-march=native`` where the
    compiler knows it, else the portable build.

    Raises:
        ConfigError: the compiler fails (or does not start) either way.
        OSError: ``target``'s folder cannot be created or written.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    message = ""
    for arch in (("-march=native",), ()):
        try:
            with atomic_target(target) as tmp:   # removes the partial file if the body raises
                try:
                    proc = subprocess.run([cc, *_FLAGS, *arch, "-I", str(HERE), "-o", str(tmp), *map(str, SOURCES), "-lm"],
                                          capture_output=True, text=True)
                except OSError as err:   # the compiler itself, not the folder: no other folder would help
                    raise _CompileFailed(str(err)) from None
                if proc.returncode != 0:
                    raise _CompileFailed((proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1])
            with atomic_target(_digest_path(target)) as tmp:   # written last: it vouches for the library
                tmp.write_text(_digest(target) + "\n")
            return
        except _CompileFailed as err:
            message = str(err)
    raise ConfigError(f"the native backend: compiling its C steps with {cc} failed ({message}); {_FIX}")


# This process's own build folder, made the first time the user cache cannot be written.
_scratch: Path | None = None


def _build_where_writable(cc: str, target: Path) -> Path:
    """Build into ``target``; where its folder cannot be created or written (read-only, or a file in the
    way), into a private temporary folder of this process instead, with a warning (once per process)
    that the build is repeated in every process and how to keep it. Returns the library's path.

    Raises:
        ConfigError: the build fails (:func:`_build`), or neither folder can be written.
    """
    global _scratch
    try:
        _build(cc, target)
        return target
    except OSError as err:
        cache_error = err
    try:
        if _scratch is None:
            _scratch = Path(tempfile.mkdtemp(prefix="leastcontrol-native-"))
            atexit.register(shutil.rmtree, _scratch, ignore_errors=True)
            warnings.warn(f"the native backend's cache {target.parent} is not writable "
                          f"({cache_error.strerror or cache_error}); its C steps are built in a temporary folder, "
                          "again in every process; set $XDG_CACHE_HOME to a writable folder to keep them",
                          RuntimeWarning, stacklevel=4)
        _build(cc, _scratch / target.name)
    except OSError as err:
        raise ConfigError(f"the native backend can write its C steps neither to its cache {target.parent} "
                          f"({cache_error.strerror or cache_error}) nor to a temporary folder ({err.strerror or err}); "
                          f"set $XDG_CACHE_HOME to a writable folder, or {_FIX}") from None
    return _scratch / target.name


def _open(path: Path) -> ctypes.CDLL:
    """The library at ``path``, loaded; OSError where the loader refuses it, AttributeError where it
    lacks the C steps."""
    lib = ctypes.CDLL(str(path))
    for suffix, _ in _DTYPES.values():
        _declare(lib, "lc_system_dims" + suffix, None, [ctypes.c_void_p, ctypes.c_void_p])
    return lib


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL:
    """The compiled kernels, loaded; kept for the process once loaded (``library.cache_clear()`` forgets them).

    Built on first use into the user cache (``$XDG_CACHE_HOME/leastcontrol/native``), once per source,
    compiler and CPU, with the digest that vouches for it. An entry that is not as built (an empty or
    truncated file) or does not load is built again; a cache that cannot be written gives a warning
    and a build in a temporary folder of this process.

    Raises:
        ConfigError: no C compiler, the compiler fails, or the fresh build does not load.
    """
    cc = _compiler()
    key = hashlib.sha256(b"\0".join([*(p.read_bytes() for p in SOURCES + HEADERS), cc.encode(), " ".join(_FLAGS).encode(),
                                     platform.machine().encode(), platform.platform().encode(), _cpu()])).hexdigest()[:16]
    target = user_cache_dir("native", f"steps-{key}.so")
    if _intact(target):
        try:
            return _open(target)
        except (OSError, AttributeError):
            pass   # built again below, where a fresh build that does not load either is the error
    # Not built yet, or a broken entry (an interrupted copy, a full disk, an older build without its digest).
    target = _build_where_writable(cc, target)
    try:
        return _open(target)
    except (OSError, AttributeError) as err:
        raise ConfigError(f"the native backend built its C steps with {cc} into {target} but cannot load them "
                          f"({err}); {_FIX}") from None


# Why the C steps cannot be built or loaded in this process, once usable() has found it (and warned).
_failure: str | None = None


def usable() -> bool:
    """Whether the C steps build and load in this process (:func:`library`), for the native backend.

    Where they cannot (no C compiler, the compiler fails, the built library does not load), warns once
    (RuntimeWarning) with the reason and the fix, and answers False from then on without trying again:
    the backend then gives way to the solver's next backend, eager where none is left (:func:`failed`).
    """
    global _failure
    if _failure is not None:
        return False
    try:
        library()
        return True
    except ConfigError as err:
        _failure = str(err)
    warnings.warn(f"the native backend cannot run here, so its steps run on the solver's next backend (eager "
                  f"where none is left): {_failure}", RuntimeWarning, stacklevel=3)
    return False


def failed() -> bool:
    """Whether :func:`usable` has found that the C steps cannot run in this process (it warned then)."""
    return _failure is not None


def _declare(lib, name: str, restype, argtypes):
    """``lib``'s function ``name`` with its C signature."""
    fn = getattr(lib, name)
    fn.restype, fn.argtypes = restype, argtypes
    return fn


def _pad_columns(t: torch.Tensor, width: int) -> torch.Tensor:
    out = t.new_zeros(t.shape[0], width)
    out[:, :t.shape[1]] = t
    return out


# --- systems -----------------------------------------------------------------------------------


class NativeSystem:
    """A system's C kernels: the ``lc_system`` struct of ``native.h`` the fields call, in the precision
    of the system's weights, and the tensors it points to (kept alive here).

    Attributes:
        dtype: the precision of every row the kernels read and write.
        n_state, n_out, n_drive, n_lin: the widths of a state row (the output population its last
            ``n_out`` columns), of a drive row and of a linearisation row (what the state VJP reads).
    """

    def __init__(self, lib: ctypes.CDLL, dtype: torch.dtype, struct, keep: Tuple[torch.Tensor, ...] = ()):
        self.lib, self.dtype, self.struct, self._keep = lib, dtype, struct, keep
        self.suffix, self.real = _DTYPES[dtype]
        self.handle = ctypes.addressof(struct)
        dims = (ctypes.c_int * 4)()
        getattr(lib, "lc_system_dims" + self.suffix)(self.handle, dims)
        self.n_state, self.n_out, self.n_drive, self.n_lin = dims


def _check_weights(*weights: torch.Tensor) -> torch.dtype:
    """The weights' dtype, if the C kernels run on it (CPU, float32 or float64), else a ConfigError."""
    t = weights[0]
    if t.device.type != "cpu" or t.dtype not in _DTYPES or any(w.dtype != t.dtype or w.device != t.device for w in weights):
        raise ConfigError(f"the native backend runs on the CPU in float32 or float64; got {t.device.type} "
                          f"{str(t.dtype).removeprefix('torch.')}; {_FIX}")
    return t.dtype


def recurrent_system(op) -> NativeSystem:
    """The C kernels of :class:`~leastcontrol.systems.networks.RecurrentEquilibrium` (``rnn.c``) from its
    flat operator ``op``: ``forward_t = [W; D]ᵀ`` ``(H, N)`` and the way back ``back`` ``(N, H)``
    (``[W; D]`` or KP's feedback weights), copied with zero-padded columns.

    Raises:
        ConfigError: the weights are not on the CPU in float32 or float64, or no C compiler.
    """
    dtype = _check_weights(op.forward_t, op.back)
    H, N = op.H, op.forward_t.shape[1]
    if tuple(op.forward_t.shape) != (H, N) or tuple(op.back.shape) != (N, H):
        raise ConfigError(f"the native backend: weights {tuple(op.forward_t.shape)} and {tuple(op.back.shape)} "
                          f"do not fit a network of {H} hidden units; {_FIX}")
    lib = library()
    suffix, ptr, i32 = _DTYPES[dtype][0], ctypes.c_void_p, ctypes.c_int
    pad = _declare(lib, "lc_pad", i32, [i32])
    Ft = _pad_columns(op.forward_t, pad(N))
    Bk = _pad_columns(op.back, pad(H))
    struct = ctypes.create_string_buffer(_declare(lib, "lc_rnn_size" + suffix, ctypes.c_size_t, [])())
    _declare(lib, "lc_rnn_init" + suffix, None, [ptr, i32, i32, ptr, ptr])(ctypes.addressof(struct), H, N - H,
                                                                             Ft.data_ptr(), Bk.data_ptr())
    return NativeSystem(lib, dtype, struct, keep=(Ft, Bk))


# Flat operator class -> builder of its C system. Looked up by exact class: a subclass may change
# the dynamics the C kernels implement.
_SYSTEMS: Dict[type, Callable[[object], NativeSystem]] = {}


def register_native_system(op_class: type, builder: Callable[[object], NativeSystem], *, overwrite: bool = False) -> None:
    """Declare that flat operators of class ``op_class`` have C kernels: ``builder(op)`` returns their
    :class:`NativeSystem` (raising ConfigError where it cannot, e.g. weights on a GPU)."""
    if not overwrite and op_class in _SYSTEMS:
        raise ValueError(f"native system for {op_class.__name__} is already registered; pass overwrite=True to replace it")
    _SYSTEMS[op_class] = builder


def covers(op) -> bool:
    """Whether the system whose flat operator is ``op`` has C kernels (registered for its exact class)."""
    return type(op) in _SYSTEMS


def native_system(op) -> NativeSystem | None:
    """The C kernels of the system whose flat operator is ``op``, or ``None`` where it has none."""
    builder = _SYSTEMS.get(type(op))
    return None if builder is None else builder(op)


# --- fields ------------------------------------------------------------------------------------


class NativeField:
    """Euler steps of one learning rule's field on a :class:`NativeSystem`, in C (``fields.c``, ``euler.c``).

    A kernel of the solver's ``native`` backend: called as ``kernel(z, context, dt, n, groups)`` it
    returns ``(z_n, residual)``, ``n ≥ 1`` Euler steps ``z ← z + dt·g(z)`` from the flat ``(B, width)``
    rows ``z`` (not modified; a new tensor) and each row's relative residual of the last step,
    ``dt·‖g(z_{n−1})‖ / ‖z_{n−1}‖``, ``(B,)``: one ratio over the row when ``groups`` is ``None``, else
    the largest of the column groups' own ratios (``‖z_g‖²`` floored at 1e-30), NaN where the step
    is not finite. ``context`` holds the batch-aligned rows the field reads (:attr:`context_keys`).

    A subclass names its C entry points ``lc_<kind>_steps`` / ``lc_<kind>_work`` (:attr:`kind`), the
    context rows they read and their widths (:meth:`context_widths`), and its constants.

    Raises:
        ConfigError: at the call, a tensor not in the system's dtype on the CPU, or of a shape
            other than ``(B, width)`` and the context widths (checked before C reads any memory).
    """

    kind = ""
    context_keys: Tuple[str, ...] = ()

    def __init__(self, system: NativeSystem):
        self.system = system
        lib, suffix, ptr, i32 = system.lib, system.suffix, ctypes.c_void_p, ctypes.c_int
        self._steps = getattr(lib, f"lc_{self.kind}_steps{suffix}")
        self._steps.restype = None
        self._steps.argtypes = ([ptr, i32, i32, system.real, ptr] + [ptr] * len(self.context_keys)
                                + self.constant_types(system.real) + [i32, ptr, ptr, ptr])
        self._work_size = getattr(lib, f"lc_{self.kind}_work{suffix}")
        self._work_size.restype, self._work_size.argtypes = ctypes.c_long, [ptr, i32]
        self._constants: Tuple = ()
        self._work: torch.Tensor | None = None   # scratch, sized by the largest batch so far
        self._work_rows = 0
        self._groups: Dict[Tuple[int, ...] | None, Tuple[int, object]] = {}
        widths = self.context_widths()
        self.widths = (self.width,) + tuple(widths[k] for k in self.context_keys)

    @property
    def width(self) -> int:
        """The width of a row of the field's state."""
        return self.system.n_state

    def context_widths(self) -> Dict[str, int]:
        raise NotImplementedError

    @staticmethod
    def constant_types(real) -> list:
        """The ctypes of the constants the C entry point takes after the context rows."""
        return []

    def supports(self, groups: Sequence[int] | None) -> bool:
        """Whether the residual the solver reads is one this computes: any grouping of the row's columns."""
        return groups is None or (all(int(w) >= 1 for w in groups) and sum(groups) == self.width)

    def _check(self, z: torch.Tensor, context) -> list:
        """The context rows, contiguous, after checking every tensor's dtype, device and shape: the C
        code reads raw memory and could not tell."""
        try:
            rows = [context[k] for k in self.context_keys]
        except (KeyError, TypeError):
            raise ConfigError(f"native {self.kind} steps read the context {', '.join(self.context_keys)}; "
                              f"got {sorted(context) if isinstance(context, dict) else context!r}") from None
        tensors = [z] + rows
        dtype = self.system.dtype
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.dtype != dtype or t.device.type != "cpu":
                raise ConfigError(f"native steps need every tensor in {dtype} on the CPU like the weights; "
                                  f"got {getattr(t, 'dtype', type(t).__name__)} on {getattr(t, 'device', '?')}")
        shapes = [tuple(t.shape) for t in tensors]
        if shapes != [(z.shape[0], w) for w in self.widths]:
            raise ConfigError(f"native {self.kind} steps: state and context shapes {shapes} do not fit "
                              f"widths {self.widths} (state, {', '.join(self.context_keys)}) of this system")
        return [t.contiguous() for t in rows]

    def _group_args(self, groups):
        out = self._groups.get(groups)
        if out is None:
            widths = (self.width,) if groups is None else tuple(int(w) for w in groups)
            if not self.supports(widths):
                raise ConfigError(f"native {self.kind} steps: groups {groups} do not split the row's {self.width} columns")
            out = self._groups[groups] = (len(widths), (ctypes.c_int * len(widths))(*widths))
        return out

    def __call__(self, z: torch.Tensor, context, dt: float, n: int,
                 groups: Sequence[int] | None) -> Tuple[torch.Tensor, torch.Tensor]:
        rows = self._check(z, context)
        if not (isinstance(n, int) and n >= 1):
            raise ValueError(f"native steps take n >= 1 steps, got {n!r}")
        ngroups, widths = self._group_args(None if groups is None else tuple(groups))
        z = z.clone(memory_format=torch.contiguous_format)
        B = z.shape[0]
        res = z.new_empty(B)
        if B == 0:
            return z, res
        if self._work is None or B > self._work_rows:
            self._work = z.new_empty(int(self._work_size(self.system.handle, B)))
            self._work_rows = B
        self._steps(self.system.handle, B, n, dt, z.data_ptr(), *[t.data_ptr() for t in rows], *self._constants,
                    ngroups, widths, res.data_ptr(), self._work.data_ptr())
        return z, res


class FreeField(NativeField):
    """The free dynamics ``ṡ = f(s)`` on state rows ``s`` ``(B, N)``; context ``drive`` ``(B, n_drive)``."""

    kind = "free"
    context_keys = ("drive",)

    def context_widths(self):
        return {"drive": self.system.n_drive}


class AdjointField(NativeField):
    """RBP's adjoint dynamics at a fixed state, ``λ̇ = (∂_s f)ᵀ λ + ∇_s L`` on ``λ`` ``(B, N)``; context
    ``lin`` (the state's linearisation, ``(B, n_lin)``: the flat operator's ``linearize``, ``φ'(v°)``
    for the network) and ``dL`` ``(B, N)``."""

    kind = "adjoint"
    context_keys = ("lin", "dL")

    def context_widths(self):
        return {"lin": self.system.n_lin, "dL": self.system.n_state}


_LOSSES = {"cross_entropy": 0, "mse": 1}


class ControlledField(NativeField):
    """LCP's controlled dynamics (LCP-DI; KP where the system's way back holds the feedback weights) on
    ``z = [s | e | u_int]`` ``(B, 2N)``, ``e`` the ``E = N − K`` populations before the output, ``u_int`` ``K``:

        ż = [f(s) + ψ,  ((∂_s f)ᵀ ψ)_{:E},  −(∇_o L/B + α u_int)],   ψ = [e | k_i u_int − k_p ∇_o L/B]

    with ``∇_o L = softmax(o) − target`` (cross-entropy) or ``o − target`` (mse), ``o`` the output
    population of ``s``; context ``drive`` ``(B, n_drive)`` and ``target`` (dense, ``(B, K)``).

    Args:
        system: the system's C kernels. loss: ``cross_entropy`` or ``mse``.
        alpha, k_i, k_p: the controller. inv_B: ``1/B`` of the full batch (the batch-mean loss).

    Raises:
        ConfigError: another loss.
    """

    kind = "controlled"
    context_keys = ("drive", "target")

    def __init__(self, system: NativeSystem, loss: str, alpha: float, k_i: float, k_p: float, inv_B: float):
        if loss not in _LOSSES:
            raise ConfigError(f"the native backend's controlled steps cover the losses {', '.join(_LOSSES)}; "
                              f"got '{loss}'; {_FIX}")
        super().__init__(system)
        self._constants = (_LOSSES[loss], float(alpha), float(k_i), float(k_p), float(inv_B))

    @property
    def width(self):
        return 2 * self.system.n_state

    def context_widths(self):
        return {"drive": self.system.n_drive, "target": self.system.n_out}

    @staticmethod
    def constant_types(real):
        return [ctypes.c_int] + [real] * 4


# Field kind -> its kernel class; the kinds are the ones methods ask for (methods/base.py _kernels).
_FIELDS: Dict[str, type] = {}


def register_native_field(kind: str, cls: type, *, overwrite: bool = False) -> None:
    """Declare the C field ``kind`` (entry points ``lc_<kind>_steps`` and ``lc_<kind>_work`` in the library)
    and its kernel class, a :class:`NativeField` subclass built as ``cls(system, **constants)``."""
    if not (isinstance(cls, type) and issubclass(cls, NativeField)):
        raise ValueError(f"register_native_field('{kind}') needs a NativeField subclass, got {cls!r}")
    if not overwrite and kind in _FIELDS:
        raise ValueError(f"native field '{kind}' is already registered; pass overwrite=True to replace it")
    _FIELDS[kind] = cls


def field_kernel(op, kind: str, **constants) -> NativeField | None:
    """The C steps of the field ``kind`` (``free``, ``adjoint``, ``controlled``) on the system whose flat
    operator is ``op``, or ``None`` where that system has no C kernels.

    Raises:
        ConfigError: an unknown kind; the system's weights are not on the CPU in float32 or float64;
            no C compiler, or the build failed.
    """
    if kind not in _FIELDS:
        raise ConfigError(f"unknown native field '{kind}'; valid: {', '.join(sorted(_FIELDS))}")
    system = native_system(op)
    return None if system is None else _FIELDS[kind](system, **constants)


register_native_field("free", FreeField)
register_native_field("adjoint", AdjointField)
register_native_field("controlled", ControlledField)


def _register_builtin_systems() -> None:
    from ..systems.networks import _RecurrentFlat
    register_native_system(_RecurrentFlat, recurrent_system)


_register_builtin_systems()
