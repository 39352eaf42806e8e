"""Reproduce the published MNIST table: every row's published settings, several seeds, one report.

Rows are the files ``configs/mnist-<model>-<method>.toml`` shipped with the package. For each row
and seed the run's JSON (as ``train --json-out``) is written to the output folder; a run whose
JSON exists is skipped, and a run that was interrupted continues from the checkpoint it saves
after every epoch (``<row>_seed<k>.ckpt``, removed once the JSON is written), so an interrupted
reproduction resumes where it stopped, to the result it would have had uninterrupted. Then
``results.csv``, ``results.md`` (mean ± std test accuracy, wall time per epoch, mean solver
iterations, feedback alignment) and ``accuracy.png`` (test accuracy per epoch) are written.
"""
from __future__ import annotations

import csv
import io
import json
import statistics
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from tqdm.auto import tqdm

from .atomic import atomic_target
from .errors import ConfigError
from .config import set_path
from .train import TrainConfig, load_config_file, train

ROW_ORDER = ["ff-bp", "ff-lcp-di", "ff-lcp-kp", "ff-lcp-lf", "ff-lcp-ebd",
             "rnn-rbp", "rnn-lcp-di", "rnn-lcp-kp", "rnn-lcp-lf", "rnn-lcp-ebd"]


def available_rows(benchmark: str = "mnist") -> Dict[str, Path]:
    """Row name (``ff-bp``, ``rnn-lcp-di``, ...) -> its shipped config file."""
    folder = resources.files("leastcontrol") / "configs"
    prefix = f"{benchmark}-"
    rows = {Path(f.name).stem[len(prefix):]: Path(str(f)) for f in folder.iterdir()
            if f.name.startswith(prefix) and f.name.endswith(".toml")}
    order = {name: i for i, name in enumerate(ROW_ORDER)}
    return dict(sorted(rows.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))


def _write_text(path: Path, text: str) -> None:
    with atomic_target(path) as tmp:
        tmp.write_text(text)


def summarise(runs: Dict[str, List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """One summary per row: mean/std test accuracy over seeds, seconds per epoch, iterations."""
    table = []
    for row, results in runs.items():
        acc = [100 * r["test_accuracy"] for r in results]
        history = [h for r in results for h in r["history"]]
        entry = {
            "row": row, "seeds": len(results),
            "test_accuracy_mean": statistics.fmean(acc),
            "test_accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "seconds_per_epoch": statistics.fmean(h["seconds"] for h in history),
            "mean_iterations": statistics.fmean(h["mean_iterations"] for h in history),
            "converged_fraction": statistics.fmean(h.get("converged_fraction", 1.0) for h in history),
        }
        alignments = [r["feedback_alignment"] for r in results if r.get("feedback_alignment")]
        if alignments:
            entry["feedback_alignment"] = {k: statistics.fmean(a[k] for a in alignments) for k in alignments[0]}
        table.append(entry)
    return table


def _markdown(table: List[Dict[str, Any]], header: str) -> str:
    lines = [header, "",
             "| row | test accuracy (%) | seeds | s / epoch | mean iterations | converged batches "
             "| feedback alignment (cos with the forward transpose) |",
             "|---|---|---|---|---|---|---|"]
    for e in table:
        align = ", ".join(f"{k} {v:.3f}" for k, v in e.get("feedback_alignment", {}).items()) or "–"
        # One run has no spread to show.
        spread = f" ± {e['test_accuracy_std']:.2f}" if e["seeds"] > 1 else ""
        lines.append(f"| {e['row']} | {e['test_accuracy_mean']:.2f}{spread} | {e['seeds']} | "
                     f"{e['seconds_per_epoch']:.1f} | {e['mean_iterations']:.1f} | {e['converged_fraction']:.2f} | {align} |")
    return "\n".join(lines) + "\n"


def _csv(table: List[Dict[str, Any]]) -> str:
    buf = io.StringIO()
    fields = ["row", "seeds", "test_accuracy_mean", "test_accuracy_std", "seconds_per_epoch",
              "mean_iterations", "converged_fraction", "feedback_alignment"]
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
    with atomic_target(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def reproduce(benchmark: str = "mnist", out: str | Path = "runs/reproduce", *, rows: Optional[Sequence[str]] = None,
              seeds: Sequence[int] = (0,), overrides: Optional[Dict[str, Any]] = None,
              progress: bool = True) -> List[Dict[str, Any]]:
    """Run (or resume) the table and write its four artefacts into ``out``.

    Args:
        benchmark: prefix of the shipped config files (``mnist``).
        out: output folder.
        rows: subset of row names (default: every shipped row).
        seeds: seeds to run per row.
        overrides: settings applied on top of every row's file, by their dotted keys (e.g.
            ``loop.epochs``, ``data.limit_train``, ``data.dir``).
    Returns:
        The per-row summaries written to ``results.csv``.
    Raises:
        ConfigError: unknown row names or invalid overrides.
        CheckpointError: an interrupted run's checkpoint in ``out`` has other settings than
            this call gives the run (e.g. another ``--epochs``).
    """
    available = available_rows(benchmark)
    chosen = list(rows) if rows else list(available)
    unknown = [r for r in chosen if r not in available]
    if unknown:
        raise ConfigError(f"unknown row(s) {', '.join(unknown)}; valid rows: {', '.join(available)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for row in chosen:
        values = load_config_file(available[row])
        for key, value in (overrides or {}).items():
            values = set_path(values, key, value)
        for seed in seeds:
            stem = out / f"{row}_seed{seed}"
            run = set_path(values, "loop.seed", seed)
            run["output"] = {"json_out": f"{stem}.json", "checkpoint": f"{stem}.ckpt", "resume": True, "progress": False}
            jobs.append((row, TrainConfig.from_tree(run, where=f"row {row}")))
    runs: Dict[str, List[Dict[str, Any]]] = {row: [] for row in chosen}
    bar = tqdm(jobs, desc="runs", disable=not progress, dynamic_ncols=True)
    for row, config in bar:
        path = Path(config.output.json_out)
        if not path.exists():
            bar.set_postfix_str(f"{row} seed {config.loop.seed}")
            config.output.progress = progress
            train(config)
        # The JSON is the run's record; its per-epoch checkpoint is only there to resume it.
        Path(config.output.checkpoint).unlink(missing_ok=True)
        runs[row].append(json.loads(path.read_text()))
    bar.close()
    table = summarise(runs)
    shown = {k.rsplit(".", 1)[1]: v for k, v in (overrides or {}).items() if k != "data.dir"}
    header = f"# {benchmark} reproduction ({', '.join(f'{k}={v}' for k, v in shown.items()) or 'published budget'})"
    _write_text(out / "results.md", _markdown(table, header))
    _write_text(out / "results.csv", _csv(table))
    _plot(runs, out / "accuracy.png", header.lstrip("# "))
    return table
