"""Command line: ``leastcontrol train | eval | reproduce``.

``leastcontrol train`` with no arguments trains the recurrent equilibrium
network with LCP-DI on the bundled digits data (offline, about a minute).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from .data import DATASETS
from .errors import LeastControlError
from .meta.learners import ACTIVATIONS
from .meta.problem import INNER_SOLVERS, STEP_RULES
from .methods import METHODS
from .methods.base import IMPLS
from .solvers import CONTROLLED_RESIDUALS, SOLVERS
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leastcontrol",
        description="Learn equilibrium systems with the least-control principle (Meulemans et al., NeurIPS 2022).")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train an equilibrium network", argument_default=argparse.SUPPRESS,
                       description="Train an equilibrium network; defaults are the published MNIST settings. "
                                   "Flags override the values of --config.")
    t.add_argument("--config", help="TOML or JSON file of settings (see configs/); flags override it")
    t.add_argument("--model", choices=SYSTEMS.names(),
                   help="ff: layered network; rnn: recurrent (default); conv-ff: layered conv net; deq: deep "
                        "equilibrium model (conv systems are sized from the images)")
    t.add_argument("--method", choices=METHODS.names(), help="learning rule (default lcp-di)")
    _add_data_args(t, train=True)
    t.add_argument("--hidden", type=_positive_int, help="hidden units, per layer for ff (256)")
    t.add_argument("--recurrent-bias", action=argparse.BooleanOptionalAction,
                   help="rnn: give W φ(v) its own bias besides the input's, as the paper's research code does "
                        "(off; the published configs turn it on)")
    t.add_argument("--epochs", type=_positive_int,
                   help="training epochs (default 30; 8 on digits)")
    t.add_argument("--batch-size", type=_positive_int, help="(64)")
    t.add_argument("--lr", type=float, help="learning rate (1e-3)")
    t.add_argument("--optimizer", choices=["adam", "sgd"], help="(adam)")
    t.add_argument("--weight-decay", type=float, help="L2 weight decay of the optimizer (0)")
    t.add_argument("--schedule", choices=["cosine", "none"],
                   help="cosine (default): per-step decay to 0.1*lr over the run")
    t.add_argument("--grad-clip", type=float, help="max gradient norm (default: 10 for rnn, off for ff; 0 = off)")
    g = t.add_argument_group("dynamics and control (defaults: the method's published settings)")
    g.add_argument("--alpha", type=float, help="controller leak α (lcp-di: 0.1)")
    g.add_argument("--k-i", type=float, help="integral gain (lcp-di: 1)")
    g.add_argument("--k-p", type=float, help="proportional gain (lcp-di: 0)")
    g.add_argument("--kappa", type=float, help="lcp-kp: weight decay per step (1e-6)")
    g.add_argument("--dt", type=float, help="Euler step (1)")
    g.add_argument("--tol", type=float, help="relative-residual tolerance (lcp-di 1e-6, rbp 1e-4)")
    g.add_argument("--max-iter", type=_positive_int, help="max solver steps (lcp-di 800, rbp 200)")
    g.add_argument("--solver", choices=SOLVERS.names(), help="fixed-point solver (euler)")
    g.add_argument("--check-every", type=_positive_int, help="test convergence every k solver steps (10)")
    g.add_argument("--warm-start-tol", type=float,
                   help="tolerance of the free solve that starts the controlled dynamics (default: --tol)")
    g.add_argument("--controlled-residual", choices=CONTROLLED_RESIDUALS,
                   help="lcp-di/kp/lf: when the controlled dynamics count as settled: per-population (default: "
                        "state, hidden control and controller each to --tol) or joint (one residual over all)")
    g.add_argument("--patience", type=_positive_int,
                   help="stall rule (off): a sample whose residual has not fallen by 10%% in this many steps stops")
    g.add_argument("--stall-tol", type=float, help="stall rule: only below this residual (default: any)")
    g.add_argument("--impl", choices=IMPLS,
                   help="fast (default): closed-form VJPs, sample freezing; autograd: research-code reference path")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="run the Euler steps between convergence checks as one torch.compile graph (off; "
                        "compiles for seconds at the start, pays on small batches and long tails)")
    g.add_argument("--native", action=argparse.BooleanOptionalAction,
                   help="rnn on the cpu: run the last few active samples of every solve (free phase, rbp's adjoint, "
                        "lcp-di/kp's controlled phase) as one C loop, checks included (off; needs a C compiler, "
                        "builds once into the user cache)")
    g.add_argument("--anderson-memory", type=int,
                   help="euler: mix the last M runs of --check-every steps at each check (Anderson "
                        "acceleration of the k-step map; 0/off: plain Euler)")
    g.add_argument("--anderson-after", type=int, help="euler: first step of that mixing (50)")
    g.add_argument("--anderson-restarts", type=int,
                   help="euler: times a sample whose residual jumps past 10x its best goes back to its best point "
                        "and mixes again (no limit); after that it stops mixing (0: at the first jump)")
    g.add_argument("--check-stability", action=argparse.BooleanOptionalAction,
                   help="after every solve, estimate each sample's Euler-map spectral radius (30 Jacobian-vector "
                        "products) and warn when a solver (anderson, broyden) settled samples at fixed points the "
                        "plain dynamics leave; the epoch records carry unstable_fraction (off: costs several free solves)")
    g.add_argument("--ebd-optim", choices=["adam", "sgd"], help="lcp-ebd: optimiser on the state (adam)")
    g.add_argument("--ebd-lr", type=float, help="lcp-ebd: its learning rate (0.01)")
    g.add_argument("--ebd-steps", type=_positive_int, help="lcp-ebd: optimiser steps (800)")
    g.add_argument("--ff-init", action=argparse.BooleanOptionalAction,
                   help="lcp-ebd: start from the free equilibrium (off)")
    lf = t.add_argument_group("lcp-lf: learning the linear feedback Q in a noisy phase")
    lf.add_argument("--sigma", type=float, help="hidden noise std (0.01)")
    lf.add_argument("--tau-noise", type=float, help="noise correlation time in steps (20)")
    lf.add_argument("--noise-steps", type=int, help="length of the noisy phase (200; 0: Q fixed)")
    lf.add_argument("--tau-q", type=float, help="time constant of Q (1e5)")
    lf.add_argument("--wd-q", type=float, help="weight decay of Q (0.01)")
    lf.add_argument("--timescale", type=float, help="speed-up of the noisy phase, enters squared (5)")
    t.add_argument("--seed", type=int, help="(0)")
    t.add_argument("--eval-every", type=int, help="evaluate on the test set every N epochs (1; 0: only at the end)")
    t.add_argument("--json-out", help="write config, history and test accuracy to this JSON file")
    t.add_argument("--checkpoint", help="save model/optimizer state here after every epoch")
    t.add_argument("--resume", action="store_true", help="continue the run saved in --checkpoint")
    t.add_argument("--skip-diverged", action="store_true",
                   help="a batch whose solve diverges makes no update (counted in the history) instead of stopping")
    t.add_argument("--device", choices=["cpu", "cuda", "auto"], help="where to train (cpu; auto: cuda if present)")
    t.add_argument("--augment", action="store_true", help="cifar10: random crop (pad 4) and horizontal flip")
    t.add_argument("--amp", action="store_true",
                   help="bf16 autocast of convolutions and matrix products; state, control and updates stay fp32 "
                        "(residual floor ~1e-3: use a loose --tol or --patience)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(quiet=False)

    r = sub.add_parser("reproduce", help="run the published table (each row's config, several seeds)")
    r.add_argument("benchmark", choices=["mnist", "cifar10"])
    r.add_argument("--out", default="runs/reproduce", help="output folder (finished runs there are skipped)")
    r.add_argument("--rows", nargs="+", default=None, help="subset of rows, e.g. ff-bp rnn-lcp-di (default: all)")
    r.add_argument("--seeds", nargs="+", type=int, default=[0])
    r.add_argument("--epochs", type=_positive_int, default=None, help="override every row's epochs (30)")
    r.add_argument("--limit-train", type=_positive_int, default=None)
    r.add_argument("--limit-test", type=_positive_int, default=None)
    r.add_argument("--dataset", default=None, choices=DATASETS.names(), help="override the data set (mnist)")
    r.add_argument("--data-dir", default=None)
    r.add_argument("--skip-diverged", action="store_true", default=None,
                   help="a batch whose solve diverges makes no update (counted) instead of stopping the run")
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
    m.add_argument("--ways", type=_positive_int, default=5, help="omniglot: classes per episode (5)")
    m.add_argument("--shots", type=_positive_int, default=None,
                   help="support examples per class (omniglot, 1) or per task (sinusoid, 10)")
    m.add_argument("--queries", type=_positive_int, default=None,
                   help="query examples per class / task while meta-training (omniglot 15, sinusoid 10)")
    m.add_argument("--learner", default="conv", choices=["conv", "mlp"],
                   help="omniglot learner: 4-block conv net, 64 channels (conv) or a faster MLP")
    m.add_argument("--activation", default="relu", choices=sorted(ACTIVATIONS),
                   help="the learner's rate function (omniglot and sinusoid): relu (published) or a smooth one")
    m.add_argument("--data-dir", default=None, help="omniglot: directory holding the zip archives")
    m.add_argument("--meta-batch", type=_positive_int, default=25, help="tasks per meta-step (25)")
    m.add_argument("--meta-steps", type=_positive_int, default=1000)
    m.add_argument("--meta-lr", type=float, default=1e-3)
    m.add_argument("--inner-solver", default="gd", choices=INNER_SOLVERS,
                   help="gradient steps (gd), Anderson-accelerated gradient steps, or Adam")
    m.add_argument("--inner-lr", type=float, default=0.01, help="inner step size (0.01)")
    m.add_argument("--inner-steps", type=_positive_int, default=300, help="inner solver steps (300)")
    m.add_argument("--inner-tol", type=float, default=1e-5, help="relative-residual tolerance of the inner solves")
    m.add_argument("--inner-step-rule", choices=STEP_RULES, default="fixed",
                   help="fixed: every task steps with --inner-lr; curvature: each task's step is capped at "
                        "1/λ_max of its inner Hessian (estimated by power iteration), so the gradient "
                        "dynamics stay stable as meta-training sharpens the inner loss")
    m.add_argument("--lam", type=float, default=1.0, help="pull λ of the adapted weights towards ω (1.0)")
    m.add_argument("--learn-lam", action="store_true", help="also meta-learn one λ per weight (not fomaml)")
    m.add_argument("--beta", type=float, default=0.1, help="control strength (lcp) / nudging (contrastive)")
    m.add_argument("--route", default="di", choices=["di", "energy"], help="lcp: dynamic inversion or energy")
    m.add_argument("--controlled-steps", type=_positive_int, default=None,
                   help="lcp: max steps of the controlled dynamics (default: --inner-steps)")
    m.add_argument("--controlled-residual", default="per-population", choices=CONTROLLED_RESIDUALS,
                   help="lcp (di): φ and ψ each settle to --inner-tol (per-population, default) "
                        "or one residual over [φ | ψ] (joint)")
    m.add_argument("--cg-steps", type=_positive_int, default=10, help="imaml conjugate-gradient steps (10)")
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
    return parser


def _train(args) -> int:
    from .train import config_from_mapping, load_config_file, train

    given = {k: v for k, v in vars(args).items() if k not in ("command", "config", "quiet")}
    values = load_config_file(args.config) if getattr(args, "config", None) else {}
    values.update(given)
    if "epochs" not in values and values.get("dataset", "digits") == "digits":
        values["epochs"] = 8  # the embedded default job: about a minute on two cores
    values["progress"] = not args.quiet
    config = config_from_mapping(values, source="command line")
    print(f"leastcontrol train: model={config.model} method={config.method} dataset={config.dataset} "
          f"epochs={config.epochs} ({config.build_method()!r})", flush=True)
    result = train(config)
    last = result["history"][-1] if result["history"] else {}
    print(f"test accuracy {result['test_accuracy']:.4f}  train time {result['train_seconds']:.1f}s  "
          f"mean iterations {last.get('mean_iterations', 0):.1f}  "
          f"converged batches {result['converged_fraction']:.2f}")
    if config.json_out:
        print(f"results written to {config.json_out}")
    return 0


def _reproduce(args) -> int:
    from .reproduce import reproduce

    overrides = {k: getattr(args, k) for k in ("epochs", "limit_train", "limit_test", "dataset", "data_dir",
                                               "skip_diverged")
                 if getattr(args, k) is not None}
    table = reproduce(args.benchmark, args.out, rows=args.rows, seeds=args.seeds, overrides=overrides,
                      progress=not args.quiet)
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
    result = meta_train(config)
    test, before = result["test"], result["test_untrained"]
    print(f"{config.task} {config.method}: held-out {test['metric']} {test['mean']:.4f} ± {test['ci95']:.4f} "
          f"over {test['tasks']} tasks (untrained: {before['mean']:.4f}); meta-training {result['train_seconds']:.1f}s; "
          f"inner solve settled on {100 * result['inner_converged_fraction']['train']:.0f}% of training tasks")
    return 0


def _eval(args) -> int:
    from .data import load_dataset
    from .train import config_from_checkpoint, evaluate, load_checkpoint, preprocess, restore_system
    from .atomic import write_json

    state = load_checkpoint(args.checkpoint)
    config = config_from_checkpoint(state)
    dataset = args.dataset or config.dataset
    data_dir = args.data_dir or config.data_dir
    data = load_dataset(dataset, data_dir, args.limit_train or 1, args.limit_test)
    system, method = restore_system(state, config, data)
    accuracy = evaluate(method, system, preprocess(config, data.test_x, train=False), data.test_y,
                        config.eval_batch_size, config.amp, progress=True)
    print(f"{args.checkpoint}: test accuracy {accuracy:.4f} on {len(data.test_y)} {dataset} samples "
          f"(epoch {state['epoch']})")
    if args.json_out:
        write_json(args.json_out, {"checkpoint": str(args.checkpoint), "dataset": dataset,
                                   "test_accuracy": accuracy, "test_samples": len(data.test_y),
                                   "epoch": state["epoch"]})
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return {"train": _train, "eval": _eval, "reproduce": _reproduce, "bench": _bench, "meta": _meta}[args.command](args)
    except LeastControlError as exc:
        print(f"leastcontrol: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # invalid inputs found by the library carry a readable message
        print(f"leastcontrol: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("leastcontrol: interrupted (completed epochs are in --checkpoint, if given)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
