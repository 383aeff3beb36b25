"""The package's shape (README "Architecture"): one file name per module, a loop that only orchestrates, and
registries filled by importing their facades. The import layers and the absence of cycles are import-linter's
contracts (`.importlinter`, run by the README's test command as `lint-imports`)."""

import os
import subprocess
import sys

from tests.conftest import REPO_ROOT

PACKAGE = os.path.join(REPO_ROOT, "mmjax")


def test_no_two_modules_share_a_file_name():
    owners: dict[str, list[str]] = {}
    for directory, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py") and name not in ("__init__.py", "__main__.py"):
                owners.setdefault(name, []).append(os.path.relpath(os.path.join(directory, name), REPO_ROOT))
    assert not {name: paths for name, paths in owners.items() if len(paths) > 1}


def test_the_train_loop_only_orchestrates():
    with open(os.path.join(PACKAGE, "train", "loop.py")) as f:
        assert len(f.readlines()) <= 300


def test_importing_the_facades_registers_every_part():
    code = (
        "from mmjax.data import datasets, ops; from mmjax import evaluate, tasks; from mmjax.nn import builder; "
        "from mmjax import registry as r; "
        "print('|'.join(','.join(x) for x in (datasets.dataset_names(), r.PREPROCESS_OPS.names(), "
        "tasks.TASKS.names(), evaluate.EVALUATORS.names(), r.ENCODERS.names(), r.FUSIONS.names(), r.HEADS.names())))"
    )
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    datasets, ops, tasks, evaluators, encoders, fusions, heads = (x.split(",") for x in out.stdout.strip().split("|"))
    assert datasets == ["av_digits", "av_mnist", "coco_captions", "coco_objects", "files", "intents",
                        "shapes_captions", "shapes_vqa", "spoken_numbers", "synthetic"]
    assert ops == sorted([
        "decode", "resize", "resize_small", "center_crop", "random_crop", "random_resized_crop", "flip_lr",
        "flip_ud", "randaugment", "normalize", "resample", "crop_or_pad", "random_crop_or_pad", "log_mel",
        "spec_augment", "tokenize", "pad_or_truncate", "one_hot", "multi_hot", "standardize", "cast", "mfcc",
        "deltas", "cmvn",
    ])
    assert tasks == ["caption", "classification", "clip", "coca", "ctc", "itm", "multilabel", "regression",
                     "siglip"]
    assert evaluators == ["captioning", "classical", "modality_diagnostics", "robustness", "split_metrics",
                          "transcription", "vqa", "zero_shot"]
    assert {"small_cnn", "vit", "resnet18", "text_transformer", "minilm_l6", "spectrogram_cnn", "ast",
            "tabular_mlp", "vgg", "rnn"} <= set(encoders)
    assert len(fusions) == 16 and {"concat", "late", "bottleneck", "serial", "film"} <= set(fusions)
    assert heads == ["classifier", "regressor"]
