"""`pytest bench/`: the benchmark harness (see bench/README.md); `python -m bench.report` renders its results."""
