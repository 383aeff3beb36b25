"""Captioning your own files, end to end: `write_example_folder` -> `python -m mmjax.data.build --paired` -> the
command it prints (`experiments.shapes_caption --preset files | files_audio`) trains the captioner a few steps ->
the `captioning` evaluator's metrics, samples.jsonl (each example's reference and manifest row) and caption grid;
the scoring of a known decoder output; the bad inputs that stop such a run at set-up, each naming its fix."""

import contextlib
import csv
import io
import json
import os
import shlex
import types

import ml_collections
import pytest

from experiments import shapes_caption
from mmjax import experiment
from mmjax.data import build, files
from mmjax.data.datasets import get_dataset
from mmjax.data.tokenization import encode_texts
from mmjax.evaluate import captioning
from mmjax.train import setup as setup_lib

COUNT = 40  # Built into train 32, validation 4, test 4.
TINY = {"data.batch_size": 8, "data.eval_batch_size": 8, "model.decoder.width": 16, "model.decoder.depth": 1,
        "model.decoder.num_heads": 2, "model.decoder.mlp_dim": 32, "train.num_steps": 3, "train.log_every_steps": 1,
        "train.eval_every_steps": 3, "checkpoint.every_steps": 3, "optimizer.warmup_steps": 1,
        "eval.captioning.grid": 4}
TINY_ENCODERS = {
    "files": {"image": {"name": "vit", "patch_size": 8, "width": 16, "depth": 1, "num_heads": 2, "mlp_dim": 32}},
    "files_audio": {"audio": {"name": "spectrogram_cnn", "features": (4, 8), "width": 16}},
}
# Builds of the example folder: what the manifest's columns become (KIND= drops a kind; label stays metadata).
BUILDS = {
    "files": ("--column", "audio=", "--paired"),  # Image + caption.
    "files_audio": ("--column", "image=", "--paired"),  # Audio + transcript.
    "no_text": ("--column", "text=", "--paired"),  # Image + audio: nothing for a decoder to learn.
    "classification": ("--column", "audio="),  # Image + text with labels, not --paired.
}


def _expected(text: str) -> str:
    """A manifest caption as the build's tokenizer normalises it (lowercase, single spaces)."""
    return " ".join(text.lower().split())


@pytest.fixture(scope="module")
def own_files(tmp_path_factory):
    """The example folder (every even row's caption in capitals with doubled spaces) built as `BUILDS`;
    (row -> manifest text, {build: (data dir, what the build printed)})."""
    folder = str(tmp_path_factory.mktemp("own_captions"))
    manifest = build.write_example_folder(os.path.join(folder, "raw"), COUNT, num_classes=3, sample_rate=8000,
                                          seconds=0.5, image_sizes=(10, 12))
    with open(manifest) as f:
        rows = list(csv.DictReader(f))
    for i, row in enumerate(rows):
        if i % 2:
            row["text"] = row["text"].upper().replace(" ", "  ")
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    builds = {}
    for name, args in BUILDS.items():
        out = os.path.join(folder, name)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            build.main(["--manifest", manifest, "--out", out, "--quiet", *args])
        builds[name] = (out, printed.getvalue())
    return {i: row["text"] for i, row in enumerate(rows, start=1)}, builds


def _printed_command(printed: str, module: str = "experiments.shapes_caption") -> tuple[str, list[str]]:
    """(preset, config overrides) of the command for experiment `module` that a build printed."""
    line = next(line for line in printed.splitlines() if f"python -m {module} " in line)
    words = shlex.split(line.split(" with: ", 1)[1].split(" (README")[0])
    assert words[:3] == ["python", "-m", module], words
    return words[words.index("--preset") + 1], [w[len("--config."):] for w in words if w.startswith("--config.")]


def _config(preset: str, overrides, variant: str = "cross", **extra) -> ml_collections.ConfigDict:
    """The experiment's config for `preset` and `overrides`, shrunk (TINY, tiny encoders), one variant."""
    values = [*overrides, *(f"{k}={v}" for k, v in {**TINY, **extra}.items())]
    config = experiment.config(shapes_caption, preset, values)
    config.model.encoders = TINY_ENCODERS[preset]
    config.variants = (variant,)
    return config


def _vocabulary(data_dir: str) -> int:
    return get_dataset(ml_collections.ConfigDict({"name": "files", "data_dir": data_dir})).inputs["text"].vocab_size()


def _samples(workdir: str) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(workdir, captioning.SAMPLES_FILENAME))]


@pytest.mark.parametrize("build_name, variant", [("files", "cross"), ("files_audio", "prefix")],
                         ids=["image_caption", "audio_transcript"])
