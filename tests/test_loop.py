"""The training loop's optimizer, schedule, batches and persistent states, each against a closed form
or an independent run (tiny systems on the bundled digits)."""
import math

import pytest
import torch

from leastcontrol import config as cfg
from leastcontrol.errors import ConfigError
from leastcontrol.train import LoopConfig, TrainConfig, build_optimizer, lr_factor, train

from .helpers import interrupt_on_second_eval

TINY_EP = {
    "model": {"name": "hopfield", "hidden": [12], "init": "glorot"},
    "method": {"name": "ep", "loss": "mse", "beta": 1.0, "random_sign": True,
               "free": {"name": "euler", "dt": 0.5, "tol": 0.0, "max_steps": 6},
               "nudged": {"name": "euler", "dt": 0.5, "tol": 0.0, "max_steps": 2}},
    "data": {"name": "digits", "limit_train": 120, "limit_test": 40},
    "loop": {"epochs": 2, "batch_size": 20, "optimizer": "sgd", "lr": 0.2, "schedule": "none",
             "shuffle": False, "persistent_states": True, "param_lr": {"W.1": 0.1, "b.1": 0.1}},
    "output": {"progress": False, "log": False},
}


def _config(tree=TINY_EP, **changes):
    for path, value in changes.items():
        tree = cfg.set_path(tree, path.replace("__", "."), value)
    return TrainConfig.from_tree(tree)


def test_warmup_cosine_is_optax_warmup_cosine_decay():
    """Closed form of optax.warmup_cosine_decay_schedule(lr, 1.1 lr, W, T, 0.1 lr) as pcx sets it."""
    loop = LoopConfig(schedule="warmup-cosine", warmup=0.1, warmup_peak=1.1)
    total = 250
    factor = lr_factor(loop, total)
    W = 25
    for t in (0, 1, 12, 24):
        assert factor(t) == pytest.approx(1.0 + 0.1 * t / W)
    for t in (25, 100, 249, 250):
        cos = 0.5 * (1 + math.cos(math.pi * (t - W) / (total - W)))
        assert factor(t) == pytest.approx(0.1 + (1.1 - 0.1) * cos)
    assert factor(250) == pytest.approx(0.1)
    with pytest.raises(ConfigError, match='settings of schedule "warmup-cosine"'):
        LoopConfig(warmup=0.2)
    with pytest.raises(ConfigError, match="loop.warmup is the fraction"):
        LoopConfig(schedule="warmup-cosine", warmup=1.0)


def test_param_lr_gives_each_matched_parameter_its_rate_and_names_a_pattern_that_matches_nothing():
    system = _config().model.build(64, 10)
    opt = build_optimizer(_config().loop, system)
    rates = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = dict(system.named_parameters())
    assert rates[id(named["W.0"])] == 0.2 and rates[id(named["b.0"])] == 0.2
    assert rates[id(named["W.1"])] == 0.1 and rates[id(named["b.1"])] == 0.1
    assert sum(len(g["params"]) for g in opt.param_groups) == len(named)
    with pytest.raises(ConfigError, match=r"'U\.\*' matches no parameter of the HopfieldEquilibrium; its parameters: W\.0"):
        build_optimizer(LoopConfig(param_lr={"U.*": 0.1}), system)
    with pytest.raises(ConfigError, match="loop.param_lr.W.1 must be a finite number > 0"):
        LoopConfig(param_lr={"W.1": -1.0})
    # AdamW: decoupled weight decay, p ← p − lr (adam + wd p), as torch's AdamW.
    loop = LoopConfig(optimizer="adamw", lr=0.01, weight_decay=0.1)
    opt = build_optimizer(loop, system)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["weight_decay"] == 0.1


def test_unshuffled_epochs_read_the_data_in_order_and_drop_last_leaves_out_the_partial_batch(monkeypatch):
    from leastcontrol.methods.baselines import BP
    seen = []
    real = BP.__call__

    def spy(self, system, x, y, start=None):
        seen.append(y.clone())
        return real(self, system, x, y, start)

    monkeypatch.setattr(BP, "__call__", spy)
    tree = {"model": {"name": "ff", "hidden": 8}, "method": {"name": "bp"},
            "data": {"name": "digits", "limit_train": 50, "limit_test": 10},
            "loop": {"epochs": 2, "batch_size": 16, "shuffle": False, "drop_last": True},
            "output": {"progress": False, "log": False}}
    result = train(TrainConfig.from_tree(tree))
    data = TrainConfig.from_tree(tree).data.load()
    assert [len(y) for y in seen] == [16, 16, 16] * 2          # 50 // 16 batches, the last 2 samples left out
    assert torch.equal(torch.cat(seen[:3]), data.train_y[:48]) and torch.equal(torch.cat(seen[3:]), data.train_y[:48])
    assert len(result["history"]) == 2
    with pytest.raises(ConfigError, match="drop_last leaves no batch"):
        train(TrainConfig.from_tree(cfg.set_path(tree, "loop.batch_size", 64)))


