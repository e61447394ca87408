"""Small random-weight models built offline from transformers configs (GPT-2, Qwen2, Llama with
grouped-query attention, a BERT classifier), saved as Hugging Face folders, converted with
`--quant f32` and compared with transformers on the same weights."""

import json

import numpy as np
import pytest
import torch

from byte_level import byte_level_tokenizer_json
from conftest import cosine

VOCAB = 300


def save_hf(model, folder, tokenizer_json: str, extra: dict | None = None):
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "tokenizer.json").write_text(tokenizer_json)
    if extra:
        for name, doc in extra.items():
            (folder / name).write_text(json.dumps(doc))


def build(kind: str, folder):
    import transformers as T

    torch.manual_seed({"gpt2": 1, "qwen2": 2, "llama": 3}[kind])
    if kind == "gpt2":
        cfg = T.GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                           bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
        model = T.GPT2LMHeadModel(cfg)
    elif kind == "qwen2":
        cfg = T.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                            tie_word_embeddings=True, eos_token_id=VOCAB - 1)
        model = T.Qwen2ForCausalLM(cfg)
    else:
        cfg = T.LlamaConfig(vocab_size=VOCAB, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                            num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                            tie_word_embeddings=False, eos_token_id=VOCAB - 1)
        model = T.LlamaForCausalLM(cfg)
    with torch.no_grad():   # random biases too (HF initialises them to zero), so they are exercised
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    model.eval()
    save_hf(model, folder, byte_level_tokenizer_json(VOCAB))
    return model


@pytest.fixture(scope="module", params=["gpt2", "qwen2", "llama"])
def pair(request, tmp_path_factory):
    from models.api import load_model
    from models.convert import convert

    folder = tmp_path_factory.mktemp(request.param)
    hf = build(request.param, folder)
    path = str(folder / "model.edge")
    convert(str(folder), path, quant="f32", progress=False)
    return hf, load_model(path), request.param


def test_random_decoder_logits_match_transformers(pair):
    hf, ours, kind = pair
    rng = np.random.default_rng(0)
    for n in (1, 7, 40):
        ids = rng.integers(0, VOCAB - 1, n).tolist()
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].numpy()
        got = ours.logits(ids)
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert err <= 1e-3, f"{kind}, {n} tokens: {err:.2e}"


def test_random_decoder_greedy_matches_transformers(pair):
    from models.api import SamplingParams

    hf, ours, kind = pair
    ids = [5, 80, 120, 33, 7]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                          pad_token_id=0)[0, len(ids):].tolist()
    # min_new_tokens masks the end token in transformers; ignore_eos lets ours run past it too,
    # so compare only the prefix before any end token
    got = list(ours.generate_ids(ids, SamplingParams(max_tokens=32, ignore_eos=True)))
    end = VOCAB - 1
    cut = got.index(end) if end in got else 32
    assert cut >= 8, f"{kind}: an end token after {cut} tokens leaves too little to compare"
    assert got[:cut] == ref[:cut], kind


def test_random_bert_classifier_matches_transformers(tmp_path):
    import transformers as T
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    from models.api import load_model
    from models.convert import convert

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + \
        ["the", "cat", "sat", "on", "mat", "good", "bad", "movie", "##s", "##ing"]
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    torch.manual_seed(4)
    cfg = T.BertConfig(vocab_size=len(words), hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=80, max_position_embeddings=64, num_labels=3,
                       id2label={0: "neg", 1: "neutral", 2: "pos"}, label2id={"neg": 0, "neutral": 1, "pos": 2})
    hf = T.BertForSequenceClassification(cfg).eval()
    save_hf(hf, tmp_path, tok.to_str())
    convert(str(tmp_path), str(tmp_path / "m.edge"), quant="f32", progress=False)
    ours = load_model(str(tmp_path / "m.edge"))
    assert ours.task == "classify"
    texts = ["the cat sat on the mat", "good movies", "bad", "sitting cats on mats is good"]
    got = ours.classify(texts)
    for text, g in zip(texts, got):
        ids = ours.tokenize(text)
        with torch.no_grad():
            out = hf(torch.tensor([ids]), output_hidden_states=True)
        probs = torch.softmax(out.logits[0], -1).numpy()
        np.testing.assert_allclose([g["scores"][lab] for lab in ("neg", "neutral", "pos")], probs, atol=1e-5)
        assert g["label"] == ["neg", "neutral", "pos"][int(probs.argmax())]
        hidden = out.hidden_states[-1][0].numpy()
        mean = hidden.mean(0)
        assert cosine(ours.embed([text])[0], mean / np.linalg.norm(mean)) >= 0.9999
    assert ours.predict(texts)[0]["label"] == got[0]["label"]
