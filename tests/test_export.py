"""`mmjax.export`: the exported StableHLO functions (symbolic batch) return the in-process model's outputs, through
a loader that needs neither mmjax nor its model code; the preprocessing spec rebuilds the evaluation preprocessing;
bad inputs and a workdir without checkpoints are clear errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mmjax import export
from mmjax.data.raw_inputs import from_spec
from mmjax.export_loader import ExportedModel
from mmjax.inference import Preparer, read_manifest
from mmjax.predict import Predictor


def _prepared(predictor, examples, modalities=None):
    preparer = Preparer(predictor.setup, modalities)
    rows = [preparer(example) for example in examples]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def test_a_classifier_round_trips_at_any_batch_size(classifier_workdir, tmp_path):
    workdir, path, _ = classifier_workdir
    predictor = Predictor.load(workdir, "latest")
    out = str(tmp_path / "export")
    meta = export.main(["--workdir", workdir, "--out", out, "--step", "latest"])  # The command line, in-process.
    assert list(meta["functions"]) == ["predict"] and meta["task"] == "classification"
    assert meta["step"] == predictor.step and meta["fingerprint"]
    assert not os.path.exists(out + ".partial")
    model = ExportedModel.load(out)
    assert model.class_names == list(predictor.class_names) and len(model.class_names) == 3
    assert model.inputs("predict")["audio_mask"] == ([None], "float32")
    manifest = read_manifest(path, columns={"text": ""})
    examples = [manifest.raw(i, ["image", "audio"]) for i in range(7)]  # Row 3 has no audio: masked.
    for size in (1, 7):  # One export, two batch sizes (the batch dimension is symbolic).
        inputs = _prepared(predictor, examples[:size])
        outputs = model("predict", inputs)
        expected = predictor.outputs(examples[:size])["probabilities"]
        np.testing.assert_allclose(outputs["probabilities"], expected, rtol=1e-5, atol=1e-6)
        assert outputs["logits"].shape == (size, 3)
    assert inputs["audio_mask"][2] == 0.0
    # The preprocessing spec rebuilds the evaluation preprocessing exactly.
    spec = model.preprocessing["inputs"]
    assert set(spec) == {"image", "audio", "audio_mask"} and "evaluation_chain" in spec["image"]["raw"]
    for modality in ("image", "audio"):
        rebuilt = from_spec(spec[modality]["raw"], out)
        np.testing.assert_array_equal(rebuilt(examples[0][modality]), inputs[modality][0])
    with pytest.raises(ValueError, match=r"predict: input 'image' has shape \[7, 5, 5, 3\], expected \[batch, "):
        model("predict", {**inputs, "image": np.zeros((7, 5, 5, 3), np.float32)})
    with pytest.raises(ValueError, match=r"missing \['audio_mask'\]"):
        model("predict", {k: v for k, v in inputs.items() if k != "audio_mask"})
    with pytest.raises(KeyError, match="no function 'embed_text'"):
        model("embed_text", inputs)


def test_towers_export_and_run_without_mmjax(itm_workdir, tmp_path):
    """A matching model exports each tower and the ITM head; a plain Python process that cannot import mmjax runs
    them with the folder's load_exported.py and gets the in-process model's outputs."""
    workdir, path, _ = itm_workdir
    predictor = Predictor.load(workdir, "latest")
    out = str(tmp_path / "export")
    meta = export.export(predictor, out)
    assert sorted(meta["functions"]) == ["embed_image", "embed_text", "itm"]
    manifest = read_manifest(path)
    examples = [manifest.raw(i, ["image", "text"]) for i in range(5)]
    inputs = _prepared(predictor, examples, ["image", "text"])
    np.savez(tmp_path / "inputs.npz", **inputs)
    script = (
        "import sys; sys.modules['mmjax'] = None\n"  # Any import of mmjax now fails.
        "import numpy as np\nfrom load_exported import ExportedModel\n"
        f"model = ExportedModel.load({out!r})\ninputs = dict(np.load({str(tmp_path / 'inputs.npz')!r}))\n"
        "np.savez(sys.argv[1], image=model('embed_image', {'image': inputs['image']})['embedding'],"
        " text=model('embed_text', {'text': inputs['text']})['embedding'], itm=model('itm', inputs)['itm_logit'])\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "outputs.npz")], cwd=out,
                            capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    served = np.load(tmp_path / "outputs.npz")
    in_process = predictor.outputs(examples)
    np.testing.assert_allclose(served["image"], in_process["embedding_image"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(served["text"], in_process["embedding_text"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(served["itm"], in_process["itm_logit"], rtol=1e-5, atol=1e-5)
    spec = json.loads(open(os.path.join(out, "preprocessing.json")).read())["inputs"]["text"]["raw"]
    assert spec["tokenizer"] == "tokenizer_text.json" and os.path.exists(os.path.join(out, spec["tokenizer"]))
    np.testing.assert_array_equal(from_spec(spec, out)(examples[0]["text"]), inputs["text"][0])


def test_the_command_line_refuses_a_workdir_without_checkpoints_and_bad_platforms(tmp_path, capsys):
    for argv, message in [
        (["--workdir", str(tmp_path), "--out", str(tmp_path / "e")], str(tmp_path)),
        (["--workdir", str(tmp_path), "--out", str(tmp_path / "e"), "--platforms", "gpu"],
         "--platforms 'gpu': valid platforms are cpu, cuda, rocm, tpu"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            export.main(argv)
        assert exit_info.value.code == 1
        error = capsys.readouterr().err
        assert error.startswith("error: ") and message in error, error
    assert not os.path.exists(tmp_path / "e")
    with pytest.raises(FileNotFoundError, match="is not an export folder"):
        ExportedModel.load(str(tmp_path))
