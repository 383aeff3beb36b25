"""Shapes-Captions, LiT-style (Zhai et al. 2022): a locked pretrained text tower, an image tower trained to match it.

Command (needs the MiniLM weights package, see README "Pretrained weights"; builds the dataset on first use):

    python -m experiments.shapes_lit --workdir /tmp/shapes_lit

The text tower is all-MiniLM-L6-v2 (`train.init_from`, its own WordPiece tokenizer via `data.tokenizer=minilm`)
and is locked (`train.frozen`: no gradient, no optimizer state); the text projection, the temperature and the
image tower (the small ViT of `experiments/shapes_clip.py`) train with the CLIP loss. It reports the same
retrieval, zero-shot and binding metrics as shapes_clip on the `test` split (held-out colour–shape pairs).
Expected test results (seed 0, jax 0.10.2, 2 shared CPU cores, 7 min 20 s; README "Image–text"):

    | model | i2t_recall@1 | t2i_recall@1 | i2t_recall@5 | zero_shot_top1 | binding_accuracy |
    | lit   | 0.0886       | 0.0808       | 0.2597       | 0.2860         | 0.5663           |

(binding near chance: the locked sentence encoder hardly tells attribute swaps apart; see shapes_clip, 0.86.)
"""

from __future__ import annotations

import ml_collections

from experiments import shapes_clip
from mmjax import experiment


def get_config() -> ml_collections.ConfigDict:
    config = shapes_clip.get_config()
    config.name = "shapes_lit"
    config.variants = ("lit",)
    config.data.tokenizer = "minilm"
    config.data.batch_size = 64
    config.model.encoders.text = dict(name="minilm_l6")
    config.train.init_from = {"encoders_text": "minilm"}
    config.train.frozen = ("encoders_text",)  # Locked: the projection after it still trains.
    config.train.num_steps = 400
    config.train.eval_every_steps = 200
    config.checkpoint.every_steps = 200
    return config


VARIANTS = {"lit": shapes_clip.VARIANTS["clip"]}
METRICS = shapes_clip.METRICS

if __name__ == "__main__":
    experiment.main(__name__)
