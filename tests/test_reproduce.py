"""The reproduction command: artefacts, resumption, row selection."""
import csv
import json
import re

import pytest

from leastcontrol import reproduce as reproduce_module
from leastcontrol.checkpoint import load_checkpoint
from leastcontrol.cli import main
from leastcontrol.errors import CheckpointError, ConfigError
from leastcontrol.reproduce import available_rows, benchmarks, reproduce
from leastcontrol.train import TrainConfig, load_config_file

from .helpers import interrupt_on_second_eval

TINY = {"data.name": "digits", "loop.epochs": 1, "data.limit_train": 256, "data.limit_test": 64, "model.hidden": 16}


def test_every_published_row_has_a_config():
    rows = available_rows("mnist")
    assert {"ff-bp", "ff-lcp-di", "ff-lcp-kp", "ff-lcp-ebd", "rnn-rbp", "rnn-lcp-di", "rnn-lcp-kp",
            "rnn-lcp-ebd"} <= set(rows)


@pytest.mark.parametrize("benchmark", benchmarks())
def test_every_shipped_row_builds_its_run(benchmark):
    for row, path in available_rows(benchmark).items():
        config = TrainConfig.from_tree(load_config_file(path), where=row)
        assert row.endswith(config.method.name), row


def test_the_peers_table_has_every_rule_on_each_system_it_applies_to():
    rows = list(available_rows("peers"))
    assert rows == ["ff-bp", "ff-lcp-di", "ff-lcp-ebd", "ff-pc", "ff-ipc",
                    "hopfield-rbp", "hopfield-bptt", "hopfield-lcp-di", "hopfield-ep", "hopfield-ep-centered",
                    "rnn-rbp", "rnn-bptt", "rnn-lcp-di", "rnn-lcp-ebd"]


def test_a_peers_row_of_each_new_rule_runs_and_reports_its_settled_samples(tmp_path):
    tiny = dict(TINY, **{"model.hidden": 16})
    table = reproduce("peers", tmp_path, rows=["ff-pc", "hopfield-ep"], overrides=tiny, progress=False)
    assert [e["row"] for e in table] == ["ff-pc", "hopfield-ep"]
    assert all(0.0 <= e["settled_samples"] <= 1.0 and e["steps_per_sample"] > 0 for e in table)
    header = (tmp_path / "results.md").read_text().splitlines()[0]
    assert "dataset=digits" in header and "epochs=1" in header


def test_the_published_table_runs_the_papers_own_set_ups(tmp_path):
    assert list(available_rows("published")) == ["ff-bp", "ff-pc", "hopfield-ep"]
    for row, path in available_rows("published").items():
        config = TrainConfig.from_tree(load_config_file(path))
        assert config.loop.epochs == 25 and config.data.name == "mnist", row
    ep = TrainConfig.from_tree(load_config_file(available_rows("published")["hopfield-ep"]))
    assert (ep.model.hidden, ep.loop.batch_size, ep.method.free.max_steps, ep.method.nudged.max_steps) == ([500], 20, 20, 4)
    assert ep.loop.persistent_states and not ep.loop.shuffle and ep.data.validation == 10000
    pc = TrainConfig.from_tree(load_config_file(available_rows("published")["ff-pc"]))
    assert (pc.model.hidden, pc.model.activation, pc.model.state) == ([128, 128, 128], "gelu", "rate")
    assert (pc.method.inference.name, pc.method.inference.max_steps, pc.method.beta) == ("momentum", 8, 128.0)
    tiny = dict(TINY, **{"data.validation": 40, "loop.epochs": 2})
    table = reproduce("published", tmp_path, rows=["hopfield-ep"], overrides=tiny, progress=False)
    assert 0 <= table[0]["validation_accuracy_mean"] <= 100
    assert table[0]["best_test_accuracy_mean"] >= table[0]["test_accuracy_mean"]
    assert re.search(r"\| hopfield-ep \| \d+\.\d\d \| \d+\.\d\d \| \d+\.\d\d \| 1 \|",
                     (tmp_path / "results.md").read_text())


