"""Vision side of echomoe: image encoders with one face, projector and region classifier.

Quick tour::

    from echomoe.vision import VisionTransformer, Projector, RegionClassifier
    enc = VisionTransformer(image_size=64, patch_size=8, in_channels=1, hidden_size=96, depth=4,
                            num_heads=4, moe_layers=2, router="expert_choice", num_experts=4)
    tokens = enc.forward_features(images)               # (B, N, C)
    tokens, maps = enc.forward_intermediates(images, 2)  # maps: 2 x (B, C, H/p, W/p)
    embeds = Projector(96, 256, pool=True)(tokens)       # (B, N/4, 256)
    region = RegionClassifier(96, num_regions=7).predict(tokens)  # (B,)
    enc.aux_losses                                       # MoE aux losses of that forward
    cnn = ConvNet(image_size=64, widths=(16, 32, 48), depths=(1, 1, 2))  # same face, stride 8
"""

from echomoe.vision.convnet import ConvBlock, ConvNet, build_conv_block
from echomoe.vision.encoder import (
    VISION_ROUTERS,
    Attention,
    Block,
    HFVisionEncoder,
    ImageEncoder,
    VisionTransformer,
    build_vit_block,
)
from echomoe.vision.projector import Projector, RegionClassifier, pool_tokens_2x2

__all__ = [
    "VISION_ROUTERS",
    "Attention",
    "Block",
    "ConvBlock",
    "ConvNet",
    "HFVisionEncoder",
    "ImageEncoder",
    "Projector",
    "RegionClassifier",
    "VisionTransformer",
    "build_conv_block",
    "build_vit_block",
    "pool_tokens_2x2",
]
