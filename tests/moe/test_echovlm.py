"""EchoVLM's block: parity with a re-implementation from transformers' Qwen2-MoE block and
Qwen2MLP, checkpoint conversion, and the ``echovlm`` variant (pretrained dense branch kept)."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2MoeConfig
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP
from transformers.models.qwen2_moe.modeling_qwen2_moe import (
    Qwen2MoeMLP,
    Qwen2MoeSparseMoeBlock,
    load_balancing_loss_func,
)

from echomoe.models.builders import build_config, build_model
from echomoe.moe import BACKENDS, MoELayer, moefy
from echomoe.moe.echovlm import convert_echovlm_state_dict, echovlm_layer

D, F, F_E, F_S, E, K = 24, 40, 7, 13, 4, 2


class EchoVLMFFN(torch.nn.Module):
    """The FFN of EchoVLM's ``Qwen2VLDecoderLayer``, written from its description with
    transformers' own blocks: ``softmax(coef(x))[0] * moe(x) + [1] * mlp(x)``."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.mlp = Qwen2MLP(Qwen2Config(hidden_size=D, intermediate_size=F))
        self.moe = Qwen2MoeSparseMoeBlock(Qwen2MoeConfig(
            hidden_size=D, moe_intermediate_size=F_E, shared_expert_intermediate_size=F_S,
            num_experts=E, num_experts_per_tok=K, norm_topk_prob=False, hidden_act="silu"))
        self.coefficient = torch.nn.Linear(D, 2)
        for p in self.parameters():
            torch.nn.init.normal_(p, std=0.3)

    def forward(self, x):
        coef = torch.softmax(self.coefficient(x), dim=-1)
        return self.moe(x) * coef[..., 0:1] + self.mlp(x) * coef[..., 1:]

    def router_logits(self, x):
        return torch.nn.functional.linear(x.reshape(-1, D), self.moe.gate.weight)


def _backward(module, x, read):
    x = x.clone().requires_grad_(True)
    y = read(module(x))
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), x.grad


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "megablocks"])
def test_block_matches_echovlm_forward_and_backward(backend):
    ref = EchoVLMFFN()
    ours = echovlm_layer(ref.mlp, ref.moe, ref.coefficient, backend=backend)
    assert ours.dense_branch is ref.mlp and ours.path_mixer.bias is not None
    assert ours.router.normalize is False and ours.shared_expert.gate is not None
    x = torch.randn(3, 11, D)
    y_ref, gx_ref = _backward(ref, x, lambda o: o)
    y, gx = _backward(ours, x, lambda o: o.hidden_states)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gx, gx_ref, atol=1e-6, rtol=1e-5)
    # the mixer learns the same: its gradient is EchoVLM's with the rows swapped
    torch.testing.assert_close(ours.path_mixer.weight.grad, ref.coefficient.weight.grad.flip(0),
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours.router.weight.grad, ref.moe.gate.weight.grad, atol=1e-6,
                               rtol=1e-5)
    out = ours(x)
    # transformers' Qwen2-MoE balance loss is k times echomoe's
    hf = load_balancing_loss_func((ref.router_logits(x),), E, K)
    torch.testing.assert_close(K * out.aux_losses["balance"], hf, atol=1e-6, rtol=1e-5)


def test_block_from_echovlm_module_list_experts():
    """EchoVLM's own code keeps experts as a ModuleList of Qwen2MoeMLP."""
    ref = EchoVLMFFN(seed=1)
    cfg = Qwen2MoeConfig(hidden_size=D, moe_intermediate_size=F_E, hidden_act="silu")
    listed = torch.nn.ModuleList(Qwen2MoeMLP(cfg, intermediate_size=F_E) for _ in range(E))
    with torch.no_grad():
        for e, mlp in enumerate(listed):
            gate, up = ref.moe.experts.gate_up_proj[e].chunk(2)
            mlp.gate_proj.weight.copy_(gate)
            mlp.up_proj.weight.copy_(up)
            mlp.down_proj.weight.copy_(ref.moe.experts.down_proj[e])
    block = torch.nn.Module()
    block.gate, block.experts = ref.moe.gate, listed
    block.shared_expert, block.shared_expert_gate = ref.moe.shared_expert, \
        ref.moe.shared_expert_gate
    ours = echovlm_layer(ref.mlp, block, ref.coefficient)
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).hidden_states, ref(x), atol=1e-6, rtol=1e-5)


