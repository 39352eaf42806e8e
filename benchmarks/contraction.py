"""Does the published Euler step still settle a trained RNN? The spectrum at its free equilibria.

For the RNN ``v̇ = −v + W φ(v) + Ux + b``, Euler with step ``dt`` iterates
``v ← (1 − dt) v + dt (W φ(v) + Ux + b)``, whose Jacobian at an equilibrium ``v*`` is
``(1 − dt) I + dt J`` with ``J = W diag(φ'(v*))``. Near ``v*`` the iteration converges iff every
eigenvalue ``λ`` of ``J`` gives ``|1 − dt (1 − λ)| < 1``:

* at the published ``dt = 1`` (a plain fixed-point iteration) iff the spectral radius ``ρ(J) < 1``;
* for some ``dt > 0`` iff ``Re λ < 1`` for every ``λ`` (the equilibrium is stable for the ODE),
  namely for ``dt < dt_max = min_λ 2 Re(1 − λ) / |1 − λ|²``.

RBP's adjoint iteration ``g ← Jᵀ g + ∇L`` has the same Jacobian, transposed, so it diverges where
``ρ(J) > 1``. For each training checkpoint (``--checkpoint`` of ``leastcontrol train``, or the
``.ckpt`` of a ``reproduce`` run) this script settles the first ``--samples`` test images tightly
(Anderson, tol 1e-8) and prints the fraction of them where that finds an equilibrium; over
those, the fraction with ``ρ(J) ≥ 1``, with ``max Re λ ≥ 1``, the median ``ρ(J)`` and
``dt_max``; and, over all of them, the fraction that the published solver (Euler, dt 1, tol 1e-4,
max 200 steps) settles.

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


def relative_residual(system: RecurrentEquilibrium, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Per sample ``‖W φ(v) + Ux + b − v‖ / ‖v‖``: the Euler (dt 1) step's relative change."""
    f = torch.tanh(v) @ system.W.t() + system.encode(x) - v
    return f.norm(dim=1) / v.norm(dim=1).clamp_min(1e-30)


def spectrum(system: RecurrentEquilibrium, v: torch.Tensor) -> torch.Tensor:
    """Eigenvalues ``(B, H)`` of ``J = W diag(φ'(v))`` for each sample's state ``v`` (float64)."""
    W = system.W.detach().double()
    slope = 1.0 - torch.tanh(v.double()).pow(2)
    return torch.linalg.eigvals(W.unsqueeze(0) * slope.unsqueeze(1))


def largest_stable_dt(eigenvalues: torch.Tensor) -> torch.Tensor:
    """Per sample ``min_λ 2 Re(1 − λ) / |1 − λ|²`` (≤ 0: no Euler step converges; the ODE is unstable)."""
    mu = 1.0 - eigenvalues
    return (2.0 * mu.real / mu.abs().pow(2)).min(dim=1).values


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
    tight = get_method("rbp", solver="anderson", tol=1e-8, max_iter=2000)
    v = tight.free_equilibrium(system, x).state["v"]
    settled = relative_residual(system, x, v) < 1e-6
    # The spectrum says something about the iteration only at an equilibrium.
    lam = spectrum(system, v[settled])
    rho = lam.abs().max(dim=1).values
    dt_max = largest_stable_dt(lam)
    published = get_method("rbp", tol=1e-4, max_iter=200)
    v_pub = published.free_equilibrium(system, x).state["v"]
    found = bool(settled.any())  # with none found, the spectral figures are None

    def stat(t: torch.Tensor, reduce) -> float | None:
        return reduce(t).item() if found else None

    return {
        "checkpoint": str(path), "epoch": state["epoch"], "method": config.method, "samples": len(x),
        "equilibrium_found_fraction": settled.double().mean().item(),
        "spectral_radius_at_least_1_fraction": stat(rho >= 1, lambda t: t.double().mean()),
        "max_real_part_at_least_1_fraction": stat(lam.real.amax(dim=1) >= 1, lambda t: t.double().mean()),
        "spectral_radius_median": stat(rho, torch.median),
        "spectral_radius_max": stat(rho, torch.max),
        "largest_stable_dt_median": stat(dt_max, torch.median),
        "largest_stable_dt_min": stat(dt_max, torch.min),
        "published_euler_settled_fraction": (relative_residual(system, x, v_pub) < 1e-4).double().mean().item(),
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
    print("| checkpoint | epoch | method | equilibrium found | ρ(J) ≥ 1 | max Re λ ≥ 1 | median ρ(J) | max ρ(J) "
          "| median dt_max | min dt_max | settled by Euler dt 1, 1e-4, 200 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    keys = ("equilibrium_found_fraction", "spectral_radius_at_least_1_fraction", "max_real_part_at_least_1_fraction",
            "spectral_radius_median", "spectral_radius_max", "largest_stable_dt_median", "largest_stable_dt_min",
            "published_euler_settled_fraction")
    for r in rows:
        cells = ["–" if r[k] is None else f"{r[k]:.3f}" for k in keys]
        print(f"| {Path(r['checkpoint']).name} | {r['epoch']} | {r['method']} | " + " | ".join(cells) + " |")
    if args.json_out:
        write_json(args.json_out, {"samples": args.samples, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
