"""The reproduction command: artefacts, resumption, row selection."""
import csv
import json
import re

import pytest

from leastcontrol import reproduce as reproduce_module
from leastcontrol.cli import main
from leastcontrol.errors import ConfigError
from leastcontrol.reproduce import available_rows, reproduce

TINY = {"dataset": "digits", "epochs": 1, "limit_train": 256, "limit_test": 64, "hidden": 16}


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
    run = json.loads((tmp_path / "ff-bp_seed1.json").read_text())
    assert run["config"]["seed"] == 1 and run["config"]["method"] == "bp" and run["config"]["epochs"] == 1
    assert table[1]["feedback_alignment"].keys() == {"W", "D"}

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(reproduce_module, "train", no_training)
    again = reproduce("mnist", tmp_path, rows=["ff-bp", "rnn-lcp-kp"], seeds=[0, 1], overrides=TINY,
                      progress=False)
    assert again == table


def test_unknown_row_lists_valid_rows(tmp_path):
    with pytest.raises(ConfigError, match="unknown row.*valid rows: ff-bp"):
        reproduce("mnist", tmp_path, rows=["ff-sgd"], overrides=TINY, progress=False)


def test_cli_reproduce(tmp_path, capsys):
    code = main(["reproduce", "mnist", "--rows", "ff-bp", "--dataset", "digits", "--epochs", "1",
                 "--limit-train", "128", "--limit-test", "32", "--out", str(tmp_path), "--quiet"])
    assert code == 0
    assert "| ff-bp |" in capsys.readouterr().out
