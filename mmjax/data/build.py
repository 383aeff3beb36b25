"""Your own data: a CSV / JSONL manifest of image files, WAV files, text and labels -> a TFDS dataset to train on.

    python -m mmjax.data.build --manifest my.csv --out DIR [--on-error skip|stop] [--sample-rate 16000 --resample]
        [--optional audio] [--column image=photo --column label=class] [--classes cat,dog] [--paired]
        [--val-fraction 0.1 --test-fraction 0.1] [--text-files] [--label-sep ';'] [--dedup] [--overwrite]

then train any experiment on it with `config.data.name = "files"`, `config.data.data_dir = DIR` (and per-key
`config.data.preprocess` chains, see mmjax.data.ops and mmjax.data.files).

The manifest: a CSV (a header row, then one row per example; `.tsv` is tab-separated) or JSONL (one JSON object
per line) whose columns are named `image`, `audio`, `text`, `label` and optionally `split` (`--column KIND=NAME`
maps other names). Modalities are the image / audio / text columns present.

Task: with a label column, a classification dataset (multi-label with `--label-sep`). Without one, or with
`--paired`, a PAIRED dataset (task "contrastive"): its modalities are pairs (e.g. an image and its caption) that
the contrastive and matching tasks (clip, siglip, itm) train on, with retrieval evaluation on the held-out splits;
a label column is then kept as metadata (the examples' `label`) and gives the zero-shot evaluator its classes
(`mmjax.data.files`). A paired dataset needs at least two modality columns. With a text column it is also what a
text decoder trains on (`model.name = "captioner"`, task `caption`, `experiments/shapes_caption.py --preset files`
or `files_audio`): the text (a caption, a transcript), tokenised by the build's tokenizer, is the batch's `text`,
the decoder's target; the command printed at the end names the tokenizer's size (`model.decoder.vocab_size`). With
audio and text it is also speech-to-text data (`experiments/spoken_numbers.py --preset files`: a CTC head and a
text decoder scored by word error rate), whose command the build prints too.
Image and audio cells are file paths, absolute or relative to the manifest's folder (`--root` sets another);
text cells are the text itself, or paths to UTF-8 text files with `--text-files`. Labels are class names
(`--classes a,b,c` fixes the list and its order; otherwise every label of a good row, sorted, numerically when
they are all integers); `--label-sep ";"` reads several labels per cell (a multi-label task).

What is stored (TFDS `files` 1.0.0 in array_record under DIR/files/1.0.0, written with TFDS's own writer,
no TensorFlow):
    image      the file's bytes as they are (PNG, JPEG, anything Pillow reads), checked decodable at build time;
               decoded in the pipeline by the `decode` op, so images of any size are kept losslessly, resized
               by the config (`resize`, `random_crop`, ...) and never re-encoded.
    audio      float32 mono waveform in [-1, 1] at one sample rate (`--sample-rate`, else the first good file's);
               channels are averaged; any length (`crop_or_pad` fixes it in the pipeline). A file at another rate
               is a bad row unless `--resample`, which converts it (polyphase, scipy).
    text       the text (str); a WordPiece tokenizer trained on the train split is saved as tokenizer.json next
               to the data (`--tokenizer minilm|PATH|none` instead) and is what `tokenize` uses by default.
    label      class id (ClassLabel, names kept), or a list of ids with `--label-sep`; a paired build without a
               label column stores 0 (one class, "none").
    <m>_mask   float32 1.0 / 0.0, only for modalities declared `--optional`: an empty cell stores a zero
               placeholder (a black PNG of the first good image's size, zeros of the first good clip's length,
               "") with mask 0.
    row        the example's data row number in the manifest.
Metadata (modalities, optional ones, sample rate, task, tokenizer) is in the dataset's metadata.json, and a
report of the build (examples per split, bad rows) in DIR/build_report.json.

Splits: a `split` column (any names, e.g. train / validation / test), or else `--val-fraction` and
`--test-fraction` (default 0.1 each) of the good rows, carved deterministically (`--split-seed`): stratified by
label, exact totals. A split column with a `train` split but no `validation` gets one carved from train the same
way (`--val-fraction` of train, default 0.1 and at least one example; 0 turns it off), so that training's
evaluation and best checkpoint (`validation/...`) work without a change; build_report.json says what was carved
(`validation_carved`). Examples are stored in manifest order.

Duplicates: rows that would store identical examples (the same image bytes, the same audio samples, the same
text and labels, whatever their file names) are reported (their count and the first ones, in the output and in
build_report.json) and kept together in one split, so that no example is both trained and tested on: carved
splits place each group of copies as one, and with a split column a copy listed in another split than the
group's first row is moved to that row's split (and reported). `--dedup` keeps only the first row of each group.

Bad rows: missing file, unreadable image, unreadable audio, wrong sample rate, empty text, unknown label,
missing required cell (or a JSONL line that is not an object, a CSV row with extra cells, an invalid split
name). Every row is checked before anything is written; each bad row is reported as "row R (line L)": R is the
1-based data row (the CSV header and blank lines not counted), L the manifest's 1-based file line where it
starts. `--on-error stop` (default) stops at the first, naming it; `--on-error skip` leaves them out, prints
them and their count. A broken example is never written.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from mmjax.data.core import mask_key
from mmjax.data.tokenization import save_tokenizer, tokenizer_from, tokenizer_path, train_tokenizer

NAME = "files"  # TFDS dataset name: DIR/files/<VERSION>/.
VERSION = "1.0.0"
KINDS = ("image", "audio", "text", "label", "split")
MODALITIES = ("image", "audio", "text")
DEFAULT_SPLITS = ("train", "validation", "test")
REPORT_FILENAME = "build_report.json"
UNLABELLED = "none"  # The one class name of a paired build without a label column.
TOKENIZER_FILENAME = "tokenizer.json"
_SPLIT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ManifestError(ValueError):
    """The manifest or the options are unusable as a whole (not one bad row)."""


class BadRowError(ValueError):
    """A bad row with `--on-error stop`: the message names the row, the line and the reasons."""

    def __init__(self, bad: BadRow):
        super().__init__(f"{bad}. (--on-error skip leaves bad rows out)")
        self.bad = bad


@dataclasses.dataclass(frozen=True)
class BadRow:
    row: int  # 1-based data row.
    line: int  # 1-based manifest line where the row starts.
    reasons: tuple[str, ...]

    def __str__(self) -> str:
        return f"row {self.row} (line {self.line}): {'; '.join(self.reasons)}"


@dataclasses.dataclass(frozen=True)
class ManifestRow:
    row: int
    line: int
    cells: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class GoodRow:
    """A checked row: what pass 2 needs to write it."""

    row: int
    split: str | None
    labels: tuple[str, ...]
    paths: Mapping[str, str | None]  # image / audio file per modality; None when absent (optional).
    text: str | None  # None when absent (optional) or no text column.
    line: int = 0  # 1-based manifest line where the row starts.
    digest: str = ""  # Hash of what would be stored (contents, text, labels): equal for duplicate rows.


@dataclasses.dataclass
class Options:
    """Build options (the command-line flags)."""

    columns: Mapping[str, str] = dataclasses.field(default_factory=dict)  # kind -> manifest column.
    root: str | None = None
    sample_rate: int | None = None
    resample: bool = False
    optional: Sequence[str] = ()
    text_files: bool = False
    classes: Sequence[str] | None = None
    label_sep: str | None = None
    val_fraction: float | None = None
    test_fraction: float | None = None
    split_seed: int = 0
    on_error: str = "stop"
    tokenizer: str = "train"
    vocab_size: int = 8000
    overwrite: bool = False
    progress: bool = True
    dedup: bool = False  # Keep only the first of each group of duplicate rows (else: all, in one split).
    paired: bool = False  # A paired (contrastive) dataset even with a label column (kept as metadata, zero-shot).


# ---------------------------------------------------------------------------------------------- reading


def read_manifest(path: str) -> tuple[list[str], list[ManifestRow]]:
    """(column names, rows) of a CSV/TSV (header row) or JSONL manifest, with data-row and file-line numbers."""
    if not os.path.isfile(path):
        raise ManifestError(f"manifest {path} does not exist")
    lower = path.lower()
    if lower.endswith((".jsonl", ".json", ".ndjson")):
        return _read_jsonl(path)
    if lower.endswith((".csv", ".tsv", ".txt")):
        return _read_csv(path, "\t" if lower.endswith(".tsv") else ",")
    raise ManifestError(f"manifest {path}: unknown format; use .csv, .tsv or .jsonl")


def _read_csv(path: str, delimiter: str) -> tuple[list[str], list[ManifestRow]]:
    import csv

    rows: list[ManifestRow] = []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = None
        previous_line = 0
        for record in reader:
            start = previous_line + 1
            previous_line = reader.line_num
            if not record or all(not cell.strip() for cell in record):
                continue  # Blank line.
            if header is None:
                header = [name.strip() for name in record]
                duplicated = sorted({n for n in header if header.count(n) > 1})
                if duplicated or "" in header:
                    raise ManifestError(f"manifest {path}: the header (line {start}) has duplicated or empty "
                                        f"column names {duplicated or ['']}")
                continue
            cells: dict[str, Any] = dict(zip(header, record, strict=False))
            if len(record) > len(header):
                cells["__error__"] = f"has {len(record)} cells, the header has {len(header)}"
            rows.append(ManifestRow(len(rows) + 1, start, cells))
    if header is None:
        raise ManifestError(f"manifest {path} is empty (no header row)")
    return header, rows


def _read_jsonl(path: str) -> tuple[list[str], list[ManifestRow]]:
    rows: list[ManifestRow] = []
    columns: dict[str, None] = {}
    with open(path, encoding="utf-8-sig") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                error = None if isinstance(record, dict) else f"is not a JSON object but {type(record).__name__}"
            except json.JSONDecodeError as e:
                record, error = {}, f"is not valid JSON ({e.msg}, column {e.colno})"
            cells = dict(record) if error is None else {"__error__": error}
            columns.update(dict.fromkeys(k for k in cells if k != "__error__"))
            rows.append(ManifestRow(len(rows) + 1, line_number, cells))
    return list(columns), rows


def cell_value(row: ManifestRow, column: str | None, strip: bool = True) -> Any:
    """The cell's value: None when the column is absent or the cell empty ("", or blank with `strip`) or null;
    strings are stripped with `strip` (text keeps its blanks, so a blank text is "empty text", not a missing cell).
    """
    if column is None:
        return None
    value = row.cells.get(column)
    if isinstance(value, str):
        value = value.strip() if strip else value
        return value or None
    return value


def read_audio(path: str) -> tuple[int, np.ndarray]:
    """(sample rate, float32 mono waveform in [-1, 1]) of a WAV file (PCM 8/16/24/32-bit or float)."""
    from scipy.io import wavfile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", wavfile.WavFileWarning)  # Unknown chunks (e.g. LIST) are skipped.
        rate, data = wavfile.read(path)
    data = np.asarray(data)
    if data.dtype == np.uint8:
        audio = (data.astype(np.float32) - 128.0) / 128.0
    elif np.issubdtype(data.dtype, np.integer):
        audio = data.astype(np.float32) / np.float32(-np.iinfo(data.dtype).min)
    else:
        audio = data.astype(np.float32)
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    return int(rate), audio


def read_image(path: str) -> tuple[bytes, tuple[int, int]]:
    """(the file's bytes, (width, height)), after checking Pillow decodes the whole image."""
    from PIL import Image

    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return data, image.size


# ---------------------------------------------------------------------------------------------- checking


@dataclasses.dataclass
class Checked:
    """Pass 1's result: good rows, bad rows, and what the dataset's features need."""

    good: list[GoodRow]
    bad: list[BadRow]
    modalities: tuple[str, ...]
    sample_rate: int | None
    image_size: tuple[int, int] | None  # (width, height) of the first good image: the placeholder's size.
    audio_length: int | None  # Samples of the first good clip (at the stored rate): the placeholder's length.


def _resolve(path: str, root: str) -> str:
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.join(root, path)


class _Checker:
    """Checks one row at a time (pass 1), remembering the sample rate and placeholder shapes it settles on."""

    def __init__(self, columns: Mapping[str, str], options: Options, root: str, modalities: tuple[str, ...]):
        self.columns, self.options, self.root, self.modalities = columns, options, root, modalities
        self.sample_rate = options.sample_rate
        self.rate_source: str | None = f"--sample-rate {options.sample_rate}" if options.sample_rate else None
        self.image_size: tuple[int, int] | None = None
        self.audio_length: int | None = None
        self.classes = None if options.classes is None else set(options.classes)

    def check(self, row: ManifestRow) -> GoodRow | BadRow:
        reasons: list[str] = []
        if "__error__" in row.cells:
            return BadRow(row.row, row.line, (f"the row {row.cells['__error__']}",))
        labels = self._labels(row, reasons)
        split = self._split(row, reasons)
        paths: dict[str, str | None] = {}
        text = None
        present = []
        digest = hashlib.sha256(json.dumps(labels).encode())
        for modality in self.modalities:
            value = cell_value(row, self.columns[modality], strip=modality != "text")
            digest.update(f"|{modality}:".encode())
            if value is None:
                if modality not in self.options.optional:
                    reasons.append(f"missing required cell {self.columns[modality]!r} ({modality})")
                continue
            if modality == "text":
                text = self._text(value, reasons)
                ok = text is not None
                digest.update(json.dumps(text).encode())
            else:
                paths[modality] = self._file(modality, value, reasons, digest)
                ok = paths[modality] is not None
            if ok:
                present.append(modality)
        if not reasons and not present:
            reasons.append("no modality present (every cell of " + ", ".join(self.modalities) + " is empty)")
        if reasons:
            return BadRow(row.row, row.line, tuple(reasons))
        return GoodRow(row.row, split, labels, {m: paths.get(m) for m in self.modalities if m != "text"}, text,
                       row.line, digest.hexdigest())

    def _labels(self, row: ManifestRow, reasons: list[str]) -> tuple[str, ...]:
        column = self.columns.get("label")
        if column is None:  # A paired build without labels.
            return ()
        value = cell_value(row, column)
        if value is None:
            reasons.append(f"missing required cell {column!r} (label)")
            return ()
        if isinstance(value, list) and self.options.label_sep is not None:
            labels = [str(v).strip() for v in value]
        elif isinstance(value, (dict, list)):
            reasons.append(f"label {value!r} is not a class name")
            return ()
        else:
            text = str(value)
            labels = text.split(self.options.label_sep) if self.options.label_sep is not None else [text]
        labels = [label.strip() for label in labels if label.strip()]
        if not labels:
            reasons.append(f"missing required cell {column!r} (label)")
            return ()
        if self.classes is not None:
            unknown = [label for label in labels if label not in self.classes]
            if unknown:
                reasons.append(f"unknown label {', '.join(map(repr, unknown))} (--classes: "
                               f"{', '.join(self.options.classes)})")
        return tuple(labels)

    def _split(self, row: ManifestRow, reasons: list[str]) -> str | None:
        column = self.columns.get("split")
        if column is None:
            return None
        value = cell_value(row, column)
        if value is None:
            reasons.append(f"missing required cell {column!r} (split)")
            return None
        if not _SPLIT_NAME.match(str(value)):
            reasons.append(f"invalid split name {value!r} (letters, digits and _, not starting with a digit)")
            return None
        return str(value)

    def _text(self, value: Any, reasons: list[str]) -> str | None:
        column = self.columns["text"]
        if not isinstance(value, str):
            value = str(value)
        if self.options.text_files:
            value = value.strip()
            path = _resolve(value, self.root)
            if not os.path.isfile(path):
                reasons.append(f"missing file: text {value!r} ({path})")
                return None
            try:
                with open(path, encoding="utf-8") as f:
                    value = f.read()
            except (OSError, UnicodeDecodeError) as error:
                reasons.append(f"unreadable text file {value!r} ({type(error).__name__}: {error})")
                return None
        if not value.strip():
            reasons.append(f"empty text in {column!r}")
            return None
        return value.strip()

    def _file(self, modality: str, value: Any, reasons: list[str], digest) -> str | None:
        """The checked file's path (None for a bad one); `digest` is updated with what would be stored from it:
        an image's bytes, an audio file's sample rate and samples."""
        if not isinstance(value, str):
            reasons.append(f"{modality} cell {value!r} is not a file path")
            return None
        path = _resolve(value, self.root)
        if not os.path.isfile(path):
            reasons.append(f"missing file: {modality} {value!r} ({path})")
            return None
        if modality == "image":
            try:
                data, size = read_image(path)
            except Exception as error:  # Pillow raises many types for broken files.
                reasons.append(f"unreadable image {value!r} ({type(error).__name__}: {error})")
                return None
            self.image_size = self.image_size or size
            digest.update(hashlib.sha256(data).digest())
            return path
        try:
            rate, audio = read_audio(path)
        except Exception as error:  # scipy raises ValueError / EOFError / OSError for broken files.
            reasons.append(f"unreadable audio {value!r} (not a readable WAV file: {type(error).__name__}: {error})")
            return None
        if audio.size == 0:
            reasons.append(f"empty audio {value!r} (0 samples)")
            return None
        if not np.all(np.isfinite(audio)):
            reasons.append(f"unreadable audio {value!r} (NaN or infinite samples)")
            return None
        if self.sample_rate is None:
            self.sample_rate, self.rate_source = rate, f"the first good audio file, {value!r}"
        if rate != self.sample_rate and not self.options.resample:
            reasons.append(f"wrong sample rate: audio {value!r} is {rate} Hz, expected {self.sample_rate} Hz (from "
                           f"{self.rate_source}; --resample converts)")
            return None
        if self.audio_length is None:
            self.audio_length = _resampled_length(audio.size, rate, self.sample_rate)
        digest.update(f"{rate}:".encode() + hashlib.sha256(np.ascontiguousarray(audio).tobytes()).digest())
        return path


def _resampled_length(samples: int, rate: int, target: int) -> int:
    return samples if rate == target else -(-samples * target // rate)


def check_rows(rows: Sequence[ManifestRow], columns: Mapping[str, str], options: Options, root: str,
               modalities: tuple[str, ...]) -> Checked:
    """Pass 1: every row checked (files opened and decoded); stops at the first bad row with on_error="stop"."""
    from tqdm import tqdm

    checker = _Checker(columns, options, root, modalities)
    good, bad = [], []
    for row in tqdm(rows, desc="checking rows", unit="row", disable=not options.progress, file=sys.stderr):
        result = checker.check(row)
        if isinstance(result, BadRow):
            if options.on_error == "stop":
                raise BadRowError(result)
            bad.append(result)
        else:
            good.append(result)
    return Checked(good, bad, modalities, checker.sample_rate if "audio" in modalities else None,
                   checker.image_size, checker.audio_length)


# ---------------------------------------------------------------------------------------------- planning


@dataclasses.dataclass
class Duplicates:
    """Groups of good rows that would store identical examples: each group's first row and its later copies."""

    groups: list[tuple[GoodRow, list[GoodRow]]]
    dropped: bool = False  # --dedup: the copies were left out.
    moved: list[tuple[GoodRow, str, str]] = dataclasses.field(default_factory=list)  # (copy, from split, to split)

    @property
    def copies(self) -> int:
        return sum(len(copies) for _, copies in self.groups)

    def first_of(self) -> dict[int, GoodRow]:
        """Copy's row -> the first row of its group."""
        return {copy.row: first for first, copies in self.groups for copy in copies}

    def to_json(self, max_rows: int = 20) -> dict[str, Any]:
        first_of = self.first_of()
        pairs = [(copy, first) for first, copies in self.groups for copy in copies][:max_rows]
        return {
            "copies": self.copies,
            "examples": len(self.groups),
            "action": "dropped (--dedup)" if self.dropped else "kept, each group in one split",
            "first": [{"row": c.row, "line": c.line, "same_as_row": f.row, "same_as_line": f.line} for c, f in pairs],
            "moved": [{"row": c.row, "line": c.line, "from": a, "to": b, "same_as_row": first_of[c.row].row}
                      for c, a, b in self.moved],
        }

    def summary(self, max_rows: int = 5) -> list[str]:
        if not self.groups:
            return ["  duplicate rows: none"]
        action = ("dropped (--dedup)" if self.dropped
                  else "kept in the split of their group's first row (--dedup drops them)")
        pairs = [(copy, first) for first, copies in self.groups for copy in copies]
        shown = "; ".join(f"row {c.row} (line {c.line}) = row {f.row} (line {f.line})" for c, f in pairs[:max_rows])
        lines = [f"  duplicate rows: {self.copies} copies of {len(self.groups)} examples, {action}: {shown}"
                 + (f"; ... (see {REPORT_FILENAME})" if len(pairs) > max_rows else "")]
        if self.moved:
            moved = "; ".join(f"row {c.row} (line {c.line}) {a} -> {b}" for c, a, b in self.moved[:max_rows])
            lines.append(f"  {len(self.moved)} copies listed in another split than their first row, moved there: "
                         + moved + (f"; ... (see {REPORT_FILENAME})" if len(self.moved) > max_rows else ""))
        return lines


def find_duplicates(good: Sequence[GoodRow]) -> Duplicates:
    """Groups of rows with equal digests (identical stored examples), in manifest order."""
    by_digest: dict[str, list[GoodRow]] = {}
    for row in good:
        by_digest.setdefault(row.digest, []).append(row)
    return Duplicates([(rows[0], rows[1:]) for rows in by_digest.values() if len(rows) > 1])


def class_names(good: Sequence[GoodRow], classes: Sequence[str] | None) -> tuple[str, ...]:
    """`--classes` as given, else every label of the good rows, sorted (numerically when all are integers)."""
    if classes is not None:
        return tuple(classes)
    names = {label for row in good for label in row.labels}
    if names and all(re.fullmatch(r"-?\d+", n) for n in names):
        return tuple(sorted(names, key=int))
    return tuple(sorted(names))


def carve_splits(good: Sequence[GoodRow], val_fraction: float, test_fraction: float, seed: int) -> dict[int, str]:
    """Row -> train / validation / test: stratified by (first) label, exact totals, deterministic in `seed`.

    Each label's rows are shuffled and spread evenly over [0, 1) (with a random phase), all rows are sorted by
    that position, and the first round(N * test) go to test, the next round(N * val) to validation.
    """
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for row in good:
        by_label.setdefault(row.labels[0] if row.labels else "", []).append(row.row)
    keyed = []
    for label in sorted(by_label):
        members = rng.permutation(by_label[label])
        phase = rng.random()
        keyed += [((j + phase) / len(members), int(r)) for j, r in enumerate(members)]
    keyed.sort()
    n_test = round(len(keyed) * test_fraction)
    n_val = round(len(keyed) * val_fraction)
    order = [r for _, r in keyed]
    assignment = {r: "test" for r in order[:n_test]}
    assignment.update({r: "validation" for r in order[n_test : n_test + n_val]})
    assignment.update({r: "train" for r in order[n_test + n_val :]})
    return assignment


def manifest_columns(header: Sequence[str], mapping: Mapping[str, str]) -> dict[str, str]:
    """kind -> manifest column, for the kinds present; explicitly mapped columns must exist."""
    unknown = sorted(set(mapping) - set(KINDS))
    if unknown:
        raise ManifestError(f"--column {unknown[0]}=...: unknown kind; valid: {', '.join(KINDS)}")
    columns = {}
    for kind in KINDS:
        name = mapping.get(kind, kind)
        if not name:  # `--column KIND=`: no column of this kind.
            continue
        if name in header:
            columns[kind] = name
        elif kind in mapping:
            raise ManifestError(f"--column {kind}={name}: the manifest has no column {name!r} "
                                f"(columns: {', '.join(header)})")
    if not any(m in columns for m in MODALITIES):
        raise ManifestError(f"the manifest has none of the modality columns {', '.join(MODALITIES)} (columns: "
                            f"{', '.join(header)}); map them with --column image=NAME etc.")
    return columns


def _check_options(options: Options, columns: Mapping[str, str]) -> None:
    if options.on_error not in ("skip", "stop"):
        raise ManifestError(f"--on-error {options.on_error!r}; valid: skip, stop")
    absent = sorted(set(options.optional) - {m for m in MODALITIES if m in columns})
    if absent:
        raise ManifestError(f"--optional {','.join(absent)}: not a modality column of this manifest "
                            f"(modalities: {', '.join(m for m in MODALITIES if m in columns)})")
    if options.sample_rate is not None and options.sample_rate <= 0:
        raise ManifestError(f"--sample-rate {options.sample_rate} must be a positive number of Hz")
    if "split" in columns and options.test_fraction is not None:
        raise ManifestError("the manifest has a split column; --test-fraction carves splits only when it has none "
                            "(--val-fraction sets the share of train carved as validation when the column has no "
                            "validation split)")
    modalities = [m for m in MODALITIES if m in columns]
    if "label" not in columns and len(modalities) < 2:
        raise ManifestError(f"the manifest has no label column 'label' (columns: {', '.join(columns.values())}) "
                            f"and one modality ({', '.join(modalities)}): a classification dataset needs labels "
                            "(map them with --column label=NAME), a paired one at least two modality columns "
                            "(e.g. image and text)")
    if options.paired and len(modalities) < 2:
        raise ManifestError(f"--paired needs at least two modality columns (e.g. image and text); this manifest "
                            f"has {', '.join(modalities)}")
    if options.label_sep is not None and ("label" not in columns or options.paired):
        raise ManifestError("--label-sep reads several labels per cell for a multi-label classification dataset; "
                            "it needs a label column and no --paired")
    fractions = [f for f in (options.val_fraction, options.test_fraction) if f is not None]
    if any(not 0 <= f < 1 for f in fractions) or sum(fractions) >= 1:
        raise ManifestError(f"--val-fraction / --test-fraction {fractions}: each in [0, 1), summing to < 1")
    if options.vocab_size < 10:
        raise ManifestError(f"--vocab-size {options.vocab_size} is too small")
    if options.classes is not None and (not options.classes or len(set(options.classes)) != len(options.classes)):
        raise ManifestError(f"--classes {list(options.classes)}: give distinct class names")


# ---------------------------------------------------------------------------------------------- writing


def _placeholder_png(size: tuple[int, int]) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size).save(buffer, format="png")
    return buffer.getvalue()


def _make_builder_class():
    """The TFDS builder class (defined lazily: importing TFDS is slow and `--help` should not need it)."""
    import tensorflow_datasets as tfds

    from mmjax.data.tfds_builder import OfflineBuilder  # Imports TFDS: here, so that `--help` stays quick.

    version = VERSION  # The class body's own VERSION would shadow it.

    class ManifestDataset(OfflineBuilder, skip_registration=True):
        """TFDS builder of a checked manifest (see mmjax.data.build); array_record, manifest order."""

        name = NAME
        VERSION = tfds.core.Version(version)
        RELEASE_NOTES = {version: "Built by python -m mmjax.data.build from a manifest."}

        def __init__(self, *, plan: BuildPlan, **kwargs):
            self._plan = plan
            super().__init__(**kwargs)

        def _info(self) -> tfds.core.DatasetInfo:
            plan = self._plan
            features: dict[str, Any] = {"row": tfds.features.Scalar(dtype=np.int64)}
            if "image" in plan.modalities:
                features["image"] = tfds.features.Tensor(shape=(), dtype=np.object_)  # Encoded file bytes.
            if "audio" in plan.modalities:
                features["audio"] = tfds.features.Tensor(shape=(None,), dtype=np.float32)
            if "text" in plan.modalities:
                features["text"] = tfds.features.Text()
            for modality in plan.optional:
                features[mask_key(modality)] = tfds.features.Scalar(dtype=np.float32)
            label = tfds.features.ClassLabel(names=list(plan.classes))
            features["label"] = tfds.features.Sequence(label) if plan.multilabel else label
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"Built from the manifest {plan.manifest} by python -m mmjax.data.build.",
                features=tfds.features.FeaturesDict(features),
                disable_shuffling=True,  # Manifest order.
                metadata=tfds.core.MetadataDict(plan.metadata()),
            )

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split) for split in self._plan.splits}

        def _generate_examples(self, split: str):
            yield from self._plan.examples(split)

    return ManifestDataset