def test_the_printed_command_trains_a_captioner_and_scores_its_captions(own_files, tmp_path, build_name, variant):
    texts, builds = own_files
    data_dir, printed = builds[build_name]
    preset, overrides = _printed_command(printed)
    assert preset == build_name
    assert overrides == [f"data.data_dir={data_dir}", f"model.decoder.vocab_size={_vocabulary(data_dir)}"]
    result = shapes_caption.run(_config(preset, overrides, variant), str(tmp_path))

    test = result["variants"][variant]["splits"]["test"]
    assert 0 <= test["bleu4"] <= 100 and test["cider"] >= 0 and 0 <= test["exact_match"] <= 1
    assert 0 <= test["token_accuracy"] <= 1 and test["num_examples"] == 4
    assert not set(captioning.JUDGED_METRICS) & set(test)  # No caption parser for own captions.
    assert result["table"].splitlines()[0] == "| model (test) | bleu4 | cider | exact_match | token_accuracy |"
    workdir = os.path.join(str(tmp_path), variant)
    rows = _samples(workdir)
    assert {r["split"] for r in rows} == {"validation", "test"}
    test_rows = [r for r in rows if r["split"] == "test"]
    assert [r["index"] for r in test_rows] == [0, 1, 2, 3]
    for row in rows:  # Each generated caption sits beside its own example's caption, normalised.
        assert row["references"] == [_expected(texts[row["row"]])] and isinstance(row["generated"], str)
        assert set(row) == {"split", "index", "generated", "references", "exact_match", "row"}
    assert any(texts[r["row"]] != _expected(texts[r["row"]]) for r in rows)  # Some references were normalised.
    grid = os.path.join(workdir, "captions_test.png")
    assert os.path.exists(grid) == (build_name == "files")  # Pictures only of the images the decoder read.


def test_a_known_decoder_output_is_scored_against_the_normalised_references(own_files, tmp_path):
    """What a decoder that writes every test caption exactly (its target ids) and one that misses one score."""
    texts, builds = own_files
    data_dir = builds["files"][0]
    data_config = ml_collections.ConfigDict({"name": "files", "data_dir": data_dir})
    context = types.SimpleNamespace(dataset=get_dataset(data_config), model=types.SimpleNamespace(condition=("image",)),
                                    config=ml_collections.ConfigDict({"data": data_config.to_dict()}),
                                    workdir=str(tmp_path))
    evaluator = captioning.Captioning(grid=4)
    decode = evaluator.decode_config(context)
    assert (decode.bos_id, decode.eos_id, decode.pad_id, decode.max_length) == (2, 3, 0, 32)
    source = files.raw_source(data_config, "test")
    stored = [source[i]["captions"][0] for i in range(len(source))]
    assert stored == [texts[source[i]["row"]] for i in range(len(source))]  # Stored as written in the manifest.
    targets = encode_texts(context.dataset.inputs["text"].tokenizer_source(), stored, 32)
    perfect = evaluator._score(context, "test", source, targets, decode)
    assert perfect["exact_match"] == 1.0 and perfect["bleu4"] == pytest.approx(100.0)
    assert [r["generated"] for r in _samples(str(tmp_path))] == [_expected(t) for t in stored]
    wrong = targets.copy()
    wrong[0, 1:] = targets[1, 1:]  # The first example gets the second one's caption.
    assert evaluator._score(context, "test", source, wrong, decode)["exact_match"] == 0.75
    assert os.path.getsize(os.path.join(str(tmp_path), "captions_test.png")) > 0


def _setup_error(config) -> str:
    with pytest.raises(ValueError) as error:
        setup_lib.setup(config)
    return str(error.value)


def test_bad_inputs_stop_a_captioning_run_at_set_up_naming_the_fix(own_files):
    _, builds = own_files
    data_dir = builds["files"][0]
    vocabulary = _vocabulary(data_dir)
    good = [f"data.data_dir={data_dir}", f"model.decoder.vocab_size={vocabulary}"]
    assert "experiments.shapes_caption" not in builds["no_text"][1]  # No captioning command without text.
    message = _setup_error(_config("files", [f"data.data_dir={builds['no_text'][0]}", good[1]]))
    assert "model 'captioner' reads batch key(s) ['text'] that dataset 'files' does not provide" in message
    assert "the manifest's text column" in message
    message = _setup_error(_config("files", [f"data.data_dir={builds['classification'][0]}", good[1]]))
    assert ("config task.name='caption' but dataset 'files' provides 'classification' labels; a paired dataset for "
            "clip / siglip / itm / caption") in message
    message = _setup_error(_config("files", [f"data.data_dir={data_dir}"]))  # vocab_size forgotten: Shapes' 38.
    assert (f"config model.decoder.vocab_size=38 but the tokenizer of dataset 'files' has {vocabulary} tokens"
            in message and f"--config.model.decoder.vocab_size={vocabulary}" in message)
    message = _setup_error(_config("files", [good[0], f"model.decoder.vocab_size={vocabulary + 5}"]))
    assert message.startswith(f"config eval.captioning: the tokenizer has {vocabulary} tokens but the decoder's "
                              f"vocab_size is {vocabulary + 5}")
    message = _setup_error(_config("files", good, **{"checkpoint.best_metric": "validation/caption_true"}))
    assert message == ("config checkpoint.best_metric='validation/caption_true': the captioning evaluator reports "
                       "'caption_true' only on shapes_captions (its caption parser); on dataset 'files' it reports "
                       "bleu4, cider and exact_match, e.g. --config.checkpoint.best_metric=validation/cider")
    setup_lib.setup(_config("files", good))  # The same config with the printed values sets up.
