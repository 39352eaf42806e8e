"""Native Euler steps for the tail of a solve: the few samples left after most have settled.

At a handful of active samples a step of the controlled dynamics is two small matrix products and
a few elementwise passes, microseconds of arithmetic; in PyTorch each of its dozen operations costs
a fixed few microseconds of dispatch, and that fixed cost, paid hundreds of times per batch, is
where the controlled phase of LCP-DI spends half its time (``docs/performance.md``). Here the steps
between two convergence checks run as one C loop (``rnn_lcp.c``) on the recurrent network's
controlled field, the same field :class:`~leastcontrol.methods.lcp.LCPDI` builds from PyTorch
operations: same iterates up to floating-point order, same stopping rule.

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
from typing import Sequence, Tuple

import torch

from ..atomic import atomic_target
from ..errors import ConfigError
from ..paths import user_cache_dir

SOURCE = Path(__file__).with_name("rnn_lcp.c")
# Optimise for the machine it runs on; keep IEEE semantics (no -ffast-math: sums are not reordered).
_FLAGS = ("-O3", "-fno-math-errno", "-shared", "-fPIC")
_LOSSES = {"cross_entropy": 0, "mse": 1}
_DTYPES = {torch.float32: ("_f32", ctypes.c_float), torch.float64: ("_f64", ctypes.c_double)}


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
                                     platform.machine().encode(), platform.platform().encode()])).hexdigest()[:16]
    target = user_cache_dir("native", f"rnn_lcp-{key}.so")
    if not target.exists():
        _build(cc, target)
    lib = ctypes.CDLL(str(target))
    lib.lc_work_size.restype = ctypes.c_long
    lib.lc_work_size.argtypes = [ctypes.c_int] * 3
    for suffix, real in _DTYPES.values():
        fn = getattr(lib, "lc_rnn_lcp_steps" + suffix)
        fn.restype = None
        fn.argtypes = [ctypes.c_int] * 4 + [real] * 5 + [ctypes.c_int] * 2 + [ctypes.c_void_p] * 7
    return lib


def _pad_columns(t: torch.Tensor, width: int) -> torch.Tensor:
    out = t.new_zeros(t.shape[0], width)
    out[:, :t.shape[1]] = t
    return out


class RecurrentControlledSteps:
    """``n`` Euler steps of LCP's controlled field on the recurrent network, in C, in place.

    The field on ``z = [v | o | e | u_int]`` (``(B, 2N)``, ``N = H + K``):

        ż = [f(s) + ψ,  φ'(v) ⊙ (ψ M)_hidden − e,  −(∇_o L/B + α u_int)],   ψ = [e | k_i u_int − k_p ∇_o L/B]

    with ``f(s) = φ(v) [W; D]ᵀ + drive − s`` and ``M`` the way back (``[W; D]``, or KP's feedback
    weights). Built from the flat operator of
    :class:`~leastcontrol.systems.networks.RecurrentEquilibrium` (its ``forward_t`` and ``back``).

    Args:
        op: the network's flat operator. loss: ``cross_entropy`` or ``mse``.
        alpha, k_i, k_p: the controller. inv_B: ``1/B`` of the full batch (the batch-mean loss).
    Raises:
        ConfigError: the tensors are not on the CPU in float32 or float64, or no C compiler.
    """

    def __init__(self, op, loss: str, alpha: float, k_i: float, k_p: float, inv_B: float):
        dtype = op.forward_t.dtype
        if op.forward_t.device.type != "cpu" or dtype not in _DTYPES:
            raise ConfigError(f"native=True runs on the CPU in float32 or float64; got {op.forward_t.device.type} "
                              f"{str(dtype).removeprefix('torch.')}; run without native")
        if loss not in _LOSSES:
            raise ConfigError(f"native=True covers the losses {', '.join(_LOSSES)}; got '{loss}'; run without native")
        self.lib = library()
        suffix, self.real = _DTYPES[dtype]
        self.fn = getattr(self.lib, "lc_rnn_lcp_steps" + suffix)
        self.H = op.H
        self.N = op.forward_t.shape[1]
        self.K = self.N - self.H
        pad = self.lib.lc_pad
        self.Ft = _pad_columns(op.forward_t, pad(self.N))          # (H, Np)
        self.Bk = _pad_columns(op.back, pad(self.H))               # (N, Hp)
        self.constants = tuple(self.real(v) for v in (alpha, k_i, k_p, inv_B))
        self.loss = _LOSSES[loss]
        self.groups = (self.N, self.H, self.K)
        self.work = None   # scratch, sized by the first (largest) batch of a solve

    def supports(self, groups: Sequence[int] | None) -> bool:
        """Whether the residual the solver reads (``groups``: per population, or one over ``z``) is one this computes."""
        return groups is None or tuple(groups) == self.groups

    def __call__(self, z: torch.Tensor, context, dt: float, n: int,
                 groups: Sequence[int] | None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(z_n, residual)``: ``n`` steps from ``z`` (not modified) and each sample's relative residual of
        the last step, ``dt·‖g‖/‖z_{n−1}‖`` over ``groups`` (largest over the three populations, or one over ``z``)."""
        z = z.contiguous().clone()
        drive, target = context["drive"].contiguous(), context["target"].contiguous()
        B = z.shape[0]
        if self.work is None or self.work.numel() < self.lib.lc_work_size(B, self.H, self.K):
            self.work = z.new_empty(int(self.lib.lc_work_size(B, self.H, self.K)))
        res = z.new_empty(B)
        self.fn(B, self.H, self.K, n, self.real(dt), *self.constants, self.loss, groups is None,
                z.data_ptr(), drive.data_ptr(), target.data_ptr(), self.Ft.data_ptr(), self.Bk.data_ptr(),
                res.data_ptr(), self.work.data_ptr())
        return z, res
