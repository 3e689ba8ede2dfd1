"""``model.tokenizer: train_split``: the tokenizer is trained on the train split's own texts, so
real (here Chinese) reports tokenise compactly; the default stays the synthetic corpus."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from echomoe.config import ConfigError, load_config
from echomoe.data.schema import UltrasoundSample
from echomoe.models import corpus_texts, synthetic_corpus
from echomoe.train.experiment import build_model_and_processor

BASE = Path(__file__).parents[2] / "configs" / "experiments" / "base.yaml"
REPORTS = ["右叶见一低回声结节，边界清，形态规则。", "左叶见一无回声囊肿，边界清，后方回声增强。",
           "双侧甲状腺大小正常，回声均匀，未见明显结节。"]


def _samples(n: int = 30) -> list[UltrasoundSample]:
    return [UltrasoundSample(id=f"c{i}", images=[np.zeros((8, 8), np.uint8)], region="thyroid",
                             findings=REPORTS[i % 3], impression="甲状腺结节",
                             qa=[{"question": "回声如何？", "answer": "低回声", "type": "open"}])
            for i in range(n)]


def test_train_split_tokenizer_learns_the_split_language():
    train = _samples()
    cfg = load_config(BASE, ["model.tokenizer=train_split"])
    assert cfg.model.tokenizer_from_train_split()
    _, own = build_model_and_processor(cfg, train)
    _, synthetic = build_model_and_processor(load_config(BASE), train)
    text = train[0].report
    n_own = len(own.tokenizer(text, add_special_tokens=False)["input_ids"])
    n_syn = len(synthetic.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert n_own < n_syn / 2  # merges of the Chinese text vs its raw UTF-8 bytes
    assert own.tokenizer.decode(own.tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    with pytest.raises(ValueError, match="train split"):
        build_model_and_processor(cfg, [])


def test_corpus_texts_cover_reports_answers_and_prompts():
    texts = corpus_texts(_samples(3))
    assert REPORTS[0] in texts[0] and "低回声" in texts
    assert any("<image>" in t for t in texts)
    assert synthetic_corpus(4, seed=1) == synthetic_corpus(4, seed=1)


def test_a_missing_tokenizer_directory_is_still_an_error(tmp_path):
    with pytest.raises(ConfigError, match="model.tokenizer"):
        load_config(BASE, [f"model.tokenizer={tmp_path / 'nope'}"])
