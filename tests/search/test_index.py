"""`mmjax.search` with trained towers: an index of own files, queries equal to a brute force over its embeddings,
resuming a killed build (the previous index intact meanwhile), another model's index refused, a query of a
modality without a tower refused, a fusion model's features, ITM re-ranking, the command line, and Shapes-Captions
recall through the search path equal to the evaluator's."""

import csv
import json
import os
import shutil

import numpy as np
import pytest

from mmjax.inference import read_manifest
from mmjax.predict import Predictor
from mmjax.search import Index, IndexError_, IndexWriter, Searcher, build_index
from mmjax.search import __main__ as cli
from mmjax.search.collection import normalize
from mmjax.search.exact import brute_force
from mmjax.search.query import table
from mmjax.train.workdir import model_fingerprint


def _build(predictor, manifest, out, **kwargs):
    kwargs.setdefault("progress", False)
    return build_index(predictor, manifest, str(out), fingerprint=model_fingerprint(predictor.setup, predictor.state),
                       **kwargs)


def _images(manifest):
    return [manifest.raw(i, ["image"])["image"] for i in range(len(manifest.rows))]


@pytest.fixture(scope="module")
def towers(itm_workdir, tmp_path_factory):
    """(predictor, manifest, index): the matching model's image index of its 48 own pairs, in 3 shards, with HNSW
    (a matching model has a dual encoder's towers and an ITM head, so one tiny model serves every search test)."""
    predictor = Predictor.load(itm_workdir[0], "latest")
    manifest = read_manifest(itm_workdir[1])
    out = tmp_path_factory.mktemp("towers_index") / "idx"
    return predictor, manifest, _build(predictor, manifest, out, shard_size=20, ann="hnsw")


def test_index_holds_the_towers_embeddings_and_queries_equal_brute_force(towers):
    predictor, manifest, index = towers
    assert index.count == 48 and len(index.meta["shards"]) == 3 and index.modality == "image"
    assert [s["rows"] for s in index.meta["shards"]] == [20, 20, 8]
    items = index.item_list()
    assert items[0]["id"] == "item001" and items[0]["text"] == manifest.rows[0].cells["text"]
    np.testing.assert_allclose(index.embeddings(), normalize(predictor.embed("image", _images(manifest))),
                               rtol=1e-5, atol=1e-6)
    searcher = Searcher(index, predictor)
    captions = [row.cells["text"] for row in manifest.rows[:4]]
    queries = searcher.embed("text", captions)
    reference_scores, reference_rows = brute_force(index.embeddings(), queries, 7)
    scores, rows = searcher.search(queries, 7)
    np.testing.assert_array_equal(rows, reference_rows)
    np.testing.assert_allclose(scores, reference_scores, rtol=1e-5)
    hits = searcher.query("text", captions[0], k=7)
    printed = table(hits, "image").splitlines()
    assert printed[0].split() == ["rank", "score", "id", "image", "text"] and len(printed) == 9
    assert printed[2].split()[:3] == ["1", f"{hits[0].score:.4f}", hits[0].item["id"]]
    assert [h.rank for h in hits] == list(range(1, 8))
    assert [h.item["id"] for h in hits] == [items[r]["id"] for r in reference_rows[0]]
    assert index.meta["ann"]["kind"] == "hnsw" and 0 <= index.meta["ann"]["recall@10"] <= 1
    approximate = searcher.query("text", captions[0], k=7, ann=True)
    assert len(approximate) == 7 and {h.item["id"] for h in approximate} <= {i["id"] for i in items}
    with pytest.raises(ValueError, match="--k 0 must be at least 1"):
        searcher.query("text", captions[0], k=0)


