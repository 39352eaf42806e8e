"""The meta-training loop: Adam on ω with any meta-gradient method, held-out evaluation."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, Optional

import torch

from ..checkpoint import META_FORMAT, check_resume
from ..errors import ConfigError
from ..methods.lcp import check_controlled_residual
from ..run import Run
from .learners import check_activation
from .methods import META_METHODS, get_meta_method
from .problem import InnerProblem, InnerSettings
from .tasks import Omniglot, Sinusoid, check_episode

TASKS = {"sinusoid": Sinusoid, "omniglot": Omniglot}
# Each task's defaults: its documented set-up (docs/results.md, "Meta-learning"), under which every
# method's inner solves settle: Anderson-accelerated gradient steps of 0.1, each task's step capped
# by the curvature of its inner loss. A setting given explicitly wins.
TASK_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "sinusoid": dict(shots=10, queries=10, eval_queries=100, learner="mlp", activation="relu", meta_batch=25,
                     meta_steps=500, inner_solver="anderson", inner_lr=0.1, inner_step_rule="curvature", lam=2.0),
    "omniglot": dict(shots=1, queries=15, eval_queries=None, learner="mlp", activation="softplus", meta_batch=16,
                     meta_steps=150, inner_solver="anderson", inner_lr=0.1, inner_step_rule="curvature", lam=1.0),
}


# Settings that only some tasks or methods read: given for another, they are refused (not dropped).
_APPLIES = {"ways": ("task", ("omniglot",)), "data_dir": ("task", ("omniglot",)),
            "beta": ("method", ("lcp", "contrastive")), "route": ("method", ("lcp",)),
            "controlled_steps": ("method", ("lcp",)), "controlled_residual": ("method", ("lcp",)),
            "cg_steps": ("method", ("imaml",))}
# Their defaults where they apply (a setting a run does not read keeps this value, unused).
_DEFAULTS = {"ways": 5, "beta": 0.1, "route": "di", "controlled_residual": "per-population", "cg_steps": 10}


@dataclass
class MetaConfig:
    """Everything a meta-training run depends on; validated at construction.

    Settings left at ``None`` take the task's defaults (:data:`TASK_DEFAULTS`, its documented set-up).
    """

    task: str = "sinusoid"
    method: str = "lcp"
    ways: Optional[int] = None      # omniglot 5
    shots: Optional[int] = None     # sinusoid 10, omniglot 1
    queries: Optional[int] = None   # sinusoid 10, omniglot 15
    learner: Optional[str] = None   # omniglot: "mlp" (784-128-64-N) or "conv" (4 × conv 3×3, 64 channels)
    activation: Optional[str] = None  # the learner's rate function: relu, softplus, tanh
    data_dir: Optional[str] = None
    meta_batch: Optional[int] = None
    meta_steps: Optional[int] = None
    meta_lr: float = 1e-3
    inner_solver: Optional[str] = None   # gd, anderson or adam
    inner_lr: Optional[float] = None
    inner_steps: int = 300
    inner_tol: float = 1e-5
    inner_step_rule: Optional[str] = None  # fixed, or curvature: each task's step capped at 1/λ_max(H + λ)
    lam: Optional[float] = None
    learn_lam: bool = False
    beta: Optional[float] = None    # lcp, contrastive: 0.1
    route: Optional[str] = None     # lcp: "di" (default) or "energy"
    controlled_steps: Optional[int] = None  # lcp: max steps of the controlled dynamics; default: inner_steps
    controlled_residual: Optional[str] = None  # lcp: "per-population" (default) or "joint" (one residual over [φ | ψ])
    cg_steps: Optional[int] = None  # imaml: 10
    eval_tasks: int = 1000
    eval_queries: Optional[int] = None  # default: 100 (sinusoid), queries (omniglot)
    eval_chunk: Optional[int] = None    # tasks adapted at once in evaluation; default: meta_batch
    log_every: int = 50
    seed: int = 0
    json_out: Optional[str] = None
    checkpoint: Optional[str] = None  # saved every checkpoint_every meta-steps, atomically
    checkpoint_every: int = 10
    resume: bool = False              # continue the run saved in checkpoint
    progress: bool = True

    def __post_init__(self):
        if self.task not in TASKS:
            raise ConfigError(f"unknown meta task '{self.task}'; valid: {', '.join(sorted(TASKS))}")
        META_METHODS.factory(self.method)
        for key, (kind, users) in _APPLIES.items():
            mine = self.task if kind == "task" else self.method
            # Its default is no choice: the settings rebuild themselves (dataclasses.replace, a checkpoint's).
            if getattr(self, key) not in (None, _DEFAULTS.get(key)) and mine not in users:
                flag = "--" + key.replace("_", "-")
                kinds = kind + ("s" if len(users) > 1 else "")
                raise ConfigError(f"{flag} ({key}) is a setting of the {kinds} {' and '.join(users)}, not of {mine}; "
                                  "leave it out")
        for key, value in {**_DEFAULTS, **TASK_DEFAULTS[self.task]}.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        check_controlled_residual(self.controlled_residual)
        if self.eval_queries is None:
            self.eval_queries = self.queries
        if self.eval_chunk is None:
            self.eval_chunk = self.meta_batch
        for key in ("ways", "shots", "queries", "meta_batch", "meta_steps", "inner_steps", "eval_tasks",
                    "eval_queries", "eval_chunk", "log_every", "cg_steps", "checkpoint_every"):
            value = getattr(self, key)
            if not (isinstance(value, int) and value >= 1):
                raise ConfigError(f"{key} must be a positive integer, got {value!r}")
        for key in ("meta_lr", "lam", "beta", "inner_lr"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{key} must be a positive number, got {value!r}")
        check_activation(self.activation)
        check_resume(self.checkpoint, self.resume)
        if self.task == "omniglot":
            check_episode(self.shots, self.queries)
            check_episode(self.shots, self.eval_queries, "eval_queries")
        self.inner_settings()
        self.build_method()

    def build_task(self):
        """The task distribution (reads the Omniglot archives)."""
        if self.task == "omniglot":
            return Omniglot(ways=self.ways, shots=self.shots, queries=self.queries, learner=self.learner,
                            activation=self.activation, data_dir=self.data_dir)
        return Sinusoid(shots=self.shots, queries=self.queries, activation=self.activation)

    def inner_settings(self) -> InnerSettings:
        return InnerSettings(self.inner_solver, self.inner_lr, self.inner_steps, self.inner_tol, self.inner_step_rule)

    def build_method(self):
        options = {"inner": self.inner_settings(), "learn_lam": self.learn_lam}
        if self.method in ("lcp", "contrastive"):
            options["beta"] = self.beta
        if self.method == "lcp":
            options.update(route=self.route, tol=self.inner_tol, controlled_residual=self.controlled_residual,
                           max_iter=self.controlled_steps or self.inner_steps, energy_steps=self.inner_steps)
        if self.method == "imaml":
            options["cg_steps"] = self.cg_steps
        return get_meta_method(self.method, **options)


def evaluate(problem: InnerProblem, omega: torch.Tensor, task, settings: InnerSettings, n_tasks: int,
             queries: int, seed: int, chunk: int = 100) -> Dict[str, Any]:
    """Post-adaptation metric on ``n_tasks`` held-out tasks: mean and 95% confidence half-width.

    The metric is the query MSE for regression and the query accuracy for classification;
    ``inner_converged_fraction`` is the mean fraction of tasks whose adaptation reached ``tol``.
    """
    g = torch.Generator().manual_seed(10_000 + seed)  # never the training stream
    values, converged = [], []
    for start in range(0, n_tasks, chunk):
        batch = task.sample(min(chunk, n_tasks - start), g, queries=queries, split="test")
        free = problem.equilibrium(omega, batch.x, batch.y, settings)
        phi = free.state
        converged.append(free.stats.converged_fraction)
        with torch.no_grad():
            if task.loss == "mean_squared_error":
                values.append(problem.losses(phi, batch.xq, batch.yq))
            else:
                values.append((problem.forward(phi, batch.xq).argmax(-1) == batch.yq).double().mean(1))
    v = torch.cat(values).double()
    return {"metric": "mse" if task.loss == "mean_squared_error" else "accuracy", "mean": float(v.mean()),
            "ci95": float(1.96 * v.std() / math.sqrt(len(v))), "tasks": int(len(v)),
            "inner_converged_fraction": sum(converged) / len(converged)}


def unsettled_inner_message(fraction: float, settings: InnerSettings, where: str) -> str | None:
    """A readable warning when the inner solve missed ``tol`` on more than a tenth of the tasks.

    Gradient dynamics with step ``lr`` settle only if ``lr < 2 / λ_max(H + λ)``; a meta-trained ω
    can sharpen the inner loss past that bound, after which the adapted weights oscillate and
    every meta-gradient is taken at a point that is not an equilibrium.
    """
    if fraction >= 0.9:
        return None
    return (f"the inner solve reached --inner-tol {settings.tol:g} on only {100 * fraction:.0f}% of the "
            f"{where} tasks (--inner-solver {settings.solver}, --inner-lr {settings.lr:g}, --inner-steps "
            f"{settings.steps}); the meta-gradients are taken away from the inner equilibrium. If the step "
            f"exceeds 2/λ_max of the inner Hessian the gradient dynamics oscillate: use --inner-step-rule "
            f"curvature, or lower --inner-lr and raise --inner-steps")


CG_RESIDUAL_WARN = 1e-2


def unsolved_cg_message(residual: float | None, cg_steps: int) -> str | None:
    """A readable warning when iMAML's conjugate gradient left a large residual on ``(H + λ) u = ∇L_val``.

    ``residual`` is the worst task's relative residual, averaged over the last logged window.
    Meta-training sharpens the inner loss, so the condition number of ``H + λ`` grows and a CG
    budget that solved the system at the start no longer does; the meta-gradient then drifts
    toward the first-order one. ``None`` (a method without CG) gives no warning.
    """
    if residual is None or not residual > CG_RESIDUAL_WARN:
        return None
    return (f"iMAML's conjugate gradient ended meta-training with a relative residual of {residual:.2g} on "
            f"(H + λ) u = ∇L_val after --cg-steps {cg_steps}, so its meta-gradient is only partly implicit: raise "
            f"--cg-steps (a task that meets negative curvature stops early whatever the budget; a settled inner "
            f"solve avoids that)")


def _mean_stats(window: list) -> Dict[str, float]:
    """The mean over a logging window of each numeric stat the method reported (CG residual, iterations, ...)."""
    keys = [k for k, v in window[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return {k: sum(float(s[k]) for s in window) / len(window) for k in keys}


# Settings a resumed run may change (where results go and how often to save); every other setting
# must be the checkpoint's.
_RESUME_FREE = ("data_dir", "json_out", "checkpoint", "checkpoint_every", "resume", "progress")


def meta_train(config: MetaConfig) -> Dict[str, Any]:
    """Meta-train ω (the learner's initialisation and anchor) and evaluate it on held-out tasks.

    Returns:
        ``{"config", "history": [{"step", "val_loss", "seconds", "inner_converged_fraction", "method_stats"}],
        "test": {"metric", "mean", "ci95", "tasks"}, "test_untrained": {...}, "train_seconds",
        "inner_converged_fraction": {"train", "test", "test_untrained"}}``; also written to
        ``config.json_out``. ``inner_converged_fraction`` is the mean fraction of tasks whose inner
        solve reached ``tol``; below 0.9 (training or held-out) a ``RuntimeWarning`` says so and
        names the fix, as it does when iMAML's CG residual over the last logged window exceeds 1e-2.

    With ``config.checkpoint`` the run is saved every ``checkpoint_every`` meta-steps (ω, Adam,
    both random streams, the history so far); ``resume=True`` continues it from there, to the same
    result as a run that was never interrupted.

    Raises:
        ConfigError, CheckpointError (a checkpoint that exists without ``resume``, is unreadable,
        or belongs to a run with other settings).
    """
    # Outputs and the checkpoint are checked before the data loads and anything trains.
    run = Run(META_FORMAT, asdict(config), free=_RESUME_FREE, checkpoint=config.checkpoint, resume=config.resume,
              json_out=config.json_out, progress=config.progress)
    with run.collecting():   # the library's warnings join the result's
        return _meta_train(config, run)


def _meta_train(config: MetaConfig, run: Run) -> Dict[str, Any]:
    torch.manual_seed(config.seed)
    g = torch.Generator().manual_seed(config.seed)
    task = config.build_task()
    model = task.model(g)
    method = config.build_method()
    settings = config.inner_settings()
    omega = torch.nn.Parameter(InnerProblem(model, task.loss).initial_weights())
    # λ > 0 per weight, learned as log λ (its gradient is λ ⊙ ∇_λ).
    log_lam = torch.nn.Parameter(torch.full_like(omega, math.log(config.lam)), requires_grad=config.learn_lam)

    def problem() -> InnerProblem:
        lam = log_lam.detach().exp() if config.learn_lam else config.lam
        return InnerProblem(model, task.loss, lam=lam)

    def held_out():
        return evaluate(problem(), omega.detach(), task, settings, config.eval_tasks, config.eval_queries,
                        config.seed, config.eval_chunk)

    opt = torch.optim.Adam([omega, log_lam] if config.learn_lam else [omega], lr=config.meta_lr)
    history, window, settled, window_stats = [], [], [], []
    first_step, seconds_before = 1, 0.0
    state = run.state
    if state is not None:
        with torch.no_grad():
            omega.copy_(state["omega"])
            log_lam.copy_(state["log_lam"])
        opt.load_state_dict(state["optimizer"])
        g.set_state(state["task_rng"])
        torch.set_rng_state(state["torch_rng"])
        untrained, history, settled = state["untrained"], state["history"], state["settled"]
        window, window_stats = state["window"], state["window_stats"]
        first_step, seconds_before = state["step"] + 1, state["train_seconds"]
    else:
        untrained = held_out()
    start = time.perf_counter() - seconds_before
    bar = run.bar(range(first_step, config.meta_steps + 1), desc=f"meta {config.method}", initial=first_step - 1,
                  total=config.meta_steps)
    for step in bar:
        inner = problem()
        out = method(inner, omega.detach(), task.sample(config.meta_batch, g))
        omega.grad = out.grad.to(omega.dtype)
        if config.learn_lam:
            log_lam.grad = (inner.lam * out.grad_lam).to(log_lam.dtype)
        opt.step()
        window.append(out.val_loss)
        settled.append(out.stats["inner_converged"])
        window_stats.append(out.stats)
        if step % config.log_every == 0 or step == config.meta_steps:
            stats = _mean_stats(window_stats)
            entry = {"step": step, "val_loss": sum(window) / len(window), "seconds": time.perf_counter() - start,
                     "inner_converged_fraction": stats["inner_converged"], "method_stats": stats}
            if config.learn_lam:
                entry["lam_mean"] = float(log_lam.detach().exp().mean())
            history.append(entry)
            bar.set_postfix(val=f"{entry['val_loss']:.3f}")
            window, window_stats = [], []
        if step % config.checkpoint_every == 0 or step == config.meta_steps:
            run.save(step=step, omega=omega.detach(), log_lam=log_lam.detach(), optimizer=opt.state_dict(),
                     task_rng=g.get_state(), torch_rng=torch.get_rng_state(), untrained=untrained, history=history,
                     settled=settled, window=window, window_stats=window_stats,
                     train_seconds=time.perf_counter() - start)
    train_seconds = time.perf_counter() - start
    test = held_out()
    settled_fractions = {"train": sum(settled) / len(settled), "test": test.pop("inner_converged_fraction"),
                         "test_untrained": untrained.pop("inner_converged_fraction")}
    result = {"config": asdict(config), "history": history, "test": test, "test_untrained": untrained,
              "train_seconds": train_seconds, "inner_converged_fraction": settled_fractions}
    for fraction, where in ((settled_fractions["train"], "meta-training"), (settled_fractions["test"], "held-out")):
        message = unsettled_inner_message(fraction, settings, where)
        if message:
            run.warn(message, RuntimeWarning)
    message = unsolved_cg_message(history[-1]["method_stats"].get("cg_residual"), config.cg_steps)
    if message:
        run.warn(message, RuntimeWarning)
    return run.finish(result)
