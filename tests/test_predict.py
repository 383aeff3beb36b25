"""`mmjax.predict`: predictions on your own files equal the model's evaluation outputs, masks for a missing optional
modality, bad rows reported by row and line, the command line (CSV, JSONL, scoring), the notebook API, several
devices and several processes."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mmjax.data import build, pipeline
from mmjax.data.files import open_built
from mmjax.evaluate.outputs import gather_outputs
from mmjax.inference import Runner, read_manifest
from mmjax.predict import Predictor
from tests.conftest import REPO_ROOT
from tests.trained_workdirs import MISSING_AUDIO_ROWS


@pytest.fixture(scope="module")
def predictor(classifier_workdir):
    return Predictor.load(classifier_workdir[0], "latest")


def _manifest(classifier_workdir):
    return read_manifest(classifier_workdir[1], columns={"text": ""})  # The caption is metadata for this model.


def test_predictions_equal_the_evaluation_outputs_on_the_training_files(classifier_workdir, predictor):
    """Every split the model was evaluated on: the probabilities of `predict` on the manifest's files are the eval
    step's, example for example, rows with a missing audio cell included (masked, as in training)."""
    _, _, data_dir = classifier_workdir
    setup, state = predictor.setup, predictor.state
    result = predictor.predict_manifest(_manifest(classifier_workdir), progress=False)
    assert not result.bad_rows and len(result.records) == 48
    by_row = {r["row"]: r for r in result.records}
    manifest = _manifest(classifier_workdir)
    checked = 0
    for split in ("train", "validation", "test"):
        evaluated = gather_outputs(setup.eval_step_fn, state, pipeline.eval_batches(
            setup.dataset, split, global_batch_size=16), setup.eval_keys, setup.batch_sharding)
        source = open_built(data_dir).as_data_source(split=split)
        rows = [int(source[i]["row"]) for i in range(len(source))]
        outputs = predictor.outputs([manifest.raw(r - 1, ["image", "audio"]) for r in rows])
        np.testing.assert_array_equal(outputs["probabilities"], evaluated["probabilities"])
        np.testing.assert_array_equal(outputs["prediction"], evaluated["prediction"])
        for i, row in enumerate(rows):
            assert by_row[row]["probability"] == pytest.approx(float(evaluated["probabilities"][i].max()), abs=0)
        checked += len(rows)
    assert checked == 48
    assert {by_row[r]["error"] for r in MISSING_AUDIO_ROWS} == {None}  # Masked, not errors.


def test_a_missing_optional_modality_is_masked_and_a_required_one_is_a_bad_row(classifier_workdir, predictor):
    manifest = _manifest(classifier_workdir)
    row = MISSING_AUDIO_ROWS[0] - 1
    raw = manifest.raw(row, ["image", "audio"])
    assert raw["audio"] is None
    masked = predictor.outputs([raw])["probabilities"][0]
    zeros = predictor.outputs([{"image": raw["image"], "audio": None}])["probabilities"][0]
    np.testing.assert_array_equal(masked, zeros)
    with pytest.raises(ValueError, match=r"example 0: no image: the model needs one \(it was not trained with image "
                                         r"missing\)"):
        predictor.outputs([{"image": None, "audio": raw["audio"]}])
    with pytest.raises(ValueError, match="the model has no 'text' input"):
        predictor.outputs([{"image": raw["image"], "text": "a caption"}])


def test_batch_size_and_device_padding_do_not_change_outputs(classifier_workdir, predictor):
    """8 devices: a batch of 3 becomes 8 (padded rows dropped); 48 rows in batches of 8, 24 or 48 agree (to float
    rounding: XLA's kernels for another per-device batch may sum in another order; same batch, same bits)."""
    manifest = _manifest(classifier_workdir)
    reference = predictor.predict_manifest(manifest, progress=False).records
    for batch in (3, 24, 48):
        other = Predictor(predictor.setup, predictor.state, batch_size=batch)
        assert other.runner.batch_size == max(8, batch)
        records = other.predict_manifest(manifest, progress=False).records
        np.testing.assert_allclose([r["probability"] for r in records], [r["probability"] for r in reference],
                                   rtol=1e-5)
        assert [r["prediction"] for r in records] == [r["prediction"] for r in reference]
    assert Runner(predictor.setup, predictor.state, 3).batch_size == 8


def test_notebook_api_on_in_memory_arrays(classifier_workdir, predictor):
    """Decoded pixels and waveforms in memory give the same predictions as the files."""
    from PIL import Image

    from mmjax.data.raw_inputs import RawAudio

    root = os.path.dirname(classifier_workdir[1])
    examples = []
    for i in (0, 1, 5):
        image = np.asarray(Image.open(os.path.join(root, f"images/{i:04d}.png")).convert("RGB"))
        rate, audio = build.read_audio(os.path.join(root, f"audio/{i:04d}.wav"))
        examples.append({"image": image, "audio": RawAudio(rate, audio)})
    records = predictor.predict(examples, top_k=2)
    from_files = predictor.predict_manifest(_manifest(classifier_workdir), progress=False).records
    for record, i in zip(records, (0, 1, 5)):
        assert record["prediction"] == from_files[i]["prediction"]
        assert record["probability"] == pytest.approx(from_files[i]["probability"], abs=0)
        assert len(record["top"]) == 2 and record["top"][0]["class"] == record["prediction"]
    assert predictor.embed("image", [e["image"] for e in examples]).shape[0] == 3


