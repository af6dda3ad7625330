"""A character-level tokenizer for seconds-long trainer tests and tiny recipes.

Every printable ASCII character is one token (95) plus ``<pad>``, ``<eos>`` and ``<unk>``: 98 ids, so it fits the
128-token vocabulary of the tiny random Llama in the tests, and a prompt's tokens are always a prefix of the prompt +
completion's tokens (TRL splits prompt and completion at the common prefix).
"""

from __future__ import annotations

import string

SPECIALS = ("<pad>", "<eos>", "<unk>")


def char_tokenizer():
    """A ``PreTrainedTokenizerFast`` mapping each printable ASCII character to one id (no special tokens added)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
