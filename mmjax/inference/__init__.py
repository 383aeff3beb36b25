"""Running a trained model on raw examples: your own files or in-memory arrays -> the evaluation preprocessing of
the workdir's dataset -> model outputs, data-parallel over every device of every process.

`raw_examples`: manifests (the columns of `mmjax.data.build`) read row by row, each row's cells read as raw
values (`mmjax.data.raw_inputs`) and turned into the model's inputs by `Preparer` (masks for a missing optional
modality, clear reasons for bad rows). `batch_runner`: `Runner` runs a jitted per-example function of the model
(the task's outputs, one tower's embeddings, ITM scores) over many prepared examples, in row order, padding the
last batch, with a progress bar.

Layer: between `mmjax.evaluate` (whose per-example output functions it shares) and `mmjax.train`. It does not
load workdirs: it takes what `mmjax.train.workdir.load_trained` returns (a `Setup`, read through the attributes
it needs, like the evaluators' `EvalContext`, and a train state), so `mmjax.predict`, `mmjax.search` and
`mmjax.export` (the launch layer) load once and use it, and nothing below the launch layer depends on it.
"""

from mmjax.inference.batch_runner import Absent, Runner, RunResult, embed_step, itm_step, output_step
from mmjax.inference.raw_examples import Manifest, Preparer, RowError, model_kind, read_manifest

__all__ = ["Absent", "Manifest", "Preparer", "RowError", "RunResult", "Runner", "embed_step", "itm_step", "model_kind",
           "output_step", "read_manifest"]
