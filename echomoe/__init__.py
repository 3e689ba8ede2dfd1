"""echomoe: mixture-of-experts ultrasound vision-language models, routed by anatomy.

Importing the package is light: it pulls in torch only.  Training-time dependencies (wandb,
deepspeed, matplotlib) are imported by the modules that use them, when they are used.
"""

from echomoe.version import __version__

__all__ = ["__version__"]