@dataclasses.dataclass
class BuildPlan:
    """Everything the TFDS builder writes: features, splits and the good rows per split."""

    manifest: str
    modalities: tuple[str, ...]
    optional: tuple[str, ...]
    classes: tuple[str, ...]
    multilabel: bool
    sample_rate: int | None
    rows_by_split: dict[str, list[GoodRow]]
    placeholder_image: bytes | None
    placeholder_audio_length: int | None
    tokenizer: str | None = None
    progress: bool = True
    paired: bool = False  # Task "contrastive": the modalities are pairs (module docstring).
    labelled: bool = True  # A label column was given (False: every example stores class 0, UNLABELLED).

    @property
    def splits(self) -> list[str]:
        return list(self.rows_by_split)

    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": 1,
            "modalities": list(self.modalities),
            "optional": list(self.optional),
            "sample_rate": self.sample_rate,
            "task": "contrastive" if self.paired else "multilabel" if self.multilabel else "classification",
            "labelled": self.labelled,
            "image_storage": "encoded file bytes (decode op)",
            "tokenizer": self.tokenizer,
            "manifest": self.manifest,
        }

    def example(self, row: GoodRow) -> dict[str, Any]:
        """The stored features of one good row (files read again and converted)."""
        example: dict[str, Any] = {"row": row.row}
        index = {name: i for i, name in enumerate(self.classes)}
        ids = [index[label] for label in row.labels] if self.labelled else [0]
        example["label"] = ids if self.multilabel else ids[0]
        if "image" in self.modalities:
            path = row.paths.get("image")
            example["image"] = read_image(path)[0] if path else self.placeholder_image
        if "audio" in self.modalities:
            path = row.paths.get("audio")
            if path:
                rate, audio = read_audio(path)
                if rate != self.sample_rate:
                    # scipy.signal takes about a second to import: only a build that resamples pays it.
                    from mmjax.data.audio_features import resample

                    audio = resample(audio, rate, self.sample_rate)
            else:
                audio = np.zeros(self.placeholder_audio_length, np.float32)
            example["audio"] = audio.astype(np.float32)
        if "text" in self.modalities:
            example["text"] = row.text or ""
        for modality in self.optional:
            present = (row.text is not None) if modality == "text" else bool(row.paths.get(modality))
            example[mask_key(modality)] = np.float32(present)
        return example

    def examples(self, split: str) -> Iterator[tuple[int, dict[str, Any]]]:
        from tqdm import tqdm

        for row in tqdm(self.rows_by_split[split], desc=f"writing {split}", unit="example",
                        disable=not self.progress, file=sys.stderr):
            try:
                yield row.row, self.example(row)
            except Exception as error:
                raise RuntimeError(f"row {row.row}: checked good in pass 1 but failed to write ({error}); did the "
                                   "file change during the build?") from error


