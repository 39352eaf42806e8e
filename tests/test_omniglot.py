"""Omniglot: the zip reader, the small-split protocol, episodes, the batched learners and a short real run."""
import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call

from leastcontrol.data.omniglot import read_archive, small_split_protocol
from leastcontrol.errors import ConfigError, DataFormatError, DatasetNotFoundError
from leastcontrol.meta.learners import ConvLearner
from leastcontrol.meta.problem import InnerProblem
from leastcontrol.meta.tasks import Omniglot

SMALL1 = {"Greek": 3, "Latin": 3}
SMALL2 = {"Greek": 3, "Tagalog": 4, "Sanskrit": 3}


def _png(pattern: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.where(pattern, 0, 255).astype(np.uint8)).convert("1").save(buf, format="PNG")
    return buf.getvalue()


def _write_archive(path: Path, alphabets: dict, seed: int, drawings: int = 20):
    """An archive in Omniglot's layout; a character's identity is its alphabet and index (same in both splits)."""
    with zipfile.ZipFile(path, "w") as zf:
        for alphabet, n in alphabets.items():
            for c in range(1, n + 1):
                g = np.random.default_rng(abs(hash((alphabet, c))) % 2**32)
                base = g.random((105, 105)) < 0.1
                for k in range(1, drawings + 1):
                    jitter = np.random.default_rng(seed * 1000 + k).random((105, 105)) < 0.01
                    zf.writestr(f"{path.stem}/{alphabet}/character{c:02d}/{c:04d}_{k:02d}.png", _png(base ^ jitter))


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    root = tmp_path_factory.mktemp("omniglot")
    _write_archive(root / "images_background_small1.zip", SMALL1, seed=1)
    _write_archive(root / "images_background_small2.zip", SMALL2, seed=2)
    return root


def test_reader_parses_every_character(archives):
    chars = read_archive(archives / "images_background_small1.zip", size=28)
    assert chars.images.shape == (6, 20, 28, 28) and chars.images.dtype == torch.float32
    assert chars.characters[0] == "Greek/character01" and chars.alphabets == ["Greek", "Latin"]
    # Strokes (black in the files) come out near 1, the white background at 0.
    assert float(chars.images.min()) >= 0.0 and float(chars.images.max()) <= 1.0
    assert 0.02 < float(chars.images.mean()) < 0.3


def test_small_protocol_tests_only_on_new_alphabets(archives):
    train, test = small_split_protocol(archives)
    assert test.alphabets == ["Sanskrit", "Tagalog"] and len(test.characters) == 7
    assert not set(train.characters) & set(test.characters)


def test_bad_archives_fail_clearly(tmp_path, archives):
    with pytest.raises(DatasetNotFoundError, match="images_background_small1.zip not found.*--data-dir"):
        small_split_protocol(tmp_path)
    (tmp_path / "images_background_small1.zip").write_bytes(b"not a zip at all")
    with pytest.raises(DataFormatError, match="not a readable zip"):
        read_archive(tmp_path / "images_background_small1.zip")
    short = tmp_path / "short.zip"
    _write_archive(short, {"Greek": 1}, seed=3, drawings=7)
    with pytest.raises(DataFormatError, match="7 drawings, expected 20"):
        read_archive(short)
    broken = tmp_path / "broken.zip"
    with zipfile.ZipFile(broken, "w") as zf:
        zf.writestr("broken/Greek/character01/0001_01.png", b"\x89PNG garbage")
    with pytest.raises(DataFormatError, match="not a readable image"):
        read_archive(broken)


def _which_character(image, chars):
    """Index of the character (and rotation) whose drawings contain ``image``."""
    for k in range(4):
        turned = torch.rot90(image, -k, dims=(-2, -1))
        hits = (chars.images - turned).abs().flatten(2).amax(2).eq(0).any(1).nonzero()
        if len(hits):
            return int(hits[0]), k
    return None


def test_episodes_keep_splits_apart_and_permute_labels(archives):
    task = Omniglot(ways=3, shots=2, queries=3, data_dir=str(archives))
    train, test = task.splits["train"], task.splits["test"]
    g = torch.Generator().manual_seed(0)
    batch = task.sample(6, g, split="test")
    assert batch.x.shape == (6, 6, 1, 28, 28) and batch.xq.shape == (6, 9, 1, 28, 28)
    label_of = {}
    for t in range(6):
        for i in range(6):
            char, turn = _which_character(batch.x[t, i, 0], test)
            assert turn == 0  # held-out classes are not rotated
            assert test.characters[char] not in train.characters
            assert char == int(batch.classes[t, batch.y[t, i]])
            label_of.setdefault(char, set()).add(int(batch.y[t, i]))
        # Support and query of a task never share a drawing.
        assert not any(torch.equal(a, b) for a in batch.x[t] for b in batch.xq[t])
    assert any(len(labels) > 1 for labels in label_of.values())  # a character gets different labels
    rotated = task.sample(20, g, split="train")
    assert int((rotated.classes % 4).max()) > 0  # training classes include rotations
    char, turn = _which_character(rotated.x[0, 0, 0], train)
    assert int(rotated.classes[0, 0]) == 4 * char + turn


def test_episode_shapes_that_cannot_be_drawn_fail_clearly(archives):
    with pytest.raises(ConfigError, match="8-way episodes need 8 classes but the test split has 7"):
        Omniglot(ways=8, data_dir=str(archives))
    with pytest.raises(ConfigError, match="only 20 drawings"):
        Omniglot(ways=2, shots=5, queries=16, data_dir=str(archives))
    with pytest.raises(DatasetNotFoundError, match="not found"):
        Omniglot(data_dir=str(archives / "nowhere"))


def test_grouped_conv_learner_equals_one_network_per_task():
    torch.manual_seed(0)
    net = ConvLearner(ways=4, channels=6, blocks=3).double()
    problem = InnerProblem(net, "cross_entropy", lam=1.0)
    T = 3
    phi = problem.initial_weights().expand(T, -1) + 0.1 * torch.randn(T, problem.n_params, dtype=torch.float64)
    x = torch.randn(T, 5, 1, 28, 28, dtype=torch.float64)
    y = torch.randint(0, 4, (T, 5))
    single = torch.stack([functional_call(net, problem.unflatten(phi[t]), (x[t],)) for t in range(T)])
    assert torch.allclose(problem.forward(phi, x), single, atol=1e-12)
    grads = torch.stack([torch.func.grad(problem.task_loss)(phi[t], x[t], y[t]) for t in range(T)])
    assert torch.allclose(problem.grads(phi, x, y), grads, atol=1e-10)


def _real_omniglot_dir():
    env = os.environ.get("LEASTCONTROL_TEST_OMNIGLOT")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"


def test_short_lcp_run_on_real_omniglot_beats_chance():
    directory = _real_omniglot_dir()
    if not (directory / "images_background_small1.zip").is_file():
        pytest.skip(f"Omniglot small splits not found in {directory}")
    from leastcontrol.meta.train import MetaConfig, meta_train
    result = meta_train(MetaConfig(task="omniglot", method="lcp", learner="mlp", activation="relu", ways=5, shots=1,
                                   queries=5, data_dir=str(directory), meta_batch=8, meta_steps=30, meta_lr=1e-2,
                                   inner_solver="gd", inner_step_rule="fixed", inner_lr=0.5, inner_steps=10, lam=0.5,
                                   eval_tasks=200, progress=False))
    test = result["test"]
    assert test["metric"] == "accuracy" and test["tasks"] == 200
    assert test["mean"] - test["ci95"] > 0.3  # chance is 0.2
    assert test["mean"] > result["test_untrained"]["mean"] + 0.04
