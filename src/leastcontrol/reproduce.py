"""Reproduce the published MNIST table: every row's published settings, several seeds, one report.

Rows are the files ``configs/mnist-<model>-<method>.toml`` shipped with the package. For each row
and seed the run's JSON (as ``train --json-out``) is written to the output folder; a run whose
JSON exists is reused if it was made with the settings this call gives the run (all but ``output``
and ``data.dir``), and refused otherwise, before any training starts. A run that was interrupted
continues from the checkpoint it saves after every epoch (``<row>_seed<k>.ckpt``, removed once the
JSON is written), so an interrupted reproduction resumes where it stopped, to the result it would
have had uninterrupted. Then
``results.csv``, ``results.md`` (mean ± std test accuracy, wall time per epoch, mean solver
iterations, feedback alignment) and ``accuracy.png`` (test accuracy per epoch) are written.
"""
from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
import statistics
import traceback
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from tqdm.auto import tqdm

from .atomic import check_output, write_bytes, write_text
from .errors import CheckpointError, ConfigError, LeastControlError, OutputError
from .config import ABSENT, as_tree, diff_trees, set_path
from .train import TrainConfig, check_resumable, load_config_file, train

# A table's rows go by system, then by rule: the baselines, then LCP's family, then its peers.
SYSTEM_ORDER = ["ff", "conv-ff", "hopfield", "rnn", "deq"]
METHOD_ORDER = ["bp", "rbp", "bptt", "lcp-di", "lcp-kp", "lcp-lf", "lcp-ebd", "ep", "ep-centered", "pc", "ipc"]


def _configs():
    folder = resources.files("leastcontrol") / "configs"
    return [f for f in folder.iterdir() if f.name.endswith(".toml") and "-" in f.name]


def benchmarks() -> List[str]:
    """The tables shipped as config files ``configs/<benchmark>-<row>.toml`` (``mnist``, ``cifar10``, ...)."""
    return sorted({f.name.split("-", 1)[0] for f in _configs()})


def _row_order(row: str) -> tuple:
    system = max((s for s in SYSTEM_ORDER if row.startswith(s + "-")), key=len, default="")
    method = row[len(system) + 1:] if system else row

    def rank(items, name):
        return items.index(name) if name in items else len(items)

    return rank(SYSTEM_ORDER, system), rank(METHOD_ORDER, method), row


def available_rows(benchmark: str = "mnist") -> Dict[str, Path]:
    """Row name (``ff-bp``, ``rnn-lcp-di``, ...) -> its shipped config file, by system and then rule."""
    prefix = f"{benchmark}-"
    rows = {Path(f.name).stem[len(prefix):]: Path(str(f)) for f in _configs() if f.name.startswith(prefix)}
    return dict(sorted(rows.items(), key=lambda kv: _row_order(kv[0])))


# Settings that do not change a run's result: where it writes (and whether it shows progress) and
# where its data lives. Every other key of the config tree must match for a finished run to be reused.
NOT_RESULT_SETTINGS = ("output", "data.dir")


def _comparable(tree: Dict[str, Any], where: str) -> Dict[str, Any]:
    """A run's settings (its JSON's ``config``, or ``TrainConfig.to_dict()``) as this version resolves
    them: a flat table of an earlier version migrated, unset keys filled with today's defaults.

    Raises:
        ConfigError, ValueError: settings this version cannot read (an unknown key, value or name).
    """
    tree = as_tree(tree, where)
    preset = tree.pop("preset", "published")   # its settings are in the tree already
    tree.pop("output", None)                   # paths and progress; also not compared
    settings = TrainConfig.from_tree(tree, where=where).to_dict()
    settings["preset"] = preset
    return settings


def _show(value: Any) -> str:
    """A setting's value as ``--set`` would write it."""
    return repr(value) if value is ABSENT else json.dumps(value, default=repr)


