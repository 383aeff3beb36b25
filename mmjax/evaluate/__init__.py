"""Evaluation of trained states, behind one interface (`evaluator.Evaluator`, chosen by name from `config.eval`).

`outputs` runs the model over a split and gathers per-example outputs; the evaluators: `split_metrics` (the task's
exact metrics and loss), `zero_shot` (classification by class prompts), `robustness` (noisy and missing
modalities), `classical` (SVM / random-forest late fusion on encoder features), `modality_diagnostics` (how much a
fused classifier relies on each modality), `captioning` (generated captions: BLEU-4, CIDEr, exact match, attributes
checked against the scene), `vqa` (generated answers, accuracy per question type), `transcription` (speech-to-text
by a CTC head or a text decoder: word error rate, sequence accuracy); `features` extracts pooled encoder features
for any further analysis.
"""

from mmjax.evaluate import (  # noqa: F401  (register their evaluators)
    captioning,
    classical,
    diagnostics,
    robustness,
    split_metrics,
    transcription,
    vqa,
    zero_shot,
)
from mmjax.evaluate.evaluator import EVALUATORS, Evaluator, build_evaluators, evaluate

__all__ = ["EVALUATORS", "Evaluator", "build_evaluators", "evaluate"]
