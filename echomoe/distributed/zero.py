"""DeepSpeed ZeRO-3 support for echomoe's MoE layers.

The DeepSpeed training strategy itself is :class:`echomoe.train.deepspeed.DeepSpeed`; this
module holds what ZeRO needs to know about echomoe's modules.
"""

from __future__ import annotations

from torch import nn


def register_moe_parameters_for_zero3(model: nn.Module) -> int:
    """Let ZeRO-3 gather the parameters of echomoe's MoE layers around their backward.

    ZeRO-3 re-gathers a module's partitioned parameters before its backward through hooks on
    the module's *tensor* outputs.  ``MoELayer`` and its routers return dataclasses
    (``MoEOutput``, ``RouterOutput``) that those hooks cannot see, so their parameters would
    stay partitioned when autograd needs them.  The adapter that wraps each MoE layer in a
    decoder layer returns a plain tensor: registering the layer's parameters as *external*
    parameters of the adapter makes ZeRO-3 gather them for the adapter's forward and backward.
    Returns the number of parameters registered.
    """
    import deepspeed

    register_external_parameter = deepspeed.zero.register_external_parameter

    count = 0
    for module in model.modules():
        inner = getattr(module, "moe", None)
        if isinstance(inner, nn.Module) and module is not inner:
            for param in inner.parameters():
                register_external_parameter(module, param)
                count += 1
    return count