def _epoch_problem(i: int, h: Any) -> Optional[str]:
    if not isinstance(h, dict):
        return f"has history[{i}] that is not a table of the epoch's figures"
    for key, none_ok in (("epoch", False), ("seconds", False), ("mean_iterations", False), ("test_accuracy", True)):
        if key not in h:
            return f"has no '{key}' in history[{i}] (epoch {h.get('epoch', i + 1)})"
        value = h[key]
        if not ((value is None and none_ok) or (isinstance(value, (int, float)) and not isinstance(value, bool))):
            return f"has history[{i}].{key} = {_show(value)}, not a number"
    return None


def read_run(path: str | Path) -> Dict[str, Any]:
    """A finished run's JSON (``train --json-out``), checked for every field the report reads:
    ``config`` (a table), ``test_accuracy`` (a number), ``history`` (one table per epoch, each with
    ``epoch``, ``seconds``, ``mean_iterations`` and ``test_accuracy``, a number or null).

    Raises:
        ConfigError: the file cannot be read, is not valid JSON or lacks a field; the message names
            the file and the problem, and says that removing the file reruns that run.
    """
    path = Path(path)
    fix = "remove it to rerun that run"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON (line {exc.lineno} column {exc.colno}): {fix}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} cannot be read ({exc}): {fix}") from None
    if not isinstance(record, dict):
        raise ConfigError(f"{path} is not a run's result (a JSON object with config, history and test_accuracy): {fix}")
    problem = None
    for key in ("config", "history", "test_accuracy"):
        if key not in record:
            problem = f"has no '{key}'"
            break
    else:
        history, accuracy = record["history"], record["test_accuracy"]
        if not isinstance(record["config"], dict):
            problem = "has a 'config' that is not a table of settings"
        elif not isinstance(accuracy, (int, float)) or isinstance(accuracy, bool):
            problem = f"has test_accuracy = {_show(accuracy)}, not a number"
        elif not isinstance(history, list) or not history:
            problem = "has no epochs in its 'history'"
        else:
            problem = next((p for p in (_epoch_problem(i, h) for i, h in enumerate(history)) if p), None)
    if problem:
        raise ConfigError(f"{path} {problem}: {fix}")
    return record


def check_finished_run(path: str | Path, config: TrainConfig) -> Dict[str, Any]:
    """The finished run at ``path`` (:func:`read_run`), if it was made with ``config``'s settings on
    every key that changes the result (all but :data:`NOT_RESULT_SETTINGS`); its own settings are
    read as this version reads them (:func:`_comparable`).

    Raises:
        ConfigError: the file is unreadable or lacks a field (:func:`read_run`), holds settings this
            version cannot read, or was made with other settings, naming each differing key with its
            value there and in ``config``.
    """
    path = Path(path)
    record = read_run(path)
    try:
        made = _comparable(record["config"], str(path))
    except (ValueError, TypeError) as exc:   # ConfigError, or an unknown name from a registry
        raise ConfigError(f"{path} holds settings this version cannot read ({exc}): remove it to rerun "
                          "that run") from None
    diffs = diff_trees(made, _comparable(config.to_dict(), "this call"), ignore=NOT_RESULT_SETTINGS)
    if diffs:
        shown = ", ".join(f"{key} = {_show(a)} (this call: {_show(b)})" for key, a, b in diffs)
        raise ConfigError(f"{path} was made with {shown}; use another --out, or remove that file to rerun it")
    return record


def _refuse_duplicates(what: str, items: Sequence[Any]) -> None:
    twice = sorted({str(x) for x in items if list(items).count(x) > 1})
    if twice:
        raise ConfigError(f"--{what}s names {', '.join(twice)} more than once: each {what} counts once in the "
                          f"table; give each {what} once")


def _mean_of(history: List[Dict[str, Any]], key: str) -> Optional[float]:
    """The mean of a per-epoch figure, or ``None`` where a run (of an earlier version) lacks it."""
    values = [h.get(key) for h in history]
    return None if not values or any(v is None for v in values) else statistics.fmean(values)


