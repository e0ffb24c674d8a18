"""Installs hsae_fast (and, where a compiler is present, its C++ CPU backend)."""
import runpy
import sys
import sysconfig

from setuptools import find_packages, setup


def cpp_backend():
    """(ext_modules, cmdclass) for hsae_fast._hsae_cpu, the C++ CPU backend in csrc/ (sources and
    flags in csrc/build_config.py, shared with the JIT build). Built with torch's BuildExtension and
    ninja against the torch installed here; without torch at build time there is nothing to build
    against and the package installs without it (`backend="auto"` then falls back to `torch`)."""
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        # pip's build isolation hides the environment being installed into, but its torch is the
        # one to compile against (the ABI the module meets at run time): look for it there.
        sys.path.append(sysconfig.get_paths()["purelib"])
        try:
            from torch.utils.cpp_extension import BuildExtension, CppExtension
        except ImportError:
            print("hsae_fast: torch is not importable at build time; the C++ CPU backend is not built", file=sys.stderr)
            return [], {}

    class OptionalBuildExtension(BuildExtension):
        """A failed compile (no compiler, missing headers) warns and lets the install finish: the
        cpp backend then reports itself unavailable and says why in available_backends()."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any build failure must leave the install going
                print(f"hsae_fast: the C++ CPU backend was not built ({type(exc).__name__}: {exc}); "
                      "the torch backend will be used on CPU", file=sys.stderr)

    config = runpy.run_path("csrc/build_config.py")
    extension = CppExtension(
        "hsae_fast._hsae_cpu",
        [f"csrc/{name}" for name in config["SOURCES"]],
        extra_compile_args=list(config["CXX_FLAGS"]),
        extra_link_args=list(config["LINK_FLAGS"]),
    )
    return [extension], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = cpp_backend()

setup(
    name="hsae_fast",
    version="0.1.0",
    description="Hierarchical sparse autoencoders, fast: Triton and C++ kernels with a float64 reference",
    packages=find_packages(include=["hsae_fast", "hsae_fast.*", "kernels", "kernels.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "safetensors",
        "tqdm",
        "matplotlib",
        "pyyaml",
    ],
    extras_require={
        "triton": ["triton"],
        "test": ["pytest", "pytest-benchmark"],
    },
    entry_points={"console_scripts": ["hsae=hsae_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
