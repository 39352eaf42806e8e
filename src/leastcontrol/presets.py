"""Named presets: a set of settings chosen for the device in use, under the user's own.

``published`` (the default) changes nothing: the published set-ups, for reproduction. ``fast`` takes
the settings that keep the method's update and pay on the device (``docs/performance.md``):

- LCP-DI / KP / LF: the same control strength β with faster controller gains (α 1, k_i = β − k_p:
  the leak no longer caps the controller at 1 − α per step), the free phase to 1e-4 (where the
  controlled phase starts), and the stall rule with a patience of 300 steps in the controlled phase
  (it stops samples that chatter at a floor, not samples that still settle);
- the steps: on the CPU the tail of every solve of the recurrent network in C and the rest compiled
  (``backend = ["native", "compile"]``); elsewhere compiled (``["compile"]``).

A preset fills only what the configuration leaves unset: a key given in a file or with ``--set``
wins. Its gains keep the β the configuration asks for.
"""
from __future__ import annotations

from typing import Any, Callable

from .config import Tree, get_path, set_path
from .registry import Registry

PRESETS: Registry[Callable[[Tree, str], Tree]] = Registry("preset")
_CONTROLLERS = ("lcp-di", "lcp-kp", "lcp-lf")
# Methods that settle the system with solvers (the backends apply to them).
_SOLVED = ("rbp", "lcp-di", "lcp-kp", "lcp-lf", "lcp-ebd", "bptt")


def _fill(tree: Tree, path: str, value: Any) -> Tree:
    return tree if get_path(tree, path) is not None else set_path(tree, path, value)


def published(tree: Tree, device: str) -> Tree:
    """The published set-ups: nothing changes."""
    return tree


def fast(tree: Tree, device: str) -> Tree:
    """The settings that keep the update and pay on ``device`` (``cpu`` or ``cuda``); see the module."""
    method = get_path(tree, "method.name", "lcp-di")
    model = get_path(tree, "model.name", "rnn")
    if method in _CONTROLLERS and get_path(tree, "method.alpha") is None:
        alpha, k_i = 0.1, get_path(tree, "method.k_i", 1.0)      # the published gains unless given
        tree = set_path(set_path(tree, "method.alpha", 1.0), "method.k_i", k_i / alpha)
    if method in _CONTROLLERS:
        tree = _fill(tree, "method.free.tol", 1e-4)
        tree = _fill(tree, "method.controlled.patience", 300)
    if method in _SOLVED:
        backend = ["native", "compile"] if device == "cpu" and model == "rnn" and method != "lcp-lf" else ["compile"]
        tree = _fill(tree, "method.solver.backend", backend)
    return tree


PRESETS.register("published", published)
PRESETS.register("fast", fast)


def apply_preset(name: str | None, tree: Tree, device: str) -> Tree:
    """``tree`` with the preset ``name`` filled in for ``device`` (``None``: ``published``)."""
    return PRESETS.factory(name or "published")(tree, device)


__all__ = ["PRESETS", "apply_preset"]
