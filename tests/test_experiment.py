"""mmjax.experiment, the one experiment loader: names, paths and presets resolved, configs built, runs chosen."""

import json
import os
import pkgutil
import subprocess
import sys

import pytest

import experiments
from experiments import av_digits, clip_throughput, shapes_clip, text_intents
from mmjax import compare, experiment
from mmjax import config as config_lib
from tests.conftest import REPO_ROOT


def test_names_are_the_packaged_experiment_modules():
    assert experiment.names() == sorted(m.name for m in pkgutil.iter_modules(experiments.__path__))
    assert "av_digits" in experiment.names()


@pytest.mark.parametrize("target", [
    "av_digits", "experiments.av_digits", "experiments/av_digits.py", os.path.join(REPO_ROOT, "experiments",
                                                                                  "av_digits.py"),
])
def test_an_experiment_by_name_module_or_path_is_the_packaged_module(target):
    assert experiment.resolve(target) == "av_digits"
    assert experiment.load(target) is av_digits


def test_spec_with_a_preset():
    assert experiment.split("experiments/clip_throughput.py:gpu") == ("experiments/clip_throughput.py", "gpu")
    assert experiment.split("av_digits") == ("av_digits", None)


def test_unknown_experiments_and_files_are_named(tmp_path):
    with pytest.raises(experiment.ExperimentError, match="no experiment 'nope'; experiments: av_digits, "):
        experiment.load("nope")
    with pytest.raises(experiment.ExperimentError, match="no file .*missing.py"):
        experiment.load(str(tmp_path / "missing.py"))
    (tmp_path / "empty.py").write_text("X = 1\n")
    with pytest.raises(experiment.ExperimentError, match="empty has no get_config"):
        experiment.load(str(tmp_path / "empty.py"))
    with pytest.raises(experiment.ExperimentError, match="is not an experiment module in .*experiments: av_digits"):
        experiment.resolve(str(tmp_path / "empty.py"))  # A sweep or a command line needs a packaged one.


def test_an_experiment_file_outside_the_package_is_loaded_from_there(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text("from experiments import av_digits\n\n"
                    "def get_config():\n    config = av_digits.get_config()\n    config.seed = 7\n    return config\n")
    module = experiment.load(str(path))
    assert module.__name__ == "mine" and experiment.config(module).seed == 7


def test_config_applies_the_preset_then_overrides_then_the_variant():
    config = experiment.config(clip_throughput, "gpu", ["data.batch_size=8"])
    assert config.model.encoders.image.name == "vit_b16" and config.data.batch_size == 8
    config = experiment.config(av_digits, overrides=["optimizer.lr=0.1", "model.fusion.name=max"], variant="late")
    expected = av_digits.VARIANTS["late"](config_lib.apply_overrides(av_digits.get_config(), ["optimizer.lr=0.1"]))
    assert config.to_dict() == expected.to_dict() and config.model.fusion.name == "late"
    assert experiment.config(av_digits, overrides=["train.nonfinite=skip"]).train.nonfinite == "skip"
    with pytest.raises(experiment.ExperimentError, match="unknown variant 'fused' of experiments.av_digits; valid: "
                                                         "image, audio, early, late"):
        experiment.config(av_digits, variant="fused")
    with pytest.raises(config_lib.ConfigError, match="unknown preset 'tpu'; valid: gpu"):
        experiment.config(clip_throughput, "tpu")


def test_every_experiment_starts_from_the_base_config():
    base = set(config_lib.flat_keys(config_lib.base_config()))
    kept_out = {"clip_throughput": {"data.data_dir", "mesh.fsdp_min_size"},  # As their earlier config.json files.
                "shapes_clip": {"mesh.fsdp_min_size"}, "shapes_itm": {"mesh.fsdp_min_size"},
                "shapes_lit": {"mesh.fsdp_min_size"}}
    for name in experiment.names():
        keys = set(config_lib.flat_keys(experiment.load(name).get_config()))
        assert base - keys == kept_out.get(name, set()), name


def test_the_run_is_the_experiments_own_else_its_variants_compared(monkeypatch):
    calls = []
    monkeypatch.setattr(compare, "run_variants", lambda config, workdir, variants, metrics: calls.append(
        (workdir, variants, metrics)))
    experiment.runner(av_digits)(av_digits.get_config(), "/w")
    experiment.runner(shapes_clip)(shapes_clip.get_config(), "/s")
    assert calls == [("/w", av_digits.VARIANTS, compare.DEFAULT_METRICS), ("/s", shapes_clip.VARIANTS,
                                                                          shapes_clip.METRICS)]
    assert experiment.runner(text_intents) is text_intents.run


def test_command_runs_a_packaged_experiment_in_a_fresh_process():
    assert experiment.command("experiments/clip_throughput.py", "/w", ["train.num_steps=2"], preset="gpu") == [
        sys.executable, "-m", "experiments.clip_throughput", "--workdir", "/w", "--preset", "gpu",
        "--config.train.num_steps=2"]


def test_main_prints_the_resolved_config(capsys):
    experiment.main("clip_throughput", ["--workdir", "/tmp/unused", "--preset", "gpu", "--print_config",
                                        "--config.seed=3"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == config_lib.normalize(experiment.config(clip_throughput, "gpu", ["seed=3"]).to_dict())


def test_the_launch_layer_and_every_experiment_import_without_jax():
    """The command line re-executes itself before JAX starts (runtime.reexec_with_hugepages): none of this may
    load it."""
    script = ("import importlib, sys\n"
              "import mmjax.cli, mmjax.compare, mmjax.config, mmjax.experiment, mmjax.sweep.command\n"
              "for name in mmjax.experiment.names():\n"
              "    importlib.import_module('experiments.' + name)\n"
              "print(sorted(m for m in ('jax', 'flax', 'numpy', 'matplotlib') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
