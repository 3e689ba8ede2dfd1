"""Conditional generation of ultrasound images and the code that scores it.

=========================== ================================================================
:mod:`.unet`                :class:`UNet`: a small conv U-Net, optionally FiLM-conditioned
:mod:`.flow`                :class:`FlowMatchingHead`: images from a hidden state (rectified
                            flow), optional mask conditioning, classifier-free guidance
:mod:`.model`               :class:`ImageGenerator`: a VLM's language model reads the
                            request, its state at a generation task token drives the head
:mod:`.evaluate`            a segmenter trained on real images judges generated ones (Dice
                            against the requested mask, lesion presence, feature distance),
                            beside ``real`` and ``shuffled`` reference rows
=========================== ================================================================
"""

from echomoe.generation.evaluate import (
    frechet_distance,
    generation_report,
    generation_scores,
    sample_tensors,
    train_segmenter,
)
from echomoe.generation.flow import FlowMatchingHead, to_model_range, to_uint8
from echomoe.generation.model import GenerationCollator, ImageGenerator, request_text
from echomoe.generation.unet import UNet

__all__ = [
    "FlowMatchingHead",
    "GenerationCollator",
    "ImageGenerator",
    "UNet",
    "frechet_distance",
    "generation_report",
    "generation_scores",
    "request_text",
    "sample_tensors",
    "to_model_range",
    "to_uint8",
    "train_segmenter",
]
