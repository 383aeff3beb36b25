"""Your own data: manifests (CSV, JSONL) -> checked rows -> a TFDS dataset that the `files` dataset reads and trains."""

import csv
import json
import os
import shutil

import ml_collections
import numpy as np
import pytest
from scipy.io import wavfile

from experiments import av_digits
from mmjax import config as config_lib
from mmjax.data import build, pipeline
from mmjax.data.datasets import get_dataset
from mmjax.train import setup as setup_lib
from tests.conftest import tiny_overrides

CLASSES = "class_0,class_1,class_2"


def _folder(tmp_path, n=9, manifest="manifest.csv"):
    """n good examples (3 classes, 8 kHz, 0.25 s clips, small PNGs) plus files for every kind of bad row."""
    root = tmp_path / "raw"
    path = build.write_example_folder(str(root), n, num_classes=3, sample_rate=8000, seconds=0.25,
                                      image_sizes=(8, 10, 12), manifest=manifest)
    (root / "bad").mkdir()
    (root / "bad" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(40))
    (root / "bad" / "not_audio.wav").write_text("this is not a wav file")
    wavfile.write(str(root / "bad" / "rate16k.wav"), 16000, np.zeros(4000, np.int16) + 1000)
    return root, path


def _good_row(i):
    return {"image": f"images/{i:04d}.png", "audio": f"audio/{i:04d}.wav", "text": f"example {i}",
            "label": f"class_{i % 3}"}


# Each bad row of the manifests below, with the reason the report must give.
BAD = [
    ({"image": "images/missing.png"}, "missing file: image 'images/missing.png'"),
    ({"image": "bad/corrupt.png"}, "unreadable image 'bad/corrupt.png'"),
    ({"audio": "bad/not_audio.wav"}, "unreadable audio 'bad/not_audio.wav' (not a readable WAV file"),
    ({"audio": "bad/rate16k.wav"}, "wrong sample rate: audio 'bad/rate16k.wav' is 16000 Hz, expected 8000 Hz"),
    ({"text": "   "}, "empty text in 'text'"),
    ({"label": "class_9"}, "unknown label 'class_9' (--classes: class_0, class_1, class_2)"),
    ({"image": ""}, "missing required cell 'image' (image)"),
]


def _write_csv(root, records, extra_cells_row=None):
    """A CSV whose second data row holds a two-line quoted text, so data rows and file lines differ."""
    path = root / "bad.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "audio", "text", "label"])
        for i, record in enumerate(records):
            row = [record["image"], record["audio"], record["text"], record["label"]]
            if i == extra_cells_row:
                row.append("surplus")
            writer.writerow(row)
    return str(path)


def _records_with_bad_rows(text_line_break=True):
    records, expected = [], []
    for i in range(9):
        records.append(_good_row(i))
        if i == 1 and text_line_break:
            records[-1]["text"] = "a text\nover two lines"
        if i < len(BAD):
            change, reason = BAD[i]
            records.append(_good_row(i) | change)
            expected.append((len(records), reason))
    return records, expected


def test_skip_mode_reports_every_bad_csv_row_by_row_and_line(tmp_path):
    root, _ = _folder(tmp_path)
    records, expected = _records_with_bad_rows()
    records.append(_good_row(0))
    manifest = _write_csv(root, records, extra_cells_row=len(records) - 1)
    expected.append((len(records), "the row has 5 cells, the header has 4"))
    report = build.build(manifest, str(tmp_path / "out"), on_error="skip", classes=CLASSES.split(","),
                         progress=False)
    assert report.skipped == len(expected) == 8
    got = [(b.row, b.reasons) for b in report.bad_rows]
    assert [r for r, _ in got] == [r for r, _ in expected]
    for (_, reasons), (_, reason) in zip(got, expected, strict=True):
        assert len(reasons) == 1 and reasons[0].startswith(reason), (reasons, reason)
    # Rows after the two-line text sit one file line further down (line = row + 1 for the header, + 1).
    lines = {b.row: b.line for b in report.bad_rows}
    assert lines[2] == 3 and lines[4] == 6
    assert sum(report.examples.values()) == 9 and report.classes == ("class_0", "class_1", "class_2")
    saved = json.loads((tmp_path / "out" / build.REPORT_FILENAME).read_text())
    assert saved["skipped"] == 8 and saved["bad_rows"][0]["message"].startswith("row 2 (line 3): missing file")
    # Every written example decodes; none of the bad ones was written.
    dataset = get_dataset(ml_collections.ConfigDict({"name": "files", "data_dir": str(tmp_path / "out")}))
    rows = sorted(int(dataset.source(s)[i]["row"]) for s in dataset.splits for i in range(dataset.splits[s]))
    assert rows == [r for r in range(1, len(records)) if r not in dict(expected)]


