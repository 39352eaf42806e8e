"""Native Euler steps for the tail of a solve: the few samples left after most have settled.

At a handful of active samples a step is one or two small matrix products and a few elementwise
passes, microseconds of arithmetic; in PyTorch each of its dozen operations costs a fixed few
microseconds of dispatch, and that fixed cost, paid hundreds of times per batch, was where LCP-DI's
controlled phase spent half its time (``docs/performance.md``). Here the rest of such a solve runs
as one C call (``rnn.c``): its steps, convergence checks, stall rule and check-level Anderson mix,
on the recurrent network's free, adjoint (RBP) or controlled (LCP-DI/KP) field, the same fields the
methods build from PyTorch operations: same iterates up to floating-point order, same stopping rule.

The C source ships with the package and is compiled on first use with the system's C compiler
(``$CC``, else ``cc``, ``gcc`` or ``clang``; the same requirement as ``torch.compile`` on the CPU)
into the user cache, once per source and compiler, and loaded with :mod:`ctypes`.

>>> from leastcontrol.methods import get_method
>>> method = get_method("lcp-di", native=True)   # doctest: +SKIP
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple, Sequence, Tuple

import torch

from ..atomic import atomic_target
from ..errors import ConfigError
from ..paths import user_cache_dir

SOURCE = Path(__file__).with_name("rnn.c")
# Optimise for the machine it runs on; keep IEEE semantics (no -ffast-math: sums are not reordered).
_FLAGS = ("-O3", "-fno-math-errno", "-shared", "-fPIC")
_LOSSES = {"cross_entropy": 0, "mse": 1}
_DTYPES = {torch.float32: ("_f32", ctypes.c_float), torch.float64: ("_f64", ctypes.c_double)}


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
    raise ConfigError("native=True compiles a small C kernel on first use and found no C compiler "
                      "(set $CC or put cc, gcc or clang on PATH); or run without native")


class _CompileFailed(Exception):
    pass


def _build(cc: str, target: Path) -> None:
    """Compile :data:`SOURCE` into the shared library ``target``, atomically: ``-march=native`` where the
    compiler knows it, else the portable build."""
    target.parent.mkdir(parents=True, exist_ok=True)
    message = ""
    for arch in (("-march=native",), ()):
        try:
            with atomic_target(target) as tmp:   # removes the partial file if the body raises
                proc = subprocess.run([cc, *_FLAGS, *arch, "-I", str(SOURCE.parent), "-o", str(tmp), str(SOURCE), "-lm"],
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    raise _CompileFailed((proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1])
            return
        except _CompileFailed as err:
            message = str(err)
    raise ConfigError(f"native=True: compiling {SOURCE.name} with {cc} failed ({message}); run without native")


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL:
    """The compiled kernels, built on first use into the user cache; raises ConfigError if they cannot be."""
    cc = _compiler()
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), cc.encode(), " ".join(_FLAGS).encode(),
                                     platform.machine().encode(), platform.platform().encode(), _cpu()])).hexdigest()[:16]
    target = user_cache_dir("native", f"rnn-{key}.so")
    if not target.exists():
        _build(cc, target)
    lib = ctypes.CDLL(str(target))
    lib.lc_pad.restype, lib.lc_pad.argtypes = ctypes.c_int, [ctypes.c_int]
    lib.lc_steps_work.restype, lib.lc_steps_work.argtypes = ctypes.c_long, [ctypes.c_int] * 3
    lib.lc_run_work.restype, lib.lc_run_work.argtypes = ctypes.c_long, [ctypes.c_int] * 4
    ptr, i32, f64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_double
    for suffix, real in _DTYPES.values():
        steps = getattr(lib, "lc_rnn_steps" + suffix)
        steps.restype = None
        steps.argtypes = [i32] * 5 + [real] * 5 + [i32] * 2 + [ptr] * 7
        run = getattr(lib, "lc_rnn_run" + suffix)
        run.restype = i32
        run.argtypes = ([i32] * 4 + [real] * 5 + [i32] * 2 + [ptr, i32, i32, f64, i32, f64, f64] + [ptr] * 11
                        + [i32, ptr, ptr] + [i32, i32, f64, f64] + [ptr] * 8)
    return lib


def _pad_columns(t: torch.Tensor, width: int) -> torch.Tensor:
    out = t.new_zeros(t.shape[0], width)
    out[:, :t.shape[1]] = t
    return out


class TailRun(NamedTuple):
    """The outcome of :meth:`RecurrentSteps.run`, per sample of the rows it was given."""
    z: torch.Tensor           # a stopped sample's state at its stop, the others' at the end
    residual: torch.Tensor    # (B,) float64: at each sample's last check
    stop_step: torch.Tensor   # (B,) float64: the step of that check
    stopped: torch.Tensor     # (B,) bool: stopped by the rule (else it reached max_iter)
    mark_res: torch.Tensor    # (B,) float64: the stall rule's marks, updated
    mark_step: torch.Tensor
    trace: list               # the largest residual over the running samples at each check
    step: int                 # where the run ended
    diverged: bool            # a residual was not finite at the last check


class RecurrentSteps:
    """Euler steps of one of the recurrent network's fields, in C, on a flat ``(B, width)`` state.

    Built from the flat operator of :class:`~leastcontrol.systems.networks.RecurrentEquilibrium` (its
    ``forward_t = [W; D]ᵀ`` and ``back``: ``[W; D]`` or KP's feedback weights). The subclasses name the
    field: :class:`FreeSteps` ``ṡ = f(s)``, :class:`AdjointSteps` (RBP) and :class:`ControlledSteps`
    (LCP-DI/KP); ``f(s) = φ(v) [W; D]ᵀ + drive − s``.

    Raises:
        ConfigError: the weights are not on the CPU in float32 or float64, or no C compiler.
    """

    kind = -1
    groups: Tuple[int, ...] | None = None   # the per-population residual it computes besides the joint one

    def __init__(self, op, alpha: float = 0.0, k_i: float = 0.0, k_p: float = 0.0, inv_B: float = 0.0,
                 loss: str = "cross_entropy"):
        dtype = op.forward_t.dtype
        if op.forward_t.device.type != "cpu" or dtype not in _DTYPES:
            raise ConfigError(f"native=True runs on the CPU in float32 or float64; got {op.forward_t.device.type} "
                              f"{str(dtype).removeprefix('torch.')}; run without native")
        if loss not in _LOSSES:
            raise ConfigError(f"native=True covers the losses {', '.join(_LOSSES)}; got '{loss}'; run without native")
        self.lib = library()
        suffix, self.real = _DTYPES[dtype]
        self.steps_fn = getattr(self.lib, "lc_rnn_steps" + suffix)
        self.run_fn = getattr(self.lib, "lc_rnn_run" + suffix)
        self.H = op.H
        self.N = op.forward_t.shape[1]
        self.K = self.N - self.H
        pad = self.lib.lc_pad
        self.Ft = _pad_columns(op.forward_t, pad(self.N))          # (H, Np)
        self.Bk = _pad_columns(op.back, pad(self.H))               # (N, Hp)
        self.constants = tuple(self.real(v) for v in (alpha, k_i, k_p, inv_B))
        self.loss = _LOSSES[loss]
        self.work = None   # scratch of __call__, sized by the first (largest) batch of a solve
        N, H, K = self.N, self.H, self.K
        # Row widths of the state and the two context tensors the C field reads.
        self.widths = {0: (2 * N, N, K), 1: (N, N), 2: (N, H, N)}[self.kind]

    def context(self, context) -> Tuple[torch.Tensor, torch.Tensor | None]:
        """The two context rows the C field reads, contiguous."""
        raise NotImplementedError

    def _inputs(self, z: torch.Tensor, context):
        """A contiguous copy of ``z`` (the C loop steps it in place) and the context rows, checked to be
        the weights' dtype on the CPU: the C code reads raw memory and could not tell."""
        c1, c2 = self.context(context)
        tensors = (z, c1) + (() if c2 is None else (c2,))
        for t in tensors:
            if t.dtype != self.Ft.dtype or t.device.type != "cpu":
                raise ConfigError(f"native steps need every tensor in {self.Ft.dtype} on the CPU like the weights; "
                                  f"got {t.dtype} on {t.device}")
        shapes = [tuple(t.shape) for t in tensors]
        if shapes != [(z.shape[0], w) for w in self.widths[:len(tensors)]]:
            raise ConfigError(f"native {type(self).__name__}: state and context shapes {shapes} do not fit "
                              f"widths {self.widths} for this network")
        return z.contiguous().clone(), c1, c2

    def supports(self, groups: Sequence[int] | None) -> bool:
        """Whether the residual the solver reads (``groups``: per population, or one over the row) is one this computes."""
        return groups is None or (self.groups is not None and tuple(groups) == self.groups)

    def _args(self, dt):
        return (self.real(dt), *self.constants, self.loss)

    def __call__(self, z: torch.Tensor, context, dt: float, n: int,
                 groups: Sequence[int] | None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(z_n, residual)``: ``n`` steps from ``z`` (not modified) and each sample's relative residual of
        the last step, ``dt·‖g‖/‖z_{n−1}‖`` over ``groups`` (the largest over the populations, or one over the row)."""
        z, c1, c2 = self._inputs(z, context)
        B = z.shape[0]
        size = int(self.lib.lc_steps_work(B, self.H, self.K))
        if self.work is None or self.work.numel() < size:
            self.work = z.new_empty(size)
        res = z.new_empty(B)
        self.steps_fn(self.kind, B, self.H, self.K, n, *self._args(dt), groups is None, z.data_ptr(), c1.data_ptr(),
                      0 if c2 is None else c2.data_ptr(), self.Ft.data_ptr(), self.Bk.data_ptr(), res.data_ptr(),
                      self.work.data_ptr())
        return z, res

    def run(self, z: torch.Tensor, context, dt: float, groups: Sequence[int] | None, *, step: int,
            check_every: int, max_iter: int, tol: float, patience: int | None, stall_tol: float,
            stall_ratio: float, mark_res: torch.Tensor, mark_step: torch.Tensor, mix=None) -> TailRun:
        """Euler's loop on these samples to the end of the solve, its convergence checks and stopping
        rule included (:class:`~leastcontrol.solvers.Solver`'s ``tol``, ``patience``, ``stall_tol``),
        in one call: what the solver would do check by check, without a return to Python per check.

        ``mix``: ``(memory, after, reg, restart)`` for Euler's check-level Anderson mix
        (:func:`~leastcontrol.solvers._check_mix`, memory a ``_MixMemory`` of these rows), or None.
        """
        B = z.shape[0]
        z, c1, c2 = self._inputs(z, context)
        f64 = dict(dtype=torch.float64)
        res, stop_step = torch.empty(B, **f64), torch.empty(B, **f64)
        mark_res, mark_step = mark_res.double().clone(), mark_step.double().clone()
        stopped = torch.empty(B, dtype=torch.int32)
        trace = torch.empty((max_iter - step) // check_every + 2, **f64)
        work = z.new_empty(int(self.lib.lc_run_work(self.kind, B, self.H, self.K)))
        step_c, n_trace = ctypes.c_int(step), ctypes.c_int(0)
        if mix is None:
            mix_args = (0, 0, 0.0, 0.0) + (None,) * 8
        else:
            memory, after, reg, restart = mix
            m = memory.F.shape[1]
            mem = [memory.F.contiguous().clone(), memory.G.contiguous().clone(), memory.P.contiguous().clone(),
                   memory.valid.to(torch.int32), memory.best.clone(), memory.best_z.contiguous().clone(),
                   memory.left.clone()]
            scratch = torch.empty(z.shape[1] + m * (m + 4) + B * z.shape[1], **f64)
            mix_args = (m, after, reg, restart) + tuple(t.data_ptr() for t in mem) + (scratch.data_ptr(),)
        status = self.run_fn(self.kind, B, self.H, self.K, *self._args(dt), groups is None, ctypes.byref(step_c),
                             check_every, max_iter, tol, patience or 0, min(stall_tol, 1e308), stall_ratio,
                             z.data_ptr(), c1.data_ptr(), 0 if c2 is None else c2.data_ptr(), self.Ft.data_ptr(),
                             self.Bk.data_ptr(), res.data_ptr(), mark_res.data_ptr(), mark_step.data_ptr(),
                             stop_step.data_ptr(), stopped.data_ptr(), trace.data_ptr(), trace.numel(),
                             ctypes.byref(n_trace), work.data_ptr(), *mix_args)
        return TailRun(z, res, stop_step, stopped.bool(), mark_res, mark_step, trace[:n_trace.value].tolist(),
                       step_c.value, status != 0)


class FreeSteps(RecurrentSteps):
    """The free dynamics ``ṡ = f(s)`` on ``s = [v | o]``; context ``drive``."""

    kind = 1

    def context(self, context):
        return context["drive"].contiguous(), None


class AdjointSteps(RecurrentSteps):
    """RBP's adjoint dynamics at the free state, ``λ̇ = −λ + [φ'(v°) ⊙ (λ [W; D]) | 0] + ∇_s L``;
    context ``lin`` (``φ'(v°)``, ``(B, H)``) and ``dL``."""

    kind = 2

    def context(self, context):
        return context["lin"].contiguous(), context["dL"].contiguous()


class ControlledSteps(RecurrentSteps):
    """LCP's controlled dynamics on ``z = [v | o | e | u_int]`` (``(B, 2N)``, ``N = H + K``):

        ż = [f(s) + ψ,  φ'(v) ⊙ (ψ M)_hidden − e,  −(∇_o L/B + α u_int)],   ψ = [e | k_i u_int − k_p ∇_o L/B]

    ``M`` the way back (``[W; D]``, or KP's feedback weights); context ``drive`` and ``target`` (dense).

    Args:
        op: the network's flat operator. loss: ``cross_entropy`` or ``mse``.
        alpha, k_i, k_p: the controller. inv_B: ``1/B`` of the full batch (the batch-mean loss).
    """

    kind = 0

    def __init__(self, op, loss: str, alpha: float, k_i: float, k_p: float, inv_B: float):
        super().__init__(op, alpha, k_i, k_p, inv_B, loss)
        self.groups = (self.N, self.H, self.K)

    def context(self, context):
        return context["drive"].contiguous(), context["target"].contiguous()


# The fields a system's flat operator can hand out (FlatOperator.native_steps), by phase.
PHASES = {"free": FreeSteps, "adjoint": AdjointSteps, "controlled": ControlledSteps}
