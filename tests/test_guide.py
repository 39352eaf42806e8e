"""The guide's examples (a user system, step rule and method) run exactly as docs/guide.md prints them."""
import re
from pathlib import Path

import pytest
import torch

from leastcontrol.methods import METHODS, get_method
from leastcontrol.solvers import SOLVERS, Euler
from leastcontrol.systems import SYSTEMS

from .helpers import batch, cosine

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "guide.md"


def examples():
    """Name -> code of each ```python block that follows an ``<!-- example: name -->`` marker."""
    text = GUIDE.read_text(encoding="utf-8")
    return dict(re.findall(r"<!-- example: (\w+) -->\n```python\n(.*?)```", text, flags=re.S))


@pytest.fixture
def registries():
    """The examples register names; the registries are restored afterwards."""
    saved = [(r, dict(r._items)) for r in (SYSTEMS, SOLVERS, METHODS)]
    yield
    for r, items in saved:
        r._items = items


def test_the_guide_shows_the_three_examples_in_under_thirty_lines():
    code = examples()
    assert set(code) == {"system", "rule", "method", "use"}
    for name in ("system", "rule", "method"):
        assert len(code[name].strip().splitlines()) <= 30, name


def test_the_examples_run_as_printed_and_learn(registries):
    code, namespace = examples(), {}
    for name in ("system", "rule", "method"):
        exec(compile(code[name], f"guide:{name}", "exec"), namespace)
    net = SYSTEMS.create("leaky-rnn", 5, 3, hidden=8, generator=torch.Generator().manual_seed(0)).double()
    x, y = batch()
    # The user's rule reaches the equilibrium Euler reaches.
    relaxed = SOLVERS.factory("relaxed")(omega=0.8, tol=1e-12, max_steps=5000)
    a = get_method("rbp", solver=relaxed).free_equilibrium(net, x)
    b = get_method("rbp", solver=Euler(tol=1e-12, max_steps=5000)).free_equilibrium(net, x)
    assert a.stats.converged and torch.allclose(a.state["o"], b.state["o"], atol=1e-10)
    # The user's method: backprop through 40 steps from a contractive equilibrium is implicit differentiation.
    tbptt = get_method("tbptt", k=40, solver=Euler(tol=1e-12, max_steps=5000)).gradients(net, x, y).grads
    rbp = get_method("rbp", solver=Euler(tol=1e-12, max_steps=5000)).gradients(net, x, y).grads
    assert cosine(tbptt, rbp) > 0.999
    # And the three through the training loop, as the guide runs them.
    exec(compile(code["use"], "guide:use", "exec"), namespace)
    assert namespace["result"]["test_accuracy"] > 0.8


def test_a_system_missing_what_the_library_needs_says_what_to_set():
    from leastcontrol import ConfigError, EquilibriumSystem

    class NoSizes(EquilibriumSystem):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2, 2))

        def population_sizes(self):
            return {"v": 2, "o": 2}

        def encode(self, x):
            return x

        def dynamics(self, s, drive):
            return {k: -v for k, v in s.items()}

    with pytest.raises(ConfigError, match=r"NoSizes must set self.n_in .* in __init__ \(docs/guide.md"):
        get_method("rbp")(NoSizes(), torch.ones(3, 2), torch.zeros(3, dtype=torch.long))
