"""Installation script for echomoe.

PyTorch is required without an upper pin but is expected to be installed *first*
(``pip install torch==2.13.0``) so that a CPU machine never resolves an unpinned ``torch`` to the
multi-GB CUDA build.  ``make demo`` / ``make test`` do this for you, then install the exact
versions of ``requirements.lock``.
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
    # Lower bounds: the releases in requirements.lock (what `make test` runs), and transformers
    # 5.23, which the suite also passes on. Upper bounds below the next minor of the fast movers
    # (transformers, datasets, deepspeed, peft, wandb), so an untested release is never resolved;
    # `make test-latest` tries the newest releases these ranges allow.
    install_requires=[
        "torch>=2.13",
        "transformers>=5.23,<5.25",
        "einops>=0.8",
        "datasets>=5.2,<5.3",
        "evaluate>=0.4.6",
        "rouge-score>=0.1.2",
        "nltk>=3.10",
        "wandb>=0.31,<0.32",
        "deepspeed>=0.19.8,<0.20",
        "pillow>=13.0",
        "omegaconf>=2.4",
        "tqdm>=4.70",
        "matplotlib>=3.11",
        "numpy>=2.4",
        "peft>=0.21,<0.22",
        "pydicom>=3.0,<3.1",  # DICOM, with the decoders of its compressed transfer syntaxes:
        "pylibjpeg>=2.1",  # JPEG baseline / lossless (libjpeg) and JPEG 2000 (openjpeg)
        "pylibjpeg-libjpeg>=2.5",
        "pylibjpeg-openjpeg>=2.6",
    ],
    extras_require={
        "dev": [
            "pytest>=9.2",
            "pydicom-data>=1.0",  # real ultrasound DICOM files for the tests
            "pytest-xdist>=3.8",
            "hypothesis>=6.170",
            "nbmake>=1.5.5",
            "ruff>=0.17",
            "torchmetrics>=1.9",
            "pycocoevalcap>=1.2",
            "sacrebleu>=2.6",
            "monai>=1.6",
            "scipy>=1.17",
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
