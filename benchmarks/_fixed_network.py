"""Command-line set-up shared by the scripts that measure on the bench's starting network with fixed weights."""
from __future__ import annotations

import argparse

import torch

from leastcontrol import bench


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
