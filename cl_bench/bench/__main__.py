"""`python -m cl_bench.bench`: the speed and memory figures (cl_bench/bench/cli.py)."""

from .cli import main

main()