@dataclasses.dataclass
class BuildReport:
    manifest: str
    out: str
    dataset_dir: str
    examples: dict[str, int]
    skipped: int
    bad_rows: list[BadRow]
    classes: tuple[str, ...]
    modalities: tuple[str, ...]
    optional: tuple[str, ...]
    sample_rate: int | None
    task: str
    duplicates: Duplicates = dataclasses.field(default_factory=lambda: Duplicates([]))
    validation_carved: dict[str, Any] | None = None  # See `_carve_validation`.
    labelled: bool = True
    text_vocab_size: int | None = None  # Tokens of the text tokenizer (a text decoder's vocab_size); None: no text.

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["bad_rows"] = [dataclasses.asdict(b) | {"message": str(b)} for b in self.bad_rows]
        out["duplicates"] = self.duplicates.to_json()
        return out

    def summary(self, max_rows: int = 50) -> str:
        lines = [f"built {NAME} {VERSION} in {self.dataset_dir}"]
        lines.append("  examples: " + ", ".join(f"{s} {n}" for s, n in self.examples.items())
                     + f" (total {sum(self.examples.values())})")
        lines.append(f"  modalities: {', '.join(self.modalities)}"
                     + (f" (optional: {', '.join(self.optional)})" if self.optional else ""))
        if self.sample_rate:
            lines.append(f"  audio sample rate: {self.sample_rate} Hz")
        if self.task == "contrastive":
            kept = (f"labels kept as metadata and for zero-shot, {len(self.classes)} classes: "
                    + ", ".join(self.classes[:20]) + (" ..." if len(self.classes) > 20 else "")
                    if self.labelled else "no labels")
            lines.append(f"  paired ({' + '.join(self.modalities)}) for the contrastive and matching tasks "
                         f"(clip, siglip, itm); {kept}")
            if self.text_vocab_size and len(self.modalities) > 1:
                lines.append(f"  text as the target of a text decoder (captioner, task caption): tokenizer of "
                             f"{self.text_vocab_size} tokens")
        else:
            lines.append(f"  {self.task}, {len(self.classes)} classes: {', '.join(self.classes[:20])}"
                         + (" ..." if len(self.classes) > 20 else ""))
        if self.validation_carved:
            c = self.validation_carved
            lines.append(f"  validation: carved from train ({c['examples']} examples, --val-fraction {c['fraction']}, "
                         f"seed {c['seed']}): the split column had none")
        lines.append(f"  skipped rows: {self.skipped}" + (" (row = 1-based data row, line = file line):"
                                                           if self.bad_rows else ""))
        for bad in self.bad_rows[:max_rows]:
            lines.append(f"    {bad}")
        if len(self.bad_rows) > max_rows:
            lines.append(f"    ... and {len(self.bad_rows) - max_rows} more (see {REPORT_FILENAME})")
        lines += self.duplicates.summary()
        return "\n".join(lines)