def _echovlm_checkpoint(lm, seed=0):
    """An EchoVLM-layout state dict for ``lm``: each layer's mlp plus moe (per-expert weights,
    as EchoVLM's code stores them) and coefficient; and the reference FFN of each layer."""
    state = {k: v for k, v in lm.state_dict().items()}
    refs = []
    for i, layer in enumerate(lm.model.layers):
        ref = EchoVLMFFN(seed=seed + i)
        ref.mlp.load_state_dict(layer.mlp.state_dict())
        refs.append(ref)
        for key, value in ref.moe.state_dict().items():
            if key == "experts.gate_up_proj":
                for e in range(E):
                    gate, up = value[e].chunk(2)
                    state[f"model.layers.{i}.moe.experts.{e}.gate_proj.weight"] = gate
                    state[f"model.layers.{i}.moe.experts.{e}.up_proj.weight"] = up
            elif key == "experts.down_proj":
                for e in range(E):
                    state[f"model.layers.{i}.moe.experts.{e}.down_proj.weight"] = value[e]
            else:
                state[f"model.layers.{i}.moe.{key}"] = value
        for key, value in ref.coefficient.state_dict().items():
            state[f"model.layers.{i}.coefficient.{key}"] = value
    return state, refs


def test_echovlm_checkpoint_loads_into_a_keep_dense_model():
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=50, hidden_size=D, intermediate_size=F,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)).eval()
    state, refs = _echovlm_checkpoint(lm)
    moefy(lm, keep_dense=True, upcycle=False, num_experts=E, top_k=K, intermediate_size=F_E,
          shared_expert_size=F_S, normalize_topk=False, path_mixer_bias=True)
    missing, unexpected = lm.load_state_dict(convert_echovlm_state_dict(state), strict=True)
    assert not missing and not unexpected
    x = torch.randn(2, 6, D)
    with torch.no_grad():
        for layer, ref in zip(lm.model.layers, refs, strict=True):
            torch.testing.assert_close(layer.mlp.moe(x).hidden_states, ref(x), atol=1e-6,
                                       rtol=1e-5)


def test_converter_names_unknown_and_incomplete_keys():
    with pytest.raises(ValueError, match=r"layers\.0\.moe\.odd\.weight"):
        convert_echovlm_state_dict({"model.layers.0.moe.odd.weight": torch.zeros(1)})
    gaps = {f"model.layers.0.moe.experts.{e}.{n}.weight": torch.zeros(2, 2)
            for e in (0, 2) for n in ("gate_proj", "up_proj", "down_proj")}
    with pytest.raises(ValueError, match=r"experts 0\.\.1, got \[0, 2\]"):
        convert_echovlm_state_dict(gaps)
    assert convert_echovlm_state_dict({"lm_head.weight": torch.ones(1)}).keys() == {
        "lm_head.weight"}


def test_echovlm_variant_keeps_the_pretrained_mlp(tmp_path):
    config = build_config("tiny", "echovlm")
    moe = config.moe_config
    assert (moe["num_experts"], moe["top_k"], moe["normalize_topk"]) == (4, 2, False)
    assert moe["keep_dense"] and moe["path_mixer_bias"] and moe["router"] == "topk"
    assert config.loss_weights["moe_balance"] == pytest.approx(0.002)
    assert config.loss_weights["moe_z"] == 0.0
    custom = build_config("tiny", "echovlm", loss_weights={"moe_balance": 0.05})
    assert custom.loss_weights["moe_balance"] == 0.05 and custom.loss_weights["moe_z"] == 0.0
    assert build_config("tiny", "moe_topk").loss_weights["moe_z"] == 0.001  # untouched

    torch.manual_seed(0)
    text = config.text_config
    lm = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size, num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    lm.save_pretrained(tmp_path / "lm")
    model = build_model("tiny", "echovlm", language_model_path=str(tmp_path / "lm"))
    layer = model.language_model.model.layers[1].mlp.moe
    assert isinstance(layer, MoELayer) and isinstance(layer.dense_branch, Qwen2MLP)
    torch.testing.assert_close(layer.dense_branch.down_proj.weight,
                               lm.model.layers[1].mlp.down_proj.weight)
    assert layer.path_mixer.bias is not None


def test_keep_dense_with_upcycled_experts_keeps_the_lm_output():
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=50, hidden_size=D, intermediate_size=F,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)).eval()
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        before = lm(ids).logits
    original = lm.model.layers[0].mlp
    ctx = moefy(lm, keep_dense=True, num_experts=4, top_k=2, intermediate_size=F // 2,
                path_mixer_bias=True)
    assert lm.model.layers[0].mlp.moe.dense_branch is original
    with torch.no_grad(), ctx.route(None):
        torch.testing.assert_close(lm(ids).logits, before, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="keep_dense"):
        moefy(Qwen2ForCausalLM(lm.config), keep_dense=True, num_experts=4, top_k=2,
              dense_branch_size=F)
