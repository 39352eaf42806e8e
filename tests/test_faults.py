"""Faults a user meets, checked in-process where a subprocess cannot stage them (a disk that fills at the
end of a run, a diverging batch, inputs of absurd scale); the command-line cases are in
tests/fault_probe.py (tests/test_fault_probe.py). Numbers in the names follow the probe's classes."""
import errno
import json
import os
import stat
import threading
import warnings

import pytest
import torch

from leastcontrol.atomic import check_output, check_outputs, write_json
from leastcontrol.cli import main
from leastcontrol.data import DataConfig
from leastcontrol.errors import CheckpointError, NonFiniteUpdateError, OutputError, SolverDivergedError
from leastcontrol.methods import METHODS
from leastcontrol.train import TrainConfig, init_system, train

from .fault_probe import read_only_folder, Skip

TINY = {"model": {"hidden": 16}, "data": {"limit_train": 64, "limit_test": 32},
        "loop": {"epochs": 1}, "output": {"progress": False, "log": False}}


def tiny(**sections):
    tree = {key: dict(value) for key, value in TINY.items()}
    for key, value in sections.items():
        tree.setdefault(key, {}).update(value)
    return TrainConfig.from_tree(tree)


# --- 1. writes ---------------------------------------------------------------------------------
def test_1_a_regular_file_is_replaced_whole_and_keeps_its_permissions(tmp_path):
    path = tmp_path / "run.json"
    path.write_text("old")
    path.chmod(0o600)
    write_json(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]   # no temporary file left


def test_1_a_chain_of_links_is_written_through_to_its_final_target(tmp_path):
    target = tmp_path / "target.json"
    target.write_text("old")
    (tmp_path / "b").symlink_to(target)
    (tmp_path / "a").symlink_to(tmp_path / "b")
    write_json(tmp_path / "a", {"a": 1})
    assert (tmp_path / "a").is_symlink() and (tmp_path / "b").is_symlink()
    assert json.loads(target.read_text()) == {"a": 1}


