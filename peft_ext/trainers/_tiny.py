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


def save_tiny_char_model(folder, seed: int = 0):
    """Save a tiny random Llama (2 layers, hidden 64, vocabulary 128) with ``char_tokenizer`` into ``folder``: a local
    model a recipe can name (``model.name: <folder>``) for seconds-long recipe tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = char_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
