"""The index format: a collection's embeddings in shards, with ids and the manifest's metadata, written atomically
and versioned with the model's fingerprint.

    IDX/index.json            format, fingerprint, workdir, step, modality, kind, dimension, count, manifest,
                              columns, shards [{"embeddings", "items", "rows"}], bad rows, the ANN index if any
    IDX/shard-00000.npy       float32 [rows, D] unit embeddings (a fusion model's features are L2-normalised)
    IDX/shard-00000.jsonl     one item per line: {"id", "row", "line", <metadata columns>, "<modality>": cell}
    IDX/ann.faiss             optional: the faiss index of `--ann` (mmjax.search.ann)

Writing (`IndexWriter`): shards go to `IDX.partial/` (each file written under a temporary name and renamed, the
items file last, so a shard is either complete or absent), with `plan.json` saying what is being built (the model's
fingerprint, the manifest's hash, the options). An interrupted `index` resumes there: the same command skips the
complete shards; a different one starts the partial build afresh. Only when every shard is written is
`index.json` written and the directory swapped in place of `IDX` (`IDX` -> `IDX.previous`, `IDX.partial` -> `IDX`,
then `IDX.previous` removed): until then an existing index at `IDX` is untouched, and a kill between the two
renames is repaired by the next `index` or query (`recover`).

Reading (`Index`): `check_model(fingerprint)` refuses a model whose fingerprint differs from the index's (a query
embedded by other towers would be compared with the wrong vectors), naming both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

FORMAT = 1
INDEX_FILE = "index.json"
PLAN_FILE = "plan.json"
ANN_FILE = "ann.faiss"
PARTIAL, PREVIOUS = ".partial", ".previous"


class IndexError_(ValueError):  # noqa: N801 - "IndexError" is a builtin.
    """An index that cannot be used (missing, unreadable, another model's): the message says why."""


def file_hash(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def recover(path: str) -> None:
    """Finishes or undoes a swap that a kill interrupted (module docstring)."""
    previous = path + PREVIOUS
    if os.path.isdir(previous):
        if os.path.isdir(path):
            shutil.rmtree(previous)
        else:
            os.replace(previous, path)


def _write_atomic(path: str, write) -> None:
    tmp = f"{path}.tmp"
    write(tmp)
    os.replace(tmp, path)


def _save_npy(path: str, array: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array)
    _write_atomic(path, write)


def _save_text(path: str, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    _write_atomic(path, write)


def shard_names(index: int) -> tuple[str, str]:
    return f"shard-{index:05d}.npy", f"shard-{index:05d}.jsonl"


class IndexWriter:
    """Writes an index into `path` shard by shard (module docstring). `plan` describes the build (model
    fingerprint, manifest hash, options, shard count): equal plans resume, others restart the partial build."""

    def __init__(self, path: str, plan: Mapping[str, Any]):
        self.path = os.path.abspath(path)
        self.partial = self.path + PARTIAL
        self.plan = json.loads(json.dumps(dict(plan), sort_keys=True, default=str))
        recover(self.path)
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise IndexError_(f"{self.path} exists and is not a directory")
        saved = None
        plan_file = os.path.join(self.partial, PLAN_FILE)
        if os.path.isfile(plan_file):
            try:
                with open(plan_file) as f:
                    saved = json.load(f)
            except ValueError:
                saved = None
        self.resumed = saved == self.plan
        if not self.resumed:
            shutil.rmtree(self.partial, ignore_errors=True)
            os.makedirs(self.partial)
            _save_text(plan_file, json.dumps(self.plan, indent=2, sort_keys=True))

    def done(self, shard: int) -> bool:
        """Whether shard `shard` is complete (from this or an interrupted earlier run)."""
        return os.path.exists(os.path.join(self.partial, shard_names(shard)[1]))

    def write_shard(self, shard: int, embeddings: np.ndarray, items: Sequence[Mapping[str, Any]]) -> None:
        if len(embeddings) != len(items):
            raise ValueError(f"shard {shard}: {len(embeddings)} embeddings for {len(items)} items")
        vectors, records = shard_names(shard)
        _save_npy(os.path.join(self.partial, vectors), np.asarray(embeddings, np.float32))
        _save_text(os.path.join(self.partial, records), "".join(json.dumps(i, default=str) + "\n" for i in items))

    def shard_rows(self, shard: int) -> int:
        with open(os.path.join(self.partial, shard_names(shard)[1])) as f:
            return sum(1 for _ in f)

    def extra_file(self, name: str) -> str:
        """Where to write another file of the index (e.g. the ANN index) before `finish`."""
        return os.path.join(self.partial, name)

    def finish(self, info: Mapping[str, Any], shards: int) -> Index:
        """Writes index.json (with the shard list) and swaps the new index in place (module docstring)."""
        listed = []
        for shard in range(shards):
            vectors, records = shard_names(shard)
            listed.append({"embeddings": vectors, "items": records, "rows": self.shard_rows(shard)})
        meta = {"format": FORMAT, **info, "count": sum(s["rows"] for s in listed), "shards": listed}
        _save_text(os.path.join(self.partial, INDEX_FILE), json.dumps(meta, indent=2, default=str))
        os.remove(os.path.join(self.partial, PLAN_FILE))
        if os.path.isdir(self.path):
            os.replace(self.path, self.path + PREVIOUS)
        os.replace(self.partial, self.path)
        recover(self.path)
        return Index(self.path)


@dataclasses.dataclass
class Index:
    """A finished index (module docstring); `embeddings()` and `items()` read its shards."""

    path: str
    meta: dict[str, Any] = dataclasses.field(init=False)

    def __post_init__(self):
        self.path = os.path.abspath(self.path)
        recover(self.path)
        file = os.path.join(self.path, INDEX_FILE)
        if not os.path.isfile(file):
            partial = os.path.isdir(self.path + PARTIAL)
            raise IndexError_(f"no index at {self.path} ({INDEX_FILE} missing)" + (
                f"; {self.path + PARTIAL} holds an interrupted build: run the same index command again to resume it"
                if partial else "; build one with python -m mmjax.search index"))
        try:
            with open(file) as f:
                self.meta = json.load(f)
        except ValueError as error:
            raise IndexError_(f"{file} cannot be read ({error}); rebuild the index") from None
        if self.meta.get("format") != FORMAT:
            raise IndexError_(f"{file} has format {self.meta.get('format')!r}, expected {FORMAT}; rebuild the index")

    @property
    def count(self) -> int:
        return int(self.meta["count"])

    @property
    def dim(self) -> int:
        return int(self.meta["dimension"])

    @property
    def modality(self) -> str:
        return self.meta["modality"]

    def check_model(self, fingerprint: str, described: str) -> None:
        """Refuses a model other than the one that embedded the collection."""
        if fingerprint != self.meta["fingerprint"]:
            raise IndexError_(
                f"index {self.path} was built with another model (fingerprint {self.meta['fingerprint']}: workdir "
                f"{self.meta['workdir']} step {self.meta['step']}); {described} has fingerprint {fingerprint}, and its "
                "towers embed queries differently. Query with the index's model (the default, without --workdir), "
                "or rebuild the index with this one"
            )

    def _shard_offsets(self) -> list[tuple[int, int, dict]]:
        offsets, start = [], 0
        for shard in self.meta["shards"]:
            offsets.append((start, start + shard["rows"], shard))
            start += shard["rows"]
        return offsets

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Embeddings of items [start, stop) (only the shards that hold them are read)."""
        parts = []
        for first, last, shard in self._shard_offsets():
            if last <= start or first >= stop:
                continue
            array = np.load(os.path.join(self.path, shard["embeddings"]), mmap_mode="r")
            parts.append(np.asarray(array[max(start, first) - first : min(stop, last) - first], np.float32))
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)

    def embeddings(self) -> np.ndarray:
        return self.read_rows(0, self.count)

    def items(self) -> Iterator[dict[str, Any]]:
        for shard in self.meta["shards"]:
            with open(os.path.join(self.path, shard["items"])) as f:
                for line in f:
                    yield json.loads(line)

    def item_list(self) -> list[dict[str, Any]]:
        return list(self.items())

    def describe(self) -> str:
        m = self.meta
        return (f"{self.count:,} {m['modality']} items, {m['dimension']}-d {m['kind']} of {m['workdir']} step "
                f"{m['step']} (fingerprint {m['fingerprint']})")
