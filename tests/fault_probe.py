"""Fault probe: the command line as a user meets it with bad input and faults, each case a subprocess.

Every case runs ``python -m leastcontrol ...`` in a scratch folder and checks what the user gets:
the exit status, one readable line naming the fix, no traceback, and that nothing at an output path
was destroyed. The cases are grouped by the class of fault they probe (1: writing outputs, 2:
reproduce reusing runs, 3: resuming, 4: one path for two outputs, 5: outputs checked before a run,
6: runs that go badly wrong, 7: non-finite values, 8: checkpoints that do not fit, 9: the native
build cache, 10: settings that do not apply, 11: messages and leftovers).

    python tests/fault_probe.py            # every case: prints each, then "N passed, N failed"
    python tests/fault_probe.py --fast     # the cases CI runs (tests/test_fault_probe.py)
    python tests/fault_probe.py same-path resume-missing   # some cases by name

Exit status 1 if a case failed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

SRC = Path(__file__).resolve().parents[1] / "src"
# A run of one batch: the bundled digits, 64 training samples, 16 hidden units.
TINY = ["--limit-train", "64", "--limit-test", "32", "--epochs", "1", "--hidden", "16", "--quiet"]


class Skip(Exception):
    """The machine cannot stage this case (e.g. no way to make a read-only folder)."""


@dataclass
class Result:
    code: int
    out: str
    err: str


def leastcontrol(*args: str, env: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None,
                 timeout: float = 300) -> Result:
    """Run the command line; a traceback on stderr fails the case whatever else it checks."""
    environ = {**os.environ, "PYTHONPATH": str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "leastcontrol", *args], capture_output=True, text=True,
                          env=environ, cwd=cwd, timeout=timeout)
    assert "Traceback" not in proc.stderr, f"a traceback reached the user:\n{proc.stderr[-2000:]}"
    return Result(proc.returncode, proc.stdout, proc.stderr)


def refused(result: Result, *phrases: str, trained: bool = False) -> None:
    """Exit 2 with one ``leastcontrol: error:`` line holding every phrase; nothing trained unless ``trained``."""
    assert result.code == 2, f"exit {result.code}, expected 2; stderr: {result.err[-800:]}"
    errors = [line for line in result.err.splitlines() if line.startswith("leastcontrol: error:")]
    assert errors, f"no 'leastcontrol: error:' line in stderr: {result.err[-800:]}"
    for phrase in phrases:
        assert phrase in result.err, f"{phrase!r} not in the message: {errors[-1]}"
    if not trained:
        assert "epoch 1:" not in result.out, "the run trained before it was refused"


def ok(result: Result) -> None:
    assert result.code == 0, f"exit {result.code}; stderr: {result.err[-800:]}"


@contextlib.contextmanager
def read_only_folder(path: Path):
    """A folder no process of this user can write: by permission bits, or for root (whom they do not
    bind) by a read-only bind mount of it on itself."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True).returncode == 0
    if mounted:
        mounted = subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True).returncode == 0
        if not mounted:
            subprocess.run(["umount", str(path)], capture_output=True)
    if not mounted:
        raise Skip("running as root without the right to mount: no read-only folder can be made")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


CASES: Dict[str, tuple] = {}


def case(name: str, kind: int, fast: bool = True):
    """Register a case: ``fn(tmp)`` raises AssertionError on failure, :class:`Skip` when it cannot run."""
    def register(fn: Callable[[Path], None]):
        CASES[name] = (kind, fast, fn)
        return fn
    return register


# --- 1. writing an output never replaces what is at the path --------------------------------
@case("json-out-through-symlink", 1)
def _(tmp: Path) -> None:
    target, link = tmp / "target.json", tmp / "link.json"
    target.write_text("old")
    link.symlink_to(target)
    ok(leastcontrol("train", *TINY, "--json-out", str(link)))
    assert link.is_symlink(), "the symbolic link was replaced by a file"
    assert "test_accuracy" in json.loads(target.read_text()), "the link's target did not get the result"


@case("json-out-to-fifo", 1)
def _(tmp: Path) -> None:
    fifo = tmp / "fifo"
    os.mkfifo(fifo)
    got: List[str] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    ok(leastcontrol("train", *TINY, "--json-out", str(fifo)))
    reader.join(30)
    assert fifo.is_fifo(), "the FIFO was replaced by a file"
    assert got and "test_accuracy" in json.loads(got[0]), "the FIFO's reader did not get the result"