def test_1_a_fifo_is_written_in_place(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    write_json(fifo, {"a": 1})
    reader.join(10)
    assert fifo.is_fifo() and json.loads(got[0]) == {"a": 1}


def test_1_a_failed_write_leaves_the_previous_file_and_names_the_reason(tmp_path, monkeypatch):
    path = tmp_path / "run.json"
    path.write_text("previous")

    def full(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("pathlib.Path.write_bytes", full)
    with pytest.raises(OutputError, match=r"could not write --json-out to .*run.json: No space left on device"):
        write_json(path, {"a": 1})
    monkeypatch.undo()
    assert path.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


# --- 4., 5. outputs checked before a run --------------------------------------------------------
def test_5_outputs_are_checked_without_creating_anything(tmp_path):
    check_output(tmp_path / "new" / "deeper" / "run.json", "--json-out")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="is not a folder"):
        check_output(tmp_path / "file" / "run.json", "--json-out")
    with pytest.raises(OutputError, match="is a directory"):
        check_output(tmp_path, "--json-out")
    try:
        with read_only_folder(tmp_path / "ro") as folder:
            with pytest.raises(OutputError, match="not writable"):
                check_output(folder / "run.json", "--json-out")
    except Skip as skip:
        pytest.skip(str(skip))


def test_4_two_outputs_at_one_file_are_refused_also_through_a_link(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "out")
    with pytest.raises(OutputError, match="--checkpoint and --json-out are the same file"):
        check_outputs({"--checkpoint": tmp_path / "out", "--json-out": tmp_path / "link"})
    check_outputs({"--checkpoint": tmp_path / "a", "--json-out": tmp_path / "b", "--other": None})


def test_5_a_result_that_cannot_be_written_is_printed_and_the_error_names_the_path(tmp_path, monkeypatch, capsys):
    def full(path, obj, what="--json-out"):
        raise OutputError(f"could not write {what} to {path}: No space left on device")

    monkeypatch.setattr("leastcontrol.run.write_json", full)
    target = tmp_path / "run.json"
    code = main(["train", "--limit-train", "64", "--limit-test", "32", "--epochs", "1", "--hidden", "16", "--quiet",
                 "--json-out", str(target)])
    out, err = capsys.readouterr()
    assert code == 2
    assert "test accuracy" in out                        # the result the user would otherwise lose
    assert f"could not write --json-out to {target}: No space left on device" in err
    assert "Traceback" not in err and not target.exists()


# --- 3. resuming ------------------------------------------------------------------------------------
def test_3_epochs_may_grow_on_resume_only_where_the_schedule_does_not_depend_on_them(tmp_path):
    ckpt = str(tmp_path / "run.ckpt")
    train(tiny(loop={"schedule": "none"}, output={"checkpoint": ckpt}))
    grown = train(tiny(loop={"schedule": "none", "epochs": 2}, output={"checkpoint": ckpt, "resume": True}))
    assert [h["epoch"] for h in grown["history"]] == [1, 2]
    ckpt2 = str(tmp_path / "cosine.ckpt")
    train(tiny(output={"checkpoint": ckpt2}))
    with pytest.raises(CheckpointError, match=r"loop.epochs = 1 \(asked: 2\)"):
        train(tiny(loop={"epochs": 2}, output={"checkpoint": ckpt2, "resume": True}))


# --- 6. warnings stay with the result ------------------------------------------------------------
def test_6_warnings_of_a_run_are_in_its_result(tmp_path):
    with pytest.warns(UserWarning, match="no sample of epoch 1 settled"):
        result = train(tiny(method={"name": "lcp-di", "solver": {"max_steps": 3}}))
    assert len(result["warnings"]) == 1 and "max_steps" in result["warnings"][0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert train(tiny(method={"name": "rbp"}))["warnings"] == []


# --- 7. a non-finite update never reaches .grad ------------------------------------------------------
@pytest.mark.parametrize("model", ["ff", "rnn"])
@pytest.mark.parametrize("name", METHODS.names())
def test_7_inputs_of_absurd_scale_raise_or_give_a_finite_update(name, model):
    if name in ("bp", "pc", "ipc") and model == "rnn":
        pytest.skip(f"{name} trains layered systems only")
    if name in ("ep", "ep-centered"):   # energy-based systems only: once, on the layered one
        if model == "rnn":
            pytest.skip("equilibrium propagation trains energy-based systems only")
        model = "hopfield"
    config = tiny(model={"name": model}, method={"name": name})
    data = DataConfig().load(limit_train=16)
    method = config.build_method()
    system = init_system(config, data, method, torch.Generator().manual_seed(0))
    try:
        method(system, data.train_x[:8] * 1e30, data.train_y[:8])
    except SolverDivergedError:   # NonFiniteUpdateError included
        assert all(p.grad is None for p in system.parameters())
    else:
        assert all(torch.isfinite(p.grad).all() for p in system.parameters() if p.grad is not None)


def test_7_a_nan_update_names_the_parameter_and_is_not_written():
    config = tiny(model={"name": "ff"}, method={"name": "lcp-ebd"})
    data = DataConfig().load(limit_train=16)
    method = config.build_method()
    system = init_system(config, data, method, torch.Generator().manual_seed(0))
    with pytest.raises(NonFiniteUpdateError, match=r"lcp-ebd: the update of 'U' is NaN/Inf"):
        method(system, data.train_x[:8] * 1e30, data.train_y[:8])
    assert all(p.grad is None for p in system.parameters())


# --- 11. a failed download leaves no folders behind ------------------------------------------------
@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_11_a_failed_download_into_a_mistyped_folder_leaves_nothing(name, tmp_path, monkeypatch):
    import urllib.error
    from leastcontrol.data import cifar, load_dataset, mnist
    from leastcontrol.errors import DatasetNotFoundError

    def no_network(url, dest, timeout):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(mnist, "_fetch", no_network)
    monkeypatch.setattr(cifar, "_fetch", no_network)
    monkeypatch.delenv("LEASTCONTROL_OFFLINE", raising=False)
    with pytest.raises(DatasetNotFoundError, match="no network"):
        load_dataset(name, data_dir=tmp_path / "typo" / name)
    assert list(tmp_path.iterdir()) == []


def test_6b_a_new_run_never_replaces_a_checkpoint_another_run_put_at_its_path(tmp_path):
    from leastcontrol.run import Run
    path = tmp_path / "run.ckpt"
    run = Run("fmt", {"a": 1}, checkpoint=str(path))      # the path is free when the run starts
    path.write_bytes(b"another run's checkpoint")          # ... and taken while it trains
    with pytest.raises(OutputError, match="created by another process while this run worked"):
        run.save(step=1)
    assert path.read_bytes() == b"another run's checkpoint"
    path.unlink()
    run.save(step=1)                                        # free again: claimed, then replaced in place
    run.save(step=2)
    assert torch.load(path, weights_only=True)["step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["run.ckpt"]
