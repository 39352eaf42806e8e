"""Speed and memory of every method, interleaved, with the ratios of issue 4.

Same as ``leastcontrol bench``; e.g.

    python benchmarks/speed.py --data-dir ../shared/data/mnist --json-out docs/runs/bench.json
"""
import sys

from leastcontrol.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
