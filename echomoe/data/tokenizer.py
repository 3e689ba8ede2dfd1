"""Byte-level BPE tokenizer trained offline, and the special tokens every echomoe model uses.

Special tokens (single ids, never split):

* ``<image>`` (:data:`IMAGE_TOKEN`): one per image in a prompt; the collator expands each one to
  the model's number of image tokens and the model replaces their embeddings by image features.
* ``[SEG]`` / ``[DET]`` / ``[KPT]`` (:data:`SEG_TOKEN`, :data:`DET_TOKEN`, :data:`KPT_TOKEN`):
  task tokens in a target; the LM's last hidden state at that position drives the mask decoder,
  the box head and the keypoint head.
* ``<pad>``, ``<s>`` (bos), ``</s>`` (eos).

A tokenizer from :func:`train_tokenizer` gives them the ids 0-6 (pad, bos, eos, image, seg, det,
kpt).  Any pretrained HF tokenizer loaded from a local directory gets them through
:func:`add_special_tokens_to` (then resize the model's embeddings to ``len(tokenizer)``).

Nothing here touches a hub: :func:`load_tokenizer` only accepts an existing local directory.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

IMAGE_TOKEN = "<image>"
SEG_TOKEN = "[SEG]"
DET_TOKEN = "[DET]"
KPT_TOKEN = "[KPT]"
PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"

TASK_TOKENS: tuple[str, ...] = (SEG_TOKEN, DET_TOKEN, KPT_TOKEN)
"""Task tokens whose hidden states drive the grounding heads."""

EXTRA_SPECIAL_TOKENS: tuple[str, ...] = (IMAGE_TOKEN, *TASK_TOKENS)
"""The echomoe tokens added to every tokenizer (besides pad / bos / eos)."""

SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, *EXTRA_SPECIAL_TOKENS)
"""All special tokens of a trained tokenizer, in id order (0-6)."""


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    add_bos: bool = True,
    model_max_length: int = 4096,
):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it for ``transformers``.

    Training runs offline with the ``tokenizers`` library and is deterministic: the same texts
    (in the same order) and arguments give the same vocabulary and merges.  Byte-level BPE has
    no unknown token: every string round-trips exactly through ``encode`` / ``decode``.

    Args:
        texts: training corpus (e.g. reports, questions, answers, prompts).
        vocab_size: maximum vocabulary size including the 256 byte symbols and the 7 special
            tokens; the result may be smaller when the corpus has fewer merges to learn.
        min_frequency: minimum pair count for a merge.
        add_bos: when ``True``, ``tokenizer(text)`` (with ``add_special_tokens=True``) prepends
            ``<s>``; eos is never added automatically (the collator appends it to targets).
        model_max_length: recorded in the tokenizer config.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with ``pad_token="<pad>"``,
        ``bos_token="<s>"``, ``eos_token="</s>"`` and ``<image>``, ``[SEG]``, ``[DET]``,
        ``[KPT]`` as extra special tokens (ids 0-6 in :data:`SPECIAL_TOKENS` order).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs at least {minimum} "
            f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    texts = [t for t in texts]
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"texts[{bad}] is {type(texts[bad]).__name__}, expected str")

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    if add_bos:
        bos_id = backend.token_to_id(BOS_TOKEN)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS_TOKEN} $A",
            pair=f"{BOS_TOKEN} $A $B",
            special_tokens=[(BOS_TOKEN, bos_id)],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens=list(EXTRA_SPECIAL_TOKENS),
        model_max_length=model_max_length,
    )


def add_special_tokens_to(tokenizer) -> int:
    """Add the echomoe special tokens to a (pretrained) HF tokenizer, in place.

    ``<image>``, ``[SEG]``, ``[DET]``, ``[KPT]`` are added as extra special tokens (existing
    extra special tokens are kept); ``<pad>``, ``<s>``, ``</s>`` are added only where the
    tokenizer has no pad / bos / eos token of its own (existing ones are kept, so a pretrained
    LM keeps the eos it was trained with).  Calling it twice adds nothing the second time.

    Args:
        tokenizer: any ``transformers`` tokenizer (e.g. from ``AutoTokenizer.from_pretrained``
            on a local directory).

    Returns:
        The number of new vocabulary entries; resize the model's embeddings to
        ``len(tokenizer)`` when it is positive.
    """
    if not hasattr(tokenizer, "add_special_tokens"):
        raise TypeError(f"expected a transformers tokenizer, got {type(tokenizer).__name__}")
    before = len(tokenizer)
    special: dict[str, object] = {}
    if tokenizer.pad_token is None:
        special["pad_token"] = PAD_TOKEN
    if tokenizer.bos_token is None:
        special["bos_token"] = BOS_TOKEN
    if tokenizer.eos_token is None:
        special["eos_token"] = EOS_TOKEN
    existing = [str(t) for t in getattr(tokenizer, "extra_special_tokens", None) or []]
    missing = [t for t in EXTRA_SPECIAL_TOKENS if t not in existing]
    if missing:
        special["extra_special_tokens"] = missing
    if special:
        tokenizer.add_special_tokens(special, replace_extra_special_tokens=False)
    for token in EXTRA_SPECIAL_TOKENS:
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise RuntimeError(f"{token!r} did not become a single token id (got {ids})")
    return len(tokenizer) - before


def load_tokenizer(path: str | Path, *, add_missing_special_tokens: bool = True):
    """Load a tokenizer from a local directory (never a hub name) with the echomoe tokens.

    Args:
        path: a directory written by ``save_pretrained`` (ours or any HF tokenizer's).
        add_missing_special_tokens: call :func:`add_special_tokens_to` on the result.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path}: not a local tokenizer directory; echomoe never downloads from a hub. "
            "Train one with train_tokenizer(...).save_pretrained(dir) or point to a local copy "
            "of a pretrained tokenizer."
        )
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if add_missing_special_tokens:
        add_special_tokens_to(tokenizer)
    return tokenizer


def special_token_ids(tokenizer) -> dict[str, int]:
    """Ids of ``<image>``, ``[SEG]``, ``[DET]``, ``[KPT]`` (raises if one is missing or split)."""
    ids = {}
    for token in EXTRA_SPECIAL_TOKENS:
        encoded = tokenizer.encode(token, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(
                f"tokenizer has no single id for {token!r} (encodes to {encoded}); "
                "call add_special_tokens_to(tokenizer) first"
            )
        ids[token] = encoded[0]
    return ids
