"""mmjax.sweep.grid: grids and random search, parsed like --config overrides, and the trials they make."""

from experiments import av_digits
from mmjax import config as config_lib
from mmjax.sweep import grid


def _config(*overrides):
    return config_lib.apply_overrides(av_digits.get_config(), overrides)


def _trials(grids, random=None, seed=0, config=None):
    config = config or _config()
    return grid.make_trials([grid.parse_grid(g, config) for g in grids], config, random, seed)


def test_grid_is_the_product_of_values_parsed_to_each_keys_type():
    trials = _trials(["optimizer.lr=[1e-3, 3e-4]", "model.fusion.name=[concat,'late']",
                      "model.encoders.audio.features=[(4,), (4, 8)]"])
    assert len(trials) == 8
    assert [t.index for t in trials] == list(range(1, 9))
    assert trials[0].values == {"optimizer.lr": 0.001, "model.fusion.name": "concat",
                                "model.encoders.audio.features": [4]}
    assert trials[-1].values == {"optimizer.lr": 0.0003, "model.fusion.name": "late",
                                 "model.encoders.audio.features": [4, 8]}
    assert trials[1].name == "trial_002_lr=0.001_fusion=concat_features=4-8"
    assert trials[1].describe() == "optimizer.lr=0.001 model.fusion.name=concat model.encoders.audio.features=(4,8)"
    assert len({t.name for t in trials}) == 8
    # Group replacement by dict literal and a quoted sequence value, as --config takes them.
    trials = _trials(["model.fusion=[{'name': 'late', 'combine': 'mean'}, {'name': 'concat'}]",
                      "variants=['early,late', image]", "train.num_steps=choice(5, 7)"])
    assert trials[0].values == {"model.fusion": {"name": "late", "combine": "mean"}, "variants": ["early", "late"],
                                "train.num_steps": 5}
    assert trials[3].overrides == ("model.fusion={'name': 'late', 'combine': 'mean'}", "variants=image",
                                   "train.num_steps=7")


def test_random_search_is_seeded_and_samples_within_the_bounds():
    grids = ["optimizer.lr=loguniform(1e-4, 1e-2)", "optimizer.b2=uniform(0.9, 0.999)",
             "train.num_steps=randint(3, 5)", "model.fusion.name=[concat,late]"]
    trials = _trials(grids, random=40, seed=3)
    assert len(trials) == 40 and trials == _trials(grids, random=40, seed=3)
    assert [t.values for t in trials] != [t.values for t in _trials(grids, random=40, seed=4)]
    lrs = [t.values["optimizer.lr"] for t in trials]
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs) and all(float(f"{lr:.4g}") == lr for lr in lrs)
    assert min(lrs) < 1e-3 < max(lrs)  # Log-uniform: a decade either side of 1e-3 is equally likely.
    assert all(0.9 <= t.values["optimizer.b2"] <= 0.999 for t in trials)
    assert {t.values["train.num_steps"] for t in trials} == {3, 4, 5}  # Both bounds included.
    assert all(isinstance(t.values["train.num_steps"], int) for t in trials)
    assert {t.values["model.fusion.name"] for t in trials} == {"concat", "late"}
    # Only lists: distinct combinations.
    trials = _trials(["optimizer.lr=[1e-3,3e-4,1e-4]", "model.fusion.name=[concat,late]"], random=6, seed=0)
    assert len({tuple(t.overrides) for t in trials}) == 6