def test_a_killed_build_resumes_and_leaves_the_previous_index_intact(towers, tmp_path):
    predictor, manifest, index = towers
    out = tmp_path / "idx"
    shutil.copytree(index.path, out)  # The "previous" index, which must survive the interrupted rebuild.
    previous = json.loads((out / "index.json").read_text())
    run, calls = predictor.runner.run, []

    def killed_on_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return run(*args, **kwargs)

    predictor.runner.run = killed_on_second_shard
    try:
        with pytest.raises(KeyboardInterrupt):
            _build(predictor, manifest, out, shard_size=16)
    finally:
        predictor.runner.run = run
    assert json.loads((out / "index.json").read_text()) == previous  # Untouched.
    partial = sorted(os.listdir(str(out) + ".partial"))
    assert "shard-00000.jsonl" in partial and "shard-00001.jsonl" not in partial
    counted = []

    def counting(*args, **kwargs):
        counted.append(1)
        return run(*args, **kwargs)

    predictor.runner.run = counting
    try:
        resumed = _build(predictor, manifest, out, shard_size=16)
    finally:
        predictor.runner.run = run
    assert len(counted) == 2  # Shards 1 and 2 only: shard 0 was kept.
    assert resumed.count == 48 and [s["rows"] for s in resumed.meta["shards"]] == [16, 16, 16]
    assert not os.path.exists(str(out) + ".partial") and not os.path.exists(str(out) + ".previous")
    np.testing.assert_allclose(resumed.embeddings(), index.embeddings(), rtol=1e-5, atol=1e-6)
    assert [i["id"] for i in resumed.items()] == [i["id"] for i in index.items()]
    with pytest.raises(IndexError_, match="has no ANN index: build it with python -m mmjax.search index"):
        Searcher(resumed, predictor).query("text", "a caption", k=3, ann=True)


def test_index_store_swap_is_atomic_and_recovers_from_a_kill_between_renames(tmp_path):
    out = str(tmp_path / "idx")
    plan = {"fingerprint": "f1", "shard_size": 2}

    def write(plan, values):
        writer = IndexWriter(out, plan)
        for shard, value in enumerate(values):
            if not writer.done(shard):
                writer.write_shard(shard, np.full((2, 3), value, np.float32), [{"id": f"{shard}-{i}"} for i in (0, 1)])
        return writer

    info = {"fingerprint": "f1", "workdir": "w", "step": 1, "modality": "image", "kind": "unit embeddings",
            "dimension": 3}
    write(plan, [1.0, 2.0]).finish(info, 2)
    with pytest.raises(IndexError_, match=r"no index at .*idx_new \(index.json missing\); build one"):
        Index(out + "_new")
    writer = IndexWriter(out, plan)
    writer.write_shard(0, np.full((2, 3), 5.0, np.float32), [{"id": "a"}, {"id": "b"}])  # Then "killed".
    assert Index(out).embeddings()[0, 0] == 1.0  # The finished index is still what it was.
    os.rename(out, out + "_moved")
    with pytest.raises(IndexError_, match="holds an interrupted build: run the same index command again"):
        Index(out)
    os.rename(out + "_moved", out)
    assert IndexWriter(out, plan).done(0)  # Same plan: resumed.
    assert not IndexWriter(out, {**plan, "shard_size": 3}).done(0)  # Another plan: started afresh.
    # A kill between the two renames of `finish` (IDX moved to IDX.previous, IDX.partial not yet in place):
    os.rename(out, out + ".previous")
    assert Index(out).count == 4 and not os.path.exists(out + ".previous")
    (tmp_path / "idx" / "index.json").write_text("{")
    with pytest.raises(IndexError_, match="cannot be read"):
        Index(out)
    with pytest.raises(ValueError, match="shard 0: 2 embeddings for 1 items"):
        IndexWriter(out, plan).write_shard(0, np.zeros((2, 3)), [{"id": "x"}])


def test_another_models_index_and_a_modality_without_tower_are_refused(towers, classifier_workdir):
    predictor, manifest, index = towers
    with pytest.raises(IndexError_, match=r"was built with another model \(fingerprint .* embed queries "
                                          "differently. Query with the index's model"):
        Searcher.open(index.path, workdir=classifier_workdir[0], step="latest")
    searcher = Searcher(index, predictor)
    with pytest.raises(IndexError_, match="the index has no audio tower: .* embeds image, text; query with "
                                          "--image / --text"):
        searcher.query("audio", np.zeros(100, np.float32))
    with pytest.raises(ValueError, match="--modality audio: the model has no audio input"):
        _build(predictor, manifest, "unused", modality="audio")
    with pytest.raises(ValueError, match="--id-column nope: manifest .* has no such column"):
        _build(predictor, manifest, "unused", id_column="nope")


