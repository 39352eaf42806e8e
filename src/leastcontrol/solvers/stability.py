"""Linear stability of a fixed point under the Euler dynamics: the spectral radius of ``I + dt·∂_s g``."""
from __future__ import annotations

import importlib
import warnings
from typing import Dict

import torch

from ..errors import ConfigError, UnstableEquilibriumWarning
from .field import _TINY, Field, Layout

# A sample counts as unstable when its estimated Euler-map spectral radius exceeds 1 by more
# than the Krylov estimate's resolution.
UNSTABLE_RADIUS = 1.01
# Jacobian-vector products per sample of the estimate (the dimension of its Krylov space).
KRYLOV = 30


def flat_radius(field: Field, z: torch.Tensor, context, dt: float, krylov: int = KRYLOV, seed: int = 0) -> torch.Tensor:
    """:func:`euler_map_radius` of a flat field at the flat state ``z`` ``(B, N)``."""
    B, N = z.shape
    k = min(krylov, N)
    # The basis lives in float64 whatever the state's precision: only the products are in the
    # field's dtype, whose rounding (relative eps) then bounds where the Krylov space stops.
    f64 = dict(dtype=torch.float64, device=z.device)
    floor = 100 * torch.finfo(z.dtype).eps

    def euler_jvp(q):   # (I + dt·∂g) q, float64
        _, jg = torch.func.jvp(lambda s: field.fn(s, context), (z,), (q.to(z.dtype),))
        return q + dt * jg.double()

    gen = torch.Generator(device=z.device).manual_seed(seed)
    q = torch.randn(B, N, generator=gen, **f64)
    Q = torch.zeros(B, k + 1, N, **f64)   # the orthonormal basis, one row per vector
    Q[:, 0] = q / q.norm(dim=1, keepdim=True)
    H = torch.zeros(B, k + 1, k, **f64)
    with warnings.catch_warnings():
        # torch.func.jvp's first call imports torch's decompositions, which warn (once) about
        # their own use of the deprecated torch.jit.script.
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=DeprecationWarning)
        importlib.import_module("torch._decomp.decompositions_for_jvp")
    with torch.no_grad():   # forward-mode only: no graph for a backward pass
        for j in range(k):
            w = euler_jvp(Q[:, j])
            scale = w.norm(dim=1).clamp_min(1.0)
            basis = Q[:, :j + 1]
            h = torch.zeros(B, j + 1, **f64)
            for _ in range(2):   # Gram-Schmidt twice: the basis stays orthogonal to rounding
                c = torch.bmm(basis, w[:, :, None]).squeeze(-1)
                w = w - torch.bmm(c[:, None, :], basis).squeeze(1)
                h = h + c
            norm = w.norm(dim=1)
            H[:, :j + 1, j], H[:, j + 1, j] = h, norm
            # What is left at the products' rounding is no new direction: the Krylov space is
            # invariant, its Ritz values are exact, and the next vectors stay zero.
            Q[:, j + 1] = torch.where((norm > floor * scale)[:, None], w / norm.clamp_min(_TINY)[:, None], 0.0)
    return torch.linalg.eigvals(H[:, :k, :]).abs().amax(1)


def euler_map_radius(field, state, context: Dict[str, torch.Tensor] | None = None, *, dt: float = 1.0,
                     krylov: int = KRYLOV, seed: int = 0) -> torch.Tensor:
    """Each sample's spectral radius ``ρ(I + dt·∂_s g(s))`` of the Euler map's Jacobian at ``state``.

    At a fixed point ``g(s*) = 0``, ``ρ < 1`` means the Euler dynamics settle there (linear
    stability); ``ρ > 1`` means they move away from it: the state is a root of ``g``, as an
    accelerated solver (Anderson, Broyden) may find it, but not where the system settles on its
    own, and an Euler phase started there (an adjoint, a controlled phase) grows.

    Arnoldi iteration with forward-mode Jacobian-vector products (``torch.func.jvp``; no Jacobian
    is formed): ``krylov`` products per sample from a random start build an orthonormal basis of
    the Krylov space and the small Hessenberg matrix ``H`` of ``J`` on it; the estimate is the
    largest modulus of ``H``'s eigenvalues (the Ritz values). The outermost eigenvalues, a complex
    pair included, converge first, geometrically in ``krylov``; with ``krylov`` at least the
    state's width the result is exact. ``UNSTABLE_RADIUS`` (1.01) leaves a margin for the rest.

    The field must act on each sample separately, so the batched product gives every sample its
    own radius.

    Args:
        field: the vector field, ``field(state)`` or ``field(state, context)``, or a flat
            :class:`~leastcontrol.solvers.Field`.
        state: where to linearise (tensor, tuple or dict of tensors, batch first).
        context: batch-aligned tensors the field reads. dt: the Euler step.
        krylov: Jacobian-vector products per sample. seed: of the random start.
    Returns:
        ``(B,)`` float64 radii.
    Raises:
        ConfigError: ``krylov`` not a positive integer.

    >>> r = euler_map_radius(lambda s: -0.5 * s, torch.ones(3, 4))
    >>> [round(float(v), 6) for v in r]
    [0.5, 0.5, 0.5]
    """
    if not (isinstance(krylov, int) and not isinstance(krylov, bool) and krylov >= 1):
        raise ConfigError(f"krylov must be a positive integer, got {krylov!r}")
    if isinstance(field, Field):
        return flat_radius(field, state, context, float(dt), krylov, seed)
    layout = Layout(state)
    return flat_radius(layout.field(field, context is not None), layout.flat0, context, float(dt), krylov, seed)


def warn_unstable(radius: torch.Tensor, solver: str) -> None:
    """Warn (:class:`~leastcontrol.errors.UnstableEquilibriumWarning`) when a sample's radius exceeds 1."""
    unstable = radius > UNSTABLE_RADIUS
    if bool(unstable.any()):
        warnings.warn(
            f"{solver} settled {int(unstable.sum())} of {radius.numel()} samples at fixed points the plain "
            f"dynamics move away from (Euler-map spectral radius up to {float(radius.max()):.3g} > 1): the "
            "system would not settle there, and an Euler phase started there grows. Use the euler solver, or "
            "accelerate only close to a fixed point (a smaller start_below)",
            UnstableEquilibriumWarning, stacklevel=4)