def test_tiny_reproduction_writes_artefacts_and_resumes(tmp_path, monkeypatch):
    table = reproduce("mnist", tmp_path, rows=["ff-bp", "rnn-lcp-kp"], seeds=[0, 1], overrides=TINY,
                      progress=False)
    for name in ("results.md", "results.csv", "accuracy.png", "ff-bp_seed0.json", "rnn-lcp-kp_seed1.json"):
        assert (tmp_path / name).exists(), name
    assert (tmp_path / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["row"] for r in rows] == ["ff-bp", "rnn-lcp-kp"] and rows[0]["seeds"] == "2"
    assert re.search(r"\| W -?\d\.\d{3}, D -?\d\.\d{3} \|", (tmp_path / "results.md").read_text())
    # last epoch's mean ± std, then the best epoch's mean, no validation set, the seeds
    assert re.search(r"\| ff-bp \| \d+\.\d\d ± \d+\.\d\d \| \d+\.\d\d \| – \| 2 \|", (tmp_path / "results.md").read_text())
    run = json.loads((tmp_path / "ff-bp_seed1.json").read_text())
    config = run["config"]
    assert config["loop"]["seed"] == 1 and config["method"]["name"] == "bp" and config["loop"]["epochs"] == 1
    assert table[1]["feedback_alignment"].keys() == {"W", "D"}

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(reproduce_module, "train", no_training)
    again = reproduce("mnist", tmp_path, rows=["ff-bp", "rnn-lcp-kp"], seeds=[0, 1], overrides=TINY,
                      progress=False)
    assert again == table


def test_an_interrupted_row_resumes_from_its_epoch_checkpoint_to_the_uninterrupted_result(tmp_path, monkeypatch):
    tiny = dict(TINY, **{"loop.epochs": 2})
    reference = reproduce("mnist", tmp_path / "whole", rows=["rnn-lcp-kp"], overrides=tiny, progress=False)
    out = tmp_path / "interrupted"
    with monkeypatch.context() as m:
        interrupt_on_second_eval(m)
        with pytest.raises(KeyboardInterrupt):
            reproduce("mnist", out, rows=["rnn-lcp-kp"], overrides=tiny, progress=False)
    ckpt = out / "rnn-lcp-kp_seed0.ckpt"
    assert load_checkpoint(ckpt)["epoch"] == 1 and not (out / "rnn-lcp-kp_seed0.json").exists()
    # Another budget does not continue that run: it names the setting and the way out.
    with pytest.raises(CheckpointError, match="other settings.*epochs.*remove the file"):
        reproduce("mnist", out, rows=["rnn-lcp-kp"], overrides=dict(tiny, **{"loop.epochs": 3}), progress=False)
    resumed = reproduce("mnist", out, rows=["rnn-lcp-kp"], overrides=tiny, progress=False)
    assert not ckpt.exists()
    whole = json.loads((tmp_path / "whole" / "rnn-lcp-kp_seed0.json").read_text())
    again = json.loads((out / "rnn-lcp-kp_seed0.json").read_text())
    for key in ("train_loss", "test_accuracy", "mean_iterations", "batch_solver_stats"):
        assert [h[key] for h in again["history"]] == [h[key] for h in whole["history"]], key
    assert again["feedback_alignment"] == whole["feedback_alignment"]
    assert [r["test_accuracy_mean"] for r in resumed] == [r["test_accuracy_mean"] for r in reference]


def test_unknown_row_lists_valid_rows(tmp_path):
    with pytest.raises(ConfigError, match="unknown row.*valid rows: ff-bp"):
        reproduce("mnist", tmp_path, rows=["ff-sgd"], overrides=TINY, progress=False)


def test_cli_reproduce(tmp_path, capsys):
    code = main(["reproduce", "mnist", "--rows", "ff-bp", "--dataset", "digits", "--epochs", "1",
                 "--limit-train", "128", "--limit-test", "32", "--out", str(tmp_path), "--quiet"])
    assert code == 0
    assert "| ff-bp |" in capsys.readouterr().out


def test_a_row_of_one_run_shows_no_spread():
    from leastcontrol.reproduce import _markdown
    entry = {"row": "rnn-rbp", "seeds": 1, "test_accuracy_mean": 96.64, "test_accuracy_std": 0.0,
             "best_test_accuracy_mean": 96.70, "validation_accuracy_mean": None,
             "seconds_per_epoch": 35.7, "mean_iterations": 267.5, "converged_fraction": 0.47}
    line = _markdown([entry], "# t").splitlines()[-1]
    assert line.startswith("| rnn-rbp | 96.64 | 96.70 | – | 1 |") and "±" not in line


# --- reuse of finished runs: only with the settings this call asks for ------------------------------
def fake_training(monkeypatch, calls=None, accuracy=0.5):
    """Replace the training of ``reproduce`` with one that writes a run's JSON of the right shape at once
    (its settings: those it was given), recording each config it gets in ``calls``."""
    def fake_train(config):
        if calls is not None:
            calls.append(config)
        history = [{"epoch": e, "seconds": 1.0, "mean_iterations": 10.0, "converged_fraction": 1.0,
                    "test_accuracy": accuracy} for e in range(1, config.loop.epochs + 1)]
        result = {"config": config.to_dict(), "history": history, "test_accuracy": accuracy}
        (reproduce_module.Path(config.output.json_out)).write_text(json.dumps(result))
        return result

    monkeypatch.setattr(reproduce_module, "train", fake_train)


