"""Raw examples -> a trained model's inputs: manifests read row by row, and `Preparer` (the workdir's dataset's
evaluation preprocessing per modality, `Dataset.inputs`, plus the masks of optional modalities).

A manifest has the columns of `mmjax.data.build` (image / audio / text paths or cells, `--column KIND=NAME` for
other names; paths relative to the manifest's folder or `root`). Its other columns (ids, captions, ...) are
metadata, carried to the outputs; `label`, when present, is read too (prediction scores it).

What a row may lack, and what is an error (`Preparer`):
- a modality the model was trained to tolerate missing (its `<m>_mask` is a model input: a build with
  `--optional m`, or a dataset with optional modalities): an empty cell gives zeros and mask 0, as in training;
- any other modality of the model: an empty cell is a bad row ("no image: the model needs one ...");
- a manifest column of a modality the model never had: an error naming it, before any row is read (a column
  under another name is metadata).
Bad rows (missing or unreadable files, empty text, a value of the wrong shape) are reported as the builder does,
`row R (line L): reason`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mmjax.data import build
from mmjax.data.core import mask_key
from mmjax.data.raw_inputs import RawInput, read_cell

MODALITIES = build.MODALITIES


class RowError(ValueError):
    """A bad row: the message is `row R (line L): reason`, as the builder reports it."""

    def __init__(self, bad: build.BadRow):
        super().__init__(str(bad))
        self.bad = bad


def model_kind(model: Any) -> str:
    """"towers": a dual encoder or matching model (unit embeddings per modality, `embed`); "features": a fusion
    model (pooled encoder features, `encode`)."""
    if hasattr(model, "embed"):
        return "towers"
    if hasattr(model, "encode"):
        return "features"
    raise ValueError(f"model {type(model).__name__} has neither towers (embed) nor encoders (encode)")


@dataclasses.dataclass
class Manifest:
    """A manifest's rows and columns (`read_manifest`)."""

    path: str
    root: str
    columns: dict[str, str]  # kind (image, audio, text, label, split) -> column name
    header: list[str]
    rows: list[build.ManifestRow]
    text_files: bool = False

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if m in self.columns)

    @property
    def metadata_columns(self) -> list[str]:
        """The columns that are not modalities: ids, captions, labels, anything else (in manifest order)."""
        used = {self.columns[m] for m in self.modalities}
        return [c for c in self.header if c not in used]

    def metadata(self, row: build.ManifestRow) -> dict[str, Any]:
        return {c: row.cells.get(c) for c in self.metadata_columns}

    def where(self, index: int) -> str:
        row = self.rows[index]
        return f"row {row.row} (line {row.line})"

    def raw(self, index: int, modalities: Sequence[str]) -> dict[str, Any]:
        """The raw values of row `index` (0-based) for `modalities`: None for an empty cell or absent column.
        Raises `RowError` naming every problem of the row."""
        row = self.rows[index]
        if "__error__" in row.cells:
            raise RowError(build.BadRow(row.row, row.line, (f"the row {row.cells['__error__']}",)))
        values, reasons = {}, []
        for modality in modalities:
            column = self.columns.get(modality)
            cell = build.cell_value(row, column, strip=modality != "text") if column else None
            if cell is None:
                values[modality] = None
                continue
            try:
                values[modality] = read_cell(modality, cell, self.root, text_files=self.text_files)
            except ValueError as error:
                reasons.append(f"{error} in {column!r}" if str(error) == "empty text" else str(error))
        if reasons:
            raise RowError(build.BadRow(row.row, row.line, tuple(reasons)))
        return values


def read_manifest(path: str, *, columns: Mapping[str, str] | None = None, root: str | None = None,
                  text_files: bool = False) -> Manifest:
    """A CSV / TSV / JSONL manifest (`mmjax.data.build`'s formats and column names). Raises
    `build.ManifestError` for a missing or unreadable manifest, unknown `--column` kinds, or no modality column."""
    path = os.path.abspath(os.path.expanduser(path))
    header, rows = build.read_manifest(path)
    mapping = build.manifest_columns(header, dict(columns or {}))
    if not rows:
        raise build.ManifestError(f"manifest {path} has no data rows")
    return Manifest(path, os.path.abspath(root) if root else os.path.dirname(path), mapping, list(header), rows,
                    text_files)


