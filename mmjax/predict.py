"""Predict with a trained workdir on your own files (command line) or on in-memory examples (notebook API).

    python -m mmjax.predict --workdir W --manifest new.csv --out preds.csv [--step best|latest|N] [--batch 256]
        [--format csv|jsonl] [--top-k 5] [--on-error stop|skip] [--column KIND=NAME] [--root DIR] [--text-files]
        [--label-sep ';'] [--quiet] [--coordinator_address HOST:PORT --num_processes N --process_id I]

`W` is one trained model's workdir (for a comparison experiment, `WORKDIR/<variant>`). The manifest has the
columns of `python -m mmjax.data.build` (image / audio / text paths or cells; no label needed). Each input is
preprocessed exactly as the workdir's saved config evaluates (the dataset's `inputs`: same ops, tokenizer, sample
rate; audio at another rate is resampled, a text longer than the context truncated, each said once), so a
prediction on a training file equals the model's output during evaluation. One output row per input row, in
order, with the manifest's other columns (ids, ...) carried:

    classification  prediction, probability, top1, top1_probability, ... top{k}
    multilabel      labels (the classes scored >= task.threshold, ';'-joined), score_<class> for every class
    regression      value (value_<name> for several outputs)
    dual encoder    similarity (cosine of the two towers' embeddings, when a row has both); zero-shot top-k from
                    the dataset's class prompts for image rows (prediction, score, top1, ...); embedding_<modality>
                    in JSONL
    matching (ITM)  the same, plus match_logit and match_probability (the cross-attention head's score)

A `label` column, when present, is scored with the task's metrics (printed and written to OUT.metrics.json).
A missing cell of a modality the model was trained to tolerate (`<m>_mask` among its inputs) is masked, as in
training; a missing required cell, an unreadable file, a value of the wrong shape or an unknown label is a bad
row, reported as the builder reports them, `row R (line L): reason`: `--on-error stop` (default) stops at the
first and writes nothing; `skip` writes it with its `error` and lists them all. Runs data-parallel over every
device, and over several processes with the multi-process flags (each reads only its rows; process 0 writes).

Notebook API (load once, predict many times; inputs are raw values: image bytes or uint8 arrays, waveforms or
`RawAudio(rate, samples)`, texts):

    from mmjax.predict import Predictor
    predictor = Predictor.load("/tmp/av/early", step="best")
    predictor.predict([{"image": image_uint8, "audio": waveform}])   # [{"prediction": "3", "probability": ...}]
    predictor.outputs([...])        # the arrays: probabilities, prediction (as the evaluators see them)
    predictor.embed("image", [image_uint8, ...])                     # [N, D] unit embeddings / pooled features
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mmjax import runtime

DEFAULT_TOP_K = 5


@dataclasses.dataclass
class Predictions:
    """One record per input (JSON-able dicts, in input order), the CSV columns, label metrics, bad rows, notes."""

    kind: str
    records: list[dict[str, Any]]
    columns: list[str]
    metrics: dict[str, Any] | None = None
    bad_rows: list[str] = dataclasses.field(default_factory=list)
    notes: dict[str, str] = dataclasses.field(default_factory=dict)


def _task_kind(setup: Any) -> str:
    from mmjax.inference import model_kind

    if model_kind(setup.model) == "towers":
        return "towers"
    return setup.dataset.task


class Predictor:
    """A trained model ready to predict: `Predictor.load(workdir)`, then `predict` / `outputs` / `embed` on raw
    values, or `predict_manifest` on a manifest (module docstring)."""

    def __init__(self, setup: Any, state: Any, *, batch_size: int | None = None, workdir: str | None = None,
                 step: int | str | None = None):
        from mmjax.inference import Runner

        self.setup, self.state, self.workdir, self.step = setup, state, workdir, step
        self.runner = Runner(setup, state, batch_size)
        self.kind = _task_kind(setup)
        self.class_names = tuple(setup.dataset.class_names)
        self._classes: np.ndarray | None = None

    @classmethod
    def load(cls, workdir: str, step: int | str = "best", batch_size: int | None = None) -> Predictor:
        """Loads `workdir` at `step` ("best", falling back to "latest" when no best metric was recorded;
        "latest"; or a step number) on this machine's devices."""
        from mmjax import reporting
        from mmjax.train.workdir import load_trained

        try:
            setup, state = load_trained(workdir, step)
        except ValueError as error:
            if step != "best" or "best" not in str(error):
                raise
            reporting.console(f"{workdir}: {error}; using the latest checkpoint")
            setup, state = load_trained(workdir, "latest")
        return cls(setup, state, batch_size=batch_size, workdir=workdir, step=int(state.step))

    # ------------------------------------------------------------------------------------------- in memory

    def _preparer(self, modalities: Sequence[str] | None = None):
        from mmjax.inference import Preparer

        return Preparer(self.setup, modalities)

    def outputs(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        """The model's per-example outputs for raw examples (`{modality: raw value}`; a ValueError names the
        first bad one): the task's evaluation outputs (classification: `prediction`, `probabilities`; multilabel:
        `scores`; regression: `prediction`), or for dual encoders `embedding_<modality>` per tower present in
        every example (plus `itm_logit` for a matching model given images and texts)."""
        examples = list(examples)
        if not examples:
            raise ValueError("no examples to predict")
        if self.kind == "towers":
            present = [m for m in sorted(self.setup.config.model.encoders) if all(e.get(m) is not None for e in
                                                                                   examples)]
            if not present:
                raise ValueError(f"every example needs a value for one of the towers "
                                 f"{sorted(self.setup.config.model.encoders)} (the same in every example)")
            result = {}
            for modality in present:
                result[f"embedding_{modality}"] = self.embed(modality, [e[modality] for e in examples])
            if self._is_matching() and {"image", "text"} <= set(present):
                result["itm_logit"] = self._run_pairs(examples)
            return result
        preparer = self._preparer()
        prepared = []
        for i, example in enumerate(examples):
            try:
                prepared.append(preparer(example))
            except ValueError as error:
                raise ValueError(f"example {i}: {error}") from None
        from mmjax.inference import output_step

        run = self.runner.run(self._output_step(output_step), len(prepared), prepared.__getitem__,
                              preparer.placeholder(), on_error="stop")
        return run.outputs

    def predict(self, examples: Sequence[Mapping[str, Any]], top_k: int = DEFAULT_TOP_K) -> list[dict[str, Any]]:
        """One record per example (the columns of the module docstring, as a dict)."""
        outputs = self.outputs(examples)
        if self.kind == "towers":
            return [self._tower_record(outputs, i, top_k) for i in range(len(examples))]
        return [self._record(outputs, i, top_k) for i in range(len(examples))]

    def embed(self, modality: str, values: Sequence[Any]) -> np.ndarray:
        """`[N, D]` float32: a dual encoder's unit embeddings of one tower, or a fusion model's pooled encoder
        features of one modality, for raw values of that modality."""
        from mmjax.inference import embed_step

        preparer = self._preparer([modality])
        values = list(values)
        prepared = [preparer({modality: v}) for v in values]
        step = self._cached(("embed", modality), lambda: embed_step(self.setup.model, modality, self.setup.spec))
        run = self.runner.run(step, len(prepared), prepared.__getitem__, preparer.placeholder(), on_error="stop")
        return run.outputs["embedding"]

    # ------------------------------------------------------------------------------------------- internals

    def _cached(self, key, make):
        cache = self.__dict__.setdefault("_steps", {})
        if key not in cache:
            cache[key] = make()
        return cache[key]

    def _output_step(self, output_step):
        import jax
        import jax.numpy as jnp

        base = self._cached("outputs", lambda: output_step(self.setup.model, self.setup.task))
        if self.kind != "classification":
            return base
        model = self.setup.model

        def with_probabilities(params, model_state, batch):  # Probabilities even past roc_auc_max_classes.
            result = dict(base(params, model_state, batch))
            if "probabilities" not in result:
                inputs = {k: v for k, v in batch.items() if not k.startswith("_")}
                logits = model.apply({"params": params, **model_state}, inputs, train=False)
                result["probabilities"] = jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)
            return result

        return self._cached("outputs_probabilities", lambda: with_probabilities)

    def _is_matching(self) -> bool:
        return type(self.setup.model).__name__ == "MatchingModel"

    def _run_pairs(self, examples: Sequence[Mapping[str, Any]]) -> np.ndarray:
        from mmjax.inference import itm_step

        preparer = self._preparer(["image", "text"])
        prepared = [preparer({"image": e["image"], "text": e["text"]}) for e in examples]
        step = self._cached("itm", lambda: itm_step(self.setup.model))
        return self.runner.run(step, len(prepared), prepared.__getitem__, preparer.placeholder(),
                               on_error="stop").outputs["itm_logit"]

    def class_embeddings(self) -> np.ndarray | None:
        """Zero-shot classes `[C, D]` from the dataset's class prompts (as the zero_shot evaluator builds them),
        or None when the dataset has none."""
        prompts = self.setup.dataset.class_prompts
        if prompts is None or self.kind != "towers" or "text" not in self.setup.config.model.encoders:
            return None
        if self._classes is None:
            import jax

            from mmjax.metrics.retrieval import class_embeddings

            model = self.setup.model
            embed = jax.jit(lambda params, model_state, ids: model.apply(
                {"params": params, **model_state}, "text", ids, method="embed"))
            self._classes = class_embeddings(np.asarray(embed(self.state.params, self.state.model_state,
                                                              np.asarray(prompts))))
        return self._classes

    def _name(self, index: int) -> str:
        return self.class_names[index] if index < len(self.class_names) else str(index)

    def _top(self, scores: np.ndarray, top_k: int, key: str) -> list[dict[str, Any]]:
        order = np.argsort(-scores, kind="stable")[: max(1, top_k)]
        return [{"class": self._name(int(j)), key: float(scores[j])} for j in order]

    def _record(self, outputs: Mapping[str, np.ndarray], i: int, top_k: int) -> dict[str, Any]:
        if self.kind == "classification":
            probabilities = outputs["probabilities"][i]
            top = self._top(probabilities, top_k, "probability")
            return {"prediction": top[0]["class"], "probability": top[0]["probability"], "top": top}
        if self.kind == "multilabel":
            scores = outputs["scores"][i]
            threshold = getattr(self.setup.task, "threshold", 0.5)
            return {"labels": [self._name(j) for j in range(len(scores)) if scores[j] >= threshold],
                    "scores": {self._name(j): float(s) for j, s in enumerate(scores)}}
        values = np.asarray(outputs["prediction"][i], np.float64).reshape(-1)
        if values.size == 1:
            return {"value": float(values[0])}
        return {"values": {self._name(j): float(v) for j, v in enumerate(values)}}

    def _tower_record(self, outputs: Mapping[str, np.ndarray], i: int, top_k: int,
                      present: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
        has = {m: present[m][i] if present is not None else True for m in ("image", "audio", "text")
               if f"embedding_{m}" in outputs}
        record: dict[str, Any] = {}
        towers = [m for m in has if has[m]]
        if len(towers) == 2:
            a, b = (outputs[f"embedding_{m}"][i] for m in towers)
            record["similarity"] = float(np.dot(a.astype(np.float64), b.astype(np.float64)))
        if "itm_logit" in outputs and (present is None or present.get("itm", np.ones(1, bool))[i]):
            logit = float(outputs["itm_logit"][i])
            record["match_logit"] = logit
            record["match_probability"] = float(1.0 / (1.0 + np.exp(-logit)))
        classes = self.class_embeddings()
        if classes is not None and has.get("image"):
            top = self._top(outputs["embedding_image"][i] @ classes.T, top_k, "score")
            record.update(prediction=top[0]["class"], score=top[0]["score"], top=top)
        for m in towers:
            record[f"embedding_{m}"] = [float(x) for x in outputs[f"embedding_{m}"][i]]
        return record

    # ------------------------------------------------------------------------------------------- manifests

    def _label_parser(self, label_sep: str):
        """`cell -> label array` for scoring (a ValueError names the problem)."""
        index = {name: i for i, name in enumerate(self.class_names)}
        kind = self.kind

        def parse(cell: Any) -> Any:
            text = str(cell).strip()
            if kind == "regression":
                try:
                    values = [float(v) for v in text.split(label_sep)] if label_sep in text else [float(text)]
                except ValueError:
                    raise ValueError(f"label {text!r} is not a number") from None
                return np.asarray(values if len(values) > 1 else values[0], np.float32)
            names = [n.strip() for n in text.split(label_sep)] if kind == "multilabel" else [text]
            unknown = [n for n in names if n not in index]
            if unknown:
                shown = ", ".join(self.class_names[:20]) + (" ..." if len(self.class_names) > 20 else "")
                raise ValueError(f"unknown label {unknown[0]!r} (classes: {shown})")
            if kind == "multilabel":
                hot = np.zeros(len(self.class_names), np.float32)
                hot[[index[n] for n in names]] = 1.0
                return hot
            return np.int32(index[names[0]])

        return parse

    def predict_manifest(self, manifest: Any, *, top_k: int = DEFAULT_TOP_K, on_error: str = "stop",
                         label_sep: str = ";", progress: bool = True) -> Predictions:
        """Predictions for every row of a `mmjax.inference.Manifest` (module docstring)."""
        from mmjax.data.build import BadRow
        from mmjax.inference import RowError

        preparer = self._preparer()
        preparer.check_columns(manifest, need=() if self.kind == "towers" else None)
        if self.kind == "towers" and not [m for m in preparer.modalities if m in manifest.columns]:
            raise ValueError(f"manifest {manifest.path} has none of the model's towers "
                             f"{list(preparer.modalities)} as a column")
        label_column = manifest.columns.get("label")
        parse_label = self._label_parser(label_sep) if label_column else None
        labels: dict[int, Any] = {}

        def label_of(index: int) -> None:
            if parse_label is None:
                return
            row = manifest.rows[index]
            cell = row.cells.get(label_column)
            if cell is None or str(cell).strip() == "":
                return
            try:
                labels[index] = parse_label(cell)
            except ValueError as error:
                raise RowError(BadRow(row.row, row.line, (str(error),))) from None

        count = len(manifest.rows)
        label = f"predicting {os.path.basename(manifest.path)}" if progress else None
        if self.kind == "towers":
            outputs, ok, errors, present = self._tower_manifest(manifest, preparer, label_of, on_error, label)
        else:
            from mmjax.inference import output_step

            def prepare(index: int) -> dict[str, np.ndarray]:
                label_of(index)
                return preparer.row(manifest, index)

            run = self.runner.run(self._output_step(output_step), count, prepare, preparer.placeholder(),
                                  on_error=on_error, progress=label)
            outputs, ok, errors, present = run.outputs, run.ok, run.errors, None
            errors.update(self._remote_errors(ok, errors, prepare))
        records, columns = [], ["row", "line", *manifest.metadata_columns]
        for i, row in enumerate(manifest.rows):
            record: dict[str, Any] = {"row": row.row, "line": row.line, **manifest.metadata(row)}
            if ok[i]:
                record.update(self._tower_record(outputs, i, top_k, present) if self.kind == "towers"
                              else self._record(outputs, i, top_k))
            record["error"] = errors.get(i)
            records.append(record)
        columns += self._columns(top_k, outputs)
        metrics = self._score(outputs, ok, labels) if labels else None
        notes = dict(preparer.notes)
        for extra in self.__dict__.pop("_notes", {}).items():
            notes.setdefault(*extra)
        return Predictions(self.kind, records, columns + ["error"], metrics,
                           [errors[i] for i in sorted(errors)], notes)

    def _remote_errors(self, ok: np.ndarray, errors: Mapping[int, str], prepare) -> dict[int, str]:
        """Reasons of the rows other processes failed to prepare (process 0 reads them again to report them)."""
        import jax

        from mmjax.inference import Absent

        if jax.process_count() == 1:
            return {}
        found = {}
        for index in np.flatnonzero(~ok):
            if int(index) in errors:
                continue
            try:
                prepare(int(index))
            except Absent:
                continue
            except ValueError as error:
                found[int(index)] = str(error)
        return found

    def _tower_manifest(self, manifest, preparer, label_of, on_error, label):
        """Each tower's embeddings over the rows that have that modality (and ITM scores of rows with both)."""
        from mmjax.data.build import BadRow, cell_value
        from mmjax.inference import Absent, Preparer, RowError, embed_step, itm_step

        count = len(manifest.rows)
        towers = [m for m in preparer.modalities if m in manifest.columns]
        outputs: dict[str, np.ndarray] = {}
        present: dict[str, np.ndarray] = {}
        errors: dict[int, str] = {}
        notes: dict[str, str] = {}

        def empty(index: int, modality: str) -> bool:
            return cell_value(manifest.rows[index], manifest.columns[modality], strip=modality != "text") is None

        for index in range(count):
            if "__error__" not in manifest.rows[index].cells and all(empty(index, m) for m in towers):
                row = manifest.rows[index]
                bad = RowError(BadRow(row.row, row.line, (f"no value for any of the towers {towers}",)))
                if on_error == "stop":
                    raise bad
                errors[index] = str(bad)
        jobs = [(m, [m]) for m in towers]
        if self._is_matching() and {"image", "text"} <= set(towers):
            jobs.append(("itm", ["image", "text"]))
        for name, modalities in jobs:
            sub = Preparer(self.setup, modalities)

            def prepare(index: int, sub=sub, modalities=modalities) -> dict[str, np.ndarray]:
                if index in errors:
                    raise Absent()
                if any(empty(index, m) for m in modalities):
                    raise Absent()
                label_of(index)
                return sub.row(manifest, index)

            step = self._cached(name, lambda m=name: itm_step(self.setup.model) if m == "itm"
                                else embed_step(self.setup.model, m, self.setup.spec))
            run = self.runner.run(step, count, prepare, sub.placeholder(), on_error=on_error,
                                  progress=f"{label}: {name}" if label else None)
            for key, value in run.outputs.items():
                outputs[key if name == "itm" else f"embedding_{name}"] = value
            present[name] = run.ok
            for index, message in {**run.errors, **self._remote_errors(run.ok, run.errors, prepare)}.items():
                errors.setdefault(index, message)  # A row bad for several towers: its first reason.
            for note, where in sub.notes.items():
                notes.setdefault(note, where)
        self.__dict__["_notes"] = notes
        ok = np.zeros(count, bool)
        for name in towers:
            ok |= present[name]
        ok &= np.asarray([i not in errors for i in range(count)])
        return outputs, ok, errors, present

    def _columns(self, top_k: int, outputs: Mapping[str, np.ndarray]) -> list[str]:
        field = "score" if self.kind == "towers" else "probability"
        tops = [c for j in range(1, top_k + 1) for c in (f"top{j}", f"top{j}_{field}")]
        if self.kind == "classification":
            return ["prediction", "probability", *tops]
        if self.kind == "multilabel":
            return ["labels", *(f"score_{self._name(j)}" for j in range(len(self.class_names)))]
        if self.kind == "regression":
            width = int(np.prod(outputs["prediction"].shape[1:])) if "prediction" in outputs else 1
            return ["value"] if width == 1 else [f"value_{self._name(j)}" for j in range(width)]
        columns = []
        if sum(k.startswith("embedding_") for k in outputs) == 2:
            columns.append("similarity")
        if "itm_logit" in outputs:
            columns += ["match_logit", "match_probability"]
        if self.class_embeddings() is not None and "embedding_image" in outputs:
            columns += ["prediction", "score", *tops]
        return columns

    def _score(self, outputs: Mapping[str, np.ndarray], ok: np.ndarray, labels: Mapping[int, Any]) -> dict | None:
        """The task's metrics over the rows that have a label and a prediction."""
        rows = [i for i in sorted(labels) if ok[i]]
        if not rows:
            return None
        target = np.stack([np.asarray(labels[i]) for i in rows])
        if self.kind == "towers":
            classes = self.class_embeddings()
            if classes is None or "embedding_image" not in outputs:
                return None
            from mmjax.metrics.retrieval import zero_shot_metrics

            return {**zero_shot_metrics(outputs["embedding_image"][rows], classes, target), "num_examples": len(rows)}
        picked = {k: v[rows] for k, v in outputs.items()}
        metrics = self.setup.task.metrics(picked, target)
        return {k: v for k, v in metrics.items() if isinstance(v, (int, float))} | {"num_examples": len(rows)}


def _csv_cell(record: Mapping[str, Any], column: str) -> Any:
    if column in record:
        value = record[column]
        return "" if value is None else json.dumps(value) if isinstance(value, (list, dict)) else value
    if column.startswith("top"):
        rank, _, field = column[3:].partition("_")
        top = record.get("top") or []
        if rank.isdigit() and int(rank) <= len(top):
            return top[int(rank) - 1]["class"] if not field else top[int(rank) - 1][field]
        return ""
    if column == "labels" and "labels" in record:
        return ";".join(record["labels"])
    for prefix, key in (("score_", "scores"), ("value_", "values")):
        if column.startswith(prefix) and key in record:
            return record[key].get(column[len(prefix):], "")
    return ""


def write_predictions(predictions: Predictions, path: str, fmt: str) -> None:
    """Writes the records as CSV (the columns) or JSONL (every field), atomically (a temporary file renamed)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="") as f:
        if fmt == "jsonl":
            for record in predictions.records:
                f.write(json.dumps({k: v for k, v in record.items()}) + "\n")
        else:
            writer = csv.writer(f)
            writer.writerow(predictions.columns)
            for record in predictions.records:
                row = dict(record)
                if "labels" in row:
                    row["labels"] = ";".join(row["labels"])
                writer.writerow([_csv_cell(row, c) for c in predictions.columns])
    os.replace(tmp, path)


def parser() -> argparse.ArgumentParser:
    from mmjax.cli import add_multiprocess_arguments

    p = argparse.ArgumentParser(prog="python -m mmjax.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a trained model's workdir (WORKDIR/<variant> for comparisons)")
    p.add_argument("--manifest", required=True, help="CSV / TSV / JSONL with the columns of mmjax.data.build")
    p.add_argument("--out", required=True, help="output file (.csv or .jsonl)")
    p.add_argument("--step", default="best", help="best (default), latest, or a checkpoint step number")
    p.add_argument("--batch", type=int, help="global batch size (default: the config's data.eval_batch_size)")
    p.add_argument("--format", choices=("csv", "jsonl"), help="default: from --out's extension (csv otherwise)")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="classes listed per input (classification)")
    p.add_argument("--on-error", choices=("stop", "skip"), default="stop",
                   help="bad rows: stop at the first (default, nothing written) or write them with their error")
    p.add_argument("--column", action="append", default=[], metavar="KIND=COLUMN",
                   help="manifest column of a kind (image, audio, text, label); default: the kind's own name")
    p.add_argument("--root", help="folder that relative paths start from (default: the manifest's folder)")
    p.add_argument("--text-files", action="store_true", help="text cells are paths to UTF-8 text files")
    p.add_argument("--label-sep", default=";", help="separator of several labels in a label cell (multi-label)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_multiprocess_arguments(p)
    return p


def _step(text: str) -> int | str:
    if text in ("best", "latest"):
        return text
    if text.isdigit():
        return int(text)
    raise ValueError(f"--step {text!r}: give best, latest or a step number")


def main(argv: Sequence[str] | None = None) -> Predictions:
    runtime.prepare_process(reexec=argv is None)
    args = parser().parse_args(argv)
    from mmjax import reporting
    from mmjax.data.build import ManifestError, column_mapping
    from mmjax.inference import read_manifest
    from mmjax.train import parallel

    parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    fmt = args.format or ("jsonl" if args.out.endswith((".jsonl", ".json")) else "csv")
    try:
        if args.top_k < 1:
            raise ValueError(f"--top-k {args.top_k} must be at least 1")
        if args.batch is not None and args.batch < 1:
            raise ValueError(f"--batch {args.batch} must be at least 1")
        manifest = read_manifest(args.manifest, columns=column_mapping(args.column), root=args.root,
                                 text_files=args.text_files)
        predictor = Predictor.load(args.workdir, _step(args.step), args.batch)
        result = predictor.predict_manifest(manifest, top_k=args.top_k, on_error=args.on_error,
                                            label_sep=args.label_sep, progress=not args.quiet)
    except (ManifestError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    for note, where in result.notes.items():
        reporting.console(f"note: {note}" + (f" (first: {where})" if where else ""))
    if reporting.is_primary():
        write_predictions(result, args.out, fmt)
        if result.metrics is not None:
            with open(f"{args.out}.metrics.json", "w") as f:
                json.dump(result.metrics, f, indent=2)
    done = len(result.records) - len(result.bad_rows)
    reporting.console(f"wrote {done} predictions of {len(result.records)} rows to {args.out} ({fmt}; model "
                      f"{args.workdir} step {predictor.step})")
    if result.bad_rows:
        reporting.console(f"skipped rows: {len(result.bad_rows)} (row = 1-based data row, line = file line):")
        for message in result.bad_rows[:50]:
            reporting.console(f"  {message}")
        if len(result.bad_rows) > 50:
            reporting.console(f"  ... and {len(result.bad_rows) - 50} more (their error column in {args.out})")
    if result.metrics is not None:
        shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.metrics.items())
        reporting.console(f"scored against the label column: {shown} (also in {args.out}.metrics.json)")
    return result


if __name__ == "__main__":
    main()