def test_a_finished_run_made_with_other_settings_is_refused_before_any_training(tmp_path, monkeypatch):
    fake_training(monkeypatch, accuracy=0.9)
    reproduce("mnist", tmp_path, rows=["rnn-lcp-di"], seeds=[0], overrides=dict(TINY, **{"loop.epochs": 3}),
              progress=False)
    calls = []
    fake_training(monkeypatch, calls)
    # Seed 1 is not there yet, seed 0 is a 3-epoch run: nothing trains, the message names file, key and values.
    with pytest.raises(ConfigError) as info:
        reproduce("mnist", tmp_path, rows=["rnn-lcp-di"], seeds=[1, 0], overrides=TINY, progress=False)
    assert str(info.value) == (f"{tmp_path / 'rnn-lcp-di_seed0.json'} was made with loop.epochs = 3 (this call: 1); "
                               "use another --out, or remove that file to rerun it")
    assert calls == [] and not (tmp_path / "rnn-lcp-di_seed1.json").exists()
    # The same settings, the data elsewhere and no progress bars: reused.
    again = reproduce("mnist", tmp_path, rows=["rnn-lcp-di"], seeds=[0],
                      overrides=dict(TINY, **{"loop.epochs": 3, "data.dir": str(tmp_path)}), progress=False)
    assert calls == [] and again[0]["test_accuracy_mean"] == pytest.approx(90.0)


def test_several_runs_of_other_settings_are_named_in_one_error(tmp_path, monkeypatch):
    fake_training(monkeypatch)
    reproduce("mnist", tmp_path, rows=["ff-bp"], seeds=[0, 1], overrides=TINY, progress=False)
    with pytest.raises(ConfigError) as info:
        reproduce("mnist", tmp_path, rows=["ff-bp"], seeds=[0, 1],
                  overrides=dict(TINY, **{"data.limit_train": 128, "loop.lr": 0.01}), progress=False)
    lines = str(info.value).splitlines()
    assert len(lines) == 2 and "ff-bp_seed1.json" in lines[1]
    assert "data.limit_train = 256 (this call: 128)" in lines[0] and "loop.lr = 0.001 (this call: 0.01)" in lines[0]


def test_a_finished_run_of_an_earlier_version_is_compared_after_migrating_its_flat_config(tmp_path, monkeypatch):
    from leastcontrol.config import _FLAT, get_path

    calls = []
    fake_training(monkeypatch, calls)
    reproduce("mnist", tmp_path, rows=["ff-bp"], overrides=TINY, progress=False)
    path = tmp_path / "ff-bp_seed0.json"
    record = json.loads(path.read_text())
    tree = record["config"]
    record["config"] = {k: get_path(tree, p) for k, p in _FLAT.items() if get_path(tree, p) is not None}
    path.write_text(json.dumps(record))
    reproduce("mnist", tmp_path, rows=["ff-bp"], overrides=TINY, progress=False)
    assert len(calls) == 1
    with pytest.raises(ConfigError, match=r"ff-bp_seed0.json was made with model.hidden = 16 \(this call: 32\)"):
        reproduce("mnist", tmp_path, rows=["ff-bp"], overrides=dict(TINY, **{"model.hidden": 32}), progress=False)
    record["config"]["model"] = "lstm"
    path.write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="ff-bp_seed0.json holds settings this version cannot read.*lstm.*remove it"):
        reproduce("mnist", tmp_path, rows=["ff-bp"], overrides=TINY, progress=False)


@pytest.mark.parametrize("text,problem", [
    ('{"config": {},\n"history": [\n', r"is not valid JSON \(line 3 column 1\)"),
    ("[1, 2]", "is not a run's result"),
    ('{"config": {}, "history": []}', "has no 'test_accuracy'"),
    ('{"config": {}, "test_accuracy": 0.5}', "has no 'history'"),
    ('{"history": [], "test_accuracy": 0.5}', "has no 'config'"),
    ('{"config": {}, "test_accuracy": 0.5, "history": []}', "has no epochs"),
    ('{"config": {}, "test_accuracy": 0.5, "history": [{"epoch": 1, "seconds": 1, "test_accuracy": 0.5}]}',
     r"has no 'mean_iterations' in history\[0\] \(epoch 1\)"),
    ('{"config": {}, "test_accuracy": 0.5, "history": [{"epoch": 1, "mean_iterations": 3, "test_accuracy": 0.5}]}',
     "has no 'seconds'"),
    ('{"config": {}, "test_accuracy": 0.5, "history": [{"epoch": 1, "mean_iterations": 3, "seconds": 1}]}',
     "has no 'test_accuracy' in history"),
], ids=["not-json", "not-an-object", "no-test-accuracy", "no-history", "no-config", "no-epochs",
        "epoch-without-iterations", "epoch-without-seconds", "epoch-without-accuracy"])