def _train_tokenizer(plan: BuildPlan, vocab_size: int, directory: str) -> str:
    split = "train" if "train" in plan.rows_by_split else plan.splits[0]
    texts = [row.text for row in plan.rows_by_split[split] if row.text]
    if not texts:
        texts = [row.text for rows in plan.rows_by_split.values() for row in rows if row.text]
    save_tokenizer(train_tokenizer(texts, kind="wordpiece", vocab_size=vocab_size),
                   os.path.join(directory, TOKENIZER_FILENAME))
    return TOKENIZER_FILENAME


def _vocab_size(tokenizer: str | None, directory: str) -> int | None:
    """Tokens of the dataset's recorded tokenizer ("minilm", a path, or TOKENIZER_FILENAME in `directory`)."""
    if not tokenizer:
        return None
    path = os.path.join(directory, tokenizer) if tokenizer == TOKENIZER_FILENAME else tokenizer
    try:
        return tokenizer_from(path).get_vocab_size()
    except (OSError, ValueError, ImportError):  # E.g. MiniLM's package gone since: the build itself stands.
        return None


def dataset_dir(out: str) -> str:
    """Where a build into `out` writes: OUT/files/1.0.0."""
    return os.path.join(out, NAME, VERSION)


def build(manifest: str, out: str, options: Options | None = None, **kwargs) -> BuildReport:
    """Checks every row of `manifest`, then writes the good ones as TFDS `files` under `out` (module docstring).

    Options come as an `Options` or as its fields by keyword. Raises `BadRowError` (on_error="stop") at the first
    bad row and `ManifestError` for problems of the manifest or options as a whole; nothing is written then.
    """
    options = dataclasses.replace(options or Options(), **kwargs)
    manifest = os.path.abspath(manifest)
    out = os.path.abspath(out)
    header, rows = read_manifest(manifest)
    columns = manifest_columns(header, options.columns)
    _check_options(options, columns)
    modalities = tuple(m for m in MODALITIES if m in columns)
    target = os.path.join(out, NAME)
    if os.path.exists(target) and not options.overwrite:
        raise ManifestError(f"{target} already exists; pass --overwrite to replace it (only that folder is removed)")
    if not rows:
        raise ManifestError(f"manifest {manifest} has no data rows")

    tokenizer = None  # What the dataset's `tokenize` uses by default ("train": set once trained).
    if "text" in modalities and options.tokenizer not in ("train", "none"):
        try:
            tokenizer = options.tokenizer if options.tokenizer == "minilm" else os.path.abspath(
                tokenizer_path(options.tokenizer))
        except (FileNotFoundError, ImportError) as error:
            raise ManifestError(f"--tokenizer {options.tokenizer}: {error}") from None

    checked = check_rows(rows, columns, options, options.root or os.path.dirname(manifest), modalities)
    if not checked.good:
        raise ManifestError(f"no good rows in {manifest} ({len(checked.bad)} bad); first: {checked.bad[0]}")
    for modality in options.optional:
        if not any(row.text if modality == "text" else row.paths.get(modality) for row in checked.good):
            raise ManifestError(f"--optional {modality}: no good row has a {modality}; drop the column instead")
    duplicates = find_duplicates(checked.good)
    first_of = duplicates.first_of()
    good = [row for row in checked.good if not (options.dedup and row.row in first_of)]
    duplicates.dropped = options.dedup
    classes = class_names(good, options.classes)
    carved = None
    if "split" in columns:
        split_of = {row.row: row.split for row in good}
        carved = _carve_validation(good, split_of, first_of, options)
    else:  # Each group of copies is carved as one row (its first), so that it lands in one split.
        split_of = carve_splits([row for row in good if row.row not in first_of],
                                0.1 if options.val_fraction is None else options.val_fraction,
                                0.1 if options.test_fraction is None else options.test_fraction, options.split_seed)
    for row in good:
        if row.row in first_of:
            target = split_of[first_of[row.row].row]
            if "split" in columns and row.split != target:
                duplicates.moved.append((row, row.split, target))
            split_of[row.row] = target
    rows_by_split: dict[str, list[GoodRow]] = {}
    for row in good:
        rows_by_split.setdefault(split_of[row.row], []).append(row)
    order = [s for s in DEFAULT_SPLITS if s in rows_by_split] + sorted(set(rows_by_split) - set(DEFAULT_SPLITS))
    labelled = "label" in columns
    plan = BuildPlan(
        manifest=manifest,
        modalities=modalities,
        optional=tuple(m for m in modalities if m in options.optional),
        classes=classes if labelled else (UNLABELLED,),
        multilabel=options.label_sep is not None,
        paired=options.paired or not labelled,
        labelled=labelled,
        sample_rate=checked.sample_rate,
        rows_by_split={s: rows_by_split[s] for s in order},
        placeholder_image=_placeholder_png(checked.image_size) if "image" in options.optional else None,
        placeholder_audio_length=checked.audio_length,
        progress=options.progress,
    )
    plan.tokenizer = tokenizer

    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.utils import tqdm_utils

    if os.path.exists(target):
        shutil.rmtree(target)
    builder = _make_builder_class()(plan=plan, data_dir=out)
    was_active = tqdm_utils._active
    tfds.display_progress_bar(False)  # Ours report per split; TFDS's would interleave with them.
    try:  # TFDS prints its own progress lines to stdout; it downloads nothing, so its download dir is temporary.
        with contextlib.redirect_stdout(sys.stderr), tempfile.TemporaryDirectory() as downloads:
            builder.download_and_prepare(download_dir=downloads)
    finally:
        tfds.display_progress_bar(was_active)
    directory = dataset_dir(out)
    if "text" in modalities and options.tokenizer == "train":
        plan.tokenizer = _train_tokenizer(plan, options.vocab_size, directory)
        _write_metadata(directory, plan.metadata())
    report = BuildReport(
        manifest=manifest, out=out, dataset_dir=directory,
        examples={s: len(r) for s, r in plan.rows_by_split.items()}, skipped=len(checked.bad),
        bad_rows=checked.bad, classes=classes, modalities=modalities, optional=plan.optional,
        sample_rate=checked.sample_rate, task=plan.metadata()["task"], duplicates=duplicates,
        validation_carved=carved, labelled=labelled, text_vocab_size=_vocab_size(plan.tokenizer, directory),
    )
    with open(os.path.join(out, REPORT_FILENAME), "w") as f:
        json.dump(report.to_json(), f, indent=2)
    return report


