"""Helpers shared by the task tests (the fixtures `smol_cfg` and `smol_tok` live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[3]


def model_cfg(name: str) -> dict:
    """The model config group as shipped in config/model/<name>.yaml."""
    return yaml.safe_load((REPO / "config" / "model" / f"{name}.yaml").read_text())


def word_level_tokenizer(vocab_words: list[str], split_digit_pairs: bool):
    """A real `tokenizers` WordLevel tokenizer: whitespace words, optionally digits in pairs.

    With `split_digit_pairs` "1732" becomes "17" "32" (GPT-2's behaviour on years, the setting of
    Hanna et al.); without it every number is one unknown token.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[BOS]": 1}
    for w in vocab_words:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    pieces = [pre_tokenizers.WhitespaceSplit()]
    if split_digit_pairs:
        pieces.append(pre_tokenizers.Split(Regex(r"\d\d"), behavior="isolated"))
    tk.pre_tokenizer = pre_tokenizers.Sequence(pieces)
    tk.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", bos_token="[BOS]")