def test_a_corrupt_or_incomplete_run_json_names_the_file_before_any_training(tmp_path, monkeypatch, text, problem):
    calls = []
    fake_training(monkeypatch, calls)
    (tmp_path / "ff-bp_seed1.json").write_text(text)
    with pytest.raises(ConfigError, match=f"ff-bp_seed1.json {problem}.*: remove it to rerun that run"):
        reproduce("mnist", tmp_path, rows=["ff-bp"], seeds=[0, 1], overrides=TINY, progress=False)
    assert calls == []


def test_repeated_seeds_or_rows_are_refused(tmp_path, monkeypatch, capsys):
    calls = []
    fake_training(monkeypatch, calls)
    with pytest.raises(ConfigError, match="--seeds names 0 more than once"):
        reproduce("mnist", tmp_path, rows=["ff-bp"], seeds=[0, 1, 0], overrides=TINY, progress=False)
    with pytest.raises(ConfigError, match="--rows names ff-bp more than once"):
        reproduce("mnist", tmp_path, rows=["ff-bp", "rnn-rbp", "ff-bp"], overrides=TINY, progress=False)
    code = main(["reproduce", "mnist", "--rows", "ff-bp", "--seeds", "0", "0", "--dataset", "digits",
                 "--out", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--seeds names 0 more than once" in err and "Traceback" not in err
    assert calls == []


def test_an_interrupted_run_of_other_settings_is_refused_before_any_run_trains(tmp_path, monkeypatch):
    calls = []
    fake_training(monkeypatch, calls)
    (tmp_path / "ff-bp_seed1.ckpt").write_bytes(b"")   # not a checkpoint of these settings (of none)
    with pytest.raises(CheckpointError, match="ff-bp_seed1.ckpt is corrupt"):
        reproduce("mnist", tmp_path, rows=["ff-bp"], seeds=[0, 1], overrides=TINY, progress=False)
    assert calls == []   # seed 0 did not train first


def test_a_run_resumes_only_where_its_checkpoint_is(tmp_path, monkeypatch):
    calls = []
    fake_training(monkeypatch, calls)
    (tmp_path / "ff-bp_seed1.ckpt").write_bytes(b"")   # seed 1 was interrupted
    # The stand-in file is no checkpoint: the check of its settings before any run is the next test's.
    monkeypatch.setattr("leastcontrol.reproduce.check_resumable", lambda config: None)
    reproduce("mnist", tmp_path, rows=["ff-bp"], seeds=[0, 1], overrides=TINY, progress=False)
    assert [(c.loop.seed, c.output.resume) for c in calls] == [(0, False), (1, True)]
    assert calls[1].output.checkpoint == str(tmp_path / "ff-bp_seed1.ckpt")
    assert not (tmp_path / "ff-bp_seed1.ckpt").exists()


def test_parallel_runs_give_each_runs_result_alone_with_the_same_threads(tmp_path):
    """--jobs 2: every run's JSON equals that of the same run trained alone in this process with the
    threads each job gets (the cores shared out)."""
    import torch
    from leastcontrol.reproduce import job_threads
    rows = ["ff-bp", "rnn-rbp"]
    parallel = reproduce("mnist", tmp_path / "p", rows=rows, seeds=[0, 1], overrides=TINY, progress=False, jobs=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(job_threads(2))
    try:
        alone = reproduce("mnist", tmp_path / "s", rows=rows, seeds=[0, 1], overrides=TINY, progress=False)
    finally:
        torch.set_num_threads(threads)
    for row in rows:
        for seed in (0, 1):
            a = json.loads((tmp_path / "p" / f"{row}_seed{seed}.json").read_text())
            b = json.loads((tmp_path / "s" / f"{row}_seed{seed}.json").read_text())
            assert a["test_accuracy"] == b["test_accuracy"]
            assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    assert [e["test_accuracy_mean"] for e in parallel] == [e["test_accuracy_mean"] for e in alone]
    assert not list((tmp_path / "p").glob("*.ckpt"))


def test_a_parallel_run_that_fails_names_its_row_and_seed(tmp_path):
    from leastcontrol.reproduce import RunFailedError
    bad = dict(TINY, **{"loop.lr": 1e30, "model.hidden": 4})
    with pytest.raises(RunFailedError, match=r"row rnn-rbp, seed [01] failed .*diverged"):
        reproduce("mnist", tmp_path, rows=["rnn-rbp"], seeds=[0, 1], overrides=bad, progress=False, jobs=2)
    with pytest.raises(ConfigError, match="--jobs must be a whole number"):
        reproduce("mnist", tmp_path, rows=["ff-bp"], overrides=TINY, progress=False, jobs=0)
