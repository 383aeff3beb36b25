"""Search with a CLIP trained on the user's own unlabelled image–caption pairs, end to end: `write_example_folder`
-> `python -m mmjax.data.build --paired` -> 40 steps of CLIP (the `clip_workdir` fixture) -> `python -m mmjax.search
index` of the collection -> `query --text` and `--image` ranked as a brute force over the index's embeddings, with
the manifest's ids and captions; and `recall` of a split's captions equal to training's evaluation.

What the tiny model learns is not asserted: the build's WordPiece tokenizer is not reproducible (HF tokenizers
#1794: the trainer breaks ties in hash-map order), so the token ids, and so the trained model, differ from one test
session to the next; whether a colour's 16 images rank first varied across such sessions."""

import csv
import json
import os
import shutil

import numpy as np
import pytest

from mmjax.data.raw_inputs import read_cell
from mmjax.predict import Predictor
from mmjax.search import Index
from mmjax.search import __main__ as cli
from mmjax.search.collection import normalize
from mmjax.search.exact import brute_force


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
