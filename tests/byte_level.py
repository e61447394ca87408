"""A small byte-level BPE tokenizer for random-weight models, built with the tokenizers library (no
torch: tests/test_aarch64.py runs tests that use it on aarch64)."""


def byte_level_tokenizer_json(vocab_size: int) -> str:
    """A byte-level BPE over the 256 byte symbols, a few merges, and <|endoftext|>."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges = []
    for a, b in [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("a", "n"), ("e", "r"), ("o", "n")]:
        merges.append((a, b))
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    assert tok.get_vocab_size() <= vocab_size
    return tok.to_str()
