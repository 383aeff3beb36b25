"""Search with a CLIP trained on the user's own unlabelled image–caption pairs, end to end: `write_example_folder`
-> `python -m mmjax.data.build --paired` -> 40 steps of CLIP (the `clip_workdir` fixture) -> `python -m mmjax.search
index` of the collection -> `query --text` and `--image` ranked as a brute force over the index's embeddings, with
the manifest's ids and captions; `recall` of a split's captions equal to training's evaluation; and the same
index built by 2 processes.

What the tiny model learns is not asserted: the build's WordPiece tokenizer is not reproducible (HF tokenizers
#1794: the trainer breaks ties in hash-map order), so the token ids, and so the trained model, differ from one test
session to the next; whether a colour's 16 images rank first varied across such sessions."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from mmjax.data.raw_inputs import read_cell
from mmjax.predict import Predictor
from mmjax.search import Index
from mmjax.search import __main__ as cli
from mmjax.search.collection import normalize
from mmjax.search.exact import brute_force
from tests.conftest import REPO_ROOT, cpu_env


def _rows(manifest: str) -> dict[str, dict[str, str]]:
    with open(manifest) as f:
        return {row["id"]: row for row in csv.DictReader(f)}


def _query(capsys, *argv) -> list[dict]:
    cli.main(["query", *argv, "--json"])
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def clip_index(clip_workdir, tmp_path_factory):
    """The `index` command's index of the CLIP's own pairs, at its default step (best)."""
    workdir, manifest, _ = clip_workdir
    out = str(tmp_path_factory.mktemp("clip_index") / "idx")
    cli.main(["index", "--workdir", workdir, "--manifest", manifest, "--out", out, "--quiet"])
    return out


def test_text_and_image_queries_rank_the_collection_as_its_embeddings_do(clip_workdir, clip_index, capsys,
                                                                       tmp_path):
    """`query --text` and `--image` (a file outside the collection) return the exact top k of the index's
    embeddings against the model's own query embedding, each item with the manifest's id and cells."""
    workdir, manifest, data_dir = clip_workdir
    with open(os.path.join(data_dir, "build_report.json")) as f:
        report = json.load(f)
    assert (report["task"], report["labelled"], report["modalities"]) == ("contrastive", False, ["image", "text"])
    index = Index(clip_index)
    assert (index.count, index.modality, index.meta["model"], index.meta["step"]) == (48, "image", "TwoTower", 40)
    rows = _rows(manifest)
    assert [item["id"] for item in index.items()] == list(rows)
    predictor = Predictor.load(workdir, "best")
    image = tmp_path / "query.png"
    shutil.copy(os.path.join(os.path.dirname(manifest), rows["item005"]["image"]), image)
    found = {}
    for modality, query in [("text", "a green square"), ("image", str(image))]:
        hits = _query(capsys, "--index", clip_index, f"--{modality}", query, "--k", "16")
        value = query if modality == "text" else read_cell("image", query, ".")
        scores, order = brute_force(index.embeddings(), normalize(predictor.embed(modality, [value])), 16)
        assert [h["id"] for h in hits] == [f"item{r + 1:03d}" for r in order[0]], query
        np.testing.assert_allclose([h["score"] for h in hits], scores[0], rtol=1e-5, atol=1e-6)
        assert [h["rank"] for h in hits] == list(range(1, 17))
        for hit in hits:  # The manifest's cells of that id, as metadata.
            assert (hit["image"], hit["text"]) == (rows[hit["id"]]["image"], rows[hit["id"]]["text"])
        found[modality] = hits
    assert hits[0]["id"] == "item005" and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)  # The image itself.
    cli.main(["query", "--index", clip_index, "--text", "a green square", "--k", "3"])
    printed = capsys.readouterr().out.splitlines()
    assert printed[1] == "query (text): a green square  [exact]"
    assert printed[2].split() == ["rank", "score", "id", "image", "text"] and len(printed) == 7
    assert [line.split()[:3] for line in printed[4:]] == [[str(h["rank"]), f"{h['score']:.4f}", h["id"]]
                                                          for h in found["text"][:3]]


def test_caption_recall_through_search_equals_the_evaluators(clip_workdir, tmp_path, capsys):
    """A split's images indexed and its captions as `recall` queries: recall@K is what training's evaluator
    reported as t2i_recall@K (the search path embeds as the model was evaluated, whatever the model learnt)."""
    from mmjax.data.files import open_built

    workdir, manifest, data_dir = clip_workdir
    rows = list(_rows(manifest).values())
    predictor = Predictor.load(workdir, "best")
    for split in ("train", "test"):
        source = open_built(data_dir).as_data_source(split=split)
        members = [rows[int(source[i]["row"]) - 1] for i in range(len(source))]
        path = str(tmp_path / f"{split}.csv")
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(members)
        out = str(tmp_path / f"{split}_index")
        cli.main(["index", "--workdir", workdir, "--manifest", path, "--root", os.path.dirname(manifest), "--out",
                  out, "--quiet"])
        result = cli.main(["recall", "--index", out, "--queries", path, "--modality", "text", "--quiet"])
        capsys.readouterr()
        evaluated = predictor.setup.evaluate(predictor.state, split)
        assert result["queries"] == result["items"] == len(members) and result["skipped"] == 0
        recalls = {k: v for k, v in result.items() if k.startswith("recall@")}
        assert set(recalls) == {"recall@1", "recall@5"} | ({"recall@10"} if len(members) >= 10 else set())
        for key, value in recalls.items():
            assert value == pytest.approx(evaluated[f"t2i_{key}"], abs=1e-6), (split, key)


@pytest.mark.slow  # Two processes, each loading and compiling the model: ~35 s.
def test_two_processes_build_the_index_one_process_builds(clip_workdir, tmp_path, capsys):
    """`index` in 2 processes (jax.distributed on localhost, 4 CPU devices each) equals the single-process index:
    ids, metadata, embeddings, shards, the bad row (prepared by process 1, reported by process 0) and the ANN
    index's settings."""
    from tests.train.test_parallel import free_port

    workdir, manifest, _ = clip_workdir
    rows = list(_rows(manifest).values())
    rows[9]["image"] = "images/nowhere.png"  # Row 10: in the first batch of 16, the half process 1 prepares.
    broken = tmp_path / "collection.csv"
    with open(broken, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    common = ["--workdir", workdir, "--manifest", str(broken), "--root", os.path.dirname(manifest), "--batch", "16",
              "--shard-size", "20", "--on-error", "skip", "--ann", "ivf", "--nlist", "2", "--quiet"]
    cli.main(["index", "--out", str(tmp_path / "one"), *common])
    capsys.readouterr()
    port = free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "mmjax.search", "index", "--out", str(tmp_path / "two"), *common,
         "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i)],
        cwd=REPO_ROOT, env=cpu_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert "skipped rows: 1" in logs[0] and "wrote" not in logs[1]
    one, two = Index(str(tmp_path / "one")), Index(str(tmp_path / "two"))
    assert one.count == two.count == 47
    assert two.item_list() == one.item_list()
    assert "item010" not in {item["id"] for item in two.items()}
    np.testing.assert_allclose(two.embeddings(), one.embeddings(), rtol=1e-5, atol=1e-6)
    assert two.meta["bad_rows"] == one.meta["bad_rows"] and "row 10 (line 11): missing file" in one.meta["bad_rows"][0]
    ignored = {"seconds", "ann"}
    assert {k: v for k, v in two.meta.items() if k not in ignored} == {k: v for k, v in one.meta.items()
                                                                       if k not in ignored}
    assert two.meta["ann"]["params"] == one.meta["ann"]["params"] == {"nlist": 2, "nprobe": 2}
    assert os.path.exists(os.path.join(two.path, "ann.faiss"))
