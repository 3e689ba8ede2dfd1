"""The VLM's language-modelling loss: token mean (as transformers) and example mean."""

import math

import pytest
import torch
import torch.nn.functional as F

from echomoe.models.builders import build_model
from echomoe.models.configuration import EchoMoEConfig
from echomoe.models.losses import causal_lm_loss


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 9, 13, generator=g)
    labels = torch.randint(0, 13, (3, 9), generator=g)
    labels[0, :2] = -100          # 6 supervised next tokens
    labels[1, :7] = -100          # 1
    labels[2, :] = -100           # none: never counted
    return logits, labels


def _per_example_reference(logits, labels):
    """Each row's mean next-token cross-entropy, by a plain loop."""
    means = []
    for row_logits, row_labels in zip(logits, labels, strict=True):
        terms = [F.cross_entropy(row_logits[t - 1][None], row_labels[t][None])
                 for t in range(1, len(row_labels)) if row_labels[t] != -100]
        if terms:
            means.append(torch.stack(terms).mean())
    return means


def test_token_mean_matches_transformers_loss():
    logits, labels = _batch()
    shifted = F.cross_entropy(logits[:, :-1].reshape(-1, 13), labels[:, 1:].reshape(-1),
                              ignore_index=-100)
    assert torch.allclose(causal_lm_loss(logits, labels, "token"), shifted, atol=1e-6)


def test_example_mean_weighs_every_example_once():
    logits, labels = _batch()
    means = _per_example_reference(logits, labels)
    assert len(means) == 2
    expected = torch.stack(means).mean()
    got = causal_lm_loss(logits, labels, "example")
    assert torch.allclose(got, expected, atol=1e-6)
    # the one-token example weighs as much as the six-token one, unlike the token mean
    assert not math.isclose(got.item(), causal_lm_loss(logits, labels, "token").item(),
                            rel_tol=1e-3)


def test_no_supervised_token_is_zero_with_a_gradient():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.full((2, 5), -100)
    for reduction in ("token", "example"):
        loss = causal_lm_loss(logits, labels, reduction)
        assert loss.item() == 0.0
        loss.backward()


def test_bad_reduction_and_shapes_are_refused():
    logits, labels = _batch()
    with pytest.raises(ValueError, match="unknown LM loss reduction 'sum'"):
        causal_lm_loss(logits, labels, "sum")
    with pytest.raises(ValueError, match="must agree"):
        causal_lm_loss(logits, labels[:, :5])
    with pytest.raises(ValueError, match="lm_loss_reduction must be one of token, example"):
        EchoMoEConfig(lm_loss_reduction="mean")


def test_model_lm_loss_follows_the_config():
    torch.manual_seed(0)
    model = build_model("tiny", "dense").eval()
    ids = torch.randint(7, 1000, (3, 11))
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, :9] = -100
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
        assert torch.allclose(out.losses["lm"], causal_lm_loss(out.logits, labels, "token"),
                              atol=1e-5)
        model.config.lm_loss_reduction = "example"
        out = model(input_ids=ids, labels=labels)
    expected = torch.stack(_per_example_reference(out.logits, labels)).mean()
    assert torch.allclose(out.losses["lm"], expected, atol=1e-5)
    assert EchoMoEConfig(lm_loss_reduction="example").to_dict()["lm_loss_reduction"] == "example"


@pytest.mark.parametrize("reduction", ["token", "example"])
def test_supervised_positions_only_give_the_same_loss(reduction):
    from echomoe.models.losses import supervised_lm_loss

    torch.manual_seed(1)
    hidden = torch.randn(3, 9, 8, dtype=torch.float64)
    head = torch.nn.Linear(8, 13, bias=False).double()
    _, labels = _batch()
    expected = causal_lm_loss(head(hidden), labels, reduction)
    assert torch.allclose(supervised_lm_loss(hidden, head, labels, reduction), expected)
    none = torch.full_like(labels, -100)
    assert supervised_lm_loss(hidden, head, none, reduction).item() == 0.0


def test_labels_only_logits_model_matches_the_full_logits_loss_and_gradients():
    from echomoe.data.collate import VLMCollator
    from echomoe.data.synthetic.generate import SyntheticConfig, generate
    from echomoe.data.tasks import TaskSampler
    from echomoe.models import build_processor

    torch.manual_seed(0)
    full = build_model("tiny", "moe_topk")
    sparse = build_model("tiny", "moe_topk", labels_only_logits=True)
    sparse.load_state_dict(full.state_dict())
    processor = build_processor("tiny", num_samples=20, config=full.config)
    collator = VLMCollator(processor.tokenizer, full.tokens_per_image, full.config.image_size)
    sampler = TaskSampler({"report": 1.0, "vqa": 1.0, "segment": 1.0}, seed=0)
    samples = generate(5, seed=2, config=SyntheticConfig(image_size=32))
    items = [{"sample": s, **vars(sampler(s, key=i))} for i, s in enumerate(samples)]
    batch = collator(items)
    a, b = full(**batch), sparse(**batch)
    assert b.logits is None and a.logits is not None
    assert set(a.losses) == set(b.losses)
    for name in a.losses:
        torch.testing.assert_close(a.losses[name], b.losses[name], atol=1e-5, rtol=1e-5)
    a.loss.backward()
    b.loss.backward()
    head_a = full.language_model.get_output_embeddings().weight.grad
    head_b = sparse.language_model.get_output_embeddings().weight.grad
    torch.testing.assert_close(head_a, head_b, atol=1e-5, rtol=1e-4)
