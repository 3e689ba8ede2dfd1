"""Installation script for echomoe.

PyTorch is deliberately required without an upper pin but is expected to be installed *first*
(``pip install torch==2.13.0``) so that a CPU machine never resolves an unpinned ``torch`` to the
multi-GB CUDA build.  ``make demo`` / ``make test`` do this for you.
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
version = {}
exec((ROOT / "echomoe" / "version.py").read_text(), version)

setup(
    name="echomoe",
    version=version["__version__"],
    description="Mixture-of-experts ultrasound vision-language models, routed by anatomy.",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["echomoe", "echomoe.*"]),
    include_package_data=True,
    install_requires=[
        "torch>=2.9",
        "transformers>=5.0",
        "einops>=0.8",
        "datasets>=3.0",
        "evaluate>=0.4",
        "rouge-score>=0.1.2",
        "nltk>=3.9",
        "wandb>=0.19",
        "deepspeed>=0.16",
        "pillow>=10",
        "omegaconf>=2.3",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "numpy>=1.26",
        "peft>=0.13",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
            "nbmake>=1.5",
            "ruff>=0.6",
            "torchmetrics>=1.4",
            "pycocoevalcap>=1.2",
            "sacrebleu>=2.4",
            "monai>=1.4",
            "scipy>=1.11",
        ],
        # GPU only: megablocks needs CUDA, triton and stanford-stk.
        "megablocks": ["megablocks>=0.7"],
    },
    entry_points={"console_scripts": ["echomoe=echomoe.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
