"""How csrc/ is compiled: read by setup.py (`pip install -e .`) and by hsae_fast/backends/cpp.py (JIT).

-fopenmp: at::parallel_for is inlined from ATen's headers and runs in parallel only where the
including code is compiled with OpenMP (ATen/ParallelOpenMP.h tests _OPENMP); without the flag
every loop of this module runs on one thread. The module then needs libgomp.so.1, which resolves by
soname to the copy torch has already loaded, so the process keeps one OpenMP runtime and one pool.
No -march: the hot loops carry their own AVX-512 / AVX2 / baseline clones (GCC target_clones)
picked when the module loads, so one build runs on any x86-64 CPU.
-fno-math-errno: sqrt then compiles to the vector instruction (nothing here reads errno).
"""
SOURCES = ("hsae_cpu.cpp", "adamw_rows.cpp", "bindings.cpp")
CXX_FLAGS = ("-O3", "-fopenmp", "-fno-math-errno")
LINK_FLAGS = ("-fopenmp",)
