"""How csrc/ is compiled: read by setup.py (`pip install -e .`) and by hsae_fast/backends/cpp.py (JIT).

No -march and no -fopenmp on purpose: the hot loops carry their own AVX-512 / AVX2 / baseline clones
(GCC target_clones) picked when the module loads, so one build runs on any x86-64 CPU; threads come
from ATen's pool (OpenMP inside torch), so the module never loads a second OpenMP runtime.
"""
SOURCES = ("hsae_cpu.cpp", "bindings.cpp")
CXX_FLAGS = ("-O3",)