def test_a_classifiers_pooled_features_answer_same_modality_queries(classifier_workdir, tmp_path):
    workdir, path, _ = classifier_workdir
    predictor = Predictor.load(workdir, "latest")
    manifest = read_manifest(path, columns={"text": ""})
    index = _build(predictor, manifest, tmp_path / "idx", modality="image")
    assert index.meta["kind"] == "pooled features (L2-normalised)" and index.count == 48
    assert index.item_list()[0]["label"] == manifest.rows[0].cells["label"]
    searcher = Searcher(index, predictor)
    image = manifest.raw(4, ["image"])["image"]
    hits = searcher.query("image", image, k=3)
    assert hits[0].item["id"] == "item005" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(IndexError_, match="an audio query cannot search image features"):
        searcher.query("audio", manifest.raw(0, ["audio"])["audio"], k=3)
    with pytest.raises(IndexError_, match="--rerank needs a matching \\(ITM\\) model"):
        searcher.query("image", image, k=3, rerank=3)


def test_itm_rerank_orders_the_exact_top_n_by_the_matching_head(towers):
    predictor, manifest, index = towers
    searcher = Searcher(index, predictor)
    caption = manifest.rows[2].cells["text"]
    plain = searcher.query("text", caption, k=8)
    reranked = searcher.query("text", caption, k=8, rerank=5)
    assert {h.item["id"] for h in reranked[:5]} == {h.item["id"] for h in plain[:5]}
    assert [h.item["id"] for h in reranked[5:]] == [h.item["id"] for h in plain[5:]]
    logits = [h.itm_logit for h in reranked[:5]]
    assert logits == sorted(logits, reverse=True) and all(h.itm_logit is None for h in reranked[5:])
    images = {row.cells["id"]: manifest.raw(i, ["image"])["image"] for i, row in enumerate(manifest.rows)}
    direct = predictor.outputs([{"image": images[h.item["id"]], "text": caption} for h in reranked[:5]])["itm_logit"]
    np.testing.assert_allclose(logits, direct, rtol=1e-5, atol=1e-5)
    assert [h.rank for h in reranked] == list(range(1, 9))


def test_the_command_line_indexes_queries_and_draws_a_contact_sheet(itm_workdir, tmp_path, capsys):
    workdir, manifest, _ = itm_workdir
    out = str(tmp_path / "idx")
    cli.main(["index", "--workdir", workdir, "--manifest", manifest, "--out", out, "--step", "latest", "--quiet"])
    assert "wrote" in capsys.readouterr().out
    with open(manifest) as f:
        caption = next(csv.DictReader(f))["text"]
    sheet = str(tmp_path / "sheet.png")
    cli.main(["query", "--index", out, "--text", caption, "--k", "4", "--json", "--contact-sheet", sheet])
    hits = json.loads(capsys.readouterr().out)
    assert [h["rank"] for h in hits] == [1, 2, 3, 4] and hits[0]["score"] >= hits[-1]["score"]
    assert os.path.getsize(sheet) > 1000
    for argv, message in [
        (["query", "--index", out, "--audio", manifest], "the index has no audio tower"),
        (["query", "--index", str(tmp_path / "none"), "--text", "x"], "no index at"),
        (["index", "--workdir", str(tmp_path), "--manifest", manifest, "--out", out], str(tmp_path)),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 1
        error = capsys.readouterr().err
        assert error.startswith("error: ") and message in error, error


@pytest.mark.slow  # Builds and trains a tiny Shapes-Captions (~45 s), then indexes and queries it (~15 s).
def test_shapes_captions_recall_through_search_equals_the_evaluators(shapes_workdir, tmp_path):
    """The held-out captions as queries over the test images: recall@1/5/10 is the evaluator's text->image."""
    from mmjax.data import shapes_captions

    workdir, data_dir = shapes_workdir
    collection, queries = shapes_captions.write_files(data_dir, "test", str(tmp_path / "files"))
    predictor = Predictor.load(workdir, "latest")
    index = _build(predictor, read_manifest(collection), tmp_path / "idx")
    result = Searcher(index, predictor).recall(read_manifest(queries), progress=False)
    evaluated = predictor.setup.evaluate(predictor.state, "test")
    assert result["items"] == 48 and result["queries"] == 48 * shapes_captions.CAPTIONS_PER_SCENE
    for k in (1, 5, 10):
        assert result[f"recall@{k}"] == pytest.approx(evaluated[f"t2i_recall@{k}"], abs=1e-6), k
