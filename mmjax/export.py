"""Export a trained workdir's inference functions with `jax.export` (StableHLO, symbolic batch dimension), its
preprocessing spec and class names, for serving without mmjax's model code.

    python -m mmjax.export --workdir W --out DIR [--step best|latest|N] [--platforms cpu[,cuda]]

Functions: a fusion (classification, multi-label, regression) model exports `predict` (its inputs: each modality,
and `<m>_mask` for modalities it was trained to do without -> `logits` plus `probabilities` / `scores`, or
`prediction` for regression); a dual encoder exports `embed_<modality>` per tower (-> `embedding`, unit norm),
and a matching model also `itm` (image, text -> `itm_logit`). Each takes the weights as its first argument (so the
StableHLO stays small and the weights are plain arrays) and inputs of any batch size.

DIR holds:

    model.json          format, functions (file, inputs with shapes [null, ...] and dtypes, outputs), task, class
                        names, fingerprint (`mmjax.train.workdir.model_fingerprint`), workdir, step, platforms
    <function>.jaxexport   `jax.export.Exported.serialize()` of the function (load with `jax.export.deserialize`)
    <function>.mlir     its StableHLO as text, for reading or for other StableHLO runtimes
    weights.npz         the parameters and model state, flattened in the functions' argument order
    preprocessing.json  per input: the evaluation preprocessing of one raw image / waveform / text
                        (`mmjax.data.raw_inputs` spec: op chain, sample rate, tokenizer file, context length)
    tokenizer_<m>.json  the text tokenizer, where there is one
    class_names.json    the label names, in output order
    load_exported.py    a copy of `mmjax.export_loader`: `ExportedModel.load(DIR)("predict", inputs)`, with jax and
                        numpy only

The folder is written as DIR.partial and renamed when complete (an existing DIR is replaced only then). The
loader's outputs equal the in-process model's (tested on CPU). Serving: README "Using a trained model".
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from mmjax import runtime
from mmjax.export_loader import FORMAT, MODEL_FILE

LOADER_FILE = "load_exported.py"


def _functions(setup: Any) -> dict[str, tuple[Any, dict[str, tuple[tuple[int, ...], str]]]]:
    """name -> (fn(variables, inputs) -> outputs, {input key: (shape without batch, dtype)})."""
    import jax
    import jax.numpy as jnp

    from mmjax.inference import model_kind

    model, spec = setup.model, {k: v for k, v in setup.spec.items() if k != "label"}
    if model_kind(model) == "towers":
        functions = {}
        for modality in sorted(setup.config.model.encoders):
            def embed(variables, inputs, modality=modality):
                return {"embedding": model.apply(variables, modality, inputs[modality], method="embed")}
            functions[f"embed_{modality}"] = (embed, {modality: spec[modality]})
        if type(model).__name__ == "MatchingModel":
            def itm(variables, inputs):
                return {"itm_logit": model.apply(variables, {"image": inputs["image"], "text": inputs["text"]},
                                                 train=False)["itm_logits"]}
            functions["itm"] = (itm, {"image": spec["image"], "text": spec["text"]})
        return functions
    task = setup.dataset.task

    def predict(variables, inputs):
        logits = jnp.asarray(model.apply(variables, inputs, train=False), jnp.float32)
        if task == "classification":
            return {"logits": logits, "probabilities": jax.nn.softmax(logits, axis=-1)}
        if task == "multilabel":
            return {"logits": logits, "scores": jax.nn.sigmoid(logits)}
        return {"prediction": logits}

    return {"predict": (predict, spec)}


def _preprocessing(setup: Any, functions: dict, directory: str) -> dict[str, Any]:
    """The preprocessing spec of every input key (tokenizers saved beside it)."""
    from mmjax.data.core import mask_key

    inputs = setup.dataset.inputs
    described: dict[str, Any] = {}
    keys = sorted({k for _, spec in functions.values() for k in spec})
    for key in keys:
        shape, dtype = setup.spec[key]
        entry: dict[str, Any] = {"shape": [None, *shape], "dtype": dtype}
        if key in inputs:
            raw = inputs[key]
            tokenizer = f"tokenizer_{key}.json" if raw.save_tokenizer(os.path.join(directory,
                                                                                   f"tokenizer_{key}.json")) else None
            entry["raw"] = raw.spec(tokenizer)
            entry["raw"]["what"] = {
                "image": "the image file's bytes (any format Pillow reads) or a uint8 array [H, W(, C)]",
                "audio": "a mono waveform in [-1, 1]; at another sample rate it is resampled to sample_rate first",
                "text": "a str",
            }[raw.modality]
        elif key.endswith("_mask"):
            modality = key[: -len("_mask")]
            entry["what"] = (f"1.0 when the example has {modality}, 0.0 when it is missing (then {modality} is all "
                             "zeros); the model was trained to do without it")
            assert key == mask_key(modality)
        else:
            entry["what"] = f"no raw-input preprocessing is declared by dataset {setup.dataset.name!r}"
        described[key] = entry
    return {"inputs": described, "batch": "every input has a leading batch dimension of any size (the same)"}


def export(predictor: Any, out: str, *, platforms: Sequence[str] = ("cpu",), fingerprint: str | None = None
           ) -> dict[str, Any]:
    """Writes the export folder `out` for a loaded `mmjax.predict.Predictor` (module docstring); returns
    model.json's content."""
    import jax
    from jax import export as jax_export

    setup, state = predictor.setup, predictor.state
    variables = jax.device_get({"params": state.params, **state.model_state})
    leaves, treedef = jax.tree_util.tree_flatten(variables)
    leaves = [np.asarray(x) for x in leaves]
    functions = _functions(setup)
    out = os.path.abspath(out)
    partial = out + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    (batch,) = jax_export.symbolic_shape("batch")
    weights_spec = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
    described = {}
    for name, (fn, spec) in functions.items():
        def call(weights, inputs, fn=fn):
            return fn(jax.tree_util.tree_unflatten(treedef, weights), inputs)

        inputs_spec = {k: jax.ShapeDtypeStruct((batch, *shape), dtype) for k, (shape, dtype) in spec.items()}
        try:
            exported = jax_export.export(jax.jit(call), platforms=tuple(platforms))(weights_spec, inputs_spec)
        except Exception as error:  # jax raises several types for shapes it cannot keep symbolic.
            raise ValueError(f"jax.export of {name!r} failed ({type(error).__name__}: {error})") from error
        with open(os.path.join(partial, f"{name}.jaxexport"), "wb") as f:
            f.write(exported.serialize())
        with open(os.path.join(partial, f"{name}.mlir"), "w") as f:
            f.write(exported.mlir_module())
        outputs = jax.tree_util.tree_unflatten(exported.out_tree, exported.out_avals)
        described[name] = {
            "file": f"{name}.jaxexport", "stablehlo": f"{name}.mlir",
            "inputs": {k: {"shape": [None, *shape], "dtype": dtype} for k, (shape, dtype) in spec.items()},
            "outputs": {k: {"shape": [None, *(int(d) for d in v.shape[1:])], "dtype": str(v.dtype)}
                        for k, v in outputs.items()},
        }
    np.savez(os.path.join(partial, "weights.npz"), **{f"w{i:05d}": x for i, x in enumerate(leaves)})
    with open(os.path.join(partial, "preprocessing.json"), "w") as f:
        json.dump(_preprocessing(setup, functions, partial), f, indent=2)
    class_names = list(setup.dataset.class_names)
    with open(os.path.join(partial, "class_names.json"), "w") as f:
        json.dump(class_names, f, indent=2)
    import mmjax.export_loader as loader

    shutil.copyfile(loader.__file__, os.path.join(partial, LOADER_FILE))
    meta = {
        "format": FORMAT, "functions": described, "weights": "weights.npz", "preprocessing": "preprocessing.json",
        "class_names": class_names, "task": setup.dataset.task, "model": type(setup.model).__name__,
        "fingerprint": fingerprint, "workdir": os.path.abspath(predictor.workdir or ""), "step": predictor.step,
        "platforms": list(platforms), "jax_version": jax.__version__,
    }
    with open(os.path.join(partial, MODEL_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.replace(partial, out)
    return meta


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    runtime.prepare_process(reexec=argv is None)
    p = argparse.ArgumentParser(prog="python -m mmjax.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a trained model's workdir (WORKDIR/<variant>)")
    p.add_argument("--out", required=True, help="the export folder (replaced when the export is complete)")
    p.add_argument("--step", default="best", help="best (default), latest or a checkpoint step number")
    p.add_argument("--platforms", default="cpu", help="comma-separated: cpu, cuda, rocm, tpu (lowered for each)")
    args = p.parse_args(argv)
    from mmjax import reporting
    from mmjax.predict import Predictor, _step
    from mmjax.train.workdir import model_fingerprint

    try:
        platforms = [x.strip() for x in args.platforms.split(",") if x.strip()]
        unknown = sorted(set(platforms) - {"cpu", "cuda", "rocm", "tpu"})
        if unknown or not platforms:
            raise ValueError(f"--platforms {args.platforms!r}: valid platforms are cpu, cuda, rocm, tpu")
        predictor = Predictor.load(args.workdir, _step(args.step))
        meta = export(predictor, args.out, platforms=platforms,
                      fingerprint=model_fingerprint(predictor.setup, predictor.state))
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    reporting.console(f"exported {', '.join(meta['functions'])} of {args.workdir} (step {meta['step']}) to "
                      f"{args.out} for {', '.join(platforms)}; load with {os.path.join(args.out, LOADER_FILE)}: "
                      "ExportedModel.load(DIR)")
    return meta


if __name__ == "__main__":
    main()
