"""Speech-to-text on your own files, end to end: the audio + transcript build of `test_captioning_own_files`
(`write_example_folder` -> `python -m mmjax.data.build --paired`) -> the spoken_numbers command it prints
(`--preset files`) trains the CTC head and the text decoder a few steps -> the `transcription` evaluator's WER,
sequence accuracy and samples.jsonl (each utterance's normalised reference and manifest row); best-path words
rejoined from the build's word pieces; the bad inputs that stop such a run at set-up, each naming its fix."""

import json
import os

import ml_collections
import numpy as np

from experiments import spoken_numbers
from mmjax import compare, experiment
from mmjax.data import files
from mmjax.data.datasets import get_dataset
from mmjax.data.tokenization import encode_texts, tokenizer_from
from mmjax.evaluate import transcription
from mmjax.nn.models.ctc_head import ctc_targets
from mmjax.train import setup as setup_lib
from tests.evaluate.test_captioning_own_files import _expected, _printed_command, _setup_error, _vocabulary, own_files

__all__ = ["own_files"]  # The module-scoped fixture: the example folder built once per module.

MODULE = "experiments.spoken_numbers"
TINY = {"data.batch_size": 8, "data.eval_batch_size": 8, "model.encoders.audio.width": 16,
        "model.encoders.audio.depth": 1, "model.encoders.audio.num_heads": 2, "model.encoders.audio.mlp_dim": 32,
        "model.decoder.width": 16, "model.decoder.depth": 1, "model.decoder.num_heads": 2,
        "model.decoder.mlp_dim": 32, "train.num_steps": 2, "train.log_every_steps": 1, "train.eval_every_steps": 2,
        "checkpoint.every_steps": 2, "optimizer.warmup_steps": 1}


def _config(overrides, **extra) -> ml_collections.ConfigDict:
    """The experiment's `files` config with `overrides`, shrunk (TINY)."""
    return experiment.config(spoken_numbers, "files", [*overrides, *(f"{k}={v}" for k, v in {**TINY, **extra}.items())])


def _variant(overrides, name: str, **extra) -> ml_collections.ConfigDict:
    """One variant's config (what `run_variants` trains), for `setup`."""
    return spoken_numbers.VARIANTS[name](_config(overrides, **extra))


def test_the_printed_command_trains_both_variants_and_scores_their_transcripts(own_files, tmp_path):
    texts, builds = own_files
    data_dir, printed = builds["files_audio"]
    preset, overrides = _printed_command(printed, MODULE)
    vocabulary = _vocabulary(data_dir)
    assert preset == "files" and overrides == [f"data.data_dir={data_dir}", f"model.ctc.vocab_size={vocabulary}",
                                               f"model.decoder.vocab_size={vocabulary}"]
    assert all(f"python -m {MODULE} " not in builds[b][1] for b in ("files", "no_text", "classification"))
    summary = compare.run_variants(_config(overrides), str(tmp_path), spoken_numbers.VARIANTS,
                                   metrics=spoken_numbers.METRICS)
    for variant in ("ctc", "seq2seq"):
        test = summary["variants"][variant]["splits"]["test"]
        assert test["wer"] >= 0 and 0 <= test["sequence_accuracy"] <= test["length_accuracy"] <= 1
        rows = [json.loads(line) for line in open(os.path.join(str(tmp_path), variant, "samples.jsonl"))]
        assert {r["split"] for r in rows} == {"validation", "test"}
        test_rows = [r for r in rows if r["split"] == "test"]
        assert [r["index"] for r in test_rows] == [0, 1, 2, 3]
        for row in rows:  # Each hypothesis beside its own utterance's transcript, normalised, and manifest row.
            assert set(row) == {"split", "index", "reference", "hypothesis", "correct", "row"}
            assert row["reference"] == _expected(texts[row["row"]]) and isinstance(row["hypothesis"], str)
        assert test["sequence_accuracy"] == sum(r["correct"] for r in test_rows) / 4
    assert 0 <= summary["variants"]["ctc"]["splits"]["test"]["blank_fraction"] <= 1


def test_best_path_words_of_the_targets_are_the_normalised_transcripts(own_files):
    """A CTC head that emits exactly its targets (specials stripped) transcribes every utterance right, word
    pieces rejoined: the targets never hold [CLS] / [SEP] / [PAD], and references and hypotheses meet."""
    texts, builds = own_files
    data_config = ml_collections.ConfigDict({"name": "files", "data_dir": builds["files_audio"][0]})
    tokenizer = tokenizer_from(get_dataset(data_config).inputs["text"].tokenizer_source())
    source = files.raw_source(data_config, "test")
    stored = [source[i]["captions"][0] for i in range(len(source))]
    ids = encode_texts(tokenizer, stored, 32)
    targets, mask = (np.asarray(a) for a in ctc_targets(ids, (0, 2, 3)))
    assert not np.isin(targets[mask], [0, 2, 3]).any() and (mask.sum(axis=1) == (ids > 3).sum(axis=1)).all()
    assert any("##" in tokenizer.id_to_token(int(i)) for i in targets[mask])  # Some words are split into pieces.
    best_path = np.where(mask, targets, -1)
    hypotheses = [transcription.ctc_text(tokenizer, row, {0, 2, 3}) for row in best_path]
    assert hypotheses == [_expected(t) for t in stored]
    assert transcription.word_error_rate(hypotheses, hypotheses) == 0.0


def test_bad_inputs_stop_a_transcription_run_at_set_up_naming_the_fix(own_files):
    _, builds = own_files
    data_dir = builds["files_audio"][0]
    vocabulary = _vocabulary(data_dir)
    good = [f"data.data_dir={data_dir}", f"model.ctc.vocab_size={vocabulary}",
            f"model.decoder.vocab_size={vocabulary}"]
    message = _setup_error(_variant([f"data.data_dir={builds['no_text'][0]}", *good[1:]], "ctc"))
    assert "reads batch key(s) ['text'] that dataset 'files' does not provide" in message
    message = _setup_error(_variant([good[0], good[2]], "ctc"))  # ctc.vocab_size forgotten: 15.
    assert (f"the tokenizer of dataset 'files' has {vocabulary} tokens but the CTC head's vocab_size is 15" in message
            and f"--config.model.ctc.vocab_size={vocabulary}" in message)
    keeps_specials = _variant(good, "ctc")
    keeps_specials.model.ctc.strip_ids = (0,)  # Only [PAD] stripped: [CLS] and [SEP] would be targets.
    message = _setup_error(keeps_specials)
    assert "keeps the tokenizer's special id(s) [2, 3] ([CLS], [SEP], [PAD]) as CTC targets" in message
    message = _setup_error(_variant([good[0], good[1]], "seq2seq"))  # decoder.vocab_size forgotten.
    assert f"--config.model.decoder.vocab_size={vocabulary}" in message
    message = _setup_error(_variant(good, "ctc", **{"data.max_len": 64}))  # 62 targets, 48 frames.
    assert "CTC needs at least one frame per target token" in message
    setup_lib.setup(_variant(good, "ctc"))  # The same config with the printed values sets up.
