"""Evaluation beyond the training loop's metrics: robustness to noisy/missing modalities and classical baselines.

Pure numpy/sklearn (matplotlib for plots); no JAX import.
"""

from mmjax.evaluate.classical import classical_late_fusion, majority_vote, make_classifier
from mmjax.evaluate.robustness import (
    DEFAULT_NOISE_LEVELS,
    add_noise,
    area_under_curve,
    drop_modality,
    evaluate_robustness,
    modality_scale,
    plot_robustness,
    robustness_table,
)

__all__ = [
    "DEFAULT_NOISE_LEVELS",
    "add_noise",
    "area_under_curve",
    "classical_late_fusion",
    "drop_modality",
    "evaluate_robustness",
    "majority_vote",
    "make_classifier",
    "modality_scale",
    "plot_robustness",
    "robustness_table",
]
