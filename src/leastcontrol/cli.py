"""Command line: ``leastcontrol train | config | eval | reproduce | bench | meta``.

``leastcontrol train`` with no arguments trains the recurrent equilibrium
network with LCP-DI on the bundled digits data (offline, about a minute).
Its flags are the everyday settings; every other one is a key of the config
tree (:mod:`leastcontrol.config`), set in a ``--config`` file or with
``--set section.key=value``; ``leastcontrol config`` prints the whole tree.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import List, Optional

from .data import DATASETS
from .errors import LeastControlError, ResultNotWrittenError
from .meta.learners import ACTIVATIONS
from .meta.problem import INNER_SOLVERS, STEP_RULES
from .config import _FLAT, parse_override
from .methods import METHODS
from .methods.lcp import CONTROLLED_RESIDUALS
from .presets import PRESETS
from .reproduce import benchmarks
from .systems import SYSTEMS


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _add_data_args(p: argparse.ArgumentParser, train: bool):
    # For train, unset flags stay absent so that a --config file can supply them.
    unset = {"default": argparse.SUPPRESS} if train else {"default": None}
    p.add_argument("--dataset", choices=DATASETS.names(), **unset,
                   help="digits (default for train): bundled 8x8 digits, offline; mnist: MNIST IDX files "
                        "(downloaded when missing); idx: any MNIST-format directory given by --data-dir; "
                        "cifar10: the python batches (downloaded when missing)")
    p.add_argument("--data-dir", **unset,
                   help="directory with the data files (default: $LEASTCONTROL_DATA, else the user cache)")
    p.add_argument("--limit-train", type=_positive_int, **unset, help="use the first N training samples")
    p.add_argument("--limit-test", type=_positive_int, **unset, help="use the first N test samples")


_SETTINGS_EPILOG = """\
every other setting is a key of the run's config tree, set in a --config file (TOML
sections [model] [method] [method.solver] [data] [loop] [output]) or with --set, e.g.
  --set method.alpha=1 --set method.k_i=10          controller gains (β = k_i/α + k_p)
  --set method.solver.tol=1e-4                      every solve's tolerance
  --set method.controlled.patience=300              the controlled phase's stall rule
  --set 'method.solver.backend=["native","compile"]'  how the steps run
  --set loop.grad_clip=5 --set loop.optimizer=sgd   the training loop