class Preparer:
    """Raw values -> the model's inputs for one example (module docstring): `{modality: array, <m>_mask: 1/0}`.

    `context` is a `mmjax.train.setup.Setup` (its `dataset.inputs`, `spec` and `config.model.encoders`);
    `modalities` the model inputs to prepare (default: all of the model's). Notes about what preprocessing did
    (resampling, truncation) are collected in `notes` ({note: first row it applied to}) for the caller to print
    once.
    """

    def __init__(self, context: Any, modalities: Sequence[str] | None = None):
        self.model_modalities = tuple(sorted(context.config.model.encoders))
        self.modalities = tuple(modalities or self.model_modalities)
        unknown = [m for m in self.modalities if m not in self.model_modalities]
        if unknown:
            raise ValueError(f"the model has no {unknown[0]!r} input (its inputs: "
                             f"{', '.join(self.model_modalities)})")
        dataset = context.dataset
        missing = [m for m in self.modalities if m not in dataset.inputs]
        if missing:
            raise ValueError(
                f"dataset {dataset.name!r} of this workdir declares no preprocessing of raw {missing[0]} inputs "
                "(Dataset.inputs), so it cannot be run on new files; its splits can still be evaluated"
            )
        self.inputs: dict[str, RawInput] = {m: dataset.inputs[m] for m in self.modalities}
        self.spec = {k: v for k, v in context.spec.items() if k != "label"}
        self.optional = tuple(m for m in self.modalities if mask_key(m) in self.spec)
        self.notes: dict[str, str] = {}

    def check_columns(self, manifest: Manifest, *, need: Sequence[str] | None = None, foreign: bool = False
                      ) -> None:
        """Refuses a manifest with a column of a modality the model never had (unless `foreign`: a collection's
        other columns are metadata), or without a column the model needs (`need`, default: every modality the
        model cannot do without)."""
        foreign = [] if foreign else [m for m in manifest.modalities if m not in self.model_modalities]
        if foreign:
            raise build.ManifestError(
                f"manifest {manifest.path}: column {manifest.columns[foreign[0]]!r} is {foreign[0]}, a modality this "
                f"model was not trained on (its inputs: {', '.join(self.model_modalities)}); pass --column "
                f"{foreign[0]}= to keep it as metadata, or remove it"
            )
        required = [m for m in self.modalities if m not in self.optional] if need is None else list(need)
        absent = [m for m in required if m not in manifest.columns]
        if absent:
            raise build.ManifestError(
                f"manifest {manifest.path} has no {absent[0]} column, which the model needs (columns: "
                f"{', '.join(manifest.header)}; map another name with --column {absent[0]}=NAME)"
            )

    def placeholder(self) -> dict[str, np.ndarray]:
        """Zeros of every prepared key (padding rows of a batch)."""
        keys = [*self.modalities, *(mask_key(m) for m in self.optional)]
        return {k: np.zeros(*self.spec[k]) for k in keys}

    def prepare_one(self, modality: str, value: Any) -> np.ndarray:
        """One modality's model input (raises ValueError naming the modality and the problem)."""
        try:
            array = np.asarray(self.inputs[modality](value))
        except ValueError as error:
            raise ValueError(f"{modality}: {error}") from None
        shape, dtype = self.spec[modality]
        if array.shape != tuple(shape) or str(array.dtype) != dtype:
            raise ValueError(
                f"{modality} preprocessed to shape {array.shape} and dtype {array.dtype}, but the model takes "
                f"{tuple(shape)} {dtype} (preprocessing: {self.inputs[modality].chain or 'tokenizer'})"
            )
        for note in self.inputs[modality].notes(value):
            self.notes.setdefault(note, "")
        return array

    def __call__(self, values: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """`{modality: raw value or None}` -> model inputs (raises ValueError with the reason)."""
        out: dict[str, np.ndarray] = {}
        foreign = [m for m in MODALITIES if values.get(m) is not None and m not in self.model_modalities]
        if foreign:
            raise ValueError(f"the model has no {foreign[0]!r} input (its inputs: "
                             f"{', '.join(self.model_modalities)})")
        reasons = []
        for modality in self.modalities:
            value = values.get(modality)
            if value is None:
                if modality in self.optional:
                    out[modality] = np.zeros(*self.spec[modality])
                    out[mask_key(modality)] = np.float32(0.0)
                else:
                    reasons.append(f"no {modality}: the model needs one (it was not trained with {modality} missing)")
                continue
            try:
                out[modality] = self.prepare_one(modality, value)
            except ValueError as error:
                reasons.append(str(error))
                continue
            if modality in self.optional:
                out[mask_key(modality)] = np.float32(1.0)
        if reasons:
            raise ValueError("; ".join(reasons))
        return out

    def row(self, manifest: Manifest, index: int) -> dict[str, np.ndarray]:
        """Row `index` of `manifest` prepared; raises `RowError` (`row R (line L): reason`)."""
        values = manifest.raw(index, self.modalities)
        before = set(self.notes)
        try:
            out = self(values)
        except ValueError as error:
            row = manifest.rows[index]
            raise RowError(build.BadRow(row.row, row.line, (str(error),))) from None
        for note in set(self.notes) - before:
            self.notes[note] = manifest.where(index)
        return out