def test_jsonl_manifest_with_blank_and_broken_lines(tmp_path):
    root, _ = _folder(tmp_path)
    records, expected = _records_with_bad_rows(text_line_break=False)
    lines = [json.dumps(r) for r in records]
    lines.insert(3, "")  # A blank line: not a row, but a line.
    lines.append("{not json")
    lines.append("[1, 2]")
    (root / "bad.jsonl").write_text("\n".join(lines) + "\n")
    report = build.build(str(root / "bad.jsonl"), str(tmp_path / "out"), on_error="skip",
                         classes=CLASSES.split(","), progress=False)
    got = {b.row: (b.line, b.reasons[0]) for b in report.bad_rows}
    assert len(got) == report.skipped == 9
    assert got[2] == (2, "missing file: image 'images/missing.png' (" + str(root / "images" / "missing.png") + ")")
    assert got[4][0] == 5  # After the blank line: data row 4 is file line 5.
    assert got[len(records) + 1][1].startswith("the row is not valid JSON")
    assert got[len(records) + 2][1] == "the row is not a JSON object but list"
    assert sum(report.examples.values()) == 9


def test_stop_mode_raises_at_the_first_bad_row_and_writes_nothing(tmp_path):
    root, _ = _folder(tmp_path)
    records, _ = _records_with_bad_rows()
    manifest = _write_csv(root, records)
    with pytest.raises(build.BadRowError, match=r"^row 2 \(line 3\): missing file: image 'images/missing.png'"):
        build.build(manifest, str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()
    # The command line: exit status 1 and the same message; skip mode prints the count and the rows.
    with pytest.raises(SystemExit) as exit_info:
        build.main(["--manifest", manifest, "--out", str(tmp_path / "out"), "--quiet"])
    assert exit_info.value.code == 1


def test_command_line_skip_mode_prints_the_summary(tmp_path, capsys):
    root, _ = _folder(tmp_path)
    records, _ = _records_with_bad_rows()
    manifest = _write_csv(root, records)
    build.main(["--manifest", manifest, "--out", str(tmp_path / "out"), "--on-error", "skip", "--quiet",
                "--classes", CLASSES, "--val-fraction", "0.2", "--test-fraction", "0.2"])
    out = capsys.readouterr().out
    assert "skipped rows: 7 (row = 1-based data row, line = file line):" in out
    assert "row 6 (line 8): unreadable audio 'bad/not_audio.wav'" in out
    assert "examples: train 5, validation 2, test 2 (total 9)" in out
    assert "--config.data.name=files --config.data.data_dir=" in out
    with pytest.raises(SystemExit):  # The output folder is never replaced silently.
        build.main(["--manifest", manifest, "--out", str(tmp_path / "out"), "--on-error", "skip", "--quiet"])
    assert "already exists; pass --overwrite" in capsys.readouterr().err


def test_resample_and_optional_modalities(tmp_path):
    root, _ = _folder(tmp_path)
    records = [_good_row(i) for i in range(9)]
    records[2]["audio"] = "bad/rate16k.wav"
    records[4]["audio"] = ""
    records[7]["audio"] = ""
    manifest = _write_csv(root, records)
    report = build.build(manifest, str(tmp_path / "required"), on_error="skip", resample=True, progress=False)
    assert [(b.row, b.reasons) for b in report.bad_rows] == [
        (5, ("missing required cell 'audio' (audio)",)), (8, ("missing required cell 'audio' (audio)",))]
    out = str(tmp_path / "optional")
    report = build.build(manifest, out, resample=True, optional=("audio",), progress=False,
                         val_fraction=0.0, test_fraction=0.0)
    assert report.skipped == 0 and report.examples == {"train": 9} and report.optional == ("audio",)
    config = ml_collections.ConfigDict({"name": "files", "data_dir": out, "modalities": ("audio", "image"),
                                        "preprocess": {"audio": "crop_or_pad(2000)|log_mel(n_mels=8)"}})
    dataset = get_dataset(config)
    source = dataset.source("train")
    by_row = {int(source[i]["row"]): source[i] for i in range(len(source))}
    assert by_row[3]["audio"].shape == (2000,)  # 0.25 s at 16 kHz, stored resampled to 8 kHz.
    assert by_row[5]["audio_mask"] == 0 and not by_row[5]["audio"].any() and by_row[1]["audio_mask"] == 1
    assert by_row[5]["audio"].shape == by_row[1]["audio"].shape  # The placeholder: the first clip's length.
    batch = next(pipeline.eval_batches(dataset, "train", global_batch_size=16))
    valid = batch[pipeline.VALID_KEY] == 1
    masks = batch["audio_mask"][valid]
    assert sorted(masks.tolist()) == [0.0, 0.0] + [1.0] * 7
    assert not batch["audio"][valid][masks == 0].any() and batch["audio"][valid][masks == 1].any()
    assert pipeline.input_spec(dataset, "train")["audio_mask"] == ((), "float32")


def test_split_column_and_carved_splits(tmp_path):
    root, _ = _folder(tmp_path)
    records = [_good_row(i) | {"split": ("train", "train", "val_a", "test")[i % 4]} for i in range(9)]
    records[5]["split"] = "no good"
    path = root / "splits.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    report = build.build(str(path), str(tmp_path / "out"), on_error="skip", progress=False)
    # No "validation" in the column: one of the 4 train rows is carved as validation (at least one), and said so.
    assert report.examples == {"train": 3, "validation": 1, "test": 2, "val_a": 2}
    assert report.validation_carved == {"from": "train", "fraction": 0.1, "seed": 0, "examples": 1,
                                        "stratified_by": "label"}
    assert "validation: carved from train (1 examples, --val-fraction 0.1, seed 0)" in report.summary()
    saved = json.loads((tmp_path / "out" / build.REPORT_FILENAME).read_text())
    assert saved["validation_carved"]["examples"] == 1
    assert report.bad_rows[0].reasons[0].startswith("invalid split name 'no good'")
    off = build.build(str(path), str(tmp_path / "off"), on_error="skip", val_fraction=0.0, progress=False)
    assert off.examples == {"train": 4, "test": 2, "val_a": 2} and off.validation_carved is None
    half = build.build(str(path), str(tmp_path / "half"), on_error="skip", val_fraction=0.5, progress=False)
    assert half.examples == {"train": 2, "validation": 2, "test": 2, "val_a": 2}
    with pytest.raises(build.ManifestError, match="has a split column; --test-fraction"):
        build.build(str(path), str(tmp_path / "out2"), test_fraction=0.2, progress=False)
    records[0]["split"] = "validation"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(build.ManifestError, match="split column has a validation split; --val-fraction"):
        build.build(str(path), str(tmp_path / "out3"), val_fraction=0.2, on_error="skip", progress=False)
    # Carving without a split column: exact totals, stratified, deterministic in the seed.
    good = [build.GoodRow(r, None, (f"c{r % 4}",), {}, None) for r in range(1, 101)]
    first = build.carve_splits(good, 0.1, 0.2, seed=0)
    assert first == build.carve_splits(good, 0.1, 0.2, seed=0) != build.carve_splits(good, 0.1, 0.2, seed=1)
    counts = {s: sorted(r for r, v in first.items() if v == s) for s in ("train", "validation", "test")}
    assert [len(counts[s]) for s in ("train", "validation", "test")] == [70, 10, 20]
    assert sorted(sum(1 for r in counts["test"] if r % 4 == c) for c in range(4)) == [5, 5, 5, 5]


def _split_of_rows(out):
    dataset = get_dataset(ml_collections.ConfigDict({"name": "files", "data_dir": out}))
    return {int(dataset.source(s)[i]["row"]): s for s in dataset.splits for i in range(dataset.splits[s])}


def _records_with_duplicates(root):
    """24 distinct rows, then 4 copies of row 3, a copy of row 6 under other file names (the same bytes), and row 8's
    files with another label (a different example, not a duplicate)."""
    shutil.copy(root / "images" / "0005.png", root / "images" / "copy5.png")
    shutil.copy(root / "audio" / "0005.wav", root / "audio" / "copy5.wav")
    records = [_good_row(i) for i in range(24)] + [_good_row(2)] * 4
    records.append(_good_row(5) | {"image": "images/copy5.png", "audio": "audio/copy5.wav"})
    records.append(_good_row(7) | {"label": "class_0"})
    return records


def test_duplicate_rows_are_reported_and_kept_in_one_split(tmp_path, capsys):
    """The probe: identical manifest rows used to be carved into different splits (trained and tested on) without a
    word. Rows 25-28 copy row 3; row 29 is row 6 under other file names."""
    root, _ = _folder(tmp_path, n=24)
    manifest = _write_csv(root, _records_with_duplicates(root))
    out = str(tmp_path / "out")
    build.main(["--manifest", manifest, "--out", out, "--quiet", "--val-fraction", "0.3", "--test-fraction", "0.3"])
    printed = capsys.readouterr().out
    assert ("duplicate rows: 5 copies of 2 examples, kept in the split of their group's first row (--dedup drops "
            "them): row 25 (line 26) = row 3 (line 4); row 26 (line 27) = row 3 (line 4)") in printed
    saved = json.loads((tmp_path / "out" / build.REPORT_FILENAME).read_text())["duplicates"]
    assert saved["copies"] == 5 and saved["examples"] == 2 and saved["action"] == "kept, each group in one split"
    assert saved["first"][0] == {"row": 25, "line": 26, "same_as_row": 3, "same_as_line": 4}
    assert saved["first"][-1] == {"row": 29, "line": 30, "same_as_row": 6, "same_as_line": 7}
    split_of = _split_of_rows(out)
    assert len(split_of) == 30  # All kept ...
    assert len({split_of[r] for r in (3, 25, 26, 27, 28)}) == 1 and split_of[29] == split_of[6]  # ... together.
    # Without duplicates the carving is what it always was (carve_splits over every row).
    unique = str(tmp_path / "unique")
    report = build.build(_write_csv(root, [_good_row(i) for i in range(24)]), unique, val_fraction=0.3,
                         test_fraction=0.3, progress=False)
    assert report.duplicates.groups == [] and "duplicate rows: none" in report.summary()
    rows = [build.GoodRow(i + 1, None, (f"class_{i % 3}",), {}, None) for i in range(24)]
    assert _split_of_rows(unique) == build.carve_splits(rows, 0.3, 0.3, seed=0)


def test_dedup_drops_copies_and_a_split_column_copy_moves_to_its_first_rows_split(tmp_path):
    root, _ = _folder(tmp_path, n=24)
    records = _records_with_duplicates(root)
    out = str(tmp_path / "dedup")
    report = build.build(_write_csv(root, records), out, dedup=True, progress=False)
    assert report.duplicates.copies == 5 and report.duplicates.dropped
    assert sorted(_split_of_rows(out)) == [r for r in range(1, 31) if r not in (25, 26, 27, 28, 29)]
    assert "dropped (--dedup)" in report.summary()
    splits = ["train"] * 24 + ["train", "test", "validation", "train", "test", "test"]
    with_splits = [r | {"split": s} for r, s in zip(records, splits)]
    path = root / "splits.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in with_splits))
    report = build.build(str(path), str(tmp_path / "column"), progress=False)
    assert [(c.row, a, b) for c, a, b in report.duplicates.moved] == [
        (26, "test", "train"), (27, "validation", "train"), (29, "test", "train")]
    split_of = _split_of_rows(str(tmp_path / "column"))
    assert {split_of[r] for r in (3, 25, 26, 27, 28, 29)} == {"train"} and split_of[30] == "test"
    assert "3 copies listed in another split than their first row, moved there: row 26 (line 26) test -> train" \
        in report.summary()


def test_multilabel_text_files_and_the_dataset_tokenizer(tmp_path):
    root, _ = _folder(tmp_path)
    (root / "text").mkdir(exist_ok=True)
    records = []
    for i in range(8):
        (root / "text" / f"{i}.txt").write_text(f"a caption about square {i}")
        records.append({"text": f"text/{i}.txt", "label": ["class_0;class_1", "class_2", "class_1;class_2"][i % 3]})
    (root / "text" / "empty.txt").write_text(" \n")
    records.append({"text": "text/empty.txt", "label": "class_0"})
    records.append({"text": "text/none.txt", "label": "class_0"})
    path = root / "multi.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(records)
    out = str(tmp_path / "out")
    report = build.build(str(path), out, on_error="skip", text_files=True, label_sep=";", progress=False,
                         val_fraction=0.25, test_fraction=0.0)
    assert [(b.row, b.reasons[0].split(" (")[0]) for b in report.bad_rows] == [
        (9, "empty text in 'text'"), (10, "missing file: text 'text/none.txt'")]
    assert report.task == "multilabel" and report.modalities == ("text",)
    assert os.path.exists(os.path.join(build.dataset_dir(out), build.TOKENIZER_FILENAME))
    dataset = get_dataset(ml_collections.ConfigDict({"name": "files", "data_dir": out, "max_len": 12}))
    assert dataset.task == "multilabel" and dataset.num_classes == 3
    raw = dataset.source("train")[0]
    example = dataset.preprocess(raw)
    assert example["text"].shape == (12,) and example["text"][0] == 2  # [CLS] of the trained WordPiece.
    expected = [[1, 1, 0], [0, 0, 1], [0, 1, 1]][(int(raw["row"]) - 1) % 3]  # The label pattern of the rows.
    np.testing.assert_array_equal(example["label"], expected)
    with pytest.raises(ValueError, match=r"needs multi-hot vectors of shape \(3,\): use multi_hot"):
        get_dataset(ml_collections.ConfigDict({"name": "files", "data_dir": out,
                                               "preprocess": {"label": "cast('int32')"}}))


def test_config_errors_name_the_problem(tmp_path):
    root, manifest = _folder(tmp_path)
    with pytest.raises(build.ManifestError, match=r"--column label=class: the manifest has no column 'class'"):
        build.build(manifest, str(tmp_path / "o"), columns={"label": "class"}, progress=False)
    with pytest.raises(build.ManifestError, match=r"--optional video: not a modality column"):
        build.build(manifest, str(tmp_path / "o"), optional=("video",), progress=False)
    with pytest.raises(build.ManifestError, match=r"--tokenizer /nowhere.json: .*no tokenizer file there"):
        build.build(manifest, str(tmp_path / "o"), tokenizer="/nowhere.json", progress=False)
    assert not (tmp_path / "o").exists()
    with pytest.raises(FileNotFoundError, match=r"no files 1.0.0 dataset there"):
        get_dataset(ml_collections.ConfigDict({"name": "files", "data_dir": str(tmp_path / "nothing")}))


@pytest.fixture(scope="module")
def built_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("own")
    manifest = build.write_example_folder(str(tmp / "raw"), 48, num_classes=3, sample_rate=8000, seconds=0.5,
                                          image_sizes=(10, 12), text=False)
    out = str(tmp / "built")
    build.build(manifest, out, progress=False)
    return out


@pytest.mark.slow  # ~20-30 s on 2 shared cores, nearly all of it XLA compiling the init and train step.
def test_a_built_dataset_trains_with_an_experiment_config(built_dir):
    """image + audio + label with the AV-Digits experiment's models and op chains with random crops and SpecAugment:
    the trainer's setup builds the model for the dataset, its train step runs on the pipeline's batches and the
    evaluation covers the test split (loop.run adds checkpoints and outputs, tested in tests/train)."""
    import jax


    config = config_lib.apply_overrides(av_digits.get_config(), tiny_overrides(built_dir))
    data = config.data.to_dict()
    data.pop("target")
    data.update(name="files", preprocess={
        "image": "decode|resize(10)|random_crop(8)|flip_lr|normalize",
        "audio": "random_crop_or_pad(3600)|log_mel(n_mels=16)|standardize|spec_augment(freq_width=3)",
    })
    config.data = data
    config.model.num_classes = 3
    s = setup_lib.setup(config)
    assert s.spec["image"] == ((8, 8, 3), "float32") and s.spec["audio"] == ((42, 16), "float32")
    state = jax.jit(s.init_fn, out_shardings=s.state_sharding)(jax.random.PRNGKey(0))
    batches = iter(pipeline.train_dataset(s.dataset, "train", global_batch_size=16, seed=0))
    step_fn = s.train_step_fn()
    losses = []
    for _ in range(3):
        host = next(batches)
        pipeline.check_batch(host, s.spec, 16)
        state, metrics = step_fn(state, pipeline.to_global({k: host[k] for k in s.keys}, s.batch_sharding))
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)) and int(state.step) == 3
    test = s.evaluate(state, "test")
    assert test["num_examples"] == 5 and 0.0 <= test["accuracy"] <= 1.0
