"""Learners for few-shot tasks, with a forward pass batched over tasks.

Each task has its own weights, so a meta-batch of T tasks is T different
networks. A learner may define ``batched_forward(params, x)``: ``params`` are
its parameters in ``named_parameters()`` order, each with a leading task axis
``(T, *shape)``, and ``x`` is ``(T, K, ...)``. :class:`~leastcontrol.meta.problem.InnerProblem`
uses it instead of ``vmap(functional_call)``.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import ConfigError

# Rate functions of the learners: (module, function). ReLU is the published choice; softplus and
# tanh are smooth, so the inner gradient field has no kinks for the weights to chatter across.
ACTIVATIONS = {"relu": (nn.ReLU, torch.relu), "softplus": (nn.Softplus, F.softplus), "tanh": (nn.Tanh, torch.tanh)}


def check_activation(name: str) -> None:
    if name not in ACTIVATIONS:
        raise ConfigError(f"unknown learner activation '{name}'; valid: {', '.join(sorted(ACTIVATIONS))}")


class ConvLearner(nn.Module):
    """The standard few-shot conv net: ``blocks`` × [conv 3×3 (pad 1), batch norm, ReLU, max-pool 2], linear.

    Batch norm uses the statistics of the batch it is given (no running
    averages): the support set while adapting, the query set when evaluated —
    the usual transductive setting of MAML-style few-shot learning.

    Args:
        ways: number of classes (outputs).
        in_channels, size: input image shape ``(in_channels, size, size)``.
        channels: feature maps per block (64 in the published net). blocks: number of blocks (4).

    >>> net = ConvLearner(ways=5)
    >>> net(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 5])
    """

    def __init__(self, ways: int, in_channels: int = 1, size: int = 28, channels: int = 64, blocks: int = 4,
                 activation: str = "relu"):
        super().__init__()
        check_activation(activation)
        self.act = ACTIVATIONS[activation][1]
        if size // 2 ** blocks < 1:
            raise ConfigError(f"{blocks} pooling blocks do not fit a {size}×{size} input; use fewer --blocks")
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        c = in_channels
        for _ in range(blocks):
            self.convs.append(nn.Conv2d(c, channels, 3, padding=1))
            self.norms.append(nn.BatchNorm2d(channels, track_running_stats=False))
            c = channels
        self.head = nn.Linear(channels * (size // 2 ** blocks) ** 2, ways)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, norm in zip(self.convs, self.norms):
            x = F.max_pool2d(self.act(norm(conv(x))), 2)
        return self.head(x.flatten(1))

    def batched_forward(self, params: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Outputs ``(T, K, ways)`` of T networks on their inputs ``(T, K, C, H, W)``.

        The task axis is folded into the channels and each convolution runs with
        ``groups=T``: one kernel call for all tasks, and per-channel batch norm is
        then per task by construction.
        """
        T, K = x.shape[:2]
        h = x.transpose(0, 1).reshape(K, T * x.shape[2], *x.shape[3:])
        p = dict(zip((name for name, _ in self.named_parameters()), params))
        for i in range(len(self.convs)):
            w, b = p[f"convs.{i}.weight"], p[f"convs.{i}.bias"]
            gamma, beta = p[f"norms.{i}.weight"], p[f"norms.{i}.bias"]
            h = F.conv2d(h, w.reshape(-1, *w.shape[2:]), b.reshape(-1), padding=1, groups=T)
            h = F.batch_norm(h, None, None, gamma.reshape(-1), beta.reshape(-1), training=True)
            h = F.max_pool2d(self.act(h), 2)
        h = h.reshape(K, T, -1).transpose(0, 1)  # (T, K, channels·s·s), channel-major like flatten(1)
        w, b = p["head.weight"], p["head.bias"]
        return torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))


def mlp_learner(ways: int, n_in: int = 784, hidden: Sequence[int] = (128, 64),
                activation: str = "relu") -> nn.Sequential:
    """An MLP learner (the fast option): ``n_in → hidden… → ways`` with ``activation``; batched by ``InnerProblem``."""
    check_activation(activation)
    layers: List[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(n_in, h), ACTIVATIONS[activation][0]()]
        n_in = h
    layers.append(nn.Linear(n_in, ways))
    return nn.Sequential(*layers)
