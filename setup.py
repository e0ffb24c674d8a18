"""Installs hsae_fast (and, where a compiler is present, its C++ CPU backend)."""
from setuptools import find_packages, setup

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
)
