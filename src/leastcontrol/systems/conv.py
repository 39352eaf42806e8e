"""Convolutional equilibrium systems: a layered conv net seen as an equilibrium, and a deep equilibrium model.

Both keep their state in its natural image shapes, ``(B, C, H, W)`` per
population; the solvers see the populations flattened into one buffer (see
:class:`~leastcontrol.systems.base.FlatOperator`). Their state VJPs are the
generic ``torch.func`` ones. Both are sized from the input shape, so the same
class runs on MNIST (1×28×28) and CIFAR-10 (3×32×32). Settings: docs/LCP.md §4.

Reference: Meulemans et al., NeurIPS 2022, §4 (CIFAR-10 experiments); Bai et
al., 2019 (deep equilibrium models).
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError
from .base import EquilibriumSystem


def _conv_out(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


def _check_input_shape(input_shape) -> Tuple[int, int, int]:
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"a convolutional system needs an image input shape (C, H, W), got {input_shape}; "
                          "use a data set of images (mnist, cifar10)")
    return shape


@contextlib.contextmanager
def _init_rng(generator: torch.Generator | None):
    """Layers built inside draw their initialisation from ``generator`` (via a forked global RNG)."""
    if generator is None:
        yield
        return
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


class ConvFeedforwardEquilibrium(EquilibriumSystem):
    """The published layered conv network as an equilibrium system (ReLU rates φ).

    Encoder (the input drive, computed once per batch): conv ``c1``@5×5 (pad 2)
    and max-pool 3/2. Then

        ḣ₁ = −h₁ + pool(conv₁(x))
        ḣ₂ = −h₂ + conv₂(φ(h₁))          5×5, stride 2, pad 2
        ḣ₃ = −h₃ + conv₃(φ(h₂))          5×5, stride 2, pad 2
        ḣ₄ = −h₄ + W₄ φ(h₃) + b₄          fully connected
        ḣ₅ = −h₅ + W₅ φ(h₄) + b₅
        ȯ  = −o  + D φ(h₅) + c

    The connectivity is layered, so the equilibrium is the ordinary forward
    pass, reached from zero in 6 Euler steps with ``dt = 1`` (:attr:`settle_steps`).

    Args:
        input_shape: ``(C, H, W)``. n_out: classes.
        channels: ``(c1, c2, c3)`` (published: 96, 128, 256). fc: widths of the two dense layers (2048).

    >>> net = ConvFeedforwardEquilibrium((1, 28, 28), 10, channels=(4, 4, 8), fc=16)
    >>> net.population_shapes()["h3"]
    (8, 4, 4)
    """

    settle_steps = 6

    def __init__(self, input_shape=(3, 32, 32), n_out: int = 10, *, channels: Sequence[int] = (96, 128, 256),
                 fc: int = 2048, dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None):
        super().__init__()
        C, H, W = self.input_shape = _check_input_shape(input_shape)
        if len(channels) != 3:
            raise ConfigError(f"channels must be three widths (c1, c2, c3), got {channels}")
        c1, c2, c3 = (int(c) for c in channels)
        self.n_in, self.n_out = C * H * W, int(n_out)
        with _init_rng(generator):
            self.enc = nn.Conv2d(C, c1, 5, padding=2, dtype=dtype)
            self.conv2 = nn.Conv2d(c1, c2, 5, stride=2, padding=2, dtype=dtype)
            self.conv3 = nn.Conv2d(c2, c3, 5, stride=2, padding=2, dtype=dtype)
            s1 = (_conv_out(H, 3, 2, 0), _conv_out(W, 3, 2, 0))
            s2 = tuple(_conv_out(s, 5, 2, 2) for s in s1)
            s3 = tuple(_conv_out(s, 5, 2, 2) for s in s2)
            flat3 = c3 * s3[0] * s3[1]
            self.fc4 = nn.Linear(flat3, fc, dtype=dtype)
            self.fc5 = nn.Linear(fc, fc, dtype=dtype)
            self.readout_layer = nn.Linear(fc, self.n_out, dtype=dtype)
        self._shapes = {"h1": (c1, *s1), "h2": (c2, *s2), "h3": (c3, *s3), "h4": (fc,), "h5": (fc,),
                        "o": (self.n_out,)}

    def population_shapes(self) -> Dict[str, tuple]:
        return dict(self._shapes)

    def population_sizes(self) -> Dict[str, int]:
        return {k: math.prod(s) for k, s in self._shapes.items()}

    def encode(self, x):
        x = x.reshape(x.shape[0], *self.input_shape)
        return F.max_pool2d(self.enc(x), 3, 2)

    def dynamics(self, state, drive):
        r = {k: torch.relu(v) for k, v in state.items() if k != "o"}
        return {
            "h1": drive - state["h1"],
            "h2": self.conv2(r["h1"]) - state["h2"],
            "h3": self.conv3(r["h2"]) - state["h3"],
            "h4": self.fc4(r["h3"].flatten(1)) - state["h4"],
            "h5": self.fc5(r["h4"]) - state["h5"],
            "o": self.readout_layer(r["h5"]) - state["o"],
        }

    # --- closed-form state VJP, and Kolen-Pollack feedback as transposed convolutions ---------
    def feedback_pathways(self):
        return {"conv2": "conv2.weight", "conv3": "conv3.weight", "fc4": "fc4.weight", "fc5": "fc5.weight",
                "D": "readout_layer.weight"}

    def mirror(self, key, weight):
        return weight if weight.dim() == 4 else weight.t()

    def rate_slope(self, state):
        return {k: (v > 0).to(v.dtype) for k, v in state.items() if k != "o"}

    def dynamics_and_state_vjp(self, state, drive, cotangent, feedback=None):
        """``(f(s), (∂_s f)ᵀ a)`` in closed form; with ``feedback`` the way back uses the feedback weights.

        ``(∂_s f)ᵀ a = −a + φ'(h_l) ⊙ (layer_{l+1})ᵀ a_{l+1}`` for each hidden block, where the transpose
        of a convolution is a transposed convolution (with the feedback kernel for lcp-kp) and that of
        a dense layer a matrix product (with the feedback matrix).
        """
        f = self.dynamics(state, drive)
        fb = feedback or {}
        a = cotangent

        def back_conv(key, conv, grad_out, shape):
            kernel = fb[key] if key in fb else conv.weight
            return torch.nn.grad.conv2d_input((grad_out.shape[0], *shape), kernel, grad_out,
                                              stride=conv.stride, padding=conv.padding)

        def back_dense(key, layer, grad_out):
            return grad_out @ (fb[key].t() if key in fb else layer.weight)

        sh = self._shapes
        up = {
            "h1": back_conv("conv2", self.conv2, a["h2"], sh["h1"]),
            "h2": back_conv("conv3", self.conv3, a["h3"], sh["h2"]),
            "h3": back_dense("fc4", self.fc4, a["h4"]).reshape(-1, *sh["h3"]),
            "h4": back_dense("fc5", self.fc5, a["h5"]),
            "h5": back_dense("D", self.readout_layer, a["o"]),
        }
        back = {k: (state[k] > 0).to(up[k].dtype) * up[k] - a[k] for k in up}
        back["o"] = -a["o"]
        return f, back

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The explicit forward pass (what the equilibrium equals)."""
        h = torch.relu(self.encode(x))
        h = torch.relu(self.conv3(torch.relu(self.conv2(h))))
        h = torch.relu(self.fc5(torch.relu(self.fc4(h.flatten(1)))))
        return self.readout_layer(h)


