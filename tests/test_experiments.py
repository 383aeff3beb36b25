"""Every experiment module (and the sweep over one) runs end to end, from its command line, in a tiny
configuration (no bit rot)."""

import csv
import json
import os
import pkgutil
import subprocess
import sys

import pytest

import experiments
from mmjax import cli
from tests.conftest import REPO_ROOT, tiny_overrides


def _check_av_digits(workdir, stdout):
    assert "| model (test) | accuracy | macro_f1 |" in stdout
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert set(summary) == {"image", "audio", "early", "late"}
    for splits in summary.values():
        assert splits["test"]["num_examples"] == 360


def _check_av_digits_tasks(workdir, stdout):
    multilabel = json.load(open(os.path.join(workdir, "multilabel", "summary.json")))
    regression = json.load(open(os.path.join(workdir, "regression", "summary.json")))
    assert set(multilabel) == set(regression) == {"early", "late"}
    assert 0 <= multilabel["early"]["test"]["mAP"] <= 1 and "micro_f1" in multilabel["late"]["test"]
    assert regression["early"]["test"]["mae"] > 0 and "pearson" in regression["late"]["test"]


# Every fusion method's forward and backward pass is tested in tests/nn/test_fusion.py; the tiny benchmark run
# covers each kind (unimodal, feature-level, transformer, decision-level) to keep CI short. All 19 methods ran
# tiny in ~10 min on a loaded 2-core machine.
# `film` also runs the model's serial path (conditioning inside the encoder) through robustness and feature extraction.
TINY_METHODS = ("image_only", "audio_only", "concat", "bottleneck", "late_product", "film")