def summarise(runs: Dict[str, List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """One summary per row: mean/std test accuracy over seeds (the last epoch's), the mean of each seed's best
    epoch, the validation accuracy (where the runs hold a validation set out), seconds per epoch, iterations."""
    table = []
    for row, results in runs.items():
        acc = [100 * r["test_accuracy"] for r in results]
        history = [h for r in results for h in r["history"]]
        # The best epoch's test accuracy of each seed (the statistic pcx reports), where epochs were evaluated.
        best = [100 * max(h["test_accuracy"] for h in r["history"] if h["test_accuracy"] is not None) for r in results]
        held = [r["history"][-1].get("validation_accuracy") for r in results]
        entry = {
            "row": row, "seeds": len(results),
            "test_accuracy_mean": statistics.fmean(acc),
            "test_accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "best_test_accuracy_mean": statistics.fmean(best),
            "validation_accuracy_mean": (None if any(v is None for v in held)
                                         else 100 * statistics.fmean(held)),
            "seconds_per_epoch": statistics.fmean(h["seconds"] for h in history),
            "mean_iterations": statistics.fmean(h["mean_iterations"] for h in history),
            "converged_fraction": statistics.fmean(h.get("converged_fraction", 1.0) for h in history),
            "steps_per_sample": _mean_of(history, "mean_sample_iterations"),
            "settled_samples": _mean_of(history, "settled_sample_fraction"),
        }
        alignments = [r["feedback_alignment"] for r in results if r.get("feedback_alignment")]
        if alignments:
            entry["feedback_alignment"] = {k: statistics.fmean(a[k] for a in alignments) for k in alignments[0]}
        table.append(entry)
    return table


def _markdown(table: List[Dict[str, Any]], header: str) -> str:
    lines = [header, "",
             "| row | test accuracy (%) | best epoch's (%) | validation (%) | seeds | s / epoch | mean iterations "
             "| steps / sample | settled samples | converged batches | feedback alignment (cos with the forward transpose) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def shown(value, form):
        return "–" if value is None else format(value, form)

    for e in table:
        align = ", ".join(f"{k} {v:.3f}" for k, v in e.get("feedback_alignment", {}).items()) or "–"
        # One run has no spread to show.
        spread = f" ± {e['test_accuracy_std']:.2f}" if e["seeds"] > 1 else ""
        lines.append(f"| {e['row']} | {e['test_accuracy_mean']:.2f}{spread} | {e['best_test_accuracy_mean']:.2f} | "
                     f"{shown(e.get('validation_accuracy_mean'), '.2f')} | {e['seeds']} | "
                     f"{e['seconds_per_epoch']:.1f} | {e['mean_iterations']:.1f} | "
                     f"{shown(e.get('steps_per_sample'), '.1f')} | {shown(e.get('settled_samples'), '.3f')} | "
                     f"{e['converged_fraction']:.2f} | {align} |")
    return "\n".join(lines) + "\n"


def _csv(table: List[Dict[str, Any]]) -> str:
    buf = io.StringIO()
    fields = ["row", "seeds", "test_accuracy_mean", "test_accuracy_std", "best_test_accuracy_mean",
              "validation_accuracy_mean", "seconds_per_epoch",
              "mean_iterations", "steps_per_sample", "settled_samples", "converged_fraction", "feedback_alignment"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for e in table:
        writer.writerow({**e, "feedback_alignment": json.dumps(e.get("feedback_alignment", {}))})
    return buf.getvalue()


def _plot(runs: Dict[str, List[Dict[str, Any]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row, results in runs.items():
        epochs = sorted({h["epoch"] for r in results for h in r["history"] if h["test_accuracy"] is not None})
        means = [100 * statistics.fmean(h["test_accuracy"] for r in results for h in r["history"]
                                        if h["epoch"] == ep and h["test_accuracy"] is not None) for ep in epochs]
        ax.plot(epochs, means, marker="o", label=row, linestyle="--" if row.startswith("ff") else "-")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    write_bytes(path, buffer.getvalue(), "--out")


class RunFailedError(LeastControlError):
    """A run of a parallel reproduction failed; the message names its row and seed and what went wrong."""


def cores() -> int:
    """The CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not on Linux
        return os.cpu_count() or 1


def job_threads(jobs: int) -> int:
    """The threads each of ``jobs`` parallel runs gets: the cores shared out, at least one."""
    return max(1, cores() // jobs)


def _start_job(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)


def _run_job(job) -> tuple:
    """Train one run of a parallel reproduction (in a worker process): ``(row, seed, None)`` when it
    finished, else ``(row, seed, message)``, the message of a library error or the traceback of any other."""
    row, tree = job
    seed = tree["loop"]["seed"]
    try:
        train(TrainConfig.from_tree(tree, where=f"row {row}"))
        return row, seed, None
    except (LeastControlError, ValueError, OSError) as exc:
        return row, seed, f"{type(exc).__name__}: {exc}"
    except Exception:   # a bug: the whole traceback, for the report
        return row, seed, traceback.format_exc()


def run_parallel(pending: Sequence[tuple], jobs: int, progress: bool = True) -> None:
    """Train ``pending`` runs (``(row, TrainConfig)``) in ``jobs`` worker processes, each with
    :func:`job_threads` threads, so that the machine's cores are shared out, not oversubscribed. Each run
    writes its JSON and checkpoints as it would alone (and gives the same result as alone with that many
    threads); a line per finished run tells its row, seed and test accuracy.

    Raises:
        RunFailedError: a run failed; the runs still going are stopped (their checkpoints stay, so the
            next call resumes them), naming the row, the seed and the error.
    """
    threads = job_threads(jobs)
    items = []
    for row, config in pending:
        tree = config.to_dict()
        tree["output"] = {**tree["output"], "progress": False, "log": False}
        items.append((row, tree))
    context = multiprocessing.get_context("spawn")   # no forked copy of the parent's threads and state
    bar = tqdm(total=len(items), desc=f"runs ({jobs} at once, {threads} thread{'s' if threads > 1 else ''} each)",
               disable=not progress, dynamic_ncols=True)
    with context.Pool(jobs, initializer=_start_job, initargs=(threads,)) as pool:
        for row, seed, problem in pool.imap_unordered(_run_job, items):
            if problem is not None:
                pool.terminate()
                raise RunFailedError(f"row {row}, seed {seed} failed (the other runs were stopped; their "
                                     f"checkpoints let the next call resume them): {problem}")
            bar.update(1)
            if progress:
                path = next(Path(c.output.json_out) for r, c in pending if r == row and c.loop.seed == seed)
                accuracy = read_run(path)["test_accuracy"]
                tqdm.write(f"{row} seed {seed}: test accuracy {100 * accuracy:.2f} %")
    bar.close()


def reproduce(benchmark: str = "mnist", out: str | Path = "runs/reproduce", *, rows: Optional[Sequence[str]] = None,
              seeds: Sequence[int] = (0,), overrides: Optional[Dict[str, Any]] = None,
              progress: bool = True, jobs: int = 1) -> List[Dict[str, Any]]:
    """Run (or resume) the table and write its four artefacts into ``out``.

    Args:
        benchmark: prefix of the shipped config files (``mnist``).
        out: output folder.
        rows: subset of row names (default: every shipped row).
        seeds: seeds to run per row.
        overrides: settings applied on top of every row's file, by their dotted keys (e.g.
            ``loop.epochs``, ``data.limit_train``, ``data.dir``).
        jobs: runs trained at once, each in its own process with the cores shared out
            (:func:`run_parallel`); 1 trains them one after the other in this process.
    Returns:
        The per-row summaries written to ``results.csv``.
    Raises:
        ConfigError: unknown or repeated row names, repeated seeds or invalid overrides; or a
            finished run's JSON in ``out`` that is unreadable, lacks a field, or was made with
            other settings than this call gives the run (:func:`check_finished_run`). All of these
            are found before any run starts; the message names every such file.
        CheckpointError: an interrupted run's checkpoint in ``out`` has other settings than
            this call gives the run (e.g. another ``--epochs``).
        RunFailedError: with ``jobs`` > 1, a run failed (naming its row, seed and error).
    """
    if not (isinstance(jobs, int) and not isinstance(jobs, bool) and jobs >= 1):
        raise ConfigError(f"--jobs must be a whole number of runs at once, at least 1, got {jobs!r}")
    available = available_rows(benchmark)
    chosen = list(rows) if rows else list(available)
    unknown = [r for r in chosen if r not in available]
    if unknown:
        raise ConfigError(f"unknown row(s) {', '.join(unknown)}; valid rows: {', '.join(available)}")
    _refuse_duplicates("row", chosen)
    _refuse_duplicates("seed", list(seeds))
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; give a folder for the reproduction's files")
    check_output(out / "results.md", "--out")
    jobs_list = []
    for row in chosen:
        values = load_config_file(available[row])
        for key, value in (overrides or {}).items():
            values = set_path(values, key, value)
        for seed in seeds:
            stem = out / f"{row}_seed{seed}"
            run = set_path(values, "loop.seed", seed)
            # An interrupted run (its checkpoint is there) continues; any other starts afresh.
            resume = Path(f"{stem}.ckpt").exists()
            run["output"] = {"json_out": f"{stem}.json", "checkpoint": f"{stem}.ckpt", "resume": resume,
                             "progress": False, "log": progress}
            jobs_list.append((row, TrainConfig.from_tree(run, where=f"row {row}")))
    # Every finished run is checked before any run starts, so a refusal never comes after hours of training.
    finished, problems, interrupted = {}, [], []
    for _, config in jobs_list:
        path = Path(config.output.json_out)
        if path.exists():
            try:
                finished[path] = check_finished_run(path, config)
            except ConfigError as exc:
                problems.append(str(exc))
        elif config.output.resume:   # an interrupted run: its checkpoint must be of these settings too
            try:
                check_resumable(config)
            except CheckpointError as exc:
                interrupted.append(str(exc))
    if problems or interrupted:
        raise (ConfigError if problems else CheckpointError)("\n".join(problems + interrupted))
    out.mkdir(parents=True, exist_ok=True)
    pending = [(row, config) for row, config in jobs_list if Path(config.output.json_out) not in finished]
    if jobs > 1 and len(pending) > 1:
        run_parallel(pending, jobs, progress)
        for _, config in pending:
            finished[Path(config.output.json_out)] = read_run(config.output.json_out)
    runs: Dict[str, List[Dict[str, Any]]] = {row: [] for row in chosen}
    bar = tqdm(jobs_list, desc="runs", disable=not progress, dynamic_ncols=True)
    for row, config in bar:
        path = Path(config.output.json_out)
        if path not in finished:
            bar.set_postfix_str(f"{row} seed {config.loop.seed}")
            config.output.progress = progress
            train(config)
            finished[path] = read_run(path)
        # The JSON is the run's record; its per-epoch checkpoint is only there to resume it.
        Path(config.output.checkpoint).unlink(missing_ok=True)
        runs[row].append(finished[path])
    bar.close()
    # Every run here was made with the settings of this call (checked above, or made just now), so
    # no row's mean mixes budgets, and the header below, from this call's overrides, describes them all.
    table = summarise(runs)
    shown = {("dataset" if k == "data.name" else k.rsplit(".", 1)[1]): v for k, v in (overrides or {}).items()
             if k != "data.dir"}
    header = f"# {benchmark} reproduction ({', '.join(f'{k}={v}' for k, v in shown.items()) or 'published budget'})"
    write_text(out / "results.md", _markdown(table, header), "--out")
    write_text(out / "results.csv", _csv(table), "--out")
    _plot(runs, out / "accuracy.png", header.lstrip("# "))
    return table