def _run(args, **kwargs):
    return subprocess.run([sys.executable, "-m", "mmjax.predict", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600, **kwargs)


def test_the_command_line_writes_csv_and_jsonl_scores_labels_and_reports_bad_rows(classifier_workdir, tmp_path):
    workdir, manifest, _ = classifier_workdir
    # A copy of the manifest with an unreadable image and a missing file (rows 2 and 4, lines 3 and 5).
    root = os.path.dirname(manifest)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    with open(manifest) as f:
        rows = list(csv.DictReader(f))
    rows[1]["image"] = str(tmp_path / "broken.png")
    rows[3]["image"] = "images/nowhere.png"
    bad = tmp_path / "bad.csv"
    with open(bad, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    common = ["--workdir", workdir, "--column", "text=", "--root", root, "--quiet"]
    result = _run(["--manifest", str(bad), "--out", str(tmp_path / "stop.csv"), *common])
    assert result.returncode == 1
    assert "error: row 2 (line 3): unreadable image" in result.stderr
    assert not os.path.exists(tmp_path / "stop.csv")  # Nothing written.
    result = _run(["--manifest", str(bad), "--out", str(tmp_path / "p.csv"), "--on-error", "skip", "--top-k", "2",
                   *common])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped rows: 2" in result.stdout
    assert "row 4 (line 5): missing file: image 'images/nowhere.png'" in result.stdout
    with open(tmp_path / "p.csv") as f:
        written = list(csv.DictReader(f))
    assert len(written) == 48 and written[1]["error"].startswith("row 2 (line 3): unreadable image")
    assert written[0]["error"] == "" and written[0]["prediction"] == written[0]["top1"]
    assert list(written[0])[:5] == ["row", "line", "id", "text", "label"]
    assert {"top2", "top2_probability"} <= set(written[0]) and "top3" not in written[0]
    metrics = json.loads((tmp_path / "p.csv.metrics.json").read_text())
    assert metrics["num_examples"] == 46 and 0 <= metrics["accuracy"] <= 1
    assert "scored against the label column: num_examples 46, accuracy" in result.stdout
    result = _run(["--manifest", manifest, "--out", str(tmp_path / "p.jsonl"), *common])
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in open(tmp_path / "p.jsonl")]
    assert len(records) == 48 and records[0]["id"] == "item001" and len(records[0]["top"]) == 3
    assert records[0]["probability"] == pytest.approx(float(written[0]["probability"]))


@pytest.mark.slow  # Two processes, each compiling the model: ~40 s.
def test_two_processes_predict_what_one_does(classifier_workdir, tmp_path):
    from tests.train.test_parallel import cpu_env, free_port

    workdir, manifest, _ = classifier_workdir
    single = _run(["--workdir", workdir, "--manifest", manifest, "--out", str(tmp_path / "one.csv"), "--column",
                   "text=", "--batch", "16", "--quiet"], env=cpu_env(8))
    assert single.returncode == 0, single.stderr[-3000:]
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "mmjax.predict", "--workdir", workdir, "--manifest", manifest, "--out",
         str(tmp_path / "two.csv"), "--column", "text=", "--batch", "16", "--quiet", "--coordinator_address",
         f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i)],
        cwd=REPO_ROOT, env=cpu_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-2000:] for log in logs)
    assert (tmp_path / "two.csv").read_text() == (tmp_path / "one.csv").read_text()


def test_other_sample_rates_image_sizes_and_long_texts_are_documented_behaviour(classifier_workdir, predictor,
                                                                                itm_workdir):
    """Audio at another rate is resampled to the model's, an image of another size is resized by the config's
    chain, a text past the context is truncated: each said once in `notes`, none an error."""
    from mmjax.data.audio_features import resample
    from mmjax.data.raw_inputs import RawAudio
    from mmjax.inference import Preparer

    manifest = _manifest(classifier_workdir)
    raw = manifest.raw(0, ["image", "audio"])
    preparer = Preparer(predictor.setup)
    assert raw["audio"].rate == 8000
    at_16k = RawAudio(16000, resample(raw["audio"].samples, 8000, 16000))
    for _ in range(2):
        prepared = preparer({"image": np.zeros((31, 17, 3), np.uint8), "audio": at_16k})
    expected = preparer({"image": raw["image"], "audio": RawAudio(8000, resample(at_16k.samples, 16000, 8000))})
    np.testing.assert_array_equal(prepared["audio"], expected["audio"])
    assert prepared["image"].shape == expected["image"].shape == tuple(predictor.setup.spec["image"][0])
    assert list(preparer.notes) == ["audio at 16000 Hz is resampled to the model's 8000 Hz"]
    with pytest.raises(ValueError, match=r"audio must be a 1-D waveform or RawAudio\(rate, samples\), got shape"):
        preparer({"image": raw["image"], "audio": np.zeros((2, 100), np.float32)})
    matching = Predictor.load(itm_workdir[0], "latest")
    texts = Preparer(matching.setup, ["text"])
    short = texts({"text": "a red circle"})["text"]
    long = texts({"text": " ".join(["red circle"] * 40)})["text"]
    assert short.shape == long.shape == (16,) and (long != 0).all() and (short == 0).any()
    assert list(texts.notes) == ["text longer than the model's context of 16 tokens is truncated (its first 16 "
                                 "tokens kept, with the end token)"]
