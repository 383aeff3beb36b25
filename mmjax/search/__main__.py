"""`python -m mmjax.search index | query | recall | bench` (see the `mmjax.search` docstring)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from mmjax import runtime


def _step(text: str | None) -> int | str | None:
    if text is None or text in ("best", "latest"):
        return text
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r}: give best, latest or a step number")


def parser() -> argparse.ArgumentParser:
    import mmjax.search as package
    from mmjax.cli import add_multiprocess_arguments

    p = argparse.ArgumentParser(prog="python -m mmjax.search", description=package.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)

    index = commands.add_parser("index", help="embed a collection into an index")
    index.add_argument("--workdir", required=True, help="a trained model's workdir (WORKDIR/<variant>)")
    index.add_argument("--manifest", required=True, help="CSV / TSV / JSONL with the columns of mmjax.data.build")
    index.add_argument("--out", required=True, help="the index directory (replaced atomically when done)")
    index.add_argument("--step", type=_step, default="best", help="best (default), latest or a step number")
    index.add_argument("--modality", choices=("image", "audio", "text"), help="the column to embed")
    index.add_argument("--batch", type=int, help="global batch size (default: data.eval_batch_size)")
    index.add_argument("--shard-size", type=int, default=4096, help="items per shard (the unit of resuming)")
    index.add_argument("--id-column", help="the column naming items (default: id if present, else the row)")
    index.add_argument("--on-error", choices=("stop", "skip"), default="stop", help="bad rows: stop, or skip them")
    index.add_argument("--ann", choices=("ivf", "hnsw"), help="also build a faiss index (recall@10 recorded)")
    index.add_argument("--nlist", type=int, help="IVF cells (default 4 sqrt(N))")
    index.add_argument("--nprobe", type=int, help="IVF cells scanned per query (default 16, at most --nlist)")
    index.add_argument("--column", action="append", default=[], metavar="KIND=COLUMN")
    index.add_argument("--root", help="folder that relative paths start from (default: the manifest's folder)")
    index.add_argument("--text-files", action="store_true", help="text cells are paths to UTF-8 text files")
    index.add_argument("--quiet", action="store_true")
    add_multiprocess_arguments(index)

    query = commands.add_parser("query", help="search an index")
    query.add_argument("--index", required=True)
    what = query.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="a text query")
    what.add_argument("--image", help="an image file as the query")
    what.add_argument("--audio", help="a WAV file as the query")
    query.add_argument("--k", type=int, default=10, help="results (default 10)")
    query.add_argument("--rerank", type=int, default=0, metavar="N",
                       help="re-score the top N with the matching model's ITM head")
    query.add_argument("--ann", action="store_true", help="use the index's faiss index instead of exact search")
    query.add_argument("--json", action="store_true", help="print the results as JSON")
    query.add_argument("--contact-sheet", metavar="PNG", help="draw the top images with captions and scores")
    query.add_argument("--workdir", help="query with another workdir (refused unless it is the same model)")
    query.add_argument("--step", type=_step, help="its step (default: the index's)")

    recall = commands.add_parser("recall", help="recall@1/5/10 of a query manifest")
    recall.add_argument("--index", required=True)
    recall.add_argument("--queries", required=True, help="a manifest with one query column and the target ids")
    recall.add_argument("--target-column", default="id", help="the id of the item each query should find")
    recall.add_argument("--modality", choices=("image", "audio", "text"), help="the query column")
    recall.add_argument("--ann", action="store_true")
    recall.add_argument("--on-error", choices=("stop", "skip"), default="stop")
    recall.add_argument("--column", action="append", default=[], metavar="KIND=COLUMN")
    recall.add_argument("--json", help="also write the result here")
    recall.add_argument("--quiet", action="store_true")

    commands.add_parser("bench", help="exact and ANN search speed on random embeddings", add_help=False)
    return p


def _index(args) -> Any:
    from mmjax import reporting
    from mmjax.data.build import column_mapping
    from mmjax.inference import read_manifest
    from mmjax.predict import Predictor
    from mmjax.search import ann
    from mmjax.search.collection import build_index
    from mmjax.train import parallel
    from mmjax.train.workdir import model_fingerprint

    parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    manifest = read_manifest(args.manifest, columns=column_mapping(args.column), root=args.root,
                             text_files=args.text_files)
    options = {"nlist": args.nlist, "nprobe": args.nprobe}  # None: the default (`mmjax.search.ann`).
    ann.check_options(args.ann, len(manifest.rows), options)  # Before loading the model (`build_index` again).
    predictor = Predictor.load(args.workdir, args.step, args.batch)
    index = build_index(predictor, manifest, args.out, fingerprint=model_fingerprint(predictor.setup, predictor.state),
                        modality=args.modality, shard_size=args.shard_size, id_column=args.id_column,
                        on_error=args.on_error, ann=args.ann, ann_options=options, progress=not args.quiet)
    if index is not None:
        reporting.console(f"wrote {index.path}: {index.describe()}")
        bad = index.meta["bad_rows"]
        if bad:
            reporting.console(f"skipped rows: {len(bad)} (row = 1-based data row, line = file line):")
            for message in bad[:50]:
                reporting.console(f"  {message}")
        if "ann" in index.meta:
            a = index.meta["ann"]
            recall = next(k for k in a if k.startswith("recall@"))  # recall@10, or @N for fewer than 10 items.
            reporting.console(f"ANN ({a['kind']}, {a['params']}): {recall} {a[recall]:.4f} against exact search on "
                              f"{a['recall_queries']} of the items as queries")
    return index


def _query(args) -> Any:
    from mmjax.data.raw_inputs import read_cell
    from mmjax.search import contact_sheet
    from mmjax.search.query import Searcher, report, table

    searcher = Searcher.open(args.index, workdir=args.workdir, step=args.step)
    modality, text = ("text", args.text) if args.text is not None else ("image", args.image) \
        if args.image is not None else ("audio", args.audio)
    searcher.check_query(modality)
    value = text if modality == "text" else read_cell(modality, text, ".")
    hits = searcher.query(modality, value, args.k, rerank=args.rerank, ann=args.ann)
    if args.json:
        print(json.dumps(report(hits), indent=2, default=str))
    else:
        print(f"{searcher.index.describe()}\nquery ({modality}): {text}  [{'ANN' if args.ann else 'exact'}"
              f"{f', ITM re-ranked top {args.rerank}' if args.rerank else ''}]")
        print(table(hits, searcher.index.modality))
    if args.contact_sheet:
        contact_sheet.write(args.contact_sheet, hits, searcher.index, query=f"{modality}: {text}",
                            query_image=value if modality == "image" else None)
        print(f"contact sheet: {args.contact_sheet}", file=sys.stderr if args.json else sys.stdout)
    return hits


def _recall(args) -> Any:
    from mmjax.data.build import column_mapping
    from mmjax.inference import read_manifest
    from mmjax.search.query import Searcher

    searcher = Searcher.open(args.index)
    manifest = read_manifest(args.queries, columns=column_mapping(args.column))
    result = searcher.recall(manifest, target_column=args.target_column, modality=args.modality, ann=args.ann,
                             on_error=args.on_error, progress=not args.quiet)
    print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def main(argv: Sequence[str] | None = None) -> Any:
    runtime.prepare_process(reexec=argv is None)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from mmjax.search import benchmark

        return benchmark.main(argv[1:])
    args = parser().parse_args(argv)
    from mmjax.data.build import ManifestError
    from mmjax.search.index_store import IndexError_

    try:
        return {"index": _index, "query": _query, "recall": _recall}[args.command](args)
    except (IndexError_, ManifestError, ValueError, FileNotFoundError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
