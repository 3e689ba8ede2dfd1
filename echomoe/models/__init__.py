"""The assembled echomoe VLM: configuration, model, processor and builders.

Quick tour::

    from echomoe.models import build_model, build_processor, count_parameters
    model = build_model("tiny", "moe_region_hard")
    processor = build_processor("tiny")
    inputs = processor(images=image, text="Write the ultrasound report for this study.\\n",
                       regions="breast")
    out = model.generate(**inputs, max_new_tokens=32)
    processor.batch_decode(out, skip_special_tokens=True)

``EchoMoEForConditionalGeneration`` is imported lazily (on first attribute access), so importing
``echomoe.models`` stays light.
"""

from echomoe.models.builders import (
    EQUAL_ACTIVE_VARIANTS,
    PRESETS,
    VARIANTS,
    build_config,
    build_model,
    build_processor,
    corpus_texts,
    count_parameters,
    synthetic_corpus,
    validate_config,
)
from echomoe.models.configuration import EchoMoEConfig
from echomoe.models.processor import (
    EchoMoEImageProcessor,
    EchoMoEProcessor,
    image_tokens_per_image,
)

__all__ = [
    "EQUAL_ACTIVE_VARIANTS",
    "PRESETS",
    "VARIANTS",
    "EchoMoEConfig",
    "EchoMoEForConditionalGeneration",
    "EchoMoEImageProcessor",
    "EchoMoEProcessor",
    "build_config",
    "build_model",
    "build_processor",
    "count_parameters",
    "image_tokens_per_image",
    "corpus_texts",
    "synthetic_corpus",
    "validate_config",
]


def __getattr__(name: str):
    if name == "EchoMoEForConditionalGeneration":
        from echomoe.models.modeling import EchoMoEForConditionalGeneration

        return EchoMoEForConditionalGeneration
    raise AttributeError(f"module 'echomoe.models' has no attribute {name!r}")
