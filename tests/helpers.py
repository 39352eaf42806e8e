"""Small systems and data shared by the tests (float64 unless stated)."""
import torch

from leastcontrol.systems import FeedforwardEquilibrium, HopfieldEquilibrium, RecurrentEquilibrium

F64 = torch.float64


def tiny_rnn(n_in=5, n_hidden=8, n_out=3, w_scale=0.5, seed=1, recurrent_bias=False):
    g = torch.Generator().manual_seed(seed)
    net = RecurrentEquilibrium(n_in, n_hidden, n_out, recurrent_bias=recurrent_bias, dtype=F64, generator=g)
    with torch.no_grad():
        net.W.mul_(w_scale)  # keep the dynamics comfortably contractive
        net.U.mul_(2.0)
    return net


def tiny_ff(sizes=(5, 7, 6, 3), seed=1, **options):
    g = torch.Generator().manual_seed(seed)
    net = FeedforwardEquilibrium(list(sizes), dtype=F64, generator=g, **options)
    with torch.no_grad():
        net.U.mul_(2.0)
    return net


def batch(n_in=5, n_out=3, B=4, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, n_in, generator=g, dtype=F64), torch.randint(0, n_out, (B,), generator=g)


def flat(grads: dict) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for _, g in sorted(grads.items())])


def cosine(a: dict, b: dict) -> float:
    a, b = flat(a), flat(b)
    return float(a @ b / (a.norm() * b.norm()))


def rel_err(a: dict, b: dict) -> float:
    a, b = flat(a), flat(b)
    return float((a - b).norm() / b.norm())


def interrupt_on_second_eval(monkeypatch):
    """Make the training loop's second evaluation raise ``KeyboardInterrupt`` (a run stopped
    after its first epoch's checkpoint)."""
    from leastcontrol import train as train_module

    calls = {"n": 0}
    real = train_module.evaluate

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate", flaky)


def flat_config(**values):
    """A run's TrainConfig from a flat table of settings (``model="ff", hidden=16, epochs=2, ...``), the
    form of earlier versions, which the config layer migrates to its sections."""
    from leastcontrol.train import TrainConfig

    return TrainConfig.from_tree(values)


def tiny_hopfield(rate="sigmoid", readout="layer", sizes=(5, 6, 4, 3), seed=1, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    net = HopfieldEquilibrium(list(sizes), rate=rate, readout=readout, dtype=F64, generator=g)
    with torch.no_grad():   # stronger coupling than the default initialisation: a less trivial equilibrium
        for W in net.W:
            W.mul_(scale)
    return net