def _check_fusion_benchmark(workdir, stdout):
    rows = list(csv.DictReader(open(os.path.join(workdir, "results.csv"))))
    methods = [r["method"] for r in rows]
    assert methods[: len(TINY_METHODS)] == list(TINY_METHODS)
    assert {"classical_svm_average", "classical_svm_vote"} <= set(methods)
    for row in rows[: len(TINY_METHODS)]:
        assert 0 <= float(row["accuracy_mean"]) <= 1 and int(row["parameters"]) > 0
        assert float(row["step_ms"]) > 0 and float(row["peak_memory_mb"]) > 0
    for name in ("results.md", "robustness.md", "robustness.png", "benchmark.json"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0
    assert os.listdir(os.path.join(workdir, cli.COMPILE_CACHE_DIR))  # --compile_cache is on by default here.
    robustness = json.load(open(os.path.join(workdir, "benchmark.json")))["robustness"]
    assert len(robustness["concat"]["noise"]["audio"]) == 6 and set(robustness["concat"]["missing"]) == {
        "audio", "image"}


def _check_text_intents(workdir, stdout):
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert set(summary) == {"frozen", "scratch"}
    assert all(splits["test"]["num_examples"] == 600 for splits in summary.values())
    assert os.path.exists(os.path.join(workdir, "scratch", "tokenizer.json"))  # Trained on the dataset's text.


def _tiny_text_intents(data_dir):
    """Intents builds in a second into any TFDS dir; MiniLM is frozen (fine-tuning adds ~50 s of compile)."""
    values = {
        "data.data_dir": data_dir, "data.batch_size": 16, "data.eval_batch_size": 120, "data.max_len": 16,
        "model.head.hidden": "(16,)", "scratch_encoder.width": 16, "scratch_encoder.depth": 1,
        "scratch_encoder.num_heads": 2, "scratch_encoder.mlp_dim": 32, "scratch_encoder.max_len": 16,
        "scratch_tokenizer.vocab_size": 200, "train.num_steps": 2, "train.log_every_steps": 1,
        "train.eval_every_steps": 2, "checkpoint.every_steps": 2, "optimizer.warmup_steps": 1,
        "eval.splits": "test", "checkpoint.best_metric": "test/accuracy", "variants": "frozen,scratch",
    }
    return [f"{k}={v}" for k, v in values.items()]


def _check_sweep(workdir, stdout):
    assert "trial 2/2: optimizer.lr=0.001" in stdout
    rows = list(csv.DictReader(open(os.path.join(workdir, "leaderboard.csv"))))
    assert [r["rank"] for r in rows] == ["1", "2"] and {r["optimizer.lr"] for r in rows} == {"0.003", "0.001"}
    assert float(rows[0]["validation/accuracy"]) >= float(rows[1]["validation/accuracy"])
    trials = json.load(open(os.path.join(workdir, "sweep.json")))["trials"]
    assert [t["status"] for t in trials] == ["done", "done"]
    for name in ("leaderboard.md", "leaderboard.png"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0
    assert os.listdir(os.path.join(workdir, cli.COMPILE_CACHE_DIR))  # --compile_cache


def _tiny_clip_throughput(data_dir):
    image = "{'name': 'vit', 'patch_size': 8, 'image_size': 16, 'width': 16, 'depth': 1, 'num_heads': 2, 'mlp_dim': 32}"
    text = ("{'name': 'text_transformer', 'vocab_size': 50, 'max_len': 8, 'width': 16, 'depth': 1, 'num_heads': 2, "
            "'mlp_dim': 32, 'causal': True, 'pool': 'eot'}")
    values = {
        "model.encoders.image": image, "model.encoders.text": text, "model.two_tower.embed_dim": 8,
        "data.synthetic.image": "(16, 16, 3)", "data.synthetic.text": "(8,)", "data.synthetic.vocab_size": 50,
        "data.synthetic.pad": 2, "data.batch_size": 16, "data.eval_batch_size": 16, "train.num_steps": 4,
        "train.eval_every_steps": 4, "checkpoint.every_steps": 4,
    }
    return [f"{k}={v}" for k, v in values.items()]


def _check_clip_throughput(workdir, stdout):
    results = json.load(open(os.path.join(workdir, "results.json")))
    test = results["splits"]["test"]
    assert results["step_time_s"] > 0 and test["num_examples"] == 64
    assert 0 <= test["i2t_recall@1"] <= test["i2t_recall@5"] <= test["i2t_recall@10"] <= 1


TINY_SHAPES_SIZES = {"train": 96, "validation": 32, "test": 48, "test_seen": 32}


def _tiny_shapes(data_dir, **extra):
    from mmjax.data import shapes_captions

    shapes_captions.build(data_dir, sizes=TINY_SHAPES_SIZES)  # Small; the experiment then finds it built.
    image = "{'name': 'vit', 'patch_size': 8, 'width': 16, 'depth': 1, 'num_heads': 2, 'mlp_dim': 32}"
    values = {
        "data.data_dir": data_dir, "data.batch_size": 16, "data.eval_batch_size": 32,
        "model.encoders.image": image, "model.two_tower.embed_dim": 8, "train.num_steps": 2,
        "train.log_every_steps": 1, "train.eval_every_steps": 2, "checkpoint.every_steps": 2,
        "optimizer.warmup_steps": 1, **extra,
    }
    return [f"{k}={v}" for k, v in values.items()]


def _check_shapes(variants):
    def check(workdir, stdout):
        summary = json.load(open(os.path.join(workdir, "summary.json")))
        assert set(summary) == set(variants)
        for splits in summary.values():
            test = splits["test"]
            assert test["num_examples"] == TINY_SHAPES_SIZES["test"]
            assert 0 <= test["binding_accuracy"] <= 1 and 0 <= test["zero_shot_top1"] <= 1
            assert test["i2t_recall@1"] <= test["i2t_recall@10"]
    return check


def _check_shapes_itm(workdir, stdout):
    _check_shapes(("dual", "cross"))(workdir, stdout)
    table = open(os.path.join(workdir, "binding.md")).read()
    assert "cross-attention head (ITM logit)" in table and "dual encoder (cosine)" in table
    cross = json.load(open(os.path.join(workdir, "binding.json")))["cross"]["test"]
    assert 0 <= cross["itm_binding_accuracy"] <= 1


def _tiny_shapes_caption(data_dir):
    values = {"model.decoder.width": 16, "model.decoder.depth": 1, "model.decoder.num_heads": 2,
              "model.decoder.mlp_dim": 32, "eval.captioning.grid": 4}
    return [o for o in _tiny_shapes(data_dir, **values) if not o.startswith("model.two_tower")]


def _check_shapes_caption(workdir, stdout):
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert set(summary) == {"cross", "prefix"}
    for variant, splits in summary.items():
        for split in ("test", "test_seen"):
            metrics = splits[split]
            assert 0 <= metrics["bleu4"] <= 100 and metrics["cider"] >= 0 and 0 <= metrics["token_accuracy"] <= 1
            assert 0 <= metrics["caption_true"] <= metrics["attributes_true"] <= metrics["grammatical"] <= 1
        rows = [json.loads(line) for line in open(os.path.join(workdir, variant, "samples.jsonl"))]
        test = [r for r in rows if r["split"] == "test"]
        assert [r["index"] for r in test] == list(range(TINY_SHAPES_SIZES["test"]))
        assert all(len(r["references"]) == 4 and isinstance(r["generated"], str) for r in test)
        assert {r["split"] for r in rows} == {"validation", "test", "test_seen"}
        assert os.path.getsize(os.path.join(workdir, variant, "captions_test.png")) > 0
    assert "| model (test) | bleu4 | cider |" in stdout


def _tiny_shapes_vqa(data_dir):
    values = {"model.decoder.width": 16, "model.decoder.depth": 1, "model.decoder.num_heads": 2,
              "model.decoder.mlp_dim": 32, "eval.splits": "test,test_seen", "checkpoint.best_metric": "test/accuracy"}
    return [o for o in _tiny_shapes(data_dir, **values) if not o.startswith("model.two_tower")]


def _check_shapes_vqa(workdir, stdout):
    results = json.load(open(os.path.join(workdir, "results.json")))
    for split in ("test", "test_seen"):
        metrics = results["splits"][split]
        assert {"accuracy", "accuracy_colour", "accuracy_count", "accuracy_relation"} <= set(metrics)
        assert all(0 <= metrics[k] <= 1 for k in ("accuracy", "accuracy_colour", "token_accuracy"))
    rows = [json.loads(line) for line in open(os.path.join(workdir, "samples.jsonl"))]
    test = [r for r in rows if r["split"] == "test"]
    assert [r["index"] for r in test] == list(range(TINY_SHAPES_SIZES["test"]))
    assert {r["type"] for r in test} == {"colour", "count", "relation"} and all(r["question"] for r in test)


TINY_SPOKEN_SIZES = {"train": 32, "validation": 16, "test": 16}


def _tiny_spoken_numbers(data_dir):
    from mmjax.data import spoken_numbers

    spoken_numbers.build(data_dir, sizes=TINY_SPOKEN_SIZES)  # A few seconds; the experiment then finds it built.
    values = {
        "data.data_dir": data_dir, "data.batch_size": 16, "data.eval_batch_size": 16,
        "model.encoders.audio.width": 16, "model.encoders.audio.depth": 1, "model.encoders.audio.num_heads": 2,
        "model.encoders.audio.mlp_dim": 32, "model.decoder.width": 16, "model.decoder.depth": 1,
        "model.decoder.num_heads": 2, "model.decoder.mlp_dim": 32, "train.num_steps": 2, "train.log_every_steps": 1,
        "train.eval_every_steps": 2, "checkpoint.every_steps": 2, "optimizer.warmup_steps": 1,
    }
    return [f"{k}={v}" for k, v in values.items()]


def _check_spoken_numbers(workdir, stdout):
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert set(summary) == {"ctc", "seq2seq"}
    for variant, splits in summary.items():
        test = splits["test"]
        assert test["wer"] >= 0 and 0 <= test["sequence_accuracy"] <= test["length_accuracy"] <= 1
        rows = [json.loads(line) for line in open(os.path.join(workdir, variant, "samples.jsonl"))]
        assert {r["split"] for r in rows} == {"validation", "test"}
        test_rows = [r for r in rows if r["split"] == "test"]
        assert [r["index"] for r in test_rows] == list(range(TINY_SPOKEN_SIZES["test"]))
        assert all(3 <= len(r["reference"].split()) <= 7 and isinstance(r["hypothesis"], str) for r in test_rows)
        assert test["sequence_accuracy"] == sum(r["correct"] for r in test_rows) / len(test_rows)
    assert 0 <= summary["ctc"]["test"]["blank_fraction"] <= 1 and "perplexity" in summary["seq2seq"]["test"]
    assert "| model (test) | wer | sequence_accuracy | length_accuracy |" in stdout


def _tiny_classic_baselines(data_dir):
    """VGG-11 of width 2, an LSTM of 4 units, 3 steps; Intents: Word2Vec of 8 dimensions, one epoch, 2 steps."""
    values = {
        "data.data_dir": data_dir, "data.batch_size": 16, "data.eval_batch_size": 64,
        "model.encoders.image.width": 2, "model.encoders.image.hidden": "(8,)", "model.encoders.audio.hidden": 4,
        "model.head.hidden": "(8,)", "train.num_steps": 3, "train.log_every_steps": 1, "train.eval_every_steps": 3,
        "checkpoint.every_steps": 3, "optimizer.warmup_steps": 1, "classical.classifiers": "svm",
        "intents.num_steps": 2, "intents.batch_size": 16, "intents.vocab_size": 200,
        "intents.word2vec.vector_size": 8, "intents.word2vec.epochs": 1, "intents.encoder.hidden": 4,
    }
    return [f"{k}={v}" for k, v in values.items()]


def _check_classic_baselines(workdir, stdout):
    rows = json.load(open(os.path.join(workdir, "summary.json")))
    models = [(r["dataset"], r["model"]) for r in rows]
    assert models == [("AV-Digits", m) for m in ("vgg", "lstm_mfcc", "concat", "film")] + [
        ("AV-Digits", "late svm average (vgg + lstm_mfcc features)"),
        ("AV-Digits", "late svm vote (vgg + lstm_mfcc features)"),
        ("Intents", "lstm_word2vec"), ("Intents", "lstm_random")]
    assert all(0 <= r["accuracy"] <= 1 for r in rows) and 0 <= rows[0]["roc_auc"] <= 1
    assert "initialised encoders_text/embed from word_vectors:" in stdout and "coverage 100.0%" in stdout
    inputs = json.load(open(os.path.join(workdir, "av_digits", "lstm_mfcc", "model_inputs.json")))
    assert "39" in json.dumps(inputs)  # 13 MFCCs + deltas + delta-deltas per frame.
    table = open(os.path.join(workdir, "summary.md")).read()
    assert "| dataset | model (test) | accuracy | macro_f1 | roc_auc |" in table


def _check_av_digits_multitask(workdir, stdout):
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert set(summary) == {"digit", "uncertainty"}
    alone, together = (summary[v][0]["test"] for v in ("digit", "uncertainty"))
    assert "accuracy" in alone and "value/mae" not in alone
    # Every head reports its own metrics over the examples with its label.
    assert 0 <= together["digit/accuracy"] <= 1 and together["value/mae"] > 0 and 0 <= together["digit_pair/mAP"] <= 1
    assert together["digit/num_examples"] == together["value/num_examples"] == together["digit_pair/num_examples"]
    assert "| model (test) | digit accuracy | value mae |" in stdout
    lines = [json.loads(line) for line in open(os.path.join(workdir, "uncertainty", "seed_0", "metrics.jsonl"))]
    train = [r for r in lines if r.get("split") == "train"]
    assert train and all(f"weight/{t}" in train[-1] for t in ("digit", "value", "digit_pair"))


# Two runs keep CI short: the image-only baseline and OGM-GE on early fusion (diagnostics, gap, modulation in the
# real loop). Gradient-Blending's weights from the runs' metrics are tested below on written metrics files.
IMBALANCE_METHODS = ("image_only", "concat_ogm_ge")


def _check_av_digits_imbalance(workdir, stdout):
    rows = json.load(open(os.path.join(workdir, "imbalance.json")))["rows"]
    assert [r["method"] for r in rows] == list(IMBALANCE_METHODS)
    by_method = {r["method"]: r for r in rows}
    fused = by_method["concat_ogm_ge"]  # The diagnostics of the fused model, its gap to the image-only model.
    assert 0 <= fused["only_image_accuracy"][0] <= 1 and 0 <= fused["logit_variance_share_audio"][0] <= 1
    assert fused["gap"][0] == fused["accuracy"][0] - by_method["image_only"]["accuracy"][0]
    assert by_method["image_only"]["only_image_accuracy"] is None
    lines = [json.loads(line) for line in open(os.path.join(workdir, "concat_ogm_ge", "seed_0", "metrics.jsonl"))]
    train = [r for r in lines if r.get("split") == "train"]
    assert all(0 < r["ogm/coef_audio"] <= 1 and 0 < r["ogm/coef_image"] <= 1 for r in train)
    assert "| method (test) | accuracy | minus best single modality |" in stdout


# Per experiment: the overrides that make it tiny and a check of its outputs. A new experiment without an entry
# fails the first test.
TINY = {
    "av_digits": (lambda d: tiny_overrides(d, **{"train.num_steps": 3, "train.eval_every_steps": 3}), _check_av_digits),
    "av_digits_tasks": (
        lambda d: tiny_overrides(d, **{"train.num_steps": 3, "train.eval_every_steps": 3, "variants": "early,late"}),
        _check_av_digits_tasks,
    ),
    "fusion_benchmark": (
        lambda d: tiny_overrides(d, **{"train.num_steps": 3, "train.eval_every_steps": 3, "seeds": "0",
                                       "classical.classifiers": "svm", "checkpoint.keep": 1,
                                       "methods": ",".join(TINY_METHODS)}),
        _check_fusion_benchmark,
    ),
    "av_digits_multitask": (
        lambda d: tiny_overrides(d, **{"train.num_steps": 3, "train.eval_every_steps": 3, "seeds": "0",
                                       "variants": "digit,uncertainty"}),
        _check_av_digits_multitask,
    ),
    "av_digits_imbalance": (
        lambda d: tiny_overrides(d, **{"train.num_steps": 3, "train.eval_every_steps": 3, "seeds": "0",
                                       "checkpoint.keep": 1, "methods": ",".join(IMBALANCE_METHODS)}),
        _check_av_digits_imbalance,
    ),
    "text_intents": (_tiny_text_intents, _check_text_intents),
    "classic_baselines": (_tiny_classic_baselines, _check_classic_baselines),
    "clip_throughput": (_tiny_clip_throughput, _check_clip_throughput),
    "shapes_clip": (
        lambda d: _tiny_shapes(d, **{"model.encoders.text.width": 16, "model.encoders.text.depth": 1,
                                     "model.encoders.text.num_heads": 2, "model.encoders.text.mlp_dim": 32}),
        _check_shapes(("clip", "siglip")),
    ),
    "shapes_lit": (_tiny_shapes, _check_shapes(("lit",))),
    "shapes_caption": (_tiny_shapes_caption, _check_shapes_caption),
    "shapes_vqa": (_tiny_shapes_vqa, _check_shapes_vqa),
    "spoken_numbers": (_tiny_spoken_numbers, _check_spoken_numbers),
    "shapes_itm": (
        lambda d: _tiny_shapes(d, **{"model.encoders.text.width": 16, "model.encoders.text.depth": 1,
                                     "model.encoders.text.num_heads": 2, "model.encoders.text.mlp_dim": 32,
                                     "matching.embed_dim": 8, "matching.fusion_dim": 16, "matching.num_layers": 1,
                                     "matching.num_heads": 2, "matching.mlp_dim": 32}),
        _check_shapes_itm,
    ),
}


def test_every_experiment_has_a_tiny_configuration():
    modules = sorted(m.name for m in pkgutil.iter_modules(experiments.__path__))
    assert modules, "no experiment modules found"
    assert sorted(TINY) == modules


@pytest.mark.parametrize("name", sorted(TINY))
def test_experiment_runs_from_the_command_line(name, av_digits_dir, tmp_path):
    overrides, check = TINY[name]
    command = [sys.executable, "-m", f"experiments.{name}", "--workdir", str(tmp_path)]
    command += [o if o.startswith("--") else f"--config.{o}" for o in overrides(av_digits_dir)]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    check(str(tmp_path), result.stdout)


def test_sweep_runs_from_the_command_line(av_digits_dir, tmp_path):
    tiny = tiny_overrides(av_digits_dir, **{"train.num_steps": 3, "train.eval_every_steps": 3, "variants": "early"})
    command = [sys.executable, "-m", "mmjax.sweep", "--workdir", str(tmp_path), "--base=av_digits",
               "--grid=optimizer.lr=[3e-3,1e-3]", "--compile_cache", *(f"--config.{o}" for o in tiny)]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    _check_sweep(str(tmp_path), result.stdout)


def test_experiment_help_and_bad_override(tmp_path):
    command = [sys.executable, "-m", "experiments.av_digits", "--help"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--workdir" in result.stdout
    assert "python -m experiments.av_digits" in result.stdout
    command = [sys.executable, "-m", "experiments.av_digits", "--workdir", str(tmp_path), "--config.optimizer.lr=x"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "config key 'optimizer.lr' expects float" in result.stderr


def test_gradient_blending_weights_are_read_from_the_runs_metrics(tmp_path):
    from experiments import fusion_benchmark

    # (train loss, validation loss) at the evaluations of steps 10 and 20; the train loss is logged every 5 steps.
    losses = {"fused": ((2.0, 2.1), (0.5, 1.1)), "audio": ((2.2, 2.2), (1.0, 1.6)), "image": ((2.3, 2.3), (1.4, 1.5))}
    dirs = {}
    for head, ((t0, v0), (t1, v1)) in losses.items():
        dirs[head] = str(tmp_path / head)
        os.makedirs(dirs[head])
        with open(os.path.join(dirs[head], "metrics.jsonl"), "w") as f:
            for record in ({"step": 5, "split": "train", "loss": 9.0}, {"step": 10, "split": "train", "loss": t0},
                           {"step": 10, "split": "validation", "loss": v0}, {"step": 15, "split": "train", "loss": 9.0},
                           {"step": 20, "split": "train", "loss": t1}, {"step": 20, "split": "validation", "loss": v1}):
                f.write(json.dumps(record) + "\n")
    raw = {}
    for head, ((t0, v0), (t1, v1)) in losses.items():
        raw[head] = (v0 - v1) / max(abs((v1 - t1) - (v0 - t0)), 1e-3) ** 2
    weights = fusion_benchmark.gblend_weights(dirs)
    for head in losses:
        assert abs(weights[head] - raw[head] / sum(raw.values())) < 1e-9
