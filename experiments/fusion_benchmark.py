"""Fusion benchmark: every fusion method (and each single modality) on AV-Digits, several seeds, one table.

For each method and seed it trains the AV-Digits model with that fusion (same encoders, optimiser, steps and
data order), then evaluates on the test split:
- accuracy and macro-F1 (mean ± std over seeds), parameter count, median train-step time, step peak memory;
- MultiBench-style robustness: Gaussian noise of increasing strength on one modality at a time (levels in units
  of that modality's standard deviation), and each modality entirely missing (masked); the relative robustness
  is the area under the accuracy–noise curve divided by the noise range;
- classical decision-level baselines: scikit-learn SVM and random forest per modality on the features of the
  trained single-modality encoders, combined by probability averaging and by voting.

Command (56 min on 2 CPU cores shared with other jobs for the 25 methods x 3 seeds, 300 steps each;
tiny: see tests/test_experiments.py):

    python -m experiments.fusion_benchmark --workdir /tmp/fusion

Writes WORKDIR/results.md, results.csv, robustness.md, robustness.png and benchmark.json; each run's own
workdir is WORKDIR/<method>/seed_<k> (re-running resumes, finished runs are only re-evaluated). On CPU the same
command gives the same numbers (step times aside). Expected test accuracy (mean ± std over seeds 0-2; the full
table, with robustness and classical baselines, is in README "Fusion benchmark"):

    image_only 0.8602 ± 0.0092   audio_only 0.8667 ± 0.0045   concat 0.9685 ± 0.0026
    weighted_sum 0.9620 ± 0.0035   attention 0.9574 ± 0.0035   max 0.9620 ± 0.0047   product 0.9574 ± 0.0080
    gmu 0.9481 ± 0.0114   tensor 0.9583 ± 0.0082   low_rank_tensor 0.9546 ± 0.0069   mi_vector 0.9593 ± 0.0035
    mi_matrix 0.9546 ± 0.0065   nl_gate 0.9037 ± 0.0154   cross_attention 0.9250 ± 0.0142
    bottleneck 0.9204 ± 0.0151   joint_transformer 0.9176 ± 0.0190   serial 0.9620 ± 0.0057   film 0.9556 ± 0.0068
    late_mean 0.9611 ± 0.0099   late_learned 0.9630 ± 0.0057   late_product 0.9556 ± 0.0079
    concat_aux 0.9731 ± 0.0026   concat_gblend 0.9676 ± 0.0013   concat_ogm_ge 0.9648 ± 0.0080
    concat_modality_dropout 0.9741 ± 0.0069
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any

import ml_collections

from experiments import av_digits
from mmjax import compare, experiment

COMPILE_CACHE = True  # Each method trains once per seed with the same programs: the cache compiles them once.
# Method name -> the model change it makes: "only" keeps one modality, "fusion" is the fusion's config.
METHODS: dict[str, dict[str, Any]] = {
    "image_only": {"only": "image"},
    "audio_only": {"only": "audio"},
    "concat": {"fusion": {"name": "concat"}},
    "weighted_sum": {"fusion": {"name": "weighted_sum"}},
    "attention": {"fusion": {"name": "attention"}},
    "max": {"fusion": {"name": "max"}},
    "product": {"fusion": {"name": "product"}},
    "gmu": {"fusion": {"name": "gmu"}},
    "tensor": {"fusion": {"name": "tensor"}},
    "low_rank_tensor": {"fusion": {"name": "low_rank_tensor"}},
    "mi_vector": {"fusion": {"name": "multiplicative", "form": "vector"}},
    "mi_matrix": {"fusion": {"name": "multiplicative", "form": "matrix"}},
    "nl_gate": {"fusion": {"name": "nl_gate"}},
    "cross_attention": {"fusion": {"name": "cross_attention"}},
    "bottleneck": {"fusion": {"name": "bottleneck"}},
    "joint_transformer": {"fusion": {"name": "joint_transformer"}},
    "serial": {"fusion": {"name": "serial", "order": ("audio", "image")}},
    "film": {"fusion": {"name": "film", "target": "image"}},  # Audio features scale/shift the image CNN's maps.
    "late_mean": {"fusion": {"name": "late", "combine": "mean"}},
    "late_learned": {"fusion": {"name": "late", "combine": "learned"}},
    "late_product": {"fusion": {"name": "late", "combine": "product"}},
    # Modality-imbalance remedies on early fusion (README "Modality imbalance"): unimodal auxiliary heads with equal
    # weights, with the Gradient-Blending weights measured on this seed's image_only, audio_only and concat runs
    # (Wang et al. 2020), OGM-GE gradient modulation (Peng et al. 2022), and modality dropout.
    "concat_aux": {"fusion": {"name": "concat"}, "aux_heads": {"audio": 1.0, "image": 1.0}},
    "concat_gblend": {"fusion": {"name": "concat"}, "gblend": True},
    "concat_ogm_ge": {"fusion": {"name": "concat"}, "modulation": {"name": "ogm_ge", "alpha": 0.5}},
    "concat_modality_dropout": {"fusion": {"name": "concat"}, "modality_dropout": 0.3},
}
GBLEND_FROM = {"fused": "concat", "audio": "audio_only", "image": "image_only"}  # G-Blend head -> measured method.


def get_config() -> ml_collections.ConfigDict:
    config = av_digits.get_config()
    config.name = "fusion_benchmark"
    del config["variants"]
    config.methods = tuple(METHODS)
    config.seeds = (0, 1, 2)
    config.robustness = dict(split="test", levels=(0.0, 0.25, 0.5, 1.0, 2.0, 4.0))
    config.classical = dict(classifiers=("svm", "random_forest"), split="test")  # Empty classifiers: skip.
    config.train.num_steps = 300  # Half the AV-Digits default: 21 methods x 3 seeds must fit in about an hour.
    config.train.eval_every_steps = 100
    config.checkpoint.every_steps = 100
    config.checkpoint.keep = 1
    return config


def method_config(config: ml_collections.ConfigDict, method: str, seed: int,
                  weights: dict[str, float] | None = None) -> ml_collections.ConfigDict:
    """The AV-Digits training config of one (method, seed); a Gradient-Blending method takes its head `weights`
    ({"fused": w, modality: w, ...}, measured by `gblend_weights`; equal when not given, for config checks)."""
    if method not in METHODS:
        raise ValueError(f"config methods: unknown method {method!r}; valid: {', '.join(METHODS)}")
    change = METHODS[method]
    run = ml_collections.ConfigDict(config.to_dict())
    for key in ("methods", "seeds", "robustness", "classical"):
        del run[key]
    run.name = f"{config.name}/{method}/seed_{seed}"
    run.seed = seed
    if "only" in change:
        return compare.unimodal(change["only"])(run)
    run = compare.fusion(**change["fusion"])(run)
    if "aux_heads" in change:
        run.model.aux_heads = dict(change["aux_heads"])
    if change.get("gblend"):
        weights = weights or {m: 1.0 / len(GBLEND_FROM) for m in GBLEND_FROM}
        run.model.aux_heads = {m: weights[m] for m in GBLEND_FROM if m != "fused"}
        run.model.fused_weight = weights["fused"]
    if "modulation" in change:
        run.train.modulation = dict(change["modulation"])
    if "modality_dropout" in change:
        run.model.modality_dropout = change["modality_dropout"]
    return run


def gblend_weights(workdirs: dict[str, str]) -> dict[str, float]:
    """Offline Gradient-Blending weights (`mmjax.tasks.multitask.gradient_blending_weights`) of the fused head and
    each modality's head, measured on the trained runs in `workdirs` ({"fused": concat run, "audio": audio_only run,
    ...}): the training loss (the last logged window mean at or before the evaluation) and the validation loss at
    the first and the last evaluation of each run."""
    from mmjax import reporting
    from mmjax.tasks.multitask import gradient_blending_weights

    train, val = {}, {}
    for head, workdir in workdirs.items():
        records = reporting.read_metrics(workdir)
        evals = [r for r in records if r["split"] == "validation" and "loss" in r]
        steps = (evals[0]["step"], evals[-1]["step"])
        logged = sorted((r["step"], r["loss"]) for r in records if r["split"] == "train" and "loss" in r)
        if len(evals) < 2 or not logged or logged[0][0] > steps[0]:
            raise ValueError(f"Gradient-Blending weights: run {workdir} needs a training loss logged by its first "
                             "evaluation and two evaluations")
        train[head] = [[loss for step, loss in logged if step <= s][-1] for s in steps]
        val[head] = [next(r["loss"] for r in evals if r["step"] == s) for s in steps]
    return gradient_blending_weights(train, val)


def _mean_std(values: list[float]) -> tuple[float, float]:
    import numpy as np

    return float(np.mean(values)), float(np.std(values))


def _format(mean: float, std: float) -> str:
    return f"{mean:.4f} ± {std:.4f}"


def run(config: ml_collections.ConfigDict, workdir: str):
    from mmjax import reporting
    from mmjax.evaluate import robustness
    from mmjax.train import loop
    from mmjax.train.workdir import load_trained

    if not config.methods or not config.seeds:
        raise ValueError("config methods and seeds must both be non-empty")
    for index, method in enumerate(config.methods):  # Fail on a typo before training anything.
        method_config(config, method, config.seeds[0])
        needed = [m for m in GBLEND_FROM.values() if m not in config.methods[:index]]
        if METHODS[method].get("gblend") and needed:
            raise ValueError(f"config methods: {method!r} measures its Gradient-Blending weights on the runs of "
                             f"{sorted(GBLEND_FROM.values())}; list {needed} before it")
        if METHODS[method].get("gblend") and config.train.num_steps <= config.train.eval_every_steps:
            raise ValueError(f"config methods: {method!r} measures each head's losses between the first and the last "
                             f"evaluation; train.num_steps={config.train.num_steps} with train.eval_every_steps="
                             f"{config.train.eval_every_steps} evaluates once")
    split = config.robustness.split
    per_method: dict[str, dict] = {}
    curves: dict[str, dict] = {}
    unimodal: dict[int, dict[str, str]] = {}  # seed -> modality -> workdir of its single-modality run.
    for method in config.methods:
        runs = []
        for seed in config.seeds:
            run_dir = os.path.join(workdir, method, f"seed_{seed}")
            weights = None
            if METHODS[method].get("gblend"):
                weights = gblend_weights({h: os.path.join(workdir, m, f"seed_{seed}") for h, m in GBLEND_FROM.items()})
                reporting.console(f"{method} seed {seed}: Gradient-Blending weights "
                                  + ", ".join(f"{h} {w:.3f}" for h, w in weights.items()))
            result = loop.run(method_config(config, method, seed, weights), run_dir)
            if result.get("preempted"):
                return result
            setup, state = load_trained(run_dir)
            evaluator = robustness.Robustness(levels=tuple(config.robustness.levels), seed=seed)
            curve = evaluator(setup, state, split, None)["robustness"]
            if "only" in METHODS[method]:
                unimodal.setdefault(seed, {})[METHODS[method]["only"]] = run_dir
            runs.append({"result": result, "robustness": curve, "gblend_weights": weights})
        per_method[method] = runs
        curves[method] = _average_curves([r["robustness"] for r in runs])
        reporting.console(f"--- {method}: test accuracy {_format(*_accuracies(runs, 'accuracy'))}")

    classical_results = _classical(config, unimodal)
    rows = _rows(per_method, curves, classical_results)
    _write_outputs(workdir, rows, curves, per_method, classical_results, config)
    table = results_table(rows)
    reporting.console("\n" + table + "\n\n" + robustness.robustness_table(curves))
    return {"rows": rows, "table": table, "runs": per_method}


def _accuracies(runs: list[dict], metric: str) -> tuple[float, float]:
    return _mean_std([r["result"]["splits"]["test"][metric] for r in runs])


def _average_curves(curves: list[dict]) -> dict:
    """Seed-averaged robustness results (same levels and modalities in each)."""
    import numpy as np

    first = curves[0]
    mean = lambda key, m: float(np.mean([c[key][m] for c in curves], axis=0))  # noqa: E731
    return {
        "levels": first["levels"],
        "metric": first["metric"],
        "clean": float(np.mean([c["clean"] for c in curves])),
        "noise": {m: np.mean([c["noise"][m] for c in curves], axis=0).tolist() for m in first["noise"]},
        "missing": {m: mean("missing", m) for m in first["missing"]},
        "relative_robustness": {m: mean("relative_robustness", m) for m in first["relative_robustness"]},
    }


def _classical(config: ml_collections.ConfigDict, unimodal: dict[int, dict[str, str]]) -> dict:
    """SVM / random forest per modality on the trained single-modality encoders' features, late-fused."""
    from mmjax import reporting
    from mmjax.evaluate import classical
    from mmjax.evaluate.features import extract_features
    from mmjax.train.workdir import load_trained

    kinds = tuple(config.classical.classifiers)
    if not kinds:
        return {}
    per_seed = []
    for seed, dirs in sorted(unimodal.items()):
        if set(dirs) != {"image", "audio"}:
            continue
        train_f, train_y, test_f, test_y = {}, None, {}, None
        for modality, run_dir in dirs.items():
            setup, state = load_trained(run_dir)
            features, train_y = extract_features(setup, state, config.data.train_split)
            train_f[modality] = features[modality]
            features, test_y = extract_features(setup, state, config.classical.split)
            test_f[modality] = features[modality]
        per_seed.append(classical.classical_late_fusion(train_f, train_y, test_f, test_y, kinds, seed=seed,
                                                        num_classes=config.model.num_classes))
    if not per_seed:
        reporting.console("classical baselines skipped: they need the image_only and audio_only methods")
        return {}
    results = {}
    for kind in kinds:
        for combine in ("average", "vote"):
            acc = [r[kind][combine]["accuracy"] for r in per_seed]
            f1 = [r[kind][combine]["macro_f1"] for r in per_seed]
            results[f"{kind}_{combine}"] = {"accuracy": _mean_std(acc), "macro_f1": _mean_std(f1),
                                            "per_seed": [r[kind] for r in per_seed]}
    return results


