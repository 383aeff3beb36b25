"""`index`: embed a collection (a manifest of images, audio clips or texts) with a trained workdir's towers into an
index (`index_store`), shard by shard, resumable.

What is embedded: for a dual encoder or matching model, one tower's unit embeddings (`--modality`, default the
manifest's image column, else audio, else text: an image collection with captions is indexed by its images, the
captions kept as metadata); for a fusion (classification) model, the pooled features of that modality's encoder,
L2-normalised (so scores are cosines; such an index answers queries of the same modality only). Every other
column of the manifest (ids, captions, labels) is stored with each item; `--id-column` (default `id` when the
manifest has one, else the row number) names items in results.

Data-parallel over every device, and over several processes with the flags of training (`--num_processes`, ...):
each process prepares and embeds its share of every batch (`mmjax.inference.Runner`), process 0 alone writes the
index (`mmjax.search.processes`), so the index equals a single process's.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mmjax import reporting
from mmjax.search import ann as ann_lib
from mmjax.search import processes
from mmjax.search.index_store import ANN_FILE, Index, IndexWriter, file_hash

DEFAULT_SHARD_SIZE = 4096
PREFERRED = ("image", "audio", "text")


def choose_modality(manifest: Any, model_modalities: Sequence[str], wanted: str | None) -> str:
    """`wanted`, or the first of image / audio / text that the manifest has a column for and the model takes."""
    if wanted:
        if wanted not in model_modalities:
            raise ValueError(f"--modality {wanted}: the model has no {wanted} input (its inputs: "
                             f"{', '.join(model_modalities)})")
        if wanted not in manifest.columns:
            raise ValueError(f"--modality {wanted}: manifest {manifest.path} has no {wanted} column (columns: "
                             f"{', '.join(manifest.header)}; map one with --column {wanted}=NAME)")
        return wanted
    for modality in PREFERRED:
        if modality in manifest.columns and modality in model_modalities:
            return modality
    raise ValueError(f"manifest {manifest.path} has no column the model can embed (model inputs: "
                     f"{', '.join(model_modalities)}; columns: {', '.join(manifest.header)})")


def normalize(embeddings: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return (embeddings / np.maximum(norms, 1e-12)).astype(np.float32)


def build_index(predictor: Any, manifest: Any, out: str, *, fingerprint: str, modality: str | None = None,
                shard_size: int = DEFAULT_SHARD_SIZE, id_column: str | None = None, on_error: str = "stop",
                ann: str | None = None, ann_options: Mapping[str, Any] | None = None,
                progress: bool = True) -> Index | None:
    """Embeds every row of `manifest` with `predictor`'s model into the index at `out` (module docstring;
    `predictor` is a loaded `mmjax.predict.Predictor`, `manifest` a `mmjax.inference.Manifest`). Returns the
    index; None on the other processes of a multi-process run, which embed their share of each batch while
    process 0 writes (`mmjax.search.processes`)."""
    from tqdm import tqdm

    from mmjax.data.build import cell_value
    from mmjax.inference import Preparer, embed_step, model_kind

    setup = predictor.setup
    model_modalities = tuple(sorted(setup.config.model.encoders))
    modality = choose_modality(manifest, model_modalities, modality)
    preparer = Preparer(setup, [modality])
    preparer.check_columns(manifest, need=[modality], foreign=True)
    if shard_size < 1:
        raise ValueError(f"--shard-size {shard_size} must be at least 1")
    column = manifest.columns[modality]
    metadata_columns = [c for c in manifest.header if c != column]  # Captions of an image collection included.
    if id_column is None:
        id_column = "id" if "id" in metadata_columns else None
    elif id_column not in manifest.header:
        raise ValueError(f"--id-column {id_column}: manifest {manifest.path} has no such column (columns: "
                         f"{', '.join(manifest.header)})")
    kind = model_kind(setup.model)
    count = len(manifest.rows)
    ann_options = {k: v for k, v in (ann_options or {}).items() if v is not None}
    ann_lib.check_options(ann, count, ann_options)
    shards = math.ceil(count / shard_size)
    plan = {"fingerprint": fingerprint, "manifest": manifest.path, "manifest_hash": file_hash(manifest.path),
            "modality": modality, "shard_size": shard_size, "columns": manifest.columns, "root": manifest.root,
            "text_files": manifest.text_files, "id_column": id_column, "on_error": on_error}
    writer = processes.on_primary(lambda: IndexWriter(out, plan), "open the index build")  # Process 0 writes.
    done = processes.shards_done(writer.done if writer else None, shards)
    if writer is not None and writer.resumed and any(done):
        reporting.console(f"resuming the interrupted index build in {writer.partial}: {sum(done)} of {shards} "
                          "shards already written")
    step = predictor._cached(("embed", modality), lambda: embed_step(setup.model, modality, setup.spec))
    bar = tqdm(total=count, initial=min(count, sum(done) * shard_size), desc=f"indexing {modality}", unit="item",
               file=sys.stderr, dynamic_ncols=True, disable=not progress or not reporting.is_primary())
    started = time.time()
    try:
        for shard in range(shards):
            if done[shard]:
                continue
            rows = list(range(shard * shard_size, min(count, (shard + 1) * shard_size)))

            def prepare(i: int, rows=rows) -> dict[str, np.ndarray]:
                return preparer.row(manifest, rows[i])

            run = predictor.runner.run(step, len(rows), prepare, preparer.placeholder(), on_error=on_error)
            errors = {rows[i]: message for i, message in
                      {**run.errors, **predictor._remote_errors(run.ok, run.errors, prepare)}.items()}
            embeddings = run.outputs["embedding"][run.ok]
            if kind == "features":
                embeddings = normalize(embeddings)
            items = []
            for i in np.flatnonzero(run.ok):
                row = manifest.rows[rows[i]]
                metadata = {c: row.cells.get(c) for c in metadata_columns}
                item_id = metadata.get(id_column) if id_column else row.row
                items.append({"id": item_id, "row": row.row, "line": row.line, **metadata,
                              modality: cell_value(row, column, strip=modality != "text")})
            if writer is not None:
                _write_bad(writer, shard, [errors[r] for r in sorted(errors)])
                writer.write_shard(shard, embeddings, items)
            bar.update(len(rows))
    finally:
        bar.close()
    info = {"workdir": os.path.abspath(predictor.workdir or ""), "step": predictor.step, "fingerprint": fingerprint,
            "modality": modality, "kind": "unit embeddings" if kind == "towers" else "pooled features (L2-normalised)",
            "model": type(setup.model).__name__, "towers": list(model_modalities),
            "dimension": None, "manifest": manifest.path, "root": manifest.root, "columns": manifest.columns,
            "text_files": manifest.text_files, "id_column": id_column, "metadata_columns": metadata_columns,
            "bad_rows": None, "seconds": round(time.time() - started, 1)}
    return processes.on_primary(lambda: _finish(writer, info, shards, ann, ann_options), "finish the index")


def _finish(writer: IndexWriter, info: dict[str, Any], shards: int, ann: str | None,
            ann_options: Mapping[str, Any]) -> Index:
    """Process 0, once every shard is written: the bad rows and dimension into index.json, the ANN index if asked
    for, and the swap into place (`IndexWriter.finish`)."""
    info["bad_rows"] = [message for shard in range(shards) for message in _read_bad(writer, shard)]
    dims = {np.load(os.path.join(writer.partial, f"shard-{s:05d}.npy"), mmap_mode="r").shape[1]
            for s in range(shards)}
    info["dimension"] = int(next(iter(dims)))
    if ann:
        embeddings = np.concatenate([np.load(os.path.join(writer.partial, f"shard-{s:05d}.npy")) for s in
                                     range(shards)])
        info["ann"] = ann_lib.build(embeddings, ann, writer.extra_file(ANN_FILE), **ann_options)
    return writer.finish(info, shards)


def _bad_file(writer: IndexWriter, shard: int) -> str:
    return writer.extra_file(f"shard-{shard:05d}.bad.txt")


def _write_bad(writer: IndexWriter, shard: int, messages: Sequence[str]) -> None:
    path = _bad_file(writer, shard)
    with open(path + ".tmp", "w") as f:
        f.write("".join(m + "\n" for m in messages))
    os.replace(path + ".tmp", path)


def _read_bad(writer: IndexWriter, shard: int) -> list[str]:
    path = _bad_file(writer, shard)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line.rstrip("\n") for line in f if line.strip()]
