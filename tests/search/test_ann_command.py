"""`index --ann` and `query --ann` through the command line (on the CLIP of own pairs): the recall@10 against exact
search that `index` prints and records is that of the faiss index it wrote, `query --ann` answers from that
index, and ANN settings, indexes and models that do not fit are refused with a message saying what to do, before
anything is written."""

import json
import os
import sys

import pytest

from mmjax.predict import Predictor
from mmjax.search import Index, ann
from mmjax.search import __main__ as cli
from mmjax.search.collection import normalize
from mmjax.search.exact import brute_force


def _fails(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error, error


def test_the_recorded_recall_is_the_written_indexs_and_queries_use_it(clip_workdir, tmp_path, capsys):
    workdir, manifest, _ = clip_workdir
    out = str(tmp_path / "idx")
    cli.main(["index", "--workdir", workdir, "--manifest", manifest, "--out", out, "--ann", "ivf", "--nlist", "4",
              "--nprobe", "1", "--quiet"])
    printed = capsys.readouterr().out
    index = Index(out)
    info = index.meta["ann"]
    assert (info["kind"], info["params"], info["recall_queries"]) == ("ivf", {"nlist": 4, "nprobe": 1}, 48)
    assert (f"ANN (ivf, {{'nlist': 4, 'nprobe': 1}}): recall@10 {info['recall@10']:.4f} against exact search on 48 "
            "of the items as queries") in printed
    embeddings, items = index.embeddings(), index.item_list()
    faiss_index = ann.load(os.path.join(out, "ann.faiss"))
    exact = brute_force(embeddings, embeddings, 10)[1]  # Every item is a recall query (48 < 1,000).
    assert info["recall@10"] == pytest.approx(ann.recall_at(ann.search(faiss_index, embeddings, 10)[1], exact))
    assert 0 < info["recall@10"] <= 1

    query = normalize(Predictor.load(workdir, "best").embed("text", ["a red square"]))
    cli.main(["query", "--index", out, "--text", "a red square", "--k", "5", "--ann", "--json"])
    hits = json.loads(capsys.readouterr().out)
    scores, rows = ann.search(faiss_index, query, 5)
    found = [(s, r) for s, r in zip(scores[0], rows[0]) if r >= 0]  # One cell probed: it may hold fewer than 5.
    assert [h["id"] for h in hits] == [items[r]["id"] for _, r in found]
    assert [h["score"] for h in hits] == pytest.approx([float(s) for s, _ in found], abs=1e-5)
    cli.main(["query", "--index", out, "--text", "a red square", "--k", "2", "--ann"])
    assert "query (text): a red square  [ANN]" in capsys.readouterr().out


def test_settings_indexes_and_models_that_do_not_fit_are_refused(clip_workdir, itm_workdir, tmp_path, capsys,
                                                                 monkeypatch):
    workdir, manifest, _ = clip_workdir
    out = str(tmp_path / "idx")
    index = ["index", "--workdir", workdir, "--manifest", manifest, "--out", out, "--quiet"]
    for extra, message in [
        (["--nlist", "4"], "--nlist: settings of the IVF index that --ann ivf builds, and no --ann was given; add "
                           "--ann ivf, or leave them out"),
        (["--ann", "hnsw", "--nprobe", "4"], "--nprobe: IVF settings, which --ann hnsw does not have"),
        (["--ann", "ivf", "--nlist", "100"], "--nlist 100: an IVF index of 48 items has at most 48 cells (k-means "
                                             "needs a point per cell; the default for 48 items is 1)"),
        (["--ann", "ivf", "--nlist", "4", "--nprobe", "5"], "--nprobe 5 scans more cells than the index has (4, "
                                                            "--nlist); give at most 4"),
        (["--ann", "ivf", "--nprobe", "2"], "more cells than the index has (1, the default --nlist for 48 items)"),
        (["--ann", "ivf", "--nprobe", "0"], "--nprobe 0 must be at least 1"),
    ]:
        _fails(capsys, index + extra, message)
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "faiss", None)  # Not installed.
        _fails(capsys, index + ["--ann", "hnsw"], "approximate search needs faiss: pip install faiss-cpu")
    assert not os.path.exists(out) and not os.path.exists(out + ".partial")  # Refused before anything was written.

    cli.main(index)  # Exact only.
    capsys.readouterr()
    _fails(capsys, ["query", "--index", out, "--text", "a red square", "--ann"],
           f"index {out} has no ANN index: build it with python -m mmjax.search index ... --ann ivf (or hnsw)")
    fingerprint = Index(out).meta["fingerprint"]
    _fails(capsys, ["query", "--index", out, "--text", "a red square", "--workdir", itm_workdir[0], "--step",
                    "latest"],
           f"index {out} was built with another model (fingerprint {fingerprint}: workdir {workdir} step 40); "
           f"workdir {itm_workdir[0]} step 3 has fingerprint ")
    # An index whose workdir has since been retrained (here: its index.json naming the other workdir).
    meta_file = os.path.join(out, "index.json")
    with open(meta_file) as f:
        meta = json.load(f)
    with open(meta_file, "w") as f:
        json.dump({**meta, "workdir": itm_workdir[0], "step": 3}, f)
    _fails(capsys, ["query", "--index", out, "--text", "a red square", "--ann"],
           "was built with another model (fingerprint")