`leastcontrol config [flags]` prints every key with its value; docs/cli.md lists them."""

# Everyday flags of `train` and `config`: flag -> (path in the config tree, argparse settings).
_RUN_FLAGS = {
    "--model": ("model.name", dict(choices=SYSTEMS.names(),
                help="rnn: recurrent (default); ff: layered; conv-ff: layered conv net; deq: deep equilibrium model")),
    "--method": ("method.name", dict(choices=METHODS.names(), help="learning rule (default lcp-di)")),
    "--dataset": ("data.name", dict(choices=DATASETS.names(),
                  help="digits (default): bundled 8x8 digits, offline; mnist, idx (a directory of IDX files), cifar10")),
    "--data-dir": ("data.dir", dict(help="directory of the data files (default: $LEASTCONTROL_DATA, else the user cache)")),
    "--limit-train": ("data.limit_train", dict(type=_positive_int, help="use the first N training samples")),
    "--limit-test": ("data.limit_test", dict(type=_positive_int, help="use the first N test samples")),
    "--hidden": ("model.hidden", dict(type=_positive_int, help="hidden units, per layer for ff (256)")),
    "--epochs": ("loop.epochs", dict(type=_positive_int, help="training epochs (30; 8 on digits)")),
    "--batch-size": ("loop.batch_size", dict(type=_positive_int, help="(64)")),
    "--lr": ("loop.lr", dict(type=float, help="learning rate (1e-3)")),
    "--seed": ("loop.seed", dict(type=int, help="(0)")),
    "--device": ("loop.device", dict(choices=["cpu", "cuda", "auto"], help="where to train (cpu; auto: cuda if present)")),
    "--json-out": ("output.json_out", dict(help="write config, history and test accuracy to this JSON file")),
    "--checkpoint": ("output.checkpoint", dict(help="save the run here after every epoch")),
    "--resume": ("output.resume", dict(action="store_const", const=True, help="continue the run saved in --checkpoint")),
}
# Flags of earlier versions that are config keys now: the message names the key.
_MOVED = {f"--{key.replace('_', '-')}": path for key, path in _FLAT.items()
          if f"--{key.replace('_', '-')}" not in _RUN_FLAGS and key not in ("progress", "model", "method", "dataset")}
_MOVED.update({"--compile": "method.solver.backend", "--native": "method.solver.backend",
               "--warm-start-tol": "method.free.tol", "--ebd-optim": "method.controlled.name",
               "--ebd-lr": "method.controlled.lr", "--ebd-steps": "method.controlled.max_steps",
               "--no-compile": "method.solver.backend", "--no-native": "method.solver.backend"})


def _add_run_args(p: argparse.ArgumentParser) -> None:
    """The flags of a training run (``train`` and ``config``); unset ones stay absent, so a file supplies them."""
    p.add_argument("--config", help="TOML or JSON file of settings (see configs/); flags and --set override it")
    p.add_argument("--preset", choices=PRESETS.names(),
                   help="published (default): the published set-ups; fast: the settings that keep the update and "
                        "pay on the device in use (docs/performance.md), under the ones you set")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", dest="overrides",
                   help="any setting by its key, e.g. method.alpha=1 (repeatable; see below)")
    for flag, (path, settings) in _RUN_FLAGS.items():
        if "choices" not in settings and "action" not in settings:
            settings = {"metavar": path.rsplit(".", 1)[1].upper(), **settings}
        p.add_argument(flag, dest="path:" + path, **settings)
    p.add_argument("--quiet", action="store_const", const=True,
                   help="no progress bars (the line per epoch stays; --set output.log=false hides it too)")


def _run_tree(args) -> dict:
    """The run's config tree from ``--config``, the everyday flags and ``--set`` (in that order of precedence)."""
    from .train import resolve_tree
    from .config import read_file

    overrides = [(key[5:], value) for key, value in vars(args).items() if key.startswith("path:")]
    overrides += [parse_override(item) for item in (getattr(args, "overrides", None) or [])]
    if getattr(args, "quiet", False):
        overrides.append(("output.progress", False))
    if getattr(args, "preset", None):
        overrides.append(("preset", args.preset))
    values = read_file(args.config) if getattr(args, "config", None) else {}
    return resolve_tree(values, overrides, where=args.config if getattr(args, "config", None) else "command line")


