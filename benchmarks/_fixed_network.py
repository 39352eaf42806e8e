"""Command-line set-up shared by the scripts that measure on the bench's starting network with fixed weights."""
from __future__ import annotations

import argparse

import torch

from leastcontrol import bench
from leastcontrol.atomic import write_json
from leastcontrol.errors import ConfigError


def parse(description: str, argv=None, add_arguments=None):
    """Parse ``--data-dir --batches --threads --json-out`` (and what ``add_arguments(parser)`` adds),
    set the thread count, and return ``(args, BenchConfig)``."""
    p = argparse.ArgumentParser(description=description)
    if add_arguments is not None:
        add_arguments(p)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args, bench.BenchConfig(data_dir=args.data_dir, batches=args.batches, progress=False, memory=False)


def rows_and_network(labels, config: bench.BenchConfig, refuse=None, weights=None):
    """The bench rows named by ``labels``, the batches (``config.warmup`` untimed, then
    ``config.batches`` timed) and the bench's starting RNN (or, with ``weights``, the RNN with the
    state_dict saved in that file: a starting network pretrained elsewhere, on the same batches).

    Exits before the pretraining (minutes) on an unknown label, listing the valid ones, and when
    ``refuse(rows)`` returns a message: a script that cannot measure some rows says so at once.
    """
    try:
        rows = bench.rows_named(labels)
    except ConfigError as err:
        raise SystemExit(str(err)) from None
    message = refuse(rows) if refuse is not None else None
    if message:
        raise SystemExit(message)
    batches, pretraining = bench.split_batches(config, config.warmup + config.batches)
    if weights is None:
        return rows, batches, bench._pretrained("rnn", config, pretraining)
    net = bench._network("rnn", config)
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return rows, batches, net


def run_rows(description: str, profile, argv=None) -> None:
    """The command line of the scripts that profile bench rows: ``rows`` and the options of
    :func:`parse`; runs ``profile(labels, config)`` and writes its result to ``--json-out``."""
    args, config = parse(description, argv,
                         lambda p: p.add_argument("rows", nargs="+", help="bench row labels (see leastcontrol bench)"))
    out = profile(args.rows, config)
    if args.json_out:
        write_json(args.json_out, {"threads": args.threads, "batches": args.batches, "rows": out})
