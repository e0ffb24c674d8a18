import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("TRITON_INTERPRET", "1")
# The cpp backend compiles csrc/ on first use (cached, rebuilt when a source changes), so the suite
# tests the sources as they are, with or without `pip install -e .` (see hsae_fast/backends/cpp.py).
os.environ.setdefault("HSAE_CPP_JIT", "1")
