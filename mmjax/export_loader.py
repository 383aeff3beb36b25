"""Load and run a model exported by `python -m mmjax.export`, without mmjax: needs only jax and numpy.

`mmjax.export` copies this file into the export folder as `load_exported.py`, so a serving process can use it
without mmjax installed:

    from load_exported import ExportedModel          # or: from mmjax.export_loader import ExportedModel
    model = ExportedModel.load("/models/av_early")
    model.functions                                   # e.g. ["predict"], or ["embed_image", "embed_text", "itm"]
    model.inputs("predict")                           # {"image": ([None, 32, 32, 3], "float32"), ...}
    outputs = model("predict", {"image": images, "audio": spectrograms})   # {"probabilities": [B, K], ...}
    model.class_names                                 # label names, in output order
    model.preprocessing                               # how raw inputs become these arrays (preprocessing.json)

Each function is a `jax.export.Exported` (StableHLO with a symbolic batch dimension, serialized by
`Exported.serialize`), called with the model's weights (weights.npz, in the order of the function's flattened
arguments) and a dict of input arrays of any batch size. Inputs are checked (keys, trailing shapes, dtypes)
before the call, with errors naming the key. The preprocessing of raw files (image bytes, waveforms, texts) is
described in preprocessing.json; with mmjax installed (its data code, not its models or checkpoints),
`mmjax.data.raw_inputs.from_spec(spec, folder)` rebuilds it exactly.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

FORMAT = 1
MODEL_FILE = "model.json"


class ExportedModel:
    """The functions of an export folder, ready to call (module docstring)."""

    def __init__(self, directory: str, meta: dict[str, Any], weights: list[np.ndarray], exported: dict[str, Any]):
        self.directory, self.meta, self.weights, self._exported = directory, meta, weights, exported

    @classmethod
    def load(cls, directory: str) -> ExportedModel:
        from jax import export

        path = os.path.join(directory, MODEL_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory} is not an export folder ({MODEL_FILE} missing); make one with "
                                    "python -m mmjax.export --workdir W --out DIR")
        with open(path) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: format {meta.get('format')!r}, this loader reads format {FORMAT}")
        with np.load(os.path.join(directory, meta["weights"])) as saved:
            weights = [saved[f"w{i:05d}"] for i in range(len(saved.files))]
        exported = {}
        for name, function in meta["functions"].items():
            with open(os.path.join(directory, function["file"]), "rb") as f:
                exported[name] = export.deserialize(bytearray(f.read()))
        return cls(directory, meta, weights, exported)

    @property
    def functions(self) -> list[str]:
        return list(self.meta["functions"])

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.get("class_names") or [])

    @property
    def preprocessing(self) -> dict[str, Any]:
        with open(os.path.join(self.directory, self.meta["preprocessing"])) as f:
            return json.load(f)

    def inputs(self, name: str) -> dict[str, tuple[list, str]]:
        """`{key: ([None, *shape], dtype)}` of a function (None: the batch dimension, any size)."""
        return {k: (v["shape"], v["dtype"]) for k, v in self._function(name)["inputs"].items()}

    def _function(self, name: str) -> dict[str, Any]:
        if name not in self.meta["functions"]:
            raise KeyError(f"no function {name!r} in {self.directory}; functions: {', '.join(self.functions)}")
        return self.meta["functions"][name]

    def __call__(self, name: str, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Runs function `name` on a dict of input arrays with one batch dimension; returns numpy outputs."""
        spec = self._function(name)["inputs"]
        missing = sorted(set(spec) - set(inputs))
        extra = sorted(set(inputs) - set(spec))
        if missing or extra:
            raise ValueError(f"{name}: inputs {sorted(inputs)}; expected {sorted(spec)} (missing {missing}, "
                             f"unexpected {extra})")
        arrays, batch = {}, None
        for key, described in spec.items():
            value = np.asarray(inputs[key])
            shape, dtype = described["shape"], described["dtype"]
            if value.ndim != len(shape) or list(value.shape[1:]) != list(shape[1:]):
                raise ValueError(f"{name}: input {key!r} has shape {list(value.shape)}, expected [batch, "
                                 f"{', '.join(map(str, shape[1:]))}]")
            if batch is not None and value.shape[0] != batch:
                raise ValueError(f"{name}: input {key!r} has batch {value.shape[0]}, others have {batch}")
            batch = value.shape[0]
            if str(value.dtype) != dtype:
                if not np.can_cast(value.dtype, dtype, casting="same_kind"):
                    raise ValueError(f"{name}: input {key!r} has dtype {value.dtype}, expected {dtype}")
                value = value.astype(dtype)
            arrays[key] = value
        outputs = self._exported[name].call(self.weights, arrays)
        return {k: np.asarray(v) for k, v in outputs.items()}