def _carve_validation(good: Sequence[GoodRow], split_of: dict[int, str], first_of: Mapping[int, GoodRow],
                      options: Options) -> dict[str, Any] | None:
    """A split column with `train` but no `validation`: moves `--val-fraction` (default 0.1, at least one example)
    of train to a new validation split, stratified and seeded like `carve_splits` (copies of a row follow it
    later). Returns what build_report.json records, or None when nothing is carved."""
    splits = set(split_of.values())
    if "validation" in splits:
        if options.val_fraction is not None:
            raise ManifestError("the manifest's split column has a validation split; --val-fraction carves one from "
                                "train only when it has none")
        return None
    fraction = 0.1 if options.val_fraction is None else options.val_fraction
    train = [row for row in good if split_of[row.row] == "train" and row.row not in first_of]
    count = max(1, round(len(train) * fraction)) if fraction > 0 and len(train) >= 2 else 0
    if not count:
        return None
    carved = carve_splits(train, count / len(train), 0.0, options.split_seed)
    for row, split in carved.items():
        if split == "validation":
            split_of[row] = "validation"
    return {"from": "train", "fraction": fraction, "seed": options.split_seed, "examples": count,
            "stratified_by": "label" if any(row.labels for row in train) else None}


def _write_metadata(directory: str, metadata: Mapping[str, Any]) -> None:
    """Rewrites the dataset's metadata.json (TFDS's MetadataDict format: plain JSON)."""
    with open(os.path.join(directory, "metadata.json"), "w") as f:
        json.dump(dict(metadata), f, indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------------- demo data


def write_example_folder(folder: str, num_examples: int = 60, *, num_classes: int = 4, sample_rate: int = 8000,
                         seconds: float = 1.0, image_sizes: Sequence[int] = (28, 32, 40), text: bool = True,
                         seed: int = 0, manifest: str = "manifest.csv") -> str:
    """Writes a small learnable folder of your-own-data files and its manifest; returns the manifest's path.

    Class k: a PNG of a bright square whose position depends on k (sizes cycle through `image_sizes`, noise
    added), a WAV tone of 300 + 150 k Hz in noise (int16, `sample_rate`), and a caption naming its colour.
    Paths in the manifest are relative (images/, audio/, text/). `manifest` ending in .jsonl writes JSONL.
    For tests, benchmarks and trying `python -m mmjax.data.build`.
    """
    from PIL import Image
    from scipy.io import wavfile

    rng = np.random.default_rng(seed)
    colours = ("red", "green", "blue", "yellow", "purple", "white", "orange", "pink", "cyan", "grey")
    for sub in ("images", "audio", "text"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    records = []
    for i in range(num_examples):
        label = i % num_classes
        size = image_sizes[i % len(image_sizes)]
        pixels = rng.normal(40.0, 20.0, (size, size, 3))
        cells = int(np.ceil(np.sqrt(num_classes)))
        side = size // cells
        top, left = (label // cells) * side, (label % cells) * side
        pixels[top : top + side, left : left + side] += 160.0
        image_path = f"images/{i:04d}.png"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(os.path.join(folder, image_path))
        t = np.arange(int(seconds * sample_rate)) / sample_rate
        tone = 0.3 * np.sin(2 * np.pi * (300.0 + 150.0 * label) * t) + rng.normal(0.0, 0.05, t.size)
        audio_path = f"audio/{i:04d}.wav"
        wavfile.write(os.path.join(folder, audio_path), sample_rate, (np.clip(tone, -1, 1) * 32767).astype(np.int16))
        record = {"image": image_path, "audio": audio_path, "label": f"class_{label}"}
        if text:
            record["text"] = f"a {colours[label % len(colours)]} square, example {i}"
        records.append(record)
    path = os.path.join(folder, manifest)
    if manifest.endswith(".jsonl"):
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    else:
        import csv

        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    return path


# ---------------------------------------------------------------------------------------------- command line


def column_mapping(items: Sequence[str]) -> dict[str, str]:
    """`["image=photo", "text="]` -> {kind: column}; an empty column (`text=`) means no column of that kind (a
    column named like the kind is then metadata)."""
    mapping = {}
    for item in items:
        kind, sep, name = item.partition("=")
        if not sep or not kind.strip():
            raise ManifestError(f"--column {item!r} must look like KIND=COLUMN, e.g. image=photo_path (KIND= for "
                                "none)")
        mapping[kind.strip()] = name.strip()
    return mapping


def _csv_list(items: Sequence[str] | None) -> list[str]:
    return [part.strip() for item in items or () for part in item.split(",") if part.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mmjax.data.build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", required=True, help="CSV / TSV (header row) or JSONL file")
    p.add_argument("--out", required=True, help="output folder: the data_dir to train with (data.data_dir)")
    p.add_argument("--column", action="append", default=[], metavar="KIND=COLUMN",
                   help=f"manifest column of a kind ({', '.join(KINDS)}); default: the kind's own name")
    p.add_argument("--root", help="folder that relative paths start from (default: the manifest's folder)")
    p.add_argument("--sample-rate", type=int, help="audio sample rate in Hz (default: the first good file's)")
    p.add_argument("--resample", action="store_true", help="convert audio at other rates instead of rejecting it")
    p.add_argument("--optional", action="append", metavar="MODALITY",
                   help="modalities whose cells may be empty (stored as zeros with <modality>_mask = 0); "
                        "repeat or comma-separate")
    p.add_argument("--text-files", action="store_true", help="text cells are paths to UTF-8 text files")
    p.add_argument("--classes", help="comma-separated class names, in label-id order; other labels are bad rows")
    p.add_argument("--label-sep", help="several labels per cell separated by this (multi-label task)")
    p.add_argument("--paired", action="store_true",
                   help="a paired dataset (image-text, audio-text, ...) for clip / siglip / itm even with a label "
                        "column (kept as metadata and for zero-shot); without a label column it is the default")
    p.add_argument("--val-fraction", type=float,
                   help="without a split column: validation share (default 0.1); with one that has no validation "
                        "split: the share of train carved as validation (default 0.1; 0: none)")
    p.add_argument("--test-fraction", type=float, help="without a split column: test share (default 0.1)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the carved splits")
    p.add_argument("--on-error", choices=("skip", "stop"), default="stop",
                   help="bad rows: stop at the first (default) or skip them and report them")
    p.add_argument("--tokenizer", default="train",
                   help="text: 'train' (WordPiece on the train split, saved with the data), 'minilm', a "
                        "tokenizer.json path, or 'none'")
    p.add_argument("--vocab-size", type=int, default=8000, help="vocabulary of the trained tokenizer")
    p.add_argument("--dedup", action="store_true",
                   help="keep only the first of rows that store identical examples (default: keep them all, each "
                        "group in one split; either way they are reported)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT/files if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def caption_command(report: BuildReport) -> str:
    """The command that trains and evaluates a captioner (text as the target) on a paired build with text."""
    preset, reads = ("files", "images") if "image" in report.modalities else ("files_audio", "audio")
    return (f"caption its {reads} (the text as the target) with: python -m experiments.shapes_caption --preset "
            f"{preset} --workdir W --config.data.data_dir={report.out} "
            f"--config.model.decoder.vocab_size={report.text_vocab_size} (README \"Captioning\")")


def transcription_command(report: BuildReport) -> str:
    """The command that trains speech-to-text (a CTC head and a text decoder) on a paired audio + text build."""
    vocabulary = report.text_vocab_size
    return (f"transcribe its audio (speech-to-text: CTC and a text decoder, WER) with: python -m "
            f"experiments.spoken_numbers --preset files --workdir W --config.data.data_dir={report.out} "
            f"--config.model.ctc.vocab_size={vocabulary} --config.model.decoder.vocab_size={vocabulary} "
            "(README \"Speech-to-text\")")


def main(argv: Sequence[str] | None = None) -> BuildReport:
    args = parser().parse_args(argv)
    try:
        options = Options(
            columns=column_mapping(args.column), root=args.root, sample_rate=args.sample_rate,
            resample=args.resample, optional=tuple(_csv_list(args.optional)), text_files=args.text_files,
            classes=_csv_list([args.classes]) if args.classes is not None else None, label_sep=args.label_sep,
            val_fraction=args.val_fraction, test_fraction=args.test_fraction, split_seed=args.split_seed,
            on_error=args.on_error, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
            overwrite=args.overwrite, progress=not args.quiet, dedup=args.dedup, paired=args.paired,
        )
        report = build(args.manifest, args.out, options)
    except (ManifestError, BadRowError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    print(report.summary())
    if report.task == "contrastive":
        classes = max(1, len(report.classes))
        print(f"train CLIP / SigLIP / ITM on it with, e.g.: python -m experiments.shapes_clip --workdir W "
              f"--config.data.name=files --config.data.data_dir={report.out} --config.model.num_classes={classes} "
              "--config.eval.splits=validation,test (see the README, \"Your own data\")")
        if report.text_vocab_size and len(report.modalities) > 1:
            print(caption_command(report))
            if "audio" in report.modalities:
                print(transcription_command(report))
    else:
        print(f"train on it with: --config.data.name=files --config.data.data_dir={report.out}")
    return report


if __name__ == "__main__":
    main()
