"""LCP with dynamic inversion through learned feedback weights (Kolen-Pollack).

The hidden control population runs the dynamic-inversion dynamics with the
transposed forward weights replaced by separate feedback weights, for the RNN

    ė = −e + φ'(v) ⊙ (B e + D̃ u),        B ≈ Wᵀ, D̃ ≈ Dᵀ,

so no neuron needs access to another's synapses. The feedback weights receive
the same local update as the forward weights they mirror, transposed
(``ΔB = ΔWᵀ``), and after every optimizer step every weight, forward and
feedback, decays by ``(1 − κ)``; the difference ``W − Bᵀ`` then shrinks and the
feedback aligns with the forward transposes over training.

Reference: Meulemans et al., NeurIPS 2022, §3; Kolen & Pollack 1994; Akrout et al. 2019.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch

from ..systems.base import EquilibriumSystem
from .base import _check_number
from .lcp import LCPDI


@dataclass
class LCPKP(LCPDI):
    """LCP-DI with Kolen-Pollack feedback weights.

    Call :meth:`prepare` on the system before building the optimizer (the
    training loop does it) and :meth:`after_step` after each optimizer step.

    Args:
        kappa: per-step multiplicative decay of every weight matrix.
        alpha, k_i, k_p, solver, free, controlled: as :class:`LCPDI`.
    """

    name = "lcp-kp"
    kappa: float = 1e-6

    def __post_init__(self):
        super().__post_init__()
        _check_number("kappa", self.kappa, allow_zero=True)
        if self.kappa >= 1:
            raise ValueError(f"kappa must be < 1, got {self.kappa}")

    def check_system(self, system: EquilibriumSystem) -> None:
        super().check_system(system)
        if not system.feedback_pathways():
            raise ValueError(f"{type(system).__name__} has no feedback pathways; lcp-kp needs a built-in system "
                             "(ff or rnn)")

    def prepare(self, system: EquilibriumSystem, generator: torch.Generator | None = None) -> None:
        """Give the system its feedback weights (random, unit norm) if it has none yet."""
        system.add_feedback(generator)

    def _feedback(self, system):
        if getattr(system, "feedback", None) is None:
            self.prepare(system)
        return system.feedback

    def gradients(self, system, x, y):
        out = super().gradients(system, x, y)
        # ΔB = ΔWᵀ: each feedback matrix gets the transposed update of the weight it mirrors.
        for key, name in system.feedback_pathways().items():
            out.grads[f"feedback.{key}"] = system.mirror(key, out.grads[name]).contiguous()
        return out

    @torch.no_grad()
    def after_step(self, system: EquilibriumSystem) -> None:
        """Decay every weight matrix, forward and feedback, by ``(1 − κ)``."""
        if self.kappa:
            for p in system.parameters():
                if p.dim() >= 2:
                    p.mul_(1.0 - self.kappa)

    @torch.no_grad()
    def alignment(self, system: EquilibriumSystem) -> Dict[str, float]:
        """Cosine similarity between each feedback matrix and the transpose of its forward weight."""
        params = dict(system.named_parameters())
        result = {}
        for key, name in system.feedback_pathways().items():
            a, b = system.feedback[key].reshape(-1), system.mirror(key, params[name]).reshape(-1)
            result[key] = float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))
        return result
