"""Input sharding across 2 real processes (jax.distributed, 2 x 4 CPU devices, gloo): each process reads only its
shard, the shards are disjoint and cover the split exactly once per epoch, each process's rows are its devices' rows
of the global batch, and evaluation sees every example exactly once.

One pair of subprocesses runs this module as a script (`worker`) and writes what it saw to JSON; the test checks it
against the 1-process pipeline.
"""

import json
import math
import subprocess
import sys

import numpy as np

from mmjax.data.core import Dataset

NUM_TRAIN, NUM_EVAL = 48, 37  # 48 = 6 whole global batches of 8; 37 leaves each process a partial eval batch.
GLOBAL_BATCH, PROCESSES, SEED = 8, 2, 7
LOCAL_BATCH = GLOBAL_BATCH // PROCESSES
STEPS_PER_EPOCH = NUM_TRAIN // GLOBAL_BATCH


class CountingSource:
    """Examples `{"id": i}`; records every index read (`__getitem__`)."""

    def __init__(self, n):
        self.n, self.reads = n, []

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        self.reads.append(int(index))
        return {"id": int(index)}


def _preprocess(example):
    return {"id": np.int32(example["id"]), "label": np.int32(example["id"] % 2)}


def indexed_dataset():
    sources = {"train": CountingSource(NUM_TRAIN), "eval": CountingSource(NUM_EVAL)}
    dataset = Dataset(name="indexed", source=sources.__getitem__, preprocess=_preprocess,
                      splits={"train": NUM_TRAIN, "eval": NUM_EVAL}, num_classes=2, modalities=("id",))
    return dataset, sources


def worker(port: int, process_id: int, out_path: str) -> None:
    """One process of the pair: records its local batches, its reads and the assembled global batches."""
    from mmjax.train import parallel

    parallel.initialize_distributed(f"127.0.0.1:{port}", PROCESSES, process_id)
    import jax
    from jax.experimental import multihost_utils

    from mmjax.data import pipeline

    assert jax.process_count() == PROCESSES and jax.device_count() == 8 and jax.local_device_count() == 4
    dataset, sources = indexed_dataset()
    sharding = parallel.batch_sharding(parallel.make_mesh())
    first = process_id * LOCAL_BATCH
    report = {"local": [], "global": []}

    # One epoch without Grain read-ahead threads (num_threads=0), so the reads are exactly the consumed examples.
    unthreaded = iter(pipeline.train_dataset(dataset, "train", global_batch_size=GLOBAL_BATCH, seed=SEED,
                                             num_threads=0))
    report["local"] = [next(unthreaded)["id"].tolist() for _ in range(STEPS_PER_EPOCH)]
    report["train_reads"] = list(sources["train"].reads)

    # The default (threaded) pipeline gives the same batches; assembled into global arrays, this process's
    # devices hold exactly its rows.
    threaded = iter(pipeline.train_dataset(dataset, "train", global_batch_size=GLOBAL_BATCH, seed=SEED))
    for step in range(STEPS_PER_EPOCH):
        ids = next(threaded)["id"]
        assert ids.tolist() == report["local"][step], (step, ids, report["local"][step])
        array = pipeline.to_global({"id": ids}, sharding)["id"]
        assert array.shape == (GLOBAL_BATCH,)
        covered = []
        for shard in array.addressable_shards:
            rows = range(*shard.index[0].indices(GLOBAL_BATCH))
            assert first <= rows.start and rows.stop <= first + LOCAL_BATCH, (process_id, rows)
            np.testing.assert_array_equal(np.asarray(shard.data), ids[rows.start - first:rows.stop - first])
            covered.extend(rows)
        assert sorted(covered) == list(range(first, first + LOCAL_BATCH))
        report["global"].append(np.asarray(multihost_utils.process_allgather(array, tiled=True)).tolist())
    threaded.close()

    report["eval_valid"], report["eval_batches"] = [], 0
    for batch in pipeline.eval_batches(dataset, "eval", global_batch_size=GLOBAL_BATCH):
        assert len(batch["id"]) == LOCAL_BATCH
        pipeline.to_global(batch, sharding)  # Every process assembles every batch (as evaluation does).
        report["eval_valid"].extend(batch["id"][batch[pipeline.VALID_KEY] == 1].tolist())
        report["eval_batches"] += 1
    report["eval_reads"] = list(sources["eval"].reads)
    with open(out_path, "w") as f:
        json.dump(report, f)
    multihost_utils.sync_global_devices("test-multihost-input-done")


def test_two_processes_read_disjoint_shards_that_cover_the_split(tmp_path):
    from mmjax.data import pipeline
    from tests.conftest import REPO_ROOT
    from tests.train.test_parallel import cpu_env, free_port

    port = free_port()
    outputs = [str(tmp_path / f"process_{i}.json") for i in range(PROCESSES)]
    procs = [
        subprocess.Popen([sys.executable, "-m", "tests.data.test_multihost_input", str(port), str(i), outputs[i]],
                         env=cpu_env(4), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(PROCESSES)
    ]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    reports = []
    for path in outputs:
        with open(path) as f:
            reports.append(json.load(f))

    # Train: disjoint shards that together are the split, exactly once in the epoch; each process read only its own
    # examples, each once.
    shards = [sorted(i for batch in r["local"] for i in batch) for r in reports]
    assert all(len(s) == NUM_TRAIN // PROCESSES for s in shards)
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(NUM_TRAIN))
    for report, shard in zip(reports, shards, strict=True):
        assert sorted(report["train_reads"]) == shard
    # The global batches are those of one process, and process p holds rows [p*L, (p+1)*L) of each.
    reference_dataset, _ = indexed_dataset()
    single = iter(pipeline.train_dataset(reference_dataset, "train", global_batch_size=GLOBAL_BATCH, seed=SEED))
    expected = [next(single)["id"].tolist() for _ in range(STEPS_PER_EPOCH)]
    assert reports[0]["global"] == reports[1]["global"] == expected
    for p, report in enumerate(reports):
        for step, local in enumerate(report["local"]):
            assert local == expected[step][p * LOCAL_BATCH:(p + 1) * LOCAL_BATCH]

    # Eval: every example exactly once across the processes, the same number of batches on each, own reads only.
    assert reports[0]["eval_batches"] == reports[1]["eval_batches"] == math.ceil(math.ceil(NUM_EVAL / 2) / LOCAL_BATCH)
    assert sorted(reports[0]["eval_valid"] + reports[1]["eval_valid"]) == list(range(NUM_EVAL))
    for report in reports:
        assert sorted(report["eval_reads"]) == sorted(report["eval_valid"])


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