def _refuse_moved_flags(parser: argparse.ArgumentParser, argv: List[str]) -> None:
    """A flag of an earlier version gets one line naming the config key it became."""
    for item in argv:
        flag = item.split("=", 1)[0]
        if flag in _MOVED:
            path = _MOVED[flag]
            hint = ("use --preset fast, or --set 'method.solver.backend=[\"native\", \"compile\"]'"
                    if path == "method.solver.backend" else f"use --set {path}=VALUE (or put it in a --config file)")
            parser.error(f"{flag} is now the config key {path}: {hint}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leastcontrol",
        description="Learn equilibrium systems with the least-control principle (Meulemans et al., NeurIPS 2022).")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train an equilibrium network", argument_default=argparse.SUPPRESS,
                       description="Train an equilibrium network; defaults are the published MNIST settings.",
                       epilog=_SETTINGS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_args(t)
    c = sub.add_parser("config", help="print a run's whole configuration (every key, with its value) as TOML",
                       argument_default=argparse.SUPPRESS, epilog=_SETTINGS_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Print the configuration `leastcontrol train` would run with the same flags: "
                                   "every key of every section, defaults filled in. Save it, edit it, pass it "
                                   "back with --config.")
    _add_run_args(c)

    r = sub.add_parser("reproduce", help="run the published table (each row's config, several seeds)")
    r.add_argument("benchmark", choices=benchmarks())
    r.add_argument("--out", default="runs/reproduce",
                   help="output folder (finished runs there with the same settings are reused)")
    r.add_argument("--rows", nargs="+", default=None, help="subset of rows, e.g. ff-bp rnn-lcp-di (default: all)")
    r.add_argument("--seeds", nargs="+", type=int, default=[0])
    r.add_argument("--epochs", type=_positive_int, default=None, help="override every row's epochs (30)")
    r.add_argument("--limit-train", type=_positive_int, default=None)
    r.add_argument("--limit-test", type=_positive_int, default=None)
    r.add_argument("--dataset", default=None, choices=DATASETS.names(), help="override the data set (mnist)")
    r.add_argument("--data-dir", default=None)
    r.add_argument("--skip-diverged", action="store_true", default=None,
                   help="a batch whose solve diverges makes no update (counted) instead of stopping the run")
    r.add_argument("--jobs", type=_positive_int, default=1,
                   help="runs trained at once, each in its own process with the machine's cores shared out (1)")
    r.add_argument("--quiet", action="store_true")

    b = sub.add_parser("bench", help="time and memory of every method, interleaved; ratios to the baselines")
    b.add_argument("--data-dir", default=None, help="MNIST directory (default: random inputs of MNIST shape)")
    b.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    b.add_argument("--batches", type=_positive_int, default=20, help="timed batches per row (20)")
    b.add_argument("--warmup", type=int, default=3, help="untimed batches per row first (3)")
    b.add_argument("--pretrain", type=int, default=156,
                   help="batches of bp (ff) / lcp-di (rnn) training before any row starts (156: one 10k epoch)")
    b.add_argument("--batch-size", type=_positive_int, default=64)
    b.add_argument("--hidden", type=_positive_int, default=256)
    b.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    b.add_argument("--json-out", default=None, help="write every figure and the ratios to this JSON file")
    b.add_argument("--rows", nargs="+", default=None, metavar="LABEL",
                   help="run only these rows (labels as in the table, e.g. rnn-rbp-compile rnn-lcp-di); "
                        "ratios whose rows did not run are left empty")
    b.add_argument("--quiet", action="store_true")

    m = sub.add_parser("meta", help="meta-learning: the inner problem as an equilibrium, LCP against iMAML")
    m.add_argument("--task", default="sinusoid", choices=["sinusoid", "omniglot"])
    m.add_argument("--method", default="lcp", choices=["lcp", "imaml", "fomaml", "contrastive"])
    m.add_argument("--ways", type=_positive_int, default=None, help="omniglot: classes per episode (5)")
    m.add_argument("--shots", type=_positive_int, default=None,
                   help="support examples per class (omniglot, 1) or per task (sinusoid, 10)")
    m.add_argument("--queries", type=_positive_int, default=None,
                   help="query examples per class / task while meta-training (omniglot 15, sinusoid 10)")
    m.add_argument("--learner", default=None, choices=["conv", "mlp"],
                   help="omniglot learner: a faster MLP (default) or the 4-block conv net, 64 channels (conv)")
    m.add_argument("--activation", default=None, choices=sorted(ACTIVATIONS),
                   help="the learner's rate function: relu (published; sinusoid default) or a smooth one "
                        "(softplus: omniglot default)")
    m.add_argument("--data-dir", default=None, help="omniglot: directory holding the zip archives")
    m.add_argument("--meta-batch", type=_positive_int, default=None, help="tasks per meta-step (sinusoid 25, omniglot 16)")
    m.add_argument("--meta-steps", type=_positive_int, default=None, help="(sinusoid 500, omniglot 150)")
    m.add_argument("--meta-lr", type=float, default=1e-3)
    m.add_argument("--inner-solver", default=None, choices=INNER_SOLVERS,
                   help="gradient steps (gd), Anderson-accelerated gradient steps (default), or Adam")
    m.add_argument("--inner-lr", type=float, default=None, help="inner step size (0.1)")
    m.add_argument("--inner-steps", type=_positive_int, default=300, help="inner solver steps (300)")
    m.add_argument("--inner-tol", type=float, default=1e-5, help="relative-residual tolerance of the inner solves")
    m.add_argument("--inner-step-rule", choices=STEP_RULES, default=None,
                   help="fixed: every task steps with --inner-lr; curvature (default): each task's step is capped at "
                        "1/λ_max of its inner Hessian (estimated by power iteration), so the gradient "
                        "dynamics stay stable as meta-training sharpens the inner loss")
    m.add_argument("--lam", type=float, default=None, help="pull λ of the adapted weights towards ω (sinusoid 2, omniglot 1)")
    m.add_argument("--learn-lam", action="store_true", help="also meta-learn one λ per weight (not fomaml)")
    m.add_argument("--beta", type=float, default=None, help="control strength (lcp) / nudging (contrastive)")
    m.add_argument("--route", default=None, choices=["di", "energy"], help="lcp: dynamic inversion or energy")
    m.add_argument("--controlled-steps", type=_positive_int, default=None,
                   help="lcp: max steps of the controlled dynamics (default: --inner-steps)")
    m.add_argument("--controlled-residual", default=None, choices=CONTROLLED_RESIDUALS,
                   help="lcp (di): φ and ψ each settle to --inner-tol (per-population, default) "
                        "or one residual over [φ | ψ] (joint)")
    m.add_argument("--cg-steps", type=_positive_int, default=None, help="imaml conjugate-gradient steps (10)")
    m.add_argument("--eval-tasks", type=_positive_int, default=1000, help="held-out tasks (1000; ≥ 600 for omniglot)")
    m.add_argument("--checkpoint", default=None,
                   help="save the run here every --checkpoint-every meta-steps (atomic writes)")
    m.add_argument("--checkpoint-every", type=_positive_int, default=10, help="meta-steps between checkpoints (10)")
    m.add_argument("--resume", action="store_true", help="continue the run saved in --checkpoint")
    m.add_argument("--eval-queries", type=_positive_int, default=None,
                   help="query points per held-out task (sinusoid 100) or per class (omniglot: --queries)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--json-out", default=None)
    m.add_argument("--quiet", action="store_true")

    e = sub.add_parser("eval", help="test accuracy of a saved checkpoint")
    e.add_argument("--checkpoint", required=True)
    _add_data_args(e, train=False)
    e.add_argument("--json-out", default=None)
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _train(args) -> int:
    from .atomic import check_inputs_kept
    from .train import TrainConfig, train

    config = TrainConfig.from_tree(_run_tree(args), where=getattr(args, "config", None) or "command line")
    # The run checks its outputs before the data loads (Run); only the config file is the command line's.
    check_inputs_kept({"--checkpoint": config.output.checkpoint, "--json-out": config.output.json_out},
                      {"--config": getattr(args, "config", None)})
    print(f"leastcontrol train: model={config.model.name} method={config.method.name} dataset={config.data.name} "
          f"epochs={config.loop.epochs} ({config.method!r})", flush=True)
    _reported(train, config, _train_summary)
    if config.output.json_out:
        print(f"results written to {config.output.json_out}")
    return 0


