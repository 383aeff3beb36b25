"""mmjax.sweep.leaderboard: rows of every shape of run result, ranked; swept values an experiment replaced."""

import pytest

from experiments import av_digits
from mmjax import config as config_lib
from mmjax.sweep import engine, grid, leaderboard


def _config(*overrides):
    return config_lib.apply_overrides(av_digits.get_config(), overrides)


def test_result_shapes():
    def loop_result(accuracy):
        return {"workdir": "/w", "step_time_s": 0.01, "num_parameters": 5,
                "splits": {"test": {"accuracy": accuracy, "num_examples": 3, "per_class": {}}}}

    assert [r["variant"] for r in leaderboard.result_rows(loop_result(0.5))] == [""]
    rows = leaderboard.result_rows({"variants": {"early": loop_result(0.5), "late": loop_result(0.7)}, "table": ""})
    assert [r["variant"] for r in rows] == ["early", "late"] and rows[1]["splits"] == {"test": {"accuracy": 0.7}}
    tasks = {"multilabel": {"variants": {"early": loop_result(0.1)}, "table": ""},
             "regression": {"variants": {"late": loop_result(0.2)}, "table": ""}}
    assert [r["variant"] for r in leaderboard.result_rows(tasks)] == ["multilabel/early", "regression/late"]
    with pytest.raises(grid.SweepError, match=r"run\(\) returned a dict with keys \['rows', 'table'\]"):
        leaderboard.result_rows({"rows": [], "table": ""}, "fusion_benchmark")
    assert leaderboard.default_mode("validation/loss") == "min" and leaderboard.default_mode("test/mae") == "min"
    assert leaderboard.default_mode("test/macro_f1") == "max"


def test_swept_values_an_experiment_replaced_are_reported(tmp_path):
    config = _config()
    [trial] = grid.make_trials([grid.parse_grid(g, config) for g in ("model.fusion.name=[concat]",
                                                                     "optimizer.lr=[0.01]")], config)
    for variant, fusion in (("early", "concat"), ("late", "late")):  # What av_digits' variants set.
        config_lib.save(_config(f"model.fusion={{'name': '{fusion}'}}", "optimizer.lr=0.01"), str(tmp_path / variant))
    rows = [{"variant": v, "workdir": str(tmp_path / v)} for v in ("early", "late", "image")]  # image: not saved.
    overridden = engine.overridden_values(trial, rows)
    assert overridden == {"model.fusion.name": {"late": "late"}}
    record = {"index": 1, "name": trial.name, "values": trial.values, "status": "done", "overridden": overridden,
              "rows": [{"variant": v, "splits": {"test": {"accuracy": a}}} for v, a in (("early", 0.5), ("late", 0.6))]}
    table = leaderboard.leaderboard_markdown(leaderboard.rank([record], "test/accuracy", "max"),
                                             ["model.fusion.name", "optimizer.lr"], "test/accuracy")
    assert "| 1 | 1 | late | concat (ran late) | 0.01 | 0.6000 |" in table
    assert "| 2 | 1 | early | concat | 0.01 | 0.5000 |" in table
