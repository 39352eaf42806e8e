"""Per-sample losses and their gradients: of the output population, and of a meta-learner's outputs.

The controller of LCP needs ``∇_o ℓ(o, y)`` for every sample separately, so a
loss here returns per-sample values (shape ``(B,)``) and a per-sample gradient
(shape of ``o``). Batch objectives are means of these.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import Registry


class Loss:
    """A per-sample loss ``ℓ(o_i, y_i)``.

    Subclasses implement :meth:`value`; :meth:`grad` defaults to autograd but
    the built-ins give closed forms because the controller calls it every step.
    """

    name = "loss"

    def check_target(self, target: torch.Tensor, output_size: int, batch_size: int) -> torch.Tensor:
        raise NotImplementedError

    def value(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample loss, shape ``(B,)``."""
        raise NotImplementedError

    def grad(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``∂ℓ(o_i, y_i)/∂o_i`` for every sample, shape of ``output``."""
        with torch.enable_grad():
            o = output.detach().requires_grad_(True)
            return torch.autograd.grad(self.value(o, target).sum(), o)[0]

    def dense_target(self, target: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """The target as a tensor shaped like ``output``, read by :meth:`dense_grad` every solver step."""
        return target

    def dense_grad(self, output: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """:meth:`grad` from a :meth:`dense_target` (a fresh tensor the caller may modify in place)."""
        return self.grad(output, dense)


class CrossEntropy(Loss):
    """Softmax cross-entropy on logits ``o``; targets are class indices ``(B,)``."""

    name = "cross_entropy"

    def check_target(self, target, output_size, batch_size):
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"targets must be a torch.Tensor of class indices, got {type(target).__name__}")
        if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"cross-entropy targets must be integer class indices, got dtype {target.dtype}")
        if target.shape != (batch_size,):
            raise ValueError(f"targets must have shape ({batch_size},) (one class index per sample), got {tuple(target.shape)}")
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= output_size):
            raise ValueError(f"class indices must lie in [0, {output_size - 1}], got range "
                             f"[{int(target.min())}, {int(target.max())}]")
        return target.long()

    def value(self, output, target):
        return F.cross_entropy(output, target, reduction="none")

    def grad(self, output, target):
        g = torch.softmax(output, dim=-1)
        g[torch.arange(output.shape[0], device=output.device), target] -= 1.0
        return g

    def dense_target(self, target, output):
        return F.one_hot(target, output.shape[-1]).to(output.dtype)

    def dense_grad(self, output, dense):
        # softmax(o) − onehot(y): two kernels, no indexing in the solver loop.
        return torch.softmax(output, dim=-1).sub_(dense)


class SquaredError(Loss):
    """``½‖o − y‖²`` per sample; targets have the shape of the output, or are class indices ``(B,)``,
    read as one-hot rows (the squared-error cost of classification, as equilibrium propagation uses)."""

    name = "mse"

    def check_target(self, target, output_size, batch_size):
        if isinstance(target, torch.Tensor) and not target.is_floating_point() and target.dim() == 1:
            labels = CrossEntropy().check_target(target, output_size, batch_size)
            return F.one_hot(labels, output_size).to(torch.get_default_dtype())
        if not isinstance(target, torch.Tensor) or not target.is_floating_point():
            raise ValueError("squared-error targets must be a floating-point tensor (or class indices)")
        if target.shape != (batch_size, output_size):
            raise ValueError(f"targets must have shape ({batch_size}, {output_size}), got {tuple(target.shape)}")
        if not torch.isfinite(target).all():
            raise ValueError("targets contain NaN or Inf")
        return target

    def value(self, output, target):
        return 0.5 * (output - target.to(output.dtype)).pow(2).sum(-1)

    def grad(self, output, target):
        return output - target.to(output.dtype)

    def dense_target(self, target, output):
        return target.to(output.dtype)

    def dense_grad(self, output, dense):
        return output - dense


class MeanSquaredError(Loss):
    """``mean_j (o_j − y_j)²`` per sample, the mean over the output's features (regression tasks such as
    the sinusoid of meta-learning, whose metric it is); targets have the shape of the output."""

    name = "mean_squared_error"

    def check_target(self, target, output_size, batch_size):
        return SquaredError().check_target(target, output_size, batch_size)

    def value(self, output, target):
        return (output - target.to(output.dtype)).pow(2).mean(-1)

    def grad(self, output, target):
        return (output - target.to(output.dtype)) * (2.0 / output.shape[-1])


LOSSES: Registry[Loss] = Registry("loss")
LOSSES.register("cross_entropy", CrossEntropy)
LOSSES.register("mse", SquaredError)
LOSSES.register("mean_squared_error", MeanSquaredError)


def get_loss(loss: "str | Loss") -> Loss:
    """Return a loss object from a name (``cross_entropy``, ``mse``) or pass one through."""
    return loss if isinstance(loss, Loss) else LOSSES.create(loss)