class DEQ(EquilibriumSystem):
    """A deep equilibrium model with a ResNet-style implicit block (Bai et al., 2019).

        x̃ = BN(conv(x))                                       (encoder, 3×3; the input drive)
        T(z) = GN(ReLU(z + GN(x̃ + conv₂(GN(ReLU(conv₁(z)))))))    (3×3 convs, GroupNorm(8))
        ż = T(z) − z,        ȯ = −o + D · avgpool₈(BN_r(z)) + c

    The readout's batch norm normalises with running statistics (updated from
    the free equilibria while training, see :meth:`observe_equilibrium`), so the
    dynamics of every sample are independent of the rest of the batch — a
    requirement of per-sample convergence and of the controlled dynamics.

    Args:
        input_shape: ``(C, H, W)``. n_out: classes.
        channels: state channels (48). inner: hidden channels of the block (64). groups: GroupNorm groups (8).
        pool: average-pool size of the readout (8).

    >>> deq = DEQ((1, 28, 28), 10, channels=8, inner=8, groups=4)
    >>> deq.population_shapes()["z"]
    (8, 28, 28)
    """

    def __init__(self, input_shape=(3, 32, 32), n_out: int = 10, *, channels: int = 48, inner: int = 64,
                 groups: int = 8, pool: int = 8, dtype: torch.dtype = torch.float32,
                 generator: torch.Generator | None = None):
        super().__init__()
        C, H, W = self.input_shape = _check_input_shape(input_shape)
        if channels % groups or inner % groups:
            raise ConfigError(f"GroupNorm({groups}) needs channels ({channels}) and inner ({inner}) divisible by it")
        self.n_in, self.n_out, self.pool = C * H * W, int(n_out), min(int(pool), H, W)
        with _init_rng(generator):
            self.enc = nn.Conv2d(C, channels, 3, padding=1, bias=False, dtype=dtype)
            self.enc_norm = nn.BatchNorm2d(channels, dtype=dtype)
            self.conv1 = nn.Conv2d(channels, inner, 3, padding=1, bias=False, dtype=dtype)
            self.conv2 = nn.Conv2d(inner, channels, 3, padding=1, bias=False, dtype=dtype)
            self.gn1 = nn.GroupNorm(groups, inner, dtype=dtype)
            self.gn2 = nn.GroupNorm(groups, channels, dtype=dtype)
            self.gn3 = nn.GroupNorm(groups, channels, dtype=dtype)
            self.readout_norm = nn.BatchNorm2d(channels, dtype=dtype)
            pooled = (H // self.pool) * (W // self.pool)
            self.readout_layer = nn.Linear(channels * pooled, self.n_out, dtype=dtype)
            # A small second convolution keeps the block contractive at the start (as in DEQ code bases).
            with torch.no_grad():
                self.conv2.weight.mul_(0.1)
        self._shapes = {"z": (channels, H, W), "o": (self.n_out,)}

    def population_shapes(self) -> Dict[str, tuple]:
        return dict(self._shapes)

    def population_sizes(self) -> Dict[str, int]:
        return {k: math.prod(s) for k, s in self._shapes.items()}

    def encode(self, x):
        return self.enc_norm(self.enc(x.reshape(x.shape[0], *self.input_shape)))

    def block(self, z, drive):
        """``T(z)``: the implicit layer."""
        h = self.gn1(torch.relu(self.conv1(z)))
        return self.gn3(torch.relu(z + self.gn2(drive + self.conv2(h))))

    def _read(self, z):
        n = F.batch_norm(z, self.readout_norm.running_mean, self.readout_norm.running_var,
                         self.readout_norm.weight, self.readout_norm.bias, training=False,
                         eps=self.readout_norm.eps)
        return self.readout_layer(F.avg_pool2d(n, self.pool).flatten(1))

    def dynamics(self, state, drive):
        z = state["z"]
        return {"z": self.block(z, drive) - z, "o": self._read(z) - state["o"]}

    @torch.no_grad()
    def observe_equilibrium(self, state) -> None:
        """Update the readout's running statistics from a batch of free equilibria (training only)."""
        if self.training:
            z = state["z"].reshape(-1, *self._shapes["z"])
            self.readout_norm(z)  # a train-mode call updates running_mean / running_var
