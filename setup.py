"""moe_dist: mixture-of-experts training with expert parallelism, built to study expert specialisation."""

from setuptools import find_packages, setup

setup(
    name="moe_dist",
    version="0.1.0",
    description="Mixture-of-experts training with sharded experts, reproducing "
                "Krishnamurthy et al. (AISTATS 2023) and Chen et al. (NeurIPS 2022)",
    packages=find_packages(include=["moe_dist", "moe_dist.*"]),
    package_data={"moe_dist": ["configs/*.yaml", "models/csrc/*.cpp"]},
    python_requires=">=3.10",
    # torch is pinned to a range that admits the CPU build 2.13.0 installed first on our
    # machines; the range keeps pip from replacing it (see README, docs/design.md).
    install_requires=[
        "torch>=2.3,<2.15",
        "numpy>=1.24",
        "accelerate>=1.0",
        "tensorboard>=2.15",
        "omegaconf>=2.3",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        # builds the native CPU kernels on first use (torch.utils.cpp_extension; moe_dist/models/native.py)
        "ninja>=1.11",
    ],
    extras_require={
        "deepspeed": ["deepspeed>=0.19"],
        "webdataset": ["webdataset>=0.2.90"],
        "vision": ["torchvision"],
        # deepspeed: the DeepSpeed engine and peer tests (tests/test_parallel.py skip them
        # without it); a pure-Python sdist that installs in about 30 s and keeps the pinned torch.
        # webdataset: the shard tests (tests/test_shards.py); pure Python, no torch dependency
        "dev": ["pytest>=8.0", "pytest-timeout>=2.2", "deepspeed>=0.19", "webdataset>=0.2.90"],
    },
    entry_points={"console_scripts": ["moe-dist=moe_dist.cli:main"]},
)
