"""Does the published Euler step still settle a trained RNN? The spectrum at its free equilibria.

For the RNN ``v̇ = −v + W φ(v) + Ux + b``, Euler with step ``dt`` iterates
``v ← (1 − dt) v + dt (W φ(v) + Ux + b)``, whose Jacobian at an equilibrium ``v*`` is
``(1 − dt) I + dt J`` with ``J = W diag(φ'(v*))``. Near ``v*`` the iteration converges iff every
eigenvalue ``λ`` of ``J`` gives ``|1 − dt (1 − λ)| < 1``:

* at the published ``dt = 1`` (a plain fixed-point iteration) iff the spectral radius ``ρ(J) < 1``;
* for some ``dt > 0`` iff ``Re λ < 1`` for every ``λ`` (the equilibrium is stable for the ODE),
  namely for ``dt < dt_max = min_λ 2 Re(1 − λ) / |1 − λ|²``.

RBP's adjoint iteration ``g ← Jᵀ g + ∇L`` has the same Jacobian, transposed, so it converges
where the free Euler iteration does. For each training checkpoint (``--checkpoint`` of
``leastcontrol train``, or a ``reproduce`` run's ``.ckpt``) this script solves the free dynamics
of the first ``--samples`` test images from zero and prints the fraction that:

* the published solver settles (Euler, dt 1, tol 1e-4, max 200 steps);
* Euler at dt 1 settles tightly (to 1e-6 within 5000 steps);
* only Anderson (tol 1e-9, 2000 steps) settles: an equilibrium that Euler at dt 1 does not reach;
* neither settles: no equilibrium that either finds.

Over the equilibria found, with ``J`` there: the median ``ρ(J)``, the largest ``ρ(J)`` where Euler
settled (below 1, by the condition above), the fraction of Anderson's own with ``max Re λ < 1``
(a smaller ``dt`` would settle those), and the median ``dt_max``.

    python benchmarks/contraction.py CKPT [CKPT ...] --data-dir ../shared/data/mnist --json-out F
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from leastcontrol.atomic import write_json  # noqa: E402
from leastcontrol.data import load_dataset  # noqa: E402
from leastcontrol.methods import get_method  # noqa: E402
from leastcontrol.systems import RecurrentEquilibrium  # noqa: E402
from leastcontrol.train import config_from_checkpoint, load_checkpoint, restore_system  # noqa: E402


def relative_residual(system: RecurrentEquilibrium, x: torch.Tensor, state) -> torch.Tensor:
    """Per sample ``‖f_v‖ / ‖v‖`` of the system's own dynamics: the Euler (dt 1) step's relative change."""
    f = system.dynamics(state, system.encode(x))["v"]
    return f.norm(dim=1) / state["v"].norm(dim=1).clamp_min(1e-30)


def spectrum(system: RecurrentEquilibrium, state) -> torch.Tensor:
    """Eigenvalues ``(B, H)`` of ``J = W diag(φ'(v))`` at each sample's state (float64)."""
    W = system.W.detach().double()
    slope = system.rate_slope(state)["v"].double()
    return torch.linalg.eigvals(W.unsqueeze(0) * slope.unsqueeze(1))


def largest_stable_dt(eigenvalues: torch.Tensor) -> torch.Tensor:
    """Per sample ``min_λ 2 Re(1 − λ) / |1 − λ|²`` (≤ 0: no Euler step converges; the ODE is unstable)."""
    mu = 1.0 - eigenvalues
    return (2.0 * mu.real / mu.abs().pow(2)).min(dim=1).values


def settle(system, x, solver: str, tol: float, max_iter: int):
    """The state after a free solve from zero (the ``rbp`` method's free phase)."""
    return get_method("rbp", solver={"name": solver, "tol": tol, "max_steps": max_iter}).free_equilibrium(system, x).state


@torch.no_grad()
def measure(path: str, data_dir: str | None, samples: int) -> dict:
    state = load_checkpoint(path)
    config = config_from_checkpoint(state)
    if config.model != "rnn":
        raise SystemExit(f"{path}: a '{config.model}' checkpoint; this script measures the RNN (--model rnn)")
    data = load_dataset(config.dataset, data_dir or config.data_dir, 1, samples)
    system, _ = restore_system(state, config, data)
    system = system.double().eval()
    x = system.prepare_input(data.test_x[:samples].double())
    published = relative_residual(system, x, settle(system, x, "euler", 1e-4, 200)) < 1e-4
    # Euler at dt 1 settles only where it contracts; Anderson also finds equilibria it does not.
    euler = settle(system, x, "euler", 1e-9, 5000)
    by_euler = relative_residual(system, x, euler) < 1e-6
    anderson = settle(system, x, "anderson", 1e-9, 2000)
    by_anderson = ~by_euler & (relative_residual(system, x, anderson) < 1e-6)
    found = by_euler | by_anderson
    lam = spectrum(system, {"v": torch.where(by_anderson.unsqueeze(1), anderson["v"], euler["v"])})
    rho, top_real, dt_max = lam.abs().amax(dim=1), lam.real.amax(dim=1), largest_stable_dt(lam)

    def over(values: torch.Tensor, mask: torch.Tensor, reduce) -> float | None:
        return reduce(values[mask].double()).item() if bool(mask.any()) else None

    return {
        "checkpoint": str(path), "epoch": state["epoch"], "method": config.method, "samples": len(x),
        "published_euler_settled_fraction": published.double().mean().item(),
        "euler_settled_fraction": by_euler.double().mean().item(),
        "anderson_only_fraction": by_anderson.double().mean().item(),
        "no_equilibrium_found_fraction": (~found).double().mean().item(),
        "spectral_radius_median": over(rho, found, torch.median),
        "spectral_radius_max_where_euler_settled": over(rho, by_euler, torch.max),
        "anderson_only_stable_for_small_dt_fraction": over(top_real < 1, by_anderson, torch.mean),
        "largest_stable_dt_median": over(dt_max, found, torch.median),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [measure(c, args.data_dir, args.samples) for c in args.checkpoints]
    keys = ("published_euler_settled_fraction", "euler_settled_fraction", "anderson_only_fraction",
            "no_equilibrium_found_fraction", "spectral_radius_median", "spectral_radius_max_where_euler_settled",
            "anderson_only_stable_for_small_dt_fraction", "largest_stable_dt_median")
    print("| checkpoint | epoch | method | Euler dt 1 settles (1e-4, 200) | Euler dt 1 settles (1e-6, 5000) "
          "| only Anderson finds one | no equilibrium found | median ρ(J) | max ρ(J) where Euler settles "
          "| of Anderson's only: max Re λ < 1 | median dt_max |")
    print("|---|---|---|" + "---|" * len(keys))
    for r in rows:
        cells = ["–" if r[k] is None else f"{r[k]:.3f}" for k in keys]
        print(f"| {Path(r['checkpoint']).name} | {r['epoch']} | {r['method']} | " + " | ".join(cells) + " |")
    if args.json_out:
        write_json(args.json_out, {"samples": args.samples, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
