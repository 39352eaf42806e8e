"""Training loop and command line: real training on digits, JSON output, checkpoints, errors."""
import json
import warnings

import pytest
import torch

from leastcontrol import train as train_module
from leastcontrol.cli import main
from leastcontrol.errors import CheckpointError, ConfigError
from leastcontrol.config import merge
from leastcontrol.train import TrainConfig, load_checkpoint, train

from .helpers import flat_config, interrupt_on_second_eval


@pytest.mark.parametrize("model,method,options", [
    ("ff", "bp", {}), ("ff", "rbp", {}), ("ff", "lcp-di", {}), ("rnn", "rbp", {}),
    # Weaker control (β = 0.1) on the small RNN: its controlled dynamics settle in a few hundred
    # steps, so four epochs fit a unit test; the published β = 10 is exercised by the default job.
    ("rnn", "lcp-di", {"k_i": 0.01}),
    # Shorter noisy phases and energy descents than published, to keep the suite to minutes.
    ("ff", "lcp-kp", {}), ("ff", "lcp-lf", {"noise_steps": 40}), ("ff", "lcp-ebd", {"ebd_steps": 100, "ebd_lr": 0.05}),
    ("rnn", "lcp-kp", {"k_i": 0.01}), ("rnn", "lcp-lf", {"k_i": 0.01, "noise_steps": 40}),
    ("rnn", "lcp-ebd", {"alpha": 10.0, "ebd_lr": 1e-3, "ebd_steps": 200, "ff_init": True}),
])
def test_each_method_learns_digits(model, method, options):
    result = train(flat_config(model=model, method=method, hidden=64, lr=5e-3, epochs=4,
                               batch_size=32, eval_every=0, progress=False, **options))
    assert result["test_accuracy"] > 0.9, result["history"]


def test_json_output_schema(tmp_path):
    out = tmp_path / "sub" / "run.json"
    train(flat_config(model="ff", method="bp", hidden=16, epochs=2, limit_train=200, limit_test=50,
                      json_out=str(out), progress=False))
    data = json.loads(out.read_text())
    assert set(data) >= {"config", "history", "test_accuracy", "train_seconds"}
    assert data["config"]["method"]["name"] == "bp" and data["config"]["loop"]["lr"] == 1e-3
    assert [h["epoch"] for h in data["history"]] == [1, 2]
    for h in data["history"]:
        assert set(h) >= {"epoch", "train_loss", "train_accuracy", "test_accuracy", "mean_iterations", "seconds"}
    assert 0.0 <= data["test_accuracy"] <= 1.0 and data["test_accuracy"] == data["history"][-1]["test_accuracy"]
    assert not list(out.parent.glob("*.part"))


def test_cosine_schedule_ends_at_a_tenth():
    result = train(flat_config(model="ff", method="bp", hidden=16, epochs=2, limit_train=128, limit_test=16,
                               progress=False))
    assert result["history"][-1]["lr"] == pytest.approx(1e-4)


def test_interrupted_run_resumes_to_the_same_result(tmp_path, monkeypatch):
    base = dict(model="rnn", method="rbp", hidden=16, epochs=2, limit_train=192, limit_test=64, progress=False)
    reference = train(flat_config(**base))
    ckpt = tmp_path / "run.pt"
    with monkeypatch.context() as m:
        interrupt_on_second_eval(m)
        with pytest.raises(KeyboardInterrupt):
            train(flat_config(**base, checkpoint=str(ckpt)))
    assert load_checkpoint(ckpt)["epoch"] == 1
    with pytest.raises(CheckpointError, match="--resume"):
        train(flat_config(**base, checkpoint=str(ckpt)))
    resumed = train(flat_config(**base, checkpoint=str(ckpt), resume=True))
    assert [h["train_loss"] for h in resumed["history"]] == [h["train_loss"] for h in reference["history"]]
    for (name, p), q in zip(reference["system"].named_parameters(), resumed["system"].parameters()):
        assert torch.equal(p, q), name
    with pytest.raises(CheckpointError, match="other settings.*lr"):
        train(flat_config(**dict(base, lr=0.5), checkpoint=str(ckpt), resume=True))


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt.*--checkpoint"):
        load_checkpoint(bad)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a leastcontrol checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_bad_configuration_fails_before_training():
    with pytest.raises(ValueError, match="ff, rnn"):
        flat_config(model="lstm")
    with pytest.raises(ValueError, match="bp, bptt, ipc, lcp-di, lcp-ebd, lcp-kp, lcp-lf, pc, rbp"):
        flat_config(method="eqprop")
    with pytest.raises(ValueError, match="digits, idx, mnist"):
        flat_config(dataset="cifar100")
    with pytest.raises(ConfigError, match="epochs"):
        flat_config(epochs=0)
    with pytest.raises(ConfigError, match="lowering k_i"):
        flat_config(alpha=1000.0)
    with pytest.raises(ConfigError, match="resume"):
        flat_config(resume=True)


