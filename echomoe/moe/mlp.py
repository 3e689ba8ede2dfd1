"""Dense feed-forward blocks with ``transformers``-compatible parameter names.

:class:`GatedMLP` matches ``LlamaMLP`` / ``Qwen2MLP`` (``gate_proj``, ``up_proj``,
``down_proj``); :class:`MLP` matches ViT/CLIP MLPs (``fc1``, ``fc2``).  Both map ``(..., D)`` to
``(..., D)``.
"""

from __future__ import annotations

from torch import Tensor, nn

from echomoe.moe.dispatch import gated_activation
from echomoe.moe.experts import GATED_ACTIVATIONS, PLAIN_ACTIVATIONS, check_choice


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``; ``activation`` is ``"swiglu"`` or ``"geglu"``."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, activation: str = "swiglu"):
        super().__init__()
        check_choice("activation", activation, GATED_ACTIVATIONS)
        self.activation = activation
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """``(..., D) -> (..., D)``."""
        if self.activation == "swiglu":
            return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))
        return self.down_proj(nn.functional.gelu(self.gate_proj(x)) * self.up_proj(x))


class MLP(nn.Module):
    """``fc2(act(fc1(x)))`` with biases; ``activation`` is ``"gelu"``, ``"relu"`` or ``"silu"``."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, activation: str = "gelu"):
        super().__init__()
        check_choice("activation", activation, PLAIN_ACTIVATIONS)
        self.activation = activation
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        """``(..., D) -> (..., D)``."""
        return self.fc2(gated_activation(self.fc1(x), self.activation))


def make_mlp(hidden_size: int, intermediate_size: int, activation: str) -> nn.Module:
    """A :class:`GatedMLP` for gated activations, else an :class:`MLP`."""
    if activation in GATED_ACTIVATIONS:
        return GatedMLP(hidden_size, intermediate_size, activation=activation)
    return MLP(hidden_size, intermediate_size, activation=activation)
