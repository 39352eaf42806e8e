"""The reproduction command: artefacts, resumption, row selection."""
import csv
import json
import re

import pytest

from leastcontrol import reproduce as reproduce_module
from leastcontrol.checkpoint import load_checkpoint
from leastcontrol.cli import main
from leastcontrol.errors import CheckpointError, ConfigError
from leastcontrol.reproduce import available_rows, reproduce

from .helpers import interrupt_on_second_eval

TINY = {"data.name": "digits", "loop.epochs": 1, "data.limit_train": 256, "data.limit_test": 64, "model.hidden": 16}


def test_every_published_row_has_a_config():
    rows = available_rows("mnist")
    assert {"ff-bp", "ff-lcp-di", "ff-lcp-kp", "ff-lcp-ebd", "rnn-rbp", "rnn-lcp-di", "rnn-lcp-kp",
            "rnn-lcp-ebd"} <= set(rows)


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
    assert re.search(r"\| ff-bp \| \d+\.\d\d ± \d+\.\d\d \| 2 \|", (tmp_path / "results.md").read_text())
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
             "seconds_per_epoch": 35.7, "mean_iterations": 267.5, "converged_fraction": 0.47}
    line = _markdown([entry], "# t").splitlines()[-1]
    assert line.startswith("| rnn-rbp | 96.64 | 1 |") and "±" not in line
