"""Tasks: one module per objective, all behind `mmjax.tasks.base.Task` and registered by name in `TASKS`.

`supervised` (classification, multilabel, regression), `contrastive` (clip, siglip), `itm` (image-text matching),
`caption` (caption, coca: a text decoder's next-token loss), `ctc` (speech-to-text by CTC on per-frame logits);
their losses are the pure functions of `losses`. Importing this package registers every task.
"""

from mmjax.tasks import caption, contrastive, ctc, itm, supervised  # noqa: F401  (register their tasks)
from mmjax.tasks.base import TASKS, Task, build_task, task_class, task_name

__all__ = ["TASKS", "Task", "build_task", "task_class", "task_name"]
