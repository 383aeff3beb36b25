"""Shapes-Captions: image captioning with a text decoder trained from scratch (cross-attention and prefix-LM).

Command (builds the dataset on first use, ~10 s):

    python -m experiments.shapes_caption --workdir /tmp/shapes_caption

Both variants train the same small ViT (32x32 renders) and a 2-layer causal text decoder over the dataset's own
word-level tokens with teacher-forced next-token cross-entropy (one of the 4 captions per scene, drawn per example
and epoch). `cross`: the decoder cross-attends to the image tokens (CoCa's captioner, Yu et al. 2022); `prefix`:
the projected image tokens are a bidirectional prefix of the decoder's sequence (PaliGemma-style prefix-LM). The
`captioning` evaluator then generates a caption per image (greedy, key/value cache) on `test` (every scene holds a
colour-shape pair never seen in training) and `test_seen`, and reports BLEU-4 (sacrebleu), CIDEr (pycocoevalcap),
exact match against any of the 4 references and what the dataset's caption parser finds true of the scene;
generated captions go to WORKDIR/<variant>/samples.jsonl and captions_<split>.png. No pretrained text weights
exist offline for this grammar: the decoder is trained from scratch.

Expected results (seed 0, jax 0.10.2, 2 shared CPU cores, ~10 min for both variants; README "Captioning"):

    | model  | split     | bleu4 | cider  | exact_match | grammatical | attributes_true | caption_true | token_acc |
    | cross  | test      | 52.49 | 2.7114 | 0.0000      | 1.0000      | 0.0080          | 0.0060       | 0.7227    |
    | prefix | test      | 49.57 | 2.3854 | 0.0000      | 1.0000      | 0.0110          | 0.0100       | 0.7031    |
    | cross  | test_seen | 62.05 | 3.8915 | 0.1060      | 1.0000      | 0.2300          | 0.1820       | 0.7691    |
    | prefix | test_seen | 56.53 | 3.3968 | 0.0880      | 1.0000      | 0.1560          | 0.1420       | 0.7339    |

Every generated caption is in the grammar, but at this size and schedule (1,000 steps of 64) fewer than a fifth
of the seen-pair scenes get a caption that is entirely true, and almost no `test` scene does: naming a colour-shape
pair never seen in training is exactly what the decoder does not do.

Your own files (README "Your own data"): a manifest of images and their captions (`image,text` columns), or of
audio clips and their transcripts (`audio,text`), built with `python -m mmjax.data.build` (`--paired` when it
also has a label column), trains the same two variants with the `files` preset (images, the ViT above over
`decode|resize(32)|normalize`) or `files_audio` (the decoder over a spectrogram CNN's time steps). The text is the
decoder's target, tokenised by the build's own tokenizer, whose size the build prints:

    python -m experiments.shapes_caption --preset files --workdir /tmp/my_captions \
        --config.data.data_dir=/data/my_captions --config.model.decoder.vocab_size=V

The captioning evaluator then reports BLEU-4, CIDEr and exact match on `test` (each example's text its one
reference; there is no caption parser for your captions), the best checkpoint is the one of highest validation
CIDEr, and samples.jsonl (with each example's manifest row) and, for images, captions_<split>.png are written.
"""

from __future__ import annotations

import ml_collections

from mmjax import experiment
from mmjax.config import base_config

METRICS = ("bleu4", "cider", "exact_match", "grammatical", "attributes_true", "caption_true", "token_accuracy")
OWN_FILES_METRICS = ("bleu4", "cider", "exact_match", "token_accuracy")  # No caption parser for own captions.

_FILES = [
    "data.name=files",
    "data.max_len=32",  # Text ids per caption ([CLS] ... [SEP]), the files dataset's default.
    "model.decoder.max_len=32",
    "eval.splits=validation,test",
    "checkpoint.best_metric=validation/cider",
]
# Own files (module docstring): data.data_dir and model.decoder.vocab_size come from the build.
PRESETS = {
    "files": _FILES,
    "files_audio": [
        *_FILES,
        "model.encoders={'audio': {'name': 'spectrogram_cnn', 'features': (16, 32, 64), 'width': 64}}",
        "model.decoder.condition=('audio',)",
    ],
}


def get_config() -> ml_collections.ConfigDict:
    config = base_config()
    config.name = "shapes_caption"
    config.variants = ("cross", "prefix")
    config.data.name = "shapes_captions"
    config.data.tokenizer = ""  # The dataset's word-level tokenizer (38 tokens): model.decoder.vocab_size.
    config.data.max_len = 24
    config.data.batch_size = 64
    config.model = dict(
        name="captioner",
        num_classes=5,
        dtype="",
        encoders=dict(
            image=dict(name="vit", patch_size=4, width=64, depth=2, num_heads=4, mlp_dim=128, posemb="learned",
                       pool="mean"),
        ),
        decoder=dict(mode="cross", condition=("image",), vocab_size=38, max_len=24, width=64, depth=2,
                     num_heads=4, mlp_dim=128),
    )
    config.task = dict(name="caption", label_smoothing=0.0)
    config.optimizer.update(lr=1e-3, warmup_steps=100, weight_decay=0.05, b2=0.98)
    config.train.update(num_steps=1000, log_every_steps=100, eval_every_steps=500)
    config.eval.splits = ("validation", "test", "test_seen")
    config.eval.evaluators = ("split_metrics", "captioning")
    config.eval.captioning = dict(method="greedy", grid=16)
    config.checkpoint.update(every_steps=500, keep=1, best_metric="validation/caption_true")
    return config


def _cross(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config.model.decoder.mode = "cross"
    return config


def _prefix(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    config.model.decoder.mode = "prefix"
    return config


VARIANTS = {"cross": _cross, "prefix": _prefix}


def run(config: ml_collections.ConfigDict, workdir: str):
    """Both variants, compared on `test` by `METRICS`, or by `OWN_FILES_METRICS` on other data (own files)."""
    from mmjax import compare

    metrics = METRICS if config.data.name == "shapes_captions" else OWN_FILES_METRICS
    return compare.run_variants(config, workdir, VARIANTS, metrics=metrics)

if __name__ == "__main__":
    experiment.main(__name__)
