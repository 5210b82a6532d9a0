"""Word-level tokenizer trained on the training captions (HF ``tokenizers``), wrapped as a
``transformers.PreTrainedTokenizerFast``. The one place that decides the special tokens."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from tokenizers.trainers import WordLevelTrainer
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # ids 0, 1, 2, 3
# Words an English caption does not end with (articles, prepositions, conjunctions, possessives):
# the search bans EOS right after them (``decode.ban_bad_endings``).
BAD_ENDINGS = ("a", "an", "the", "of", "in", "on", "at", "to", "for", "with", "from", "by",
               "into", "onto", "near", "under", "over", "and", "or", "his", "her", "their", "its",
               "this", "that", "some")


def _wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK
    )


def train_tokenizer(
    captions: Iterable[str], min_frequency: int = 1, vocab_size: int | None = None
) -> PreTrainedTokenizerFast:
    """Lower-cased words; punctuation is dropped (COCO evaluation drops it too)."""
    tok = Tokenizer(WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(Regex(r"[^\w\s']"), " ")]
    )
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = WordLevelTrainer(
        vocab_size=vocab_size or 1_000_000, min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
    )
    tok.train_from_iterator(captions, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, 1), (EOS, 2)]
    )
    return _wrap(tok)


def with_vocabulary(model_config: dict, tokenizer: PreTrainedTokenizerFast) -> dict:
    """``model_config`` (plain data, ``build_model``'s input) completed with what only the
    tokenizer knows: the vocabulary size, the ids of the special tokens and of the words a
    caption must not end with."""
    vocab = tokenizer.get_vocab()
    return {**model_config, "vocab_size": len(tokenizer), "pad_id": tokenizer.pad_token_id,
            "bos_id": tokenizer.bos_token_id, "eos_id": tokenizer.eos_token_id,
            "unk_id": tokenizer.unk_token_id,
            "bad_ending_ids": sorted(vocab[w] for w in BAD_ENDINGS if w in vocab)}


def tokenizer_to_json(tokenizer: PreTrainedTokenizerFast) -> str:
    return tokenizer.backend_tokenizer.to_str()


def tokenizer_from_json(text: str) -> PreTrainedTokenizerFast:
    return _wrap(Tokenizer.from_str(text))


def encode(tokenizer: PreTrainedTokenizerFast, captions: list[str], max_length: int) -> list[list[int]]:
    """BOS + words + EOS, cut to max_length tokens (EOS kept as the last one)."""
    ids = tokenizer(captions, add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    return [x if len(x) <= max_length else x[: max_length - 1] + [eos] for x in ids]


def decode(tokenizer: PreTrainedTokenizerFast, ids) -> str:
    """Generated ids (no BOS) -> caption, stopping at the first EOS."""
    ids = [int(i) for i in ids]
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()