@case("json-out-to-this-process-stdout", 1)
def _(tmp: Path) -> None:
    piped = leastcontrol("train", *TINY, "--json-out", "/dev/stdout")   # stdout is a pipe here
    ok(piped)
    assert '"test_accuracy"' in piped.out and "epoch 1:" in piped.out
    log = tmp / "all.log"
    log.write_text("PRECIOUS\n")
    with open(log, "a") as out:   # `... --json-out /dev/stdout >> all.log`
        code = subprocess.run([sys.executable, "-m", "leastcontrol", "train", *TINY, "--json-out", "/dev/stdout"],
                              stdout=out, stderr=subprocess.PIPE, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"})
    assert code.returncode == 0 and "Traceback" not in code.stderr, code.stderr[-800:]
    text = log.read_text()
    assert text.startswith("PRECIOUS") and '"test_accuracy"' in text and "epoch 1:" in text, text[:300]


@case("output-at-an-input", 1)
def _(tmp: Path) -> None:
    import torch
    ckpt = tmp / "run.ckpt"
    torch.save({"format": "leastcontrol-checkpoint-1"}, ckpt)
    before = ckpt.read_bytes()
    refused(leastcontrol("eval", "--checkpoint", str(ckpt), "--json-out", str(ckpt)), "this run reads")
    assert ckpt.read_bytes() == before
    config = tmp / "run.toml"
    config.write_text("[loop]\nepochs = 1\n")
    refused(leastcontrol("train", *TINY, "--config", str(config), "--json-out", str(config)), "this run reads")
    assert config.read_text() == "[loop]\nepochs = 1\n"


@case("checkpoint-to-fifo", 1)
def _(tmp: Path) -> None:
    fifo = tmp / "fifo"
    os.mkfifo(fifo)
    refused(leastcontrol("train", *TINY, "--checkpoint", str(fifo)), "not a regular file")
    assert fifo.is_fifo()


# --- 2. reproduce reuses only runs of the settings asked for --------------------------------
REPRODUCE = ["reproduce", "mnist", "--rows", "ff-bp", "--dataset", "digits", "--limit-train", "64",
             "--limit-test", "32", "--quiet"]


@case("reproduce-other-budget", 2)
def _(tmp: Path) -> None:
    ok(leastcontrol(*REPRODUCE, "--epochs", "1", "--out", str(tmp / "r")))
    before = (tmp / "r" / "results.md").read_text()
    refused(leastcontrol(*REPRODUCE, "--epochs", "2", "--out", str(tmp / "r")), "loop.epochs = 1 (this call: 2)")
    assert (tmp / "r" / "results.md").read_text() == before, "the report was rewritten"


@case("reproduce-repeated-seed", 2)
def _(tmp: Path) -> None:
    refused(leastcontrol(*REPRODUCE, "--epochs", "1", "--seeds", "0", "0", "--out", str(tmp / "r")), "seed")


# --- 3. --resume continues only the run that was asked for ----------------------------------
@case("resume-with-changed-settings", 3)
def _(tmp: Path) -> None:
    ckpt = tmp / "run.ckpt"
    ok(leastcontrol("train", *TINY, "--checkpoint", str(ckpt)))
    refused(leastcontrol("train", *TINY, "--checkpoint", str(ckpt), "--resume", "--set", "method.alpha=1",
                         "--set", "method.solver.tol=1e-3"), "method.alpha = 0.1 (asked: 1)", "tol")


@case("resume-missing-checkpoint", 3)
def _(tmp: Path) -> None:
    ckpt = tmp / "typo.ckpt"
    refused(leastcontrol("train", *TINY, "--checkpoint", str(ckpt), "--resume"), "does not exist")
    assert not ckpt.exists()


# --- 4. two outputs are never one file ------------------------------------------------------
@case("checkpoint-and-json-out-one-file", 4)
def _(tmp: Path) -> None:
    out = tmp / "run.out"
    refused(leastcontrol("train", *TINY, "--checkpoint", str(out), "--json-out", str(out)), "same file")
    (tmp / "alias").symlink_to(out)
    refused(leastcontrol("train", *TINY, "--checkpoint", str(out), "--json-out", str(tmp / "alias")), "same file")


# --- 5. outputs are checked before any work, and a failed write says where -------------------
@case("json-out-is-a-folder", 5)
def _(tmp: Path) -> None:
    refused(leastcontrol("train", *TINY, "--json-out", str(tmp)), "is a directory")


@case("checkpoint-is-a-folder", 5)
def _(tmp: Path) -> None:
    refused(leastcontrol("train", *TINY, "--checkpoint", str(tmp)), "is a directory")
    refused(leastcontrol("train", *TINY, "--checkpoint", str(tmp), "--resume"), "is a directory")


@case("json-out-in-a-read-only-folder", 5)
def _(tmp: Path) -> None:
    with read_only_folder(tmp / "ro") as folder:
        refused(leastcontrol("train", *TINY, "--json-out", str(folder / "run.json")), "not writable")
        refused(leastcontrol("train", *TINY, "--checkpoint", str(folder / "sub" / "run.ckpt")), "not writable")


@case("other-commands-check-outputs-first", 5)
def _(tmp: Path) -> None:
    (tmp / "file").write_text("keep")
    refused(leastcontrol(*REPRODUCE, "--epochs", "1", "--out", str(tmp / "file")), "is a file")
    assert (tmp / "file").read_text() == "keep"
    refused(leastcontrol("eval", "--checkpoint", str(tmp / "none.ckpt"), "--json-out", str(tmp)), "is a directory")
    refused(leastcontrol("meta", "--task", "sinusoid", "--meta-steps", "1", "--json-out", str(tmp)), "is a directory")
    refused(leastcontrol("bench", "--rows", "ff-bp", "--batches", "1", "--json-out", str(tmp)), "is a directory")


# --- 6. runs that go badly wrong say so -------------------------------------------------------
@case("loss-grows-by-orders-of-magnitude", 6)
def _(tmp: Path) -> None:
    result = leastcontrol("train", "--model", "ff", "--method", "bp", "--lr", "100", "--limit-train", "640",
                          "--limit-test", "32", "--epochs", "2", "--hidden", "16", "--quiet",
                          "--json-out", str(tmp / "run.json"))
    ok(result)
    assert "learning rate is likely too large (--lr" in result.err, result.err[-800:]
    assert any("--lr" in w for w in json.loads((tmp / "run.json").read_text())["warnings"])


@case("no-batch-settles", 6)
def _(tmp: Path) -> None:
    # A tolerance no float32 solve reaches in 20 steps (tol = 0 would be a fixed budget, which need not settle).
    result = leastcontrol("train", *TINY, "--set", "method.solver.tol=1e-30", "--set", "method.solver.max_steps=20",
                          "--json-out", str(tmp / "run.json"))
    ok(result)
    assert "no sample of epoch 1 settled" in result.err, result.err[-800:]
    assert any("max_steps" in w for w in json.loads((tmp / "run.json").read_text())["warnings"])


# --- 7. NaN and absurd values -----------------------------------------------------------------
@case("nan-setting", 7)
def _(tmp: Path) -> None:
    refused(leastcontrol("train", *TINY, "--set", "loop.grad_clip=nan"), "loop.grad_clip", "finite")
    refused(leastcontrol("train", *TINY, "--lr", "inf"), "loop.lr", "finite")


# --- 8. checkpoints that do not fit -------------------------------------------------------------
@case("eval-checkpoint-of-another-version", 8)
def _(tmp: Path) -> None:
    import torch
    ckpt = tmp / "old.ckpt"
    torch.save({"format": "leastcontrol-checkpoint-1", "config": {"model": {"name": "rnn"}}}, ckpt)
    refused(leastcontrol("eval", "--checkpoint", str(ckpt)), "another version", "epoch")
    ckpt.write_bytes(b"not a checkpoint")
    refused(leastcontrol("eval", "--checkpoint", str(ckpt)), "corrupt")


@case("eval-checkpoint-for-other-data", 8, fast=False)
def _(tmp: Path) -> None:
    ckpt = tmp / "run.ckpt"
    ok(leastcontrol("train", *TINY, "--checkpoint", str(ckpt)))
    mnist = Path(os.environ.get("LEASTCONTROL_DATA", SRC.parents[1] / "shared" / "data")) / "mnist"
    if not mnist.is_dir():
        raise Skip(f"no MNIST at {mnist}")
    refused(leastcontrol("eval", "--checkpoint", str(ckpt), "--dataset", "mnist", "--data-dir", str(mnist)),
            "--dataset digits")


# --- 9. the native build cache -------------------------------------------------------------------
@case("native-cache-not-writable", 9, fast=False)
def _(tmp: Path) -> None:
    (tmp / "file").write_text("")
    result = leastcontrol("train", *TINY, "--set", 'method.solver.backend=["native"]',
                          env={"XDG_CACHE_HOME": str(tmp / "file" / "cache")})
    ok(result)
    assert "XDG_CACHE_HOME" in result.err, result.err[-800:]


# --- 10. settings that do not apply are refused --------------------------------------------------
@case("setting-of-another-method", 10)
def _(tmp: Path) -> None:
    refused(leastcontrol("train", *TINY, "--method", "rbp", "--set", "method.alpha=1"), "setting of lcp-di")
    refused(leastcontrol("train", *TINY, "--set", "method.sigma=0.1"), "setting of lcp-lf")
    refused(leastcontrol("meta", "--task", "sinusoid", "--ways", "3"), "--ways", "omniglot")
    refused(leastcontrol("meta", "--task", "sinusoid", "--method", "imaml", "--beta", "0.5"), "--beta", "lcp")


@case("peer-rules-refuse-what-they-cannot-train", 10)
def _(tmp: Path) -> None:
    refused(leastcontrol("train", *TINY, "--method", "ep"), "needs an energy-based system", "--model hopfield")
    refused(leastcontrol("train", *TINY, "--method", "pc", "--model", "rnn"), "pc needs a layered system")
    refused(leastcontrol("train", *TINY, "--model", "hopfield", "--method", "ep", "--set", "method.beta=0"), "beta")


# --- 11. messages, and what a failed run leaves behind ---------------------------------------------
@case("config-file-not-utf8", 11)
def _(tmp: Path) -> None:
    config = tmp / "run.toml"
    config.write_bytes(b"\xff\xfe[model]\n")
    refused(leastcontrol("train", "--config", str(config)), str(config), "UTF-8")


@case("reproduce-corrupt-run-json", 11)
def _(tmp: Path) -> None:
    (tmp / "r").mkdir()
    (tmp / "r" / "ff-bp_seed0.json").write_text("{")
    refused(leastcontrol(*REPRODUCE, "--epochs", "1", "--out", str(tmp / "r")), "ff-bp_seed0.json", "not valid JSON")


@case("mistyped-data-dir-leaves-nothing", 11)
def _(tmp: Path) -> None:
    typo = tmp / "typo" / "mnist"
    refused(leastcontrol("train", *TINY, "--dataset", "mnist", "--data-dir", str(typo),
                         env={"LEASTCONTROL_OFFLINE": "1"}), "MNIST not found")
    assert not (tmp / "typo").exists(), "a folder was left behind"


@case("method-and-system-checked-before-the-data", 11)
def _(tmp: Path) -> None:
    missing = str(tmp / "no-data")
    refused(leastcontrol("train", *TINY, "--method", "bp", "--dataset", "mnist", "--data-dir", missing,
                         env={"LEASTCONTROL_OFFLINE": "1"}), "bp needs a feedforward")
    refused(leastcontrol("train", *TINY, "--model", "ff", "--set", 'method.solver.backend=["native"]',
                         "--dataset", "mnist", "--data-dir", missing, env={"LEASTCONTROL_OFFLINE": "1"}),
            "no native steps")


@case("quiet-keeps-a-line-per-epoch", 11)
def _(tmp: Path) -> None:
    result = leastcontrol("train", *TINY)
    ok(result)
    assert "epoch 1:" in result.out and "test accuracy" in result.out
    silent = leastcontrol("train", *TINY, "--set", "output.log=false")
    ok(silent)
    assert "epoch 1:" not in silent.out


@case("eval-quiet", 11, fast=False)
def _(tmp: Path) -> None:
    ckpt = tmp / "run.ckpt"
    ok(leastcontrol("train", *TINY, "--checkpoint", str(ckpt)))
    result = leastcontrol("eval", "--checkpoint", str(ckpt), "--quiet")
    ok(result)
    assert "evaluate" not in result.err and "test accuracy" in result.out


def run_case(name: str, tmp: Path) -> None:
    """Run one case in the scratch folder ``tmp`` (raises AssertionError or :class:`Skip`)."""
    CASES[name][2](tmp)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", help="case names (default: all)")
    parser.add_argument("--fast", action="store_true", help="only the cases CI runs")
    args = parser.parse_args(argv)
    unknown = [n for n in args.cases if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; cases: {', '.join(CASES)}")
    names = args.cases or [n for n, (_, fast, _) in CASES.items() if fast or not args.fast]
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for name in names:
        kind, _, _ = CASES[name]
        tmp = Path(tempfile.mkdtemp(prefix="leastcontrol-probe-"))
        start = time.perf_counter()
        try:
            run_case(name, tmp)
            verdict, note = "passed", ""
        except Skip as skip:
            verdict, note = "skipped", str(skip)
        except (AssertionError, subprocess.TimeoutExpired) as exc:
            verdict, note = "failed", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        counts[verdict] += 1
        print(f"{verdict:7s} {kind:2d} {name} ({time.perf_counter() - start:.1f}s){': ' + note if note else ''}",
              flush=True)
    print(f"{counts['passed']} passed, {counts['failed']} failed" +
          (f", {counts['skipped']} skipped" if counts["skipped"] else ""))
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
