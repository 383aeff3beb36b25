"""`query` and `recall`: search an index by text, image or audio with the model that built it.

`Searcher.open(IDX)` loads the index's workdir at its step (or `--workdir` / `--step`: refused unless that model's
fingerprint is the index's), checks that the query's modality has a tower (a dual encoder answers cross-modal
queries, e.g. text -> images; a fusion model's features answer queries of the indexed modality only), embeds the
query with the workdir's evaluation preprocessing, and finds the top k by exact, device-sharded search
(`mmjax.search.exact`) or, with `ann=True`, the index's faiss index. `rerank=N` (matching models) re-scores the
exact top N with the cross-attention ITM head and orders them by it (ALBEF's re-ranking).

`recall` runs every query of a manifest (one modality column, plus the id of the item each query should find)
through the same path and reports recall@1/5/10: the fraction of queries whose item is among the top k.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mmjax import reporting
from mmjax.search.index_store import ANN_FILE, Index, IndexError_

RECALL_AT = (1, 5, 10)


@dataclasses.dataclass
class Hit:
    rank: int
    score: float
    item: dict[str, Any]
    itm_logit: float | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"rank": self.rank, "score": self.score, **self.item}
        if self.itm_logit is not None:
            out["itm_logit"] = self.itm_logit
        return out


class Searcher:
    """An index and the model that built it, ready for queries (module docstring)."""

    def __init__(self, index: Index, predictor: Any):
        self.index, self.predictor = index, predictor
        self._exact = None
        self._ann = None
        self._items: list[dict[str, Any]] | None = None

    @classmethod
    def open(cls, path: str, *, workdir: str | None = None, step: int | str | None = None,
             batch_size: int | None = None) -> Searcher:
        from mmjax.predict import Predictor
        from mmjax.train.workdir import model_fingerprint

        index = Index(path)
        workdir = workdir or index.meta["workdir"]
        step = step if step is not None else index.meta["step"]
        predictor = Predictor.load(workdir, step, batch_size)
        fingerprint = model_fingerprint(predictor.setup, predictor.state)
        index.check_model(fingerprint, f"workdir {workdir} step {predictor.step}")
        return cls(index, predictor)

    @property
    def items(self) -> list[dict[str, Any]]:
        if self._items is None:
            self._items = self.index.item_list()
        return self._items

    @property
    def towers(self) -> tuple[str, ...]:
        return tuple(sorted(self.predictor.setup.config.model.encoders))

    def check_query(self, modality: str) -> None:
        """A query modality needs a tower, and a fusion model's features compare like with like."""
        from mmjax.inference import model_kind

        if modality not in self.towers:
            raise IndexError_(
                f"the index has no {modality} tower: its model ({self.index.meta['workdir']}) embeds "
                f"{', '.join(self.towers)}; query with --{' / --'.join(self.towers)}"
            )
        if model_kind(self.predictor.setup.model) == "features" and modality != self.index.modality:
            article = "an" if modality[0] in "aeiou" else "a"
            raise IndexError_(
                f"{article} {modality} query cannot search {self.index.modality} features: this index holds the pooled "
                f"features of a fusion model's {self.index.modality} encoder, which only compare with "
                f"{self.index.modality} queries (a dual encoder's towers compare across modalities)"
            )

    def embed(self, modality: str, values: Sequence[Any]) -> np.ndarray:
        """`[Q, D]` query embeddings (unit norm) of raw values, as the index's items were embedded."""
        from mmjax.search.collection import normalize

        self.check_query(modality)
        return normalize(self.predictor.embed(modality, values))

    def search(self, queries: np.ndarray, k: int, *, ann: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """`(scores, rows)` `[Q, k]` of the top k items per query (exact unless `ann`)."""
        k = min(k, self.index.count)
        if ann:
            if self._ann is None:
                from mmjax.search import ann as ann_lib

                path = os.path.join(self.index.path, ANN_FILE)
                if not os.path.exists(path):
                    raise IndexError_(f"index {self.index.path} has no ANN index: build it with python -m "
                                      "mmjax.search index ... --ann ivf (or hnsw)")
                self._ann = ann_lib.load(path)
            from mmjax.search import ann as ann_lib

            return ann_lib.search(self._ann, queries, k)
        if self._exact is None:
            from mmjax.search.exact import ExactIndex

            self._exact = ExactIndex.from_rows(self.index.count, self.index.dim, self.index.read_rows)
        return self._exact.search(queries, k)

    def rerank(self, modality: str, value: Any, rows: Sequence[int]) -> np.ndarray:
        """ITM logits of (query, item) for the given item rows (matching models; image-text)."""
        from mmjax.data.raw_inputs import read_cell
        from mmjax.inference import Preparer, itm_step

        if not self.predictor._is_matching():
            raise IndexError_(f"--rerank needs a matching (ITM) model; {self.index.meta['workdir']} is a "
                              f"{self.index.meta['model']}")
        other = self.index.modality
        if {modality, other} != {"image", "text"}:
            raise IndexError_(f"--rerank scores image-text pairs; this is a {modality} query over {other} items")
        meta = self.index.meta
        preparer = Preparer(self.predictor.setup, ["image", "text"])
        pairs = []
        for row in rows:
            raw = read_cell(other, self.items[row][other], meta["root"], text_files=meta.get("text_files", False))
            pairs.append(preparer({modality: value, other: raw}))
        step = self.predictor._cached("itm", lambda: itm_step(self.predictor.setup.model))
        run = self.predictor.runner.run(step, len(pairs), pairs.__getitem__, preparer.placeholder(), on_error="stop")
        return run.outputs["itm_logit"]

    def query(self, modality: str, value: Any, k: int = 10, *, rerank: int = 0, ann: bool = False) -> list[Hit]:
        """The top k items for one raw query value (module docstring)."""
        if k < 1:
            raise ValueError(f"--k {k} must be at least 1")
        vector = self.embed(modality, [value])
        depth = max(k, rerank)
        scores, rows = self.search(vector, depth, ann=ann)
        found = [(float(s), int(r)) for s, r in zip(scores[0], rows[0]) if r >= 0]
        if rerank:
            head, tail = found[:rerank], found[rerank:]
            logits = self.rerank(modality, value, [r for _, r in head])
            order = np.argsort(-logits, kind="stable")
            hits = [Hit(i + 1, head[j][0], self.items[head[j][1]], float(logits[j])) for i, j in enumerate(order)]
            hits += [Hit(len(hits) + i + 1, s, self.items[r]) for i, (s, r) in enumerate(tail)]
            return hits[:k]
        return [Hit(i + 1, s, self.items[r]) for i, (s, r) in enumerate(found[:k])]

    def recall(self, manifest: Any, *, target_column: str = "id", modality: str | None = None,
               ann: bool = False, on_error: str = "stop", progress: bool = True) -> dict[str, Any]:
        """recall@1/5/10 of the queries of `manifest` (module docstring)."""
        from mmjax.inference import Preparer, embed_step
        from mmjax.search.collection import normalize

        if target_column not in manifest.header:
            raise ValueError(f"--target-column {target_column}: manifest {manifest.path} has no such column "
                             f"(columns: {', '.join(manifest.header)})")
        present = [m for m in ("image", "audio", "text") if m in manifest.columns]
        modality = modality or (present[0] if len(present) == 1 else None)
        if modality is None:
            raise ValueError(f"manifest {manifest.path} has columns of {present}: say which is the query with "
                             "--modality")
        self.check_query(modality)
        preparer = Preparer(self.predictor.setup, [modality])
        preparer.check_columns(manifest, need=[modality])
        step = self.predictor._cached(("embed", modality),
                                      lambda: embed_step(self.predictor.setup.model, modality,
                                                         self.predictor.setup.spec))
        run = self.predictor.runner.run(step, len(manifest.rows), lambda i: preparer.row(manifest, i),
                                        preparer.placeholder(), on_error=on_error,
                                        progress="embedding queries" if progress else None)
        queries = normalize(run.outputs["embedding"][run.ok])
        k = min(max(RECALL_AT), self.index.count)
        _, rows = self.search(queries, k, ann=ann)
        ids = [str(item["id"]) for item in self.items]
        targets = [str(manifest.rows[i].cells.get(target_column)) for i in np.flatnonzero(run.ok)]
        known = set(ids)
        unknown = sorted({t for t in targets if t not in known})
        if unknown:
            raise ValueError(f"{len(unknown)} target id(s) of {manifest.path} are not in the index, e.g. "
                             f"{unknown[:3]} (column {target_column!r}; the index's ids come from its "
                             f"{self.index.meta.get('id_column') or 'row numbers'})")
        found = np.asarray([[ids[r] == t if r >= 0 else False for r in hit] for hit, t in zip(rows, targets)])
        result = {f"recall@{c}": float(found[:, :c].any(axis=1).mean()) for c in RECALL_AT if c <= k}
        result.update(queries=int(run.ok.sum()), items=self.index.count, skipped=len(run.errors),
                      search="ann" if ann else "exact")
        return result


def table(hits: Sequence[Hit], modality: str, width: int = 120) -> str:
    """The hits as a console table: rank, score (and ITM logit), id, the item's cell, then its metadata."""
    if not hits:
        return "(no results)"
    skip = {"rank", "score", "id", "row", "line", modality}
    extra = [k for k in hits[0].item if k not in skip]
    header = ["rank", "score"] + (["itm"] if hits[0].itm_logit is not None else []) + ["id", modality, *extra]
    rows = []
    for hit in hits:
        cells = [str(hit.rank), f"{hit.score:.4f}"] + ([f"{hit.itm_logit:.3f}"] if hit.itm_logit is not None
                                                        else [])
        cells += [str(hit.item.get("id")), str(hit.item.get(modality))] + [str(hit.item.get(k, "")) for k in extra]
        rows.append([c if len(c) <= 48 else c[:45] + "..." for c in cells])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(line[:width] for line in lines)


def caption_of(item: Mapping[str, Any], index: Index) -> str:
    """What to print under an item in a contact sheet: its text or caption column, else its id."""
    for key in ("text", "caption", "captions", "title", "label"):
        if key in item and key != index.modality and item[key] not in (None, ""):
            return str(item[key])
    return str(item.get("id"))


def report(hits: Sequence[Hit]) -> list[dict[str, Any]]:
    return [h.to_json() for h in hits]


def console_summary(searcher: Searcher) -> None:
    reporting.console(f"index: {searcher.index.describe()}")
