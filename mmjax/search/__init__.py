"""Search a collection with a trained workdir's towers: by text, image or audio.

    python -m mmjax.search index --workdir W --manifest collection.csv --out IDX [--modality image]
        [--step best|latest|N] [--batch 256] [--shard-size 4096] [--id-column id] [--on-error stop|skip]
        [--ann ivf|hnsw [--nlist N] [--nprobe 16]] [--column KIND=NAME] [--root DIR] [--text-files] [--quiet]
        [--coordinator_address HOST:PORT --num_processes N --process_id I]
    python -m mmjax.search query --index IDX (--text "a red circle" | --image PATH | --audio PATH) [--k 10]
        [--rerank N] [--ann] [--json] [--contact-sheet out.png] [--workdir W --step S]
    python -m mmjax.search recall --index IDX --queries queries.csv [--target-column id] [--modality text] [--ann]
        [--json out.json]
    python -m mmjax.search bench [--count 1000000 --dim 256] [--no-ann] [--json out.json]

`index` embeds every row of a manifest (the columns of `mmjax.data.build`; other columns are metadata) with a dual
encoder's or matching model's tower, or a fusion model's pooled features (`collection`), into shards written
atomically, resumable after a kill, versioned with the model's fingerprint (`index_store`), in one process or
several (process 0 writes, `processes`). `query` embeds one query as the workdir's evaluation preprocessing does and
returns the top k by exact, device-sharded top-k (`exact`: equal to a single-device brute force) or faiss (`ann`,
`--ann`, with its recall@10 against exact measured when built); `--rerank N` re-scores the top N with a matching
model's ITM head; results print as a table, `--json`, or `--contact-sheet` (a grid of the top images with captions
and scores, `contact_sheet`). `recall` measures recall@1/5/10 of a query manifest through the same path (`query`);
`bench` times exact and approximate search on random embeddings against the memory-bandwidth bound (`benchmark`).

Python: `Searcher.open(IDX).query("text", "a red circle", k=10)`; `build_index(predictor, manifest, IDX, ...)`.
"""

from mmjax.search.collection import build_index
from mmjax.search.exact import ExactIndex, brute_force
from mmjax.search.index_store import Index, IndexError_, IndexWriter
from mmjax.search.query import Hit, Searcher

__all__ = ["ExactIndex", "Hit", "Index", "IndexError_", "IndexWriter", "Searcher", "brute_force", "build_index"]