def test_persistent_states_start_each_free_phase_where_the_samples_last_one_ended(monkeypatch):
    """With persistent states the second epoch's free phase of a sample starts at the state its first
    epoch's free phase ended in (checked against the states the method returned), and training with
    them is exactly resumable."""
    from leastcontrol.methods.ep import EP
    starts, ends = [], []
    real = EP.gradients

    def spy(self, system, x, y, start=None):
        out = real(self, system, x, y, start=start)
        starts.append(start.clone())
        ends.append(out.free_state.clone())
        return out

    monkeypatch.setattr(EP, "gradients", spy)
    train(_config())
    per_epoch = len(starts) // 2
    assert all(not s.any() for s in starts[:per_epoch])                   # epoch 1 starts at zero
    for b in range(per_epoch):                                           # epoch 2 starts where epoch 1 ended
        assert torch.equal(starts[per_epoch + b], ends[b])


def test_persistent_states_resume_exactly(tmp_path, monkeypatch):
    reference = train(_config())
    ckpt = tmp_path / "run.pt"
    with monkeypatch.context() as m:
        interrupt_on_second_eval(m)
        with pytest.raises(KeyboardInterrupt):
            train(_config(output__checkpoint=str(ckpt)))
    resumed = train(_config(output__checkpoint=str(ckpt), output__resume=True))
    for a, b in zip(reference["system"].parameters(), resumed["system"].parameters()):
        assert torch.equal(a, b)
    assert resumed["test_accuracy"] == reference["test_accuracy"]


def test_persistent_states_are_refused_for_a_method_that_takes_no_start():
    with pytest.raises(ConfigError, match="lcp-di starts from zero every time: use it with ep or ep-centered"):
        _config(method={"name": "lcp-di"}, model={"name": "ff", "hidden": 8})


def test_symmetric_inputs_are_2x_minus_1_and_not_for_cifar():
    config = _config(data__normalize="symmetric")
    x = torch.rand(4, 64)
    assert torch.equal(config.data.preprocess(x), x * 2 - 1)
    with pytest.raises(ConfigError, match="cifar10 is normalised per channel already"):
        _config(data={"name": "cifar10", "normalize": "symmetric"})


def test_model_options_are_checked_per_system():
    system = _config().model.build(64, 10)
    assert system.sizes == [64, 12, 10]
    bound = math.sqrt(6 / (64 + 12))
    assert system.W[0].abs().max() <= bound and system.W[0].abs().max() > 0.9 * bound and not system.b[0].any()
    assert _config(model__activation="sigmoid").model.build(64, 10).rate == "sigmoid"
    with pytest.raises(ConfigError, match="model.init is an option of hopfield and hopfield-readout, not of 'rnn'"):
        _config(model={"name": "rnn", "init": "glorot"}, method={"name": "rbp"}, loop={"epochs": 1})
    with pytest.raises(ConfigError, match="model.hidden as a list of layer widths is for the layered systems"):
        _config(model={"name": "rnn", "hidden": [8, 8]}, method={"name": "rbp"}, loop={"epochs": 1})
    with pytest.raises(ConfigError, match=r"model.hidden\[1\] must be an integer >= 1"):
        _config(model__hidden=[8, 0])


def test_config_with_pattern_keys_round_trips_through_toml():
    tomllib = pytest.importorskip("tomllib")
    tree = _config().to_dict()
    assert tomllib.loads(cfg.to_toml(tree))["loop"]["param_lr"] == {"W.1": 0.1, "b.1": 0.1}


def test_a_checkpoint_without_the_keys_a_later_version_added_resumes(tmp_path, monkeypatch):
    """Settings added since a checkpoint was written are read at their defaults, not as differences."""
    base = {"model": {"name": "ff", "hidden": 8}, "method": {"name": "bp"},
            "data": {"name": "digits", "limit_train": 64, "limit_test": 16},
            "loop": {"epochs": 2}, "output": {"progress": False, "log": False, "checkpoint": str(tmp_path / "r.pt")}}
    with monkeypatch.context() as m:
        interrupt_on_second_eval(m)
        with pytest.raises(KeyboardInterrupt):
            train(TrainConfig.from_tree(base))
    state = torch.load(tmp_path / "r.pt", weights_only=False)
    for key in ("warmup", "warmup_peak", "param_lr", "shuffle", "drop_last", "persistent_states"):
        del state["config"]["loop"][key]
    del state["config"]["data"]["normalize"]
    torch.save(state, tmp_path / "r.pt")
    resumed = train(TrainConfig.from_tree(cfg.set_path(base, "output.resume", True)))
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]


def test_validation_holds_out_the_last_training_samples_and_is_evaluated_beside_the_test_set():
    config = _config(data__validation=30, loop__epochs=1)
    full = _config(loop__epochs=1).data.load()
    data = config.data.load()
    assert torch.equal(data.train_x, full.train_x[:90]) and torch.equal(data.val_x, full.train_x[90:])
    assert torch.equal(data.val_y, full.train_y[90:]) and torch.equal(data.test_y, full.test_y)
    result = train(config)
    h = result["history"][0]
    assert 0 <= h["validation_accuracy"] <= 1 and h["test_accuracy"] == result["test_accuracy"]
    with pytest.raises(ConfigError, match="leaves no training sample out of 120; hold out fewer"):
        _config(data__validation=120).data.load()