def test_cli_train_and_eval(tmp_path, capsys):
    out, ckpt = tmp_path / "r.json", tmp_path / "r.pt"
    code = main(["train", "--model", "ff", "--method", "bp", "--hidden", "16", "--epochs", "1",
                 "--limit-train", "300", "--json-out", str(out), "--checkpoint", str(ckpt), "--quiet"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed
    accuracy = json.loads(out.read_text())["test_accuracy"]
    assert main(["eval", "--checkpoint", str(ckpt), "--json-out", str(tmp_path / "e.json")]) == 0
    assert f"{accuracy:.4f}" in capsys.readouterr().out
    assert json.loads((tmp_path / "e.json").read_text())["test_accuracy"] == pytest.approx(accuracy)


def _checkpoint(path, model="rnn", method="lcp-di", dataset="digits", input_shape=(1, 8, 8), classes=10,
                config=None, edit=None):
    """A training checkpoint of an untrained ``model`` (hidden 16) sized for ``input_shape`` and ``classes``,
    as if trained on ``dataset``; ``edit(state)`` changes it before it is saved."""
    import math
    from leastcontrol.checkpoint import TRAIN_FORMAT, save_checkpoint
    run = TrainConfig.from_tree({"model": {"name": model, "hidden": 16}, "method": {"name": method},
                                 "data": {"name": dataset}})
    system = run.model.build(math.prod(input_shape), classes, input_shape, torch.Generator().manual_seed(0))
    run.build_method().prepare(system)
    state = {"format": TRAIN_FORMAT, "config": run.to_dict() if config is None else config, "epoch": 1,
             "system": system.state_dict()}
    if edit:
        edit(state)
    save_checkpoint(path, state)
    return str(path)


def _eval_error(capsys, *args):
    code = main(["eval", "--limit-test", "32", "--quiet", "--checkpoint", *args])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert err.startswith("leastcontrol: error: ") and err.count("\n") == 1, err
    return err[len("leastcontrol: error: "):].strip()


def test_cli_eval_of_a_checkpoint_for_other_data_names_the_data_set_it_needs(tmp_path, capsys):
    mnist = _checkpoint(tmp_path / "mnist.ckpt", dataset="mnist", input_shape=(1, 28, 28))
    assert _eval_error(capsys, mnist, "--dataset", "digits") == (
        f"checkpoint {mnist} holds a rnn system for inputs of 784 features and 10 classes; dataset digits gives "
        "64 features: pass --dataset mnist")
    kp = _checkpoint(tmp_path / "kp.ckpt", model="ff", method="lcp-kp", dataset="mnist", input_shape=(1, 28, 28),
                     classes=5)   # feedback weights besides the forward ones
    assert _eval_error(capsys, kp, "--dataset", "digits").endswith(
        "holds a ff system for inputs of 784 features and 5 classes; dataset digits gives 64 features and "
        "10 classes: pass --dataset mnist")
    conv = _checkpoint(tmp_path / "conv.ckpt", model="conv-ff", method="bp", dataset="cifar10",
                       input_shape=(3, 32, 32))
    assert _eval_error(capsys, conv, "--dataset", "digits").endswith(
        "holds a conv-ff system for inputs of 3 channels and 10 classes; dataset digits gives inputs of shape "
        "1x8x8: pass --dataset cifar10")


def test_cli_eval_of_a_checkpoint_of_another_version_says_what_does_not_fit(tmp_path, capsys):
    from leastcontrol.config import _FLAT, get_path

    def drop(key):
        return lambda state: state.pop(key)

    def rename(state):
        state["system"]["W_old"] = state["system"].pop("W")

    def widen(state):
        state["system"]["W"] = torch.zeros(20, 20)

    def fmt(value):
        return lambda state: state.__setitem__("format", value)

    cases = [(dict(edit=drop("epoch")), r"was written by another version of leastcontrol \(missing 'epoch'\); "
                                        "use the version that wrote it"),
             (dict(edit=drop("system")), r"another version of leastcontrol \(missing 'system'\)"),
             (dict(edit=drop("format")), r"another version of leastcontrol \(missing 'format'\)"),
             (dict(edit=fmt("leastcontrol-checkpoint-0")),
              r"another version of leastcontrol \(format leastcontrol-checkpoint-0; this version reads "
              r"leastcontrol-checkpoint-1\)"),
             (dict(edit=rename), r"holds parameters that do not match this version's rnn system \(missing W; "
                                 r"unexpected W_old\): it was written by another version of leastcontrol or for "
                                 "another model"),
             (dict(edit=widen), r"holds parameters of other shapes than this version's rnn system with its settings "
                                r"\(W is 20x20 there, 16x16 here\): it was written by another version"),
             (dict(config={"model": {"name": "rnn", "width": 3}}),
              r"another version of leastcontrol \(its settings do not fit this version: .*unknown key 'width'"),
             (dict(config={"model": "lstm", "dataset": "digits"}), r"another version.*unknown model 'lstm'")]
    for i, (options, message) in enumerate(cases):
        path = _checkpoint(tmp_path / f"{i}.ckpt", **options)
        err = _eval_error(capsys, path)
        assert err.startswith(f"checkpoint {path} ") and __import__("re").search(message, err), (message, err)
    # A checkpoint of an earlier version with a flat config that migrates is read.
    tree = TrainConfig.from_tree({"model": {"name": "rnn", "hidden": 16}}).to_dict()
    flat = {k: get_path(tree, p) for k, p in _FLAT.items() if get_path(tree, p) is not None}
    path = _checkpoint(tmp_path / "flat.ckpt", config=flat)
    assert main(["eval", "--checkpoint", path, "--limit-test", "32", "--quiet"]) == 0
    assert "test accuracy" in capsys.readouterr().out


def test_cli_eval_quiet_and_paths_that_are_no_checkpoint(tmp_path, capsys):
    path = _checkpoint(tmp_path / "run.ckpt")
    assert main(["eval", "--checkpoint", path, "--limit-test", "32", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "test accuracy" in captured.out and captured.err == ""   # no progress bar
    assert _eval_error(capsys, str(tmp_path)) == (f"checkpoint {tmp_path} is a directory; point --checkpoint at "
                                                  "the checkpoint file in it")
    assert _eval_error(capsys, str(tmp_path / "none.ckpt")) == f"checkpoint {tmp_path / 'none.ckpt'} does not exist"


def test_cli_unknown_names_list_the_valid_ones(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--method", "backprop"])
    assert info.value.code == 2
    assert "lcp-di" in capsys.readouterr().err


def test_cli_missing_mnist_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LEASTCONTROL_OFFLINE", "1")
    code = main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--epochs", "1", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "--data-dir" in err


def test_cli_diverging_solver(capsys):
    code = main(["train", "--model", "rnn", "--method", "rbp", "--set", "method.solver.dt=50", "--epochs", "1",
                 "--limit-train", "64", "--quiet"])
    assert code == 2
    assert "diverged" in capsys.readouterr().err


def test_shipped_configs_load_and_match_the_published_settings():
    from pathlib import Path

    from leastcontrol.train import config_from_mapping, load_config_file

    files = sorted((Path(__file__).resolve().parents[1] / "configs").glob("mnist-*.toml"))
    assert len(files) >= 8
    for path in files:
        config = config_from_mapping(load_config_file(path))
        loop = config.loop
        assert (config.data.name, loop.epochs, loop.batch_size, loop.lr) == ("mnist", 30, 64, 1e-3)
        assert path.stem == f"mnist-{config.model.name}-{config.method.name}"
        assert loop.grad_clip == (10.0 if config.model.name == "rnn" else 0.0)


def test_config_file_errors_name_the_key(tmp_path):
    from leastcontrol.train import load_config_file

    bad_key = tmp_path / "a.toml"
    bad_key.write_text('model = "rnn"\nlearning_rate = 0.1\n')
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'.*valid keys:.*lr"):
        load_config_file(bad_key)
    bad_type = tmp_path / "b.json"
    bad_type.write_text('{"epochs": "ten"}')
    with pytest.raises(ConfigError, match="loop.epochs must be int"):
        load_config_file(bad_type)
    broken = tmp_path / "c.toml"
    broken.write_text("model = \n")
    with pytest.raises(ConfigError, match="cannot be parsed"):
        load_config_file(broken)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "missing.toml")


def test_cli_flags_override_the_config_file(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('model = "ff"\nmethod = "bp"\nhidden = 16\nepochs = 3\nlimit_train = 128\nlimit_test = 32\n')
    out = tmp_path / "r.json"
    assert main(["train", "--config", str(cfg), "--epochs", "1", "--json-out", str(out), "--quiet"]) == 0
    config = json.loads(out.read_text())["config"]
    assert (config["model"]["name"], config["method"]["name"], config["model"]["hidden"]) == ("ff", "bp", 16)
    assert config["loop"]["epochs"] == 1 and config["data"]["name"] == "digits" and config["loop"]["lr"] == 1e-3


def test_skip_diverged_counts_the_batches_it_skips(monkeypatch):
    from leastcontrol.errors import SolverDivergedError
    from leastcontrol.methods.baselines import RBP

    real, calls = RBP.gradients, []

    def first_batch_diverges(self, system, x, y):
        calls.append(1)
        if len(calls) == 1:
            raise SolverDivergedError("v", 130, "euler")
        return real(self, system, x, y)

    monkeypatch.setattr(RBP, "gradients", first_batch_diverges)
    config = flat_config(model="rnn", method="rbp", epochs=1, limit_train=192, limit_test=50, progress=False)
    with pytest.raises(SolverDivergedError, match=r"epoch 1, batch 1: euler diverged: population 'v'.*"
                                                  r"smaller dt.*Or set loop.skip_diverged = true"):
        train(config)
    calls.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(flat_config(model="rnn", method="rbp", epochs=1, limit_train=192, limit_test=50,
                                   progress=False, skip_diverged=True))
    assert result["history"][-1]["skipped_batches"] == 1 and len(calls) == 3
    # The schedule moves on past a skipped first batch without PyTorch's warning about the order of steps.
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]


def test_mix_settings_reach_every_solver_and_bad_ones_fail_at_construction(capsys):
    from leastcontrol.cli import main as cli
    tree = {"method": {"name": "lcp-di", "solver": {"mix": {"memory": 3, "after": 40, "restarts": 0}}}}
    method = TrainConfig.from_tree(tree).build_method()
    for phase in ("free", "controlled"):
        mix = getattr(method, phase).mix
        assert (mix.memory, mix.after, mix.restarts) == (3, 40, 0)
    # The flat keys of earlier versions become the same tree.
    flat = flat_config(method="lcp-di", anderson_memory=3, anderson_after=40, anderson_restarts=0)
    assert flat.method.config() == method.config()
    with pytest.raises(ConfigError, match="mix.restarts"):
        flat_config(method="lcp-di", anderson_memory=3, anderson_restarts=-1)
    with pytest.raises(ConfigError, match="mix.memory"):
        flat_config(method="lcp-di", anderson_memory=-2)
    with pytest.raises(ConfigError, match=r"method.solver is a setting of .*, not of bp"):
        flat_config(model="ff", method="bp", anderson_memory=3)
    # A flag of an earlier version names the key it became.
    with pytest.raises(SystemExit):
        cli(["train", "--anderson-memory", "3"])
    assert "--anderson-memory is now the config key method.solver.mix.memory: use --set" in capsys.readouterr().err


def _research_code_draws(model, method, n_in, hidden, n_out, n_train, batch_size, seed, epochs=2):
    """What PyTorch's own layers and a shuffling DataLoader draw after ``torch.manual_seed(seed)``,
    in the research code's order: encoder, hidden layer, decoder, Kolen-Pollack feedback, epochs."""
    from torch import nn
    from torch.utils.data import DataLoader

    torch.manual_seed(seed)
    layers = [nn.Linear(n_in, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, n_out)]
    feedback = {}
    if method == "lcp-kp":
        feedback["B"] = nn.Linear(hidden, hidden, bias=False).weight.detach()
        feedback["D"] = torch.randn(hidden, n_out)
    loader = DataLoader(range(n_train), batch_size=batch_size, shuffle=True)
    orders = [torch.cat(list(loader)) for _ in range(epochs)]
    return [(m.weight.detach(), m.bias.detach()) for m in layers], feedback, orders


@pytest.mark.parametrize("model,method", [("ff", "lcp-kp"), ("rnn", "lcp-kp"), ("rnn", "lcp-ebd")])
def test_a_seed_draws_the_research_codes_weights_feedback_and_batch_order(model, method, monkeypatch):
    """Seed s starts from the weights and feedback, and visits the batches in the order, that
    PyTorch layers and ``DataLoader(shuffle=True)`` give after ``torch.manual_seed(s)``; so a run
    pairs with the same seed of the paper's research code."""
    from types import SimpleNamespace

    from leastcontrol.train import epoch_order, init_system

    seed, hidden, n_train, batch = 7, 8, 40, 16
    config = flat_config(model=model, method=method, hidden=hidden, recurrent_bias=model == "rnn", seed=seed,
                         epochs=2, batch_size=batch, limit_train=n_train, limit_test=20, eval_every=0,
                         progress=False)
    layers, feedback, orders = _research_code_draws(model, method, 64, hidden, 10, n_train, batch, seed)

    net = init_system(config, SimpleNamespace(n_features=64, n_classes=10, input_shape=(64,)),
                      config.build_method(), torch.Generator().manual_seed(seed))
    hidden_w, hidden_b = (net.W[0], net.b_W[0]) if model == "ff" else (net.W, net.b_W)
    ours = [(net.U, net.b), (hidden_w, hidden_b), (net.D, net.c)]
    for (w, b), (w_ref, b_ref) in zip(ours, layers):
        assert torch.allclose(w, w_ref, rtol=1e-6, atol=0) and torch.allclose(b, b_ref, rtol=1e-6, atol=0)
    if feedback:
        key = "W_0" if model == "ff" else "W"
        assert torch.allclose(net.feedback[key], feedback["B"] / feedback["B"].norm(), rtol=1e-5, atol=1e-7)
        assert torch.allclose(net.feedback["D"], feedback["D"] / feedback["D"].norm(), rtol=1e-5, atol=1e-7)
        assert abs(float(net.feedback[key].norm()) - 1) < 1e-6

    # The training loop draws from the same stream in the same order: its epochs are the loader's.
    seen = []

    def spy(rng, n):
        out = epoch_order(rng, n)
        seen.append(out[0])
        return out

    monkeypatch.setattr(train_module, "epoch_order", spy)
    extra = ({"k_i": 0.01, "solver": {"max_steps": 50}} if method == "lcp-kp" else
             {"controlled": {"max_steps": 20}})
    train(TrainConfig.from_tree(merge(config.to_dict(), {"method": extra})))
    assert len(seen) == 2 and all(torch.equal(a, b) for a, b in zip(seen, orders))


def test_recurrent_bias_is_an_rnn_option():
    with pytest.raises(ConfigError, match="recurrent_bias"):
        flat_config(model="ff", recurrent_bias=True)


def test_feedback_weights_are_clipped_on_their_own_in_train_and_bench():
    """Kolen-Pollack feedback forms its own clip group: a large feedback update is cut to the bound
    without shrinking a forward update that is within it (the research code's two clips)."""
    from leastcontrol import bench
    from leastcontrol.methods import get_method
    from leastcontrol.systems import RecurrentEquilibrium
    from leastcontrol.train import clip_gradients, gradient_clip_groups

    net = RecurrentEquilibrium(6, 5, 3)
    get_method("lcp-kp").prepare(net)
    forward, feedback = gradient_clip_groups(net)
    assert {id(p) for p in feedback} == {id(p) for p in net.feedback.parameters()}
    assert {id(p) for p in forward} | {id(p) for p in feedback} == {id(p) for p in net.parameters()}
    for p in forward:
        p.grad = torch.full_like(p, 1e-3)
    for p in feedback:
        p.grad = torch.full_like(p, 1.0)
    before = [p.grad.clone() for p in forward]
    clip_gradients([forward, feedback], 1.0)
    assert all(torch.equal(p.grad, b) for p, b in zip(forward, before))
    assert torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in feedback])).item() == pytest.approx(1.0)
    trainer = bench._Trainer(bench.Row("rnn", "lcp-kp"), RecurrentEquilibrium(6, 5, 3), bench.BenchConfig())
    assert [len(g) for g in trainer.clip_groups] == [len(forward), len(feedback)]


def test_check_stability_reaches_the_epoch_records():
    # The library's initial RNN is contractive, so every fixed point Anderson finds on it is one
    # the Euler dynamics settle on: the check runs on every solve and flags none.
    base = dict(model="rnn", method="rbp", solver="anderson", hidden=16, epochs=1, limit_train=128, limit_test=32,
                progress=False)
    checked = train(flat_config(**base, check_stability=True))
    assert checked["config"]["method"]["adjoint"]["check_stability"] is True
    assert checked["history"][0]["unstable_fraction"] == 0.0
    assert train(flat_config(**base))["history"][0]["unstable_fraction"] is None
    with pytest.raises(ConfigError, match="check_stability"):
        flat_config(**dict(base, check_stability="yes"))


def test_config_tree_sections_and_overrides_name_the_valid_keys(capsys):
    """The tree as a file writes it, --set overrides by dotted key, and errors that name the key and the
    valid ones: an unknown section, key, method setting, solver setting or value."""
    from leastcontrol.cli import main as cli
    from leastcontrol.config import parse_override
    from leastcontrol.train import resolve_tree
    tree = resolve_tree({"model": {"name": "ff", "hidden": 16}, "method": {"name": "lcp-di", "alpha": 1.0}},
                        [parse_override("method.k_i=10"), parse_override("method.controlled.patience=300"),
                         parse_override("loop.grad_clip=5"), parse_override('method.free.tol=1e-4')])
    config = TrainConfig.from_tree(tree)
    assert config.method.beta == 10.0 and config.method.controlled.patience == 300
    assert config.method.free.tol == 1e-4 and config.method.free.max_steps == 800   # changes, not a fresh solver
    assert config.loop.grad_clip == 5.0 and config.model.hidden == 16
    bad = [("foo.bar=1", "unknown section 'foo'; valid sections: model, method, data, loop, output, preset"),
           ("loop.learning_rate=1", "loop: unknown key 'learning_rate'; valid keys: epochs, batch_size, lr"),
           ("method.gain=1", "method: unknown key 'gain' of method 'lcp-di'; valid keys: name, loss"),
           ("method.controlled.patiense=3", "method.controlled: unknown setting.*patiense of the 'euler' solver; "
                                            "valid: backend, check_every"),
           ("method.solver.name=newton", "unknown solver 'newton'; valid solvers: adam, anderson, broyden, euler"),
           ("loop.lr=fast", "loop.lr must be float, got 'fast'")]
    for item, message in bad:
        assert cli(["train", "--set", item, "--quiet"]) == 2, item
        assert __import__("re").search(message, capsys.readouterr().err), item
    assert cli(["config", "--method", "rbp", "--set", "method.adjoint.tol=1e-6"]) == 0
    printed = capsys.readouterr().out
    assert "[method.adjoint]\nname = \"euler\"\ntol = 1e-06\nmax_steps = 200" in printed
    assert 'name = "rbp"' in printed and "[loop]" in printed
    # The printed tree is a config file that gives the same run.
    import tomllib
    assert TrainConfig.from_tree(tomllib.loads(printed)).to_dict() == TrainConfig.from_tree(
        resolve_tree({}, [("method.name", "rbp"), ("method.adjoint.tol", 1e-6)])).to_dict()


def test_diff_trees_names_every_differing_leaf_by_its_dotted_key():
    from leastcontrol.config import ABSENT, diff_trees
    a = {"model": {"name": "rnn", "hidden": 16}, "loop": {"epochs": 3, "lr": 1e-3}, "data": {"dir": "/a", "name": "x"},
         "output": {"json_out": "a.json"}, "method": {"solver": {"tol": 1e-6, "backend": ["native"]}}, "preset": "fast"}
    b = {"model": {"name": "rnn", "hidden": 16}, "loop": {"epochs": 1, "lr": 1e-3, "seed": 0}, "data": {"dir": "/b"},
         "output": {"json_out": "b.json"}, "method": {"solver": {"tol": 1e-6, "backend": ["compile"]}}, "preset": {}}
    assert diff_trees(a, a) == []
    assert diff_trees(a, b, ignore=["output", "data.dir"]) == [
        ("loop.epochs", 3, 1), ("loop.seed", ABSENT, 0), ("data.name", "x", ABSENT),
        ("method.solver.backend", ["native"], ["compile"]), ("preset", "fast", {})]
    assert [k for k, _, _ in diff_trees(a, b)][:4] == ["loop.epochs", "loop.seed", "data.dir", "data.name"]
    assert diff_trees({"data": {"dirs": 1}}, {"data": {"dirs": 2}}, ignore=["data.dir"]) == [("data.dirs", 1, 2)]
    assert diff_trees({"output": 1}, {}, ignore=["output"]) == [] and repr(ABSENT) == "(absent)"