def _rows(per_method: dict, curves: dict, classical_results: dict) -> list[dict]:
    rows = []
    for method, runs in per_method.items():
        first = runs[0]["result"]
        memory = first.get("step_memory") or {}
        step_times = [r["result"]["step_time_s"] for r in runs if r["result"].get("step_time_s")]
        rows.append({
            "method": method,
            "kind": "unimodal" if "only" in METHODS[method] else
                    "remedy" if set(METHODS[method]) != {"fusion"} else
                    "decision" if METHODS[method]["fusion"]["name"] == "late" else
                    "serial" if METHODS[method]["fusion"]["name"] in ("serial", "film") else "feature",
            "accuracy": _accuracies(runs, "accuracy"),
            "macro_f1": _accuracies(runs, "macro_f1"),
            "parameters": first["num_parameters"],
            "step_ms": 1000 * float(sorted(step_times)[len(step_times) // 2]) if step_times else None,
            "peak_memory_mb": memory["peak_bytes"] / 2**20 if "peak_bytes" in memory else None,
            "robustness": curves[method]["relative_robustness"],
            "missing": curves[method]["missing"],
        })
    for name, result in classical_results.items():
        rows.append({"method": f"classical_{name}", "kind": "classical", "accuracy": result["accuracy"],
                     "macro_f1": result["macro_f1"], "parameters": None, "step_ms": None, "peak_memory_mb": None,
                     "robustness": {}, "missing": {}})
    return rows


def results_table(rows: list[dict]) -> str:
    """Markdown: accuracy and macro-F1 mean ± std, parameters, step time, peak memory, robustness per modality."""
    modalities = sorted({m for r in rows for m in r["robustness"]})
    header = ["method", "kind", "accuracy", "macro-F1", "params", "step (ms)", "peak mem (MB)"]
    header += [f"robustness {m}" for m in modalities] + [f"{m} missing" for m in modalities]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    show = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        cells = [r["method"], r["kind"], _format(*r["accuracy"]), _format(*r["macro_f1"]),
                 show(r["parameters"], ","), show(r["step_ms"], ".1f"), show(r["peak_memory_mb"], ".1f")]
        cells += [show(r["robustness"].get(m), ".4f") for m in modalities]
        cells += [show(r["missing"].get(m), ".4f") for m in modalities]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write_outputs(workdir, rows, curves, per_method, classical_results, config) -> None:
    from mmjax import reporting
    from mmjax.evaluate import robustness

    if not reporting.is_primary():
        return
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(results_table(rows) + "\n")
    modalities = sorted({m for r in rows for m in r["robustness"]})
    with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "kind", "accuracy_mean", "accuracy_std", "macro_f1_mean", "macro_f1_std",
                         "parameters", "step_ms", "peak_memory_mb"]
                        + [f"robustness_{m}" for m in modalities] + [f"missing_{m}" for m in modalities])
        for r in rows:
            writer.writerow([r["method"], r["kind"], *r["accuracy"], *r["macro_f1"], r["parameters"], r["step_ms"],
                             r["peak_memory_mb"]] + [r["robustness"].get(m) for m in modalities]
                            + [r["missing"].get(m) for m in modalities])
    with open(os.path.join(workdir, "robustness.md"), "w") as f:
        f.write(robustness.robustness_table(curves) + "\n")
    robustness.plot_robustness(curves, os.path.join(workdir, "robustness.png"), title="AV-Digits, test split")
    with open(os.path.join(workdir, "benchmark.json"), "w") as f:
        json.dump({
            "config": config.to_dict(),
            "rows": rows,
            "robustness": curves,
            "classical": classical_results,
            "runs": {m: [r["result"] for r in runs] for m, runs in per_method.items()},
        }, f, indent=2, default=list)


if __name__ == "__main__":
    experiment.main(__name__)
