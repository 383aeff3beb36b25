"""Word vectors: Word2Vec trained with gensim on a dataset's text, GloVe / word2vec files, aligned to a tokenizer's
vocabulary with a coverage report, and `train.init_from` of an embedding table."""

import numpy as np
import pytest

from mmjax.data.tokenization import save_tokenizer, train_tokenizer
from mmjax.nn import pretrained, word_vectors

TEXTS = ["set an alarm for seven", "play some jazz music", "what is the weather in paris",
         "set a timer for ten minutes", "play the radio", "is it raining in london"] * 5


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory):
    return save_tokenizer(train_tokenizer(TEXTS, kind="word", vocab_size=100), str(tmp_path_factory.mktemp("tok")))


def test_word2vec_trains_on_the_tokenized_text_reproducibly(word_tokenizer, tmp_path):
    first = word_vectors.train_word2vec(TEXTS, word_tokenizer, str(tmp_path / "a.txt"), vector_size=8, epochs=5)
    second = word_vectors.train_word2vec(TEXTS, word_tokenizer, str(tmp_path / "b.txt"), vector_size=8, epochs=5)
    assert open(first).read() == open(second).read()  # One worker and a seed: the same vectors.
    vectors = word_vectors.load_word_vectors(first)
    assert vectors.vector_size == 8 and "alarm" in vectors.key_to_index and "[CLS]" not in vectors.key_to_index
    table, coverage = word_vectors.aligned_embedding(vectors, word_tokenizer, np.zeros((40, 8), np.float32))
    assert coverage.found == coverage.total == len(vectors.key_to_index)  # Every word of the texts.
    assert coverage.share == 1.0 and coverage.special == 5


def test_glove_file_is_aligned_by_token_then_lowercase_with_coverage(word_tokenizer, tmp_path):
    glove = tmp_path / "glove.txt"  # GloVe's format: no header line.
    glove.write_text("Alarm 1 2 3\nplay 4 5 6\njazz 7 8 9\nunrelated 0 0 1\n")
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(word_tokenizer)
    vocab = tokenizer.get_vocab()
    initial = np.random.default_rng(0).normal(scale=0.02, size=(len(vocab), 3)).astype(np.float32)
    vectors = word_vectors.load_word_vectors(str(glove))
    table, coverage = word_vectors.aligned_embedding(vectors, tokenizer, initial)
    np.testing.assert_array_equal(table[vocab["alarm"]], [1, 2, 3])  # Found as "Alarm" (case differs).
    np.testing.assert_array_equal(table[vocab["jazz"]], [7, 8, 9])
    assert coverage == (3, len(vocab) - 5, 5) and "coverage" in str(coverage)
    found = np.zeros(len(vocab), bool)
    found[[vocab["alarm"], vocab["play"], vocab["jazz"]]] = True
    scale = table[found].std() / initial[~found].std()
    np.testing.assert_allclose(table[~found], initial[~found] * scale, rtol=1e-5)  # Rescaled own initialisation.
    with pytest.raises(ValueError, match=r"word vectors have 3 dimensions but the embedding table is \(\d+, 4\)"):
        word_vectors.aligned_embedding(vectors, tokenizer, np.zeros((len(vocab), 4)))
    other = tmp_path / "other.txt"
    other.write_text("2 3\nzebra 1 2 3\nquokka 4 5 6\n")  # word2vec header, no shared word.
    with pytest.raises(ValueError, match="no token of the tokenizer's vocabulary"):
        word_vectors.aligned_embedding(word_vectors.load_word_vectors(str(other)), tokenizer, initial)


def test_init_from_word_vectors_fills_the_embedding_subtree(word_tokenizer, tmp_path):
    path = word_vectors.train_word2vec(TEXTS, word_tokenizer, str(tmp_path / "w2v.txt"), vector_size=6, epochs=2)
    source = f"word_vectors:{path}"
    pretrained.check_init_from({"encoders_text/embed": source})
    with pytest.raises(ValueError, match="no word-vector file"):
        pretrained.check_init_from({"encoders_text/embed": "word_vectors:/nonexistent.txt"})
    params = {"encoders_text": {"embed": {"embedding": np.zeros((50, 6), np.float32)}, "layer_0": {"b": 1.0}}}
    merged, note = pretrained.init_from_source(params, "encoders_text/embed", source, {"tokenizer": word_tokenizer})
    vectors = word_vectors.load_word_vectors(path)
    from tokenizers import Tokenizer

    index = Tokenizer.from_file(word_tokenizer).token_to_id("weather")
    np.testing.assert_allclose(merged["encoders_text"]["embed"]["embedding"][index], vectors["weather"], rtol=1e-6)
    assert "coverage 100.0%" in note and merged["encoders_text"]["layer_0"] == {"b": 1.0}
    with pytest.raises(ValueError, match="needs config data.tokenizer"):
        pretrained.init_from_source(params, "encoders_text/embed", source, {})
    with pytest.raises(ValueError, match="initialise an embedding table"):
        pretrained.init_from_source(params, "encoders_text", source, {"tokenizer": word_tokenizer})
