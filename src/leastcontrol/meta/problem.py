"""The inner problem of meta-learning as an equilibrium system over the learner's weights.

For a task with support data ``(x, y)`` and meta-parameters ω (an anchor /
initialisation), the learner's weights φ follow the gradient dynamics of the
regularised training loss,

    φ̇ = f(φ, ω) = −∇_φ [ L_train(φ) + (λ/2)‖φ − ω‖² ] = −∇L_train(φ) − λ (φ − ω),

whose equilibrium φ° is the adapted learner. Everything is batched over tasks:
φ has shape ``(T, P)`` (P = number of the model's weights, flattened), data
``(T, K, ...)``. Per-task losses are evaluated with ``torch.func.functional_call``
under ``vmap``; Hessian-vector products are forward-over-reverse.

Reference: Meulemans et al., NeurIPS 2022, §5 (meta-learning); Rajeswaran et
al., 2019 (iMAML).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict

import torch
from torch import nn
from torch.func import functional_call, vmap

from ..errors import ConfigError, SolverDivergedError
from ..losses import get_loss
from ..solvers import Adam, Anderson, Euler, Solver, SolveResult


INNER_SOLVERS = ("gd", "anderson", "adam")
STEP_RULES = ("fixed", "curvature")


@dataclass
class InnerSettings:
    """How the free (and nudged) inner equilibria are reached.

    Args:
        solver: ``gd`` (Euler on the gradient dynamics with step ``lr``; tasks freeze at ``tol``),
            ``anderson`` (Anderson acceleration of that gradient step; tasks freeze at ``tol``;
            the controlled dynamics of ``lcp`` use it too) or ``adam`` (Adam on the inner
            objective for ``steps`` steps: a fast way to the equilibrium).
        lr: step size. steps: maximum number of steps. tol: relative-residual tolerance (``gd``).
        step_rule: ``fixed`` — every task steps with ``lr``; ``curvature`` — each task's step is
            capped at ``1 / λ_max(H + λ)``, half the stability bound of the gradient dynamics,
            with ``λ_max`` estimated at the start of every solve by ``power_iters`` Hessian-vector
            products (a rescaling of time per task: the equilibria do not change; ``tol`` still
            bounds the unscaled step ``lr · ‖f‖ / ‖φ‖``). Meta-training can sharpen the inner loss
            past ``2 / lr``, where fixed-step dynamics oscillate.
        power_iters: power iterations of the ``curvature`` rule.
    """

    solver: str = "gd"
    lr: float = 0.01
    steps: int = 300
    tol: float = 1e-5
    step_rule: str = "fixed"
    power_iters: int = 10

    def __post_init__(self):
        if self.solver not in INNER_SOLVERS:
            raise ConfigError(f"unknown inner solver '{self.solver}'; valid: {', '.join(sorted(INNER_SOLVERS))}")
        if self.step_rule not in STEP_RULES:
            raise ConfigError(f"unknown inner step rule '{self.step_rule}'; valid: {', '.join(STEP_RULES)}")
        if self.step_rule == "curvature" and self.solver == "adam":
            raise ConfigError("the curvature step rule applies to the gradient dynamics (gd, anderson), not adam")
        if not (isinstance(self.power_iters, int) and self.power_iters >= 1):
            raise ConfigError(f"power_iters must be a positive integer, got {self.power_iters!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"inner lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise ConfigError(f"inner steps must be a positive integer, got {self.steps!r}")

    def fixed_point_solver(self, tol: float, max_steps: int) -> Solver:
        """The solver of the gradient dynamics with step ``lr``: Euler (``gd`` and ``adam``) or Anderson."""
        if self.solver == "anderson":
            return Anderson(dt=self.lr, tol=tol, max_steps=max_steps, check_every=1)
        return Euler(dt=self.lr, tol=tol, max_steps=max_steps, check_every=5)

    def descent_solver(self) -> Solver:
        """``adam``: Adam with step ``lr`` on the inner objective, ``steps`` steps for every task."""
        return Adam(lr=self.lr, tol=0.0, max_steps=self.steps, check_every=20)


INNER_STEP_HINT = ("Lower --inner-lr, or use --inner-step-rule curvature: gradient dynamics with step lr are "
                   "stable only for lr < 2/λ_max of the inner Hessian (plus λ).")


@contextmanager
def inner_divergence_hint(settings: InnerSettings):
    """Re-raise a diverged inner solve with the fix that applies to it: the gradient step."""
    try:
        yield
    except SolverDivergedError as err:
        raise SolverDivergedError(
            err.population, err.step, f"inner {settings.solver} (step {settings.lr:g})", INNER_STEP_HINT) from None


def _mlp_layers(model: nn.Module, names):
    """``[(kind, weight index, bias index)]`` for a Sequential MLP, else ``None`` (generic path)."""
    if not isinstance(model, nn.Sequential):
        return None
    index = {n: i for i, n in enumerate(names)}
    layers = []
    for i, m in enumerate(model):
        if isinstance(m, nn.Linear) and m.bias is not None:
            layers.append(("linear", index[f"{i}.weight"], index[f"{i}.bias"]))
        elif isinstance(m, nn.ReLU):
            layers.append((torch.relu, None, None))
        elif isinstance(m, nn.Tanh):
            layers.append((torch.tanh, None, None))
        elif isinstance(m, nn.Softplus) and m.beta == 1 and m.threshold == 20:
            layers.append((nn.functional.softplus, None, None))
        else:
            return None
    return layers


class InnerProblem:
    """Per-task losses, gradients and Hessian-vector products of a model over flat weights.

    Args:
        model: the learner (its current weights only give the shapes and the default ω).
        loss: a per-sample loss of the library's registry (:mod:`leastcontrol.losses`):
            ``mean_squared_error`` (regression) or ``cross_entropy``; a task's loss is its mean over
            the task's samples.
        lam: strength λ of the pull towards ω: a float, or a ``(P,)`` tensor (one per weight).

    >>> net = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1))
    >>> problem = InnerProblem(net, "mean_squared_error", lam=1.0)
    >>> problem.n_params
    13
    """

    def __init__(self, model: nn.Module, loss: str = "mean_squared_error", lam: float | torch.Tensor = 1.0):
        self.model = model
        self.loss_name = loss
        self._loss = get_loss(loss)   # the library's registry: an unknown name lists the valid ones
        named = [(n, p) for n, p in model.named_parameters()]
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.n_params = sum(self.sizes)
        self.buffers = dict(model.named_buffers())
        self.lam = lam
        self._layers = _mlp_layers(model, self.names)

    def initial_weights(self) -> torch.Tensor:
        """The model's current weights as one flat vector ``(P,)`` (a natural start for ω)."""
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])

    def unflatten(self, phi: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {n: t.reshape(s) for n, t, s in zip(self.names, torch.split(phi, self.sizes), self.shapes)}

    def task_loss(self, phi: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Loss of one task's weights ``(P,)`` on its data ``(K, ...)``."""
        out = functional_call(self.model, (self.unflatten(phi), self.buffers), (x,))
        return self._loss.value(out, y).mean()

    # --- batched over tasks ------------------------------------------------------
    def forward(self, phi: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Outputs of every task's learner on its inputs: ``(T, K, ...)``.

        A model with ``batched_forward`` (see :mod:`~leastcontrol.meta.learners`) runs
        it; an ``nn.Sequential`` of ``Linear``/``ReLU``/``Tanh`` runs as batched matrix
        products over the task axis; any other model runs under ``vmap(functional_call)``.
        """
        params = [t.reshape(phi.shape[0], *shape) for t, shape in zip(torch.split(phi, self.sizes, dim=1), self.shapes)]
        if hasattr(self.model, "batched_forward"):
            return self.model.batched_forward(params, x)
        if self._layers is None:
            return vmap(lambda p, xx: functional_call(self.model, (self.unflatten(p), self.buffers), (xx,)))(phi, x)
        h = x
        for kind, w, b in self._layers:
            if kind == "linear":
                h = torch.baddbmm(params[b].unsqueeze(1), h, params[w].transpose(1, 2))
            else:
                h = kind(h)
        return h

    def losses(self, phi: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-task losses ``(T,)``."""
        out = self.forward(phi, x)
        T, K = y.shape[:2]
        return self._loss.value(out.reshape(T * K, *out.shape[2:]), y.reshape(T * K, *y.shape[2:])).reshape(T, K).mean(1)

    def grads(self, phi: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-task loss gradients ``∇_φ L(φ_t)``, shape ``(T, P)`` (tasks share no weights, so one backward)."""
        with torch.enable_grad():
            p = phi.detach().requires_grad_(True)
            return torch.autograd.grad(self.losses(p, x, y).sum(), p)[0]

    def grad_and_hvp(self, phi: torch.Tensor, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor):
        """Per-task ``(∇L(φ_t), ∇²L(φ_t) v_t)``, each ``(T, P)``, from one double backward.

        Tasks do not share weights, so double backward through the *sum* of the
        task losses gives every task's own product at once (cheaper than vmapping
        a forward-over-reverse product).
        """
        with torch.enable_grad():
            p = phi.detach().requires_grad_(True)
            g, = torch.autograd.grad(self.losses(p, x, y).sum(), p, create_graph=True)
            return g.detach(), torch.autograd.grad(g, p, grad_outputs=v)[0].detach()

    def hvp(self, phi: torch.Tensor, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Per-task Hessian-vector products ``∇²L(φ_t) v_t``, shape ``(T, P)``."""
        return self.grad_and_hvp(phi, x, y, v)[1]

    # --- the equilibrium system ------------------------------------------------------
    def top_curvature(self, phi: torch.Tensor, x, y, iters: int) -> torch.Tensor:
        """Per-task largest eigenvalue of ``H + λ`` at ``φ`` by power iteration, shape ``(T,)``.

        Starts from the gradient of the training loss (no random numbers) and returns the last
        Rayleigh quotient, a lower bound that the iteration raises.
        """
        with torch.no_grad():
            v = self.grads(phi, x, y)
            v = v + 1e-3 * v.abs().mean(1, keepdim=True)  # a zero gradient still gives a direction
            rayleigh = torch.zeros(phi.shape[0], dtype=phi.dtype, device=phi.device)
            for _ in range(iters):
                v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
                hv = self.hvp(phi, x, y, v) + self.lam * v
                rayleigh = (hv * v).sum(1)
                v = hv
            return rayleigh

    def step_scale(self, phi: torch.Tensor, x, y, settings: InnerSettings) -> torch.Tensor | None:
        """Per-task time scale ``min(1, 1 / (lr · λ_max))`` of the ``curvature`` rule, ``(T, 1)``; None if fixed."""
        if settings.step_rule != "curvature":
            return None
        top = self.top_curvature(phi, x, y, settings.power_iters)
        return (1.0 / (settings.lr * top.clamp_min(1e-30))).clamp(max=1.0)[:, None]

    @staticmethod
    def scaled_tol(tol: float, scale: torch.Tensor | None) -> float:
        """The solver tolerance that keeps ``tol``'s meaning under a per-task time scale.

        The solvers test the step they take, ``scale · lr · ‖f‖ / ‖φ‖``; ``tol`` bounds the unscaled
        step ``lr · ‖f‖ / ‖φ‖``, so the test is tightened by the smallest scale of the batch.
        """
        return tol if scale is None else tol * float(scale.min())

    # --- the inner problem as a system on the flat state φ (T, P); context: omega, x, y (batch-aligned)
    def f(self, phi: torch.Tensor, c) -> torch.Tensor:
        """``f(φ) = −∇L_train(φ) − λ(φ − ω)`` (:meth:`field` with the context's ``omega``, ``x``, ``y``)."""
        return self.field(phi, c["omega"], c["x"], c["y"])

    def f_and_vjp(self, phi: torch.Tensor, c, a: torch.Tensor):
        """``(f(φ), (∂_φ f)ᵀ a)`` with ``(∂_φ f)ᵀ a = −(H + λ) a`` (H symmetric), from one double backward."""
        g, ha = self.grad_and_hvp(phi, c["x"], c["y"], a)
        return -g - self.lam * (phi - c["omega"]), -ha - self.lam * a

    def vjp(self, phi: torch.Tensor, c, a: torch.Tensor) -> torch.Tensor:
        """``(∂_φ f)ᵀ a = −(H + λ) a``."""
        return -self.hvp(phi, c["x"], c["y"], a) - self.lam * a

    def param_vjp(self, phi: torch.Tensor, omega: torch.Tensor, cotangent: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``(∂_θ f)ᵀ c`` per task in the parameters ``θ = (ω, λ)``: ``∂_ω f = diag(λ)``, ``∂_λ f = −diag(φ − ω)``."""
        return {"omega": self.lam * cotangent, "lam": -(phi - omega) * cotangent}

    def field(self, phi, omega, x, y, nudge: float = 0.0, xq=None, yq=None) -> torch.Tensor:
        """``f(φ) = −∇L_train(φ) − λ(φ − ω)``, plus ``−β ∇L_val(φ)`` when nudged (``nudge = β``)."""
        f = -self.grads(phi, x, y) - self.lam * (phi - omega)
        if nudge:
            f = f - nudge * self.grads(phi, xq, yq)
        return f

    def equilibrium(self, omega: torch.Tensor, x, y, settings: InnerSettings, *, start=None,
                    nudge: float = 0.0, xq=None, yq=None) -> SolveResult:
        """Settle the inner dynamics from ``start`` (default ω) for every task: the adapted weights.

        With ``nudge = β`` the equilibrium of the nudged objective ``F + β L_val`` (contrastive rule).
        """
        T = x.shape[0]
        omega_t = omega.detach().expand(T, -1)
        phi0 = (omega_t if start is None else start).detach().clone()
        context = {"omega": omega_t, "x": x, "y": y}
        if nudge:
            context.update(xq=xq, yq=yq)
        scale = self.step_scale(phi0, x, y, settings)
        if scale is not None:
            context["scale"] = scale

        def field(s, c):
            f = self.field(s["phi"], c["omega"], c["x"], c["y"], nudge, c.get("xq"), c.get("yq"))
            return {"phi": f * c["scale"] if "scale" in c else f}

        tol = self.scaled_tol(settings.tol, scale)
        solver = settings.descent_solver() if settings.solver == "adam" else settings.fixed_point_solver(tol, settings.steps)
        with inner_divergence_hint(settings):
            res = solver.solve(field, {"phi": phi0}, context)
        return SolveResult(res.state["phi"], res.stats)
