"""`python -m cl_bench.bench`: the speed and memory figures (cl_bench/bench/phases.py)."""
from .phases import main

main()