def _reported(run, config, summary):
    """``run(config)``, then ``summary(result)`` printed; also when only the writing of the result failed
    (the error, which names the path, follows the result it could not write)."""
    try:
        result = run(config)
    except ResultNotWrittenError as err:   # the result is all the user has of the run: shown whole
        print(summary(err.result))
        print(json.dumps({k: v for k, v in err.result.items() if k != "system"}, indent=1, default=str))
        raise
    print(summary(result))
    return result


def _train_summary(result) -> str:
    last = result["history"][-1] if result["history"] else {}
    accuracy = "-" if result["test_accuracy"] is None else f"{result['test_accuracy']:.4f}"
    return (f"test accuracy {accuracy}  train time {result['train_seconds']:.1f}s  "
            f"mean iterations {last.get('mean_iterations', 0):.1f}  converged batches {result['converged_fraction']:.2f}")


def _config(args) -> int:
    from .config import to_toml
    from .train import TrainConfig

    config = TrainConfig.from_tree(_run_tree(args), where=getattr(args, "config", None) or "command line")
    print(to_toml(config.to_dict()), end="")
    return 0


def _reproduce(args) -> int:
    from .reproduce import reproduce

    paths = {"epochs": "loop.epochs", "limit_train": "data.limit_train", "limit_test": "data.limit_test",
             "dataset": "data.name", "data_dir": "data.dir", "skip_diverged": "loop.skip_diverged"}
    overrides = {path: getattr(args, k) for k, path in paths.items() if getattr(args, k) is not None}
    table = reproduce(args.benchmark, args.out, rows=args.rows, seeds=args.seeds, overrides=overrides,
                      progress=not args.quiet, jobs=args.jobs)
    print((Path(args.out) / "results.md").read_text())
    print(f"written: {args.out}/results.md, results.csv, accuracy.png and one JSON per run ({len(table)} rows)")
    return 0


