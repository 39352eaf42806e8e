"""The native backend's build cache and what happens where the C steps cannot be built or loaded: a
broken entry is built again, an unwritable cache is built around (with a warning), and a machine
without a working compiler runs the steps on the next backend (with one warning), never a traceback."""
import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import leastcontrol
from leastcontrol import native
from leastcontrol.errors import ConfigError
from leastcontrol.methods import get_method
from leastcontrol.solvers import Euler

from .helpers import batch, rel_err, tiny_ff, tiny_rnn

COMPILER = next(filter(None, map(shutil.which, ("cc", "gcc", "clang"))), None)   # its path
needs_compiler = pytest.mark.skipif(COMPILER is None, reason="the native backend needs a C compiler")


@pytest.fixture(autouse=True)
def _fresh_process_state(monkeypatch, tmp_path):
    """Each test starts as a fresh process would: nothing loaded, no failure found, no scratch folder,
    a cache of its own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(native, "_failure", None, raising=False)
    monkeypatch.setattr(native, "_scratch", None, raising=False)
    native.library.cache_clear()
    yield
    native.library.cache_clear()


@pytest.fixture(scope="module")
def reference_library(tmp_path_factory):
    """This machine's library, built once into a cache of this module's own; its path."""
    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.mktemp("reference")
        mp.setenv("XDG_CACHE_HOME", str(cache))
        native.library.cache_clear()
        try:
            native.library()
        finally:
            native.library.cache_clear()
    (path,) = cache.rglob("steps-*.so")
    return path


def loads_fresh(path: Path, tmp_path: Path) -> bool:
    """Whether ``path`` is a library of the C steps: a copy under a new name loads and has them (a
    copy, so that the loader cannot answer with a library it already holds under that name)."""
    copy = tmp_path / "copy.so"
    shutil.copyfile(path, copy)
    return hasattr(ctypes.CDLL(str(copy)), "lc_system_dims_f64")


def method_gradients(backend, steps=1):
    """LCP-DI's update on a small recurrent network, ``steps`` times, with the solvers' ``backend``."""
    net = tiny_rnn()
    x, y = batch(B=6)
    method = get_method("lcp-di", solver=Euler(tol=1e-9, max_steps=400, backend=backend))
    return [method.gradients(net, x, y) for _ in range(steps)][-1]


def no_fallback_warnings(record):
    return [w for w in record if "cannot run here" in str(w.message)] == []


# --- a broken cache entry ------------------------------------------------------------------------

@needs_compiler
@pytest.mark.parametrize("broken", ["empty", "truncated", "garbage"])
def test_a_broken_cache_entry_is_built_again(broken, reference_library, tmp_path):
    """An interrupted copy or a full disk leaves a file that is not the library built (beside the digest
    of the one that was): built again in its place, never handed to the loader (which may crash on a
    truncated library rather than refuse it)."""
    good = reference_library.read_bytes()
    entry = tmp_path / "xdg" / "leastcontrol" / "native" / reference_library.name
    entry.parent.mkdir(parents=True)
    entry.write_bytes({"empty": b"", "truncated": good[:len(good) // 2], "garbage": b"not a library\n" * 64}[broken])
    digest = entry.with_name(entry.name + ".sha256")
    digest.write_text(hashlib.sha256(good).hexdigest() + "\n")
    lib = native.library()
    assert hasattr(lib, "lc_system_dims_f64")
    assert entry.stat().st_size > 0 and loads_fresh(entry, tmp_path)
    assert hashlib.sha256(entry.read_bytes()).hexdigest() == digest.read_text().strip()
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name, digest.name]   # no partial file left


# --- a cache that cannot be written --------------------------------------------------------------

def unwritable_cache(tmp_path: Path, how: str) -> Path:
    """A $XDG_CACHE_HOME the build cannot write to, even as root where ``how`` is "under a file"."""
    if how == "under a file":
        (tmp_path / "file").write_text("")
        return tmp_path / "file" / "cache"
    if os.geteuid() == 0:
        pytest.skip("root writes to a read-only folder")
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    return folder


@needs_compiler
@pytest.mark.parametrize("how", ["under a file", "read-only"])
def test_an_unwritable_cache_is_built_around_with_a_warning(how, monkeypatch, tmp_path):
    """The C steps are built in a temporary folder of the process, with one warning naming the cache
    and the fix; the update is the eager one."""
    cache = unwritable_cache(tmp_path, how)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        c = method_gradients(("native",), steps=2)
        native.library.cache_clear()
        native.library()   # loaded again: built again, not warned again
    said = [str(w.message) for w in record if "not writable" in str(w.message)]
    assert len(said) == 1 and str(cache / "leastcontrol" / "native") in said[0] and "$XDG_CACHE_HOME" in said[0]
    assert no_fallback_warnings(record) and not native.failed()   # the C steps did run
    eager = method_gradients(("eager",))
    assert rel_err(c.grads, eager.grads) < 1e-10


# --- nothing to build with -----------------------------------------------------------------------

def break_the_build(how: str, monkeypatch, tmp_path: Path) -> str:
    """Take the build's ``how`` away; the part of the warning that says so."""
    if how == "no compiler":
        (tmp_path / "empty").mkdir()
        monkeypatch.setenv("PATH", str(tmp_path / "empty"))   # no cc, gcc or clang to find
        monkeypatch.setenv("CC", "/nonexistent")
        return "no C compiler"
    if how == "the compiler fails":
        false = shutil.which("false")
        if false is None:
            pytest.skip("no 'false' program to stand for a failing compiler")
        monkeypatch.setenv("CC", false)
        return "failed"
    if COMPILER is None:
        pytest.skip("needs a C compiler")

    def broken(path):
        raise OSError(f"{path}: invalid ELF header")
    monkeypatch.setattr(native, "_open", broken, raising=False)
    return "cannot load them"


