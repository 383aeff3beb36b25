"""AV-Digits: image-only, audio-only, early (concat) and late (mean of logits) fusion on the embedded dataset.

Command (the main job; builds the dataset on first use; ~3 min on 2 CPU cores in all):

    python -m experiments.av_digits --workdir /tmp/av

Override any config key, e.g. `--config.variants=early,late --config.train.num_steps=1000`.
Expected test results (seed 0, jax 0.10.2, 2 AMD EPYC cores; other CPUs differ by about the seed-to-seed
spread, see README "Results"):

    | model | accuracy | macro_f1 |
    | image | 0.8611   | 0.8610   |
    | audio | 0.8611   | 0.8613   |
    | early | 0.9639   | 0.9642   |
    | late  | 0.9667   | 0.9667   |
"""

from __future__ import annotations

import ml_collections

from mmjax import compare, experiment  # Light on purpose: the trainer (and JAX) are imported to run, after start-up.
from mmjax.config import base_config


def get_config() -> ml_collections.ConfigDict:
    config = base_config()  # The optimizer, schedule, mesh, eval and checkpoint defaults are this experiment's.
    config.name = "av_digits"
    config.variants = ("image", "audio", "early", "late")
    config.data.name = "av_digits"
    config.data.target = "digit"  # "digit" (10 classes), "value" (regression), "digit_pair" (multi-label); see tasks.
    config.data.audio = dict(n_fft=256, hop_length=160, n_mels=40)
    config.model = dict(
        num_classes=10,
        encoders=dict(
            # conv_impl: "auto" = mmjax's fast-backward convolution on CPU, XLA's elsewhere; "xla" / "cpu" force one.
            image=dict(name="small_cnn", features=(32, 64), pool_after=(1,), width=128, dropout=0.1, conv_impl="auto"),
            audio=dict(name="spectrogram_cnn", features=(16, 32, 64), width=128, dropout=0.1, conv_impl="auto"),
        ),
        fusion=dict(name="concat"),
        head=dict(name="classifier", hidden=(128,), dropout=0.2),
        modality_dropout=0.0,  # Training only: drop each modality of each example with this probability.
    )
    return config


VARIANTS = {
    "image": compare.unimodal("image"),
    "audio": compare.unimodal("audio"),
    "early": compare.fusion("concat"),
    "late": compare.fusion("late"),
}

if __name__ == "__main__":
    experiment.main(__name__)
