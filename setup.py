from setuptools import find_packages, setup

setup(
    name="hpt-megatron",
    version="0.1.0",
    description="Unified Policy Gradient Estimator and Hybrid Post-Training on Megatron-core",
    python_requires=">=3.10",
    packages=find_packages(include=["hpt_megatron", "hpt_megatron.*"]),
    install_requires=[
        # torch is not pinned: the NGC image brings its own; on CPU install torch==2.13.0 first.
        "torch>=2.6",
        "megatron-core==0.16.1",
        "transformers>=4.51",
        "safetensors>=0.4",
        "tokenizers>=0.21",
        "pyyaml>=6",
        "omegaconf>=2.3",
        "numpy",
        "pyarrow>=15",
        "math-verify[antlr4_13_2]>=0.7",
        "sympy>=1.12",
        "tensorboard>=2.15",
        "tqdm",
        "psutil",  # megatron dist-checkpointing writers need it
        "requests",
        "aiohttp",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-timeout",
            "pytest-xdist",
            "radon",
            "ruff==0.17.6",
            "mypy==2.4.1",
            "matplotlib",
            "wandb>=0.17",  # tests/unit/orchestration/test_wandb_logging.py
        ],
        "wandb": ["wandb>=0.17"],
    },
    entry_points={"console_scripts": ["hpt=hpt_megatron.cli:main"]},
)