def _bench(args) -> int:
    from .bench import BenchConfig, main_bench

    config = BenchConfig(batch_size=args.batch_size, hidden=args.hidden, batches=args.batches, warmup=args.warmup,
                         pretrain=args.pretrain, data_dir=args.data_dir, device=args.device,
                         memory=not args.no_memory, json_out=args.json_out, progress=not args.quiet,
                         rows=args.rows)
    main_bench(config)
    return 0


def _meta(args) -> int:
    from .meta.train import MetaConfig, meta_train

    config = MetaConfig(task=args.task, method=args.method, ways=args.ways, shots=args.shots, queries=args.queries,
                        learner=args.learner, activation=args.activation, data_dir=args.data_dir,
                        meta_batch=args.meta_batch, meta_steps=args.meta_steps, meta_lr=args.meta_lr,
                        inner_solver=args.inner_solver, inner_lr=args.inner_lr, inner_steps=args.inner_steps,
                        inner_tol=args.inner_tol, inner_step_rule=args.inner_step_rule, lam=args.lam, learn_lam=args.learn_lam, beta=args.beta, route=args.route,
                        controlled_steps=args.controlled_steps, controlled_residual=args.controlled_residual,
                        cg_steps=args.cg_steps, eval_tasks=args.eval_tasks, eval_queries=args.eval_queries,
                        seed=args.seed, json_out=args.json_out, checkpoint=args.checkpoint,
                        checkpoint_every=args.checkpoint_every, resume=args.resume, progress=not args.quiet)
    _reported(meta_train, config, _meta_summary)
    return 0


def _meta_summary(result) -> str:
    config, test, before = result["config"], result["test"], result["test_untrained"]
    return (f"{config['task']} {config['method']}: held-out {test['metric']} {test['mean']:.4f} ± {test['ci95']:.4f} "
            f"over {test['tasks']} tasks (untrained: {before['mean']:.4f}); meta-training {result['train_seconds']:.1f}s; "
            f"inner solve settled on {100 * result['inner_converged_fraction']['train']:.0f}% of training tasks")


def _eval(args) -> int:
    from .atomic import check_outputs, write_json
    from .data import DataConfig
    from .train import config_from_checkpoint, evaluate, load_checkpoint, restore_system

    check_outputs({"--json-out": args.json_out}, inputs={"--checkpoint": args.checkpoint})
    state = load_checkpoint(args.checkpoint, require=("epoch", "system"))
    config = config_from_checkpoint(state, args.checkpoint)
    data_config = DataConfig(name=args.dataset or config.data.name, dir=args.data_dir or config.data.dir,
                             limit_test=args.limit_test)
    data = data_config.load(limit_train=args.limit_train or 1)
    system, method = restore_system(state, config, data, args.checkpoint)
    accuracy = evaluate(method, system, data_config.preprocess(data.test_x, train=False), data.test_y,
                        config.loop.eval_batch_size, config.loop.amp, progress=not args.quiet)
    print(f"{args.checkpoint}: test accuracy {accuracy:.4f} on {len(data.test_y)} {data_config.name} samples "
          f"(epoch {state['epoch']})")
    if args.json_out:
        write_json(args.json_out, {"checkpoint": str(args.checkpoint), "dataset": data_config.name,
                                   "test_accuracy": accuracy, "test_samples": len(data.test_y),
                                   "epoch": state["epoch"]})
    return 0


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings as one line each, like the errors (the library's own warnings name their fix)."""
    return f"leastcontrol: warning: {message}\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("train", "config"):
        _refuse_moved_flags(parser, argv[1:])
    args = parser.parse_args(argv)
    shown, warnings.formatwarning = warnings.formatwarning, _format_warning
    try:
        return {"train": _train, "config": _config, "eval": _eval, "reproduce": _reproduce, "bench": _bench,
                "meta": _meta}[args.command](args)
    except LeastControlError as exc:
        print(f"leastcontrol: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # invalid inputs found by the library carry a readable message
        print(f"leastcontrol: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the environment: a file or folder that cannot be read or written, a full disk
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"leastcontrol: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("leastcontrol: interrupted (completed epochs are in --checkpoint, if given)", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = shown


if __name__ == "__main__":
    sys.exit(main())
