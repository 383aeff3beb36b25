"""`python -m mmjax.bench.inputs` in a tiny configuration: input-pipeline rates, train-step rates, table and JSON."""

import json

import pytest

from mmjax.bench import inputs as bench

TINY_MODEL = ["model.encoders.image.features=(4,)", "model.encoders.image.width=16",
              "model.encoders.audio.features=(4,)", "model.encoders.audio.width=16", "model.head.hidden=(16,)",
              "data.batch_size=16"]


@pytest.mark.slow  # ~25 s on 2 shared cores: XLA compiles the tiny model's init and train step.
def test_bench_measures_input_and_step_and_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    overrides = [arg for o in TINY_MODEL for arg in ("--override", f"files:{o}")]
    results = bench.main(["--datasets", "files", "--batches", "3", "--warmup-batches", "1", "--steps", "2",
                          "--files-examples", "24", "--json", str(out), *overrides])
    table = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["target_ratio"] == 5.0 and saved["results"] == json.loads(json.dumps(results))
    (row,) = results
    assert row["dataset"] == "files" and row["experiment"] == "av_digits:early" and row["cache_in_memory"]
    assert row["batch_size"] == 16 and row["devices"] == 8
    assert row["input_examples_per_s"] > 0 and row["step_examples_per_s"] > 0 and row["step_s"] > 0
    assert row["ratio"] == pytest.approx(row["input_examples_per_s"] / row["step_examples_per_s"])
    assert "| dataset | experiment" in table and "| files " in table and ">= 5x" in table


def test_uncached_input_only_and_argument_errors(capsys):
    results = bench.main(["--datasets", "files_uncached", "--batches", "2", "--warmup-batches", "0",
                          "--files-examples", "16", "--no-step", "--override", "files_uncached:data.batch_size=8"])
    (row,) = results
    assert not row["cache_in_memory"] and row["batch_size"] == 8 and row["input_examples_per_s"] > 0
    assert "ratio" not in row and "| files_uncached |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--datasets", "files,imagenet"])
    assert "unknown ['imagenet']; valid: av_digits, intents" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--datasets", "files", "--override", "av_digits:data.batch_size=8"])
    assert "'av_digits' is not among --datasets (files)" in capsys.readouterr().err
