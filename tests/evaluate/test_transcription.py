"""The `transcription` evaluator: WER and sequence accuracy through jiwer on hand-checked pairs, CTC transcripts
against an independent best-path decoding of the model's frames, and the errors a speech-to-text config raises at
set-up, before anything compiles. The whole evaluator runs in the tiny `spoken_numbers` experiment
(tests/test_experiments.py)."""

import itertools

import jax
import ml_collections
import numpy as np
import pytest

from experiments import spoken_numbers as experiment
from mmjax.data import pipeline
from mmjax.data import spoken_numbers as sn
from mmjax.evaluate import transcription
from mmjax.nn.models.ctc_head import CtcModel
from mmjax.train import setup as setup_lib

SIZES = {"train": 16, "validation": 8, "test": 16}


def test_wer_and_sequence_accuracy_through_jiwer_on_known_pairs():
    references = ["one two three", "four five six seven", "eight nine zero"]
    hypotheses = ["one three three", "four five six seven", "eight nine zero zero"]
    # Pair 1: one substitution (two -> three); pair 2: exact; pair 3: one insertion. 2 edits over 10 words.
    assert transcription.word_error_rate(references, hypotheses) == pytest.approx(2 / 10)
    assert transcription.sequence_accuracy(references, hypotheses) == pytest.approx(1 / 3)
    # A deletion and an empty transcript: 1 + 3 edits over 6 words.
    assert transcription.word_error_rate(["one two three", "four five six"], ["one three", ""]) == pytest.approx(4 / 6)
    # More insertions than reference words: the rate exceeds 1.
    assert transcription.word_error_rate(["one"], ["two three"]) == pytest.approx(2.0)
    assert transcription.sequence_accuracy(["one  two"], ["one two"]) == 1.0  # Words, not spacing.


def test_ctc_text_drops_specials_and_the_end_marker():
    tokenizer = sn.build_tokenizer()
    ids = np.array([8, 6, 2, 9, 3, -1, -1])  # three one [CLS] four [SEP], then past the end.
    assert transcription.ctc_text(tokenizer, ids, {0, 2, 3}) == "three one four"


def tiny(data_dir: str, variant: str, **changes) -> ml_collections.ConfigDict:
    config = experiment.get_config()
    config.data.data_dir = data_dir
    config.data.batch_size = 8
    config.data.eval_batch_size = 8
    config.model.encoders.audio.update(width=16, depth=1, num_heads=2, mlp_dim=32)
    config.model.decoder.update(width=16, depth=1, num_heads=2, mlp_dim=32)
    config = experiment.VARIANTS[variant](config)
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    sn.build(data_dir, sizes=SIZES)
    return data_dir


@pytest.mark.parametrize("variant, changes, message", [
    ("ctc", {"model.encoders.audio.patch_time": 64},
     "CTC: texts of 9 ids hold up to 7 target tokens, but the audio encoder gives 3 frames per example"),
    ("ctc", {"model.ctc.vocab_size": 16},
     "config eval.transcription: the tokenizer of dataset 'spoken_numbers' has 15 tokens but the CTC head's "
     r"vocab_size is 16 \(config model.ctc.vocab_size\).*--config.model.ctc.vocab_size=15"),
    ("seq2seq", {"model.decoder.vocab_size": 16},
     "config eval.transcription: the tokenizer has 15 tokens but the decoder's vocab_size is 16"),
    ("ctc", {"eval.transcription.method": "beam"}, "a CTC head decodes by best path only"),
    ("seq2seq", {"eval.transcription.max_length": 12}, "decode max_length=12 exceeds the decoder's max_len=9"),
    ("ctc", {"model.ctc.strip_ids": (0, 2, 15)}, r"model.ctc.strip_ids=\(0, 2, 15\) must be ids of the vocabulary"),
], ids=["too_few_frames", "ctc_vocab", "decoder_vocab", "ctc_beam", "decoder_max_length", "strip_ids"])
def test_bad_speech_to_text_configs_fail_at_setup(data_dir, variant, changes, message):
    with pytest.raises(ValueError, match=message):
        setup_lib.setup(tiny(data_dir, variant, **changes))


def test_a_ctc_head_reads_only_its_own_modality(data_dir):
    config = tiny(data_dir, "ctc")
    config.model.encoders.text = dict(name="text_transformer", vocab_size=15, max_len=9, width=16, depth=1,
                                      num_heads=2, mlp_dim=32)
    with pytest.raises(ValueError, match=r"the CTC head reads one encoder, that modality's; model.encoders has "
                                         r"\['audio', 'text'\]"):
        setup_lib.setup(config)


def test_ctc_transcripts_are_the_best_paths_of_the_models_frames(data_dir):
    run = setup_lib.setup(tiny(data_dir, "ctc"))
    state = run.initial_state()
    params = jax.tree_util.tree_map(lambda x: x * 4.0, jax.device_get(state.params))  # Fewer blank-only frames.
    state = state.replace(params=jax.device_put(params, run.state_sharding.params))
    hypotheses = transcription.Transcription().transcribe(run, state, "test", SIZES["test"])
    variables = {"params": params, **jax.device_get(state.model_state)}
    tokenizer = sn.build_tokenizer()
    expected = []
    for batch in pipeline.eval_batches(run.dataset, "test", global_batch_size=8):
        inputs = {k: batch[k] for k in ("audio", "audio_frame_mask")}
        logits, mask = run.model.apply(variables, inputs, method=CtcModel.frames)
        for row, real, valid in zip(np.asarray(logits), np.asarray(mask), batch["_valid"]):
            if valid:
                best = [k for k, _ in itertools.groupby(row[real].argmax(-1))]  # Merge repeats, then drop blanks.
                expected.append(" ".join(tokenizer.id_to_token(int(i)) for i in best
                                         if i != run.model.blank_id and i not in (0, 2, 3)))
    assert hypotheses == expected
    assert any(hypotheses)  # Not all empty: the comparison says something.