@pytest.mark.parametrize("how", ["no compiler", "the compiler fails", "the build does not load"])
def test_without_a_working_build_the_steps_run_on_the_next_backend(how, monkeypatch, tmp_path):
    """backend ("native",): one warning naming why and the fix over two updates, each the eager one;
    library() itself still raises for its direct callers."""
    reason = break_the_build(how, monkeypatch, tmp_path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        c = method_gradients(("native",), steps=2)
    said = [w for w in record if "native" in str(w.message)]
    assert len(said) == 1 and issubclass(said[0].category, RuntimeWarning)
    message = str(said[0].message)
    assert reason in message and "drop 'native' from the solver's backend (method.solver.backend)" in message
    if how == "no compiler":
        assert "set $CC" in message
    eager = method_gradients(("eager",), steps=2)
    assert rel_err(c.grads, eager.grads) < 1e-12 and c.stats.keys() == eager.stats.keys()
    with pytest.raises(ConfigError, match=reason):
        native.library()


def test_without_a_compiler_other_mistakes_still_fail(monkeypatch, tmp_path):
    """Giving way is for a build that cannot be made here, not for a system the C steps do not cover."""
    break_the_build("no compiler", monkeypatch, tmp_path)
    x, y = batch(B=2)
    with pytest.raises(ConfigError, match="drop 'native'"):
        get_method("lcp-di", solver=Euler(backend=("native",))).gradients(tiny_ff(), x, y)


# --- through the command line --------------------------------------------------------------------

@pytest.mark.parametrize("how", ["cache under a file", "no compiler"])
def test_the_command_line_trains_without_a_traceback(how, tmp_path):
    """A short training run with backend ["native"] ends normally, the warning on stderr and in the result's
    warnings, no traceback."""
    if how == "cache under a file" and COMPILER is None:
        pytest.skip("needs a C compiler")
    (tmp_path / "file").write_text("")
    (tmp_path / "empty").mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(leastcontrol.__file__).parents[1]), "OMP_NUM_THREADS": "1",
           "XDG_CACHE_HOME": str(tmp_path / "file" / "cache")}
    if how == "no compiler":
        env.update(CC="/nonexistent", PATH=str(tmp_path / "empty"), XDG_CACHE_HOME=str(tmp_path / "xdg"))
    proc = subprocess.run([sys.executable, "-m", "leastcontrol", "train", "--limit-train", "64", "--limit-test", "64",
                           "--epochs", "1", "--quiet", "--set", 'method.solver.backend=["native"]',
                           "--json-out", str(tmp_path / "run.json")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    said = "not writable" if how == "cache under a file" else "no C compiler"
    assert said in proc.stderr
    assert [w for w in json.loads((tmp_path / "run.json").read_text())["warnings"] if said in w]
