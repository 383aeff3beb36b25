"""Config overrides: types are enforced, unknown keys are named with the valid ones, the config is saved."""

import ml_collections
import pytest

from mmjax import cli
from mmjax import config as config_lib
from mmjax.config import ConfigError, apply_overrides


def _config():
    return ml_collections.ConfigDict(
        dict(
            seed=0,
            name="x",
            variants=("a", "b"),
            optimizer=dict(lr=1e-3, name="adamw", nesterov=False),
            data=dict(batch_size=64, data_dir=""),
            model=dict(encoders=dict(image=dict(name="small_cnn", features=(32, 64)))),
        )
    )


def test_overrides_parse_to_the_existing_type():
    config = config_lib.apply_overrides(
        _config(),
        [
            "optimizer.lr=3e-4",
            "data.batch_size=128",
            "optimizer.nesterov=true",
            "model.encoders.image.features=(8, 16, 32)",
            "variants=early,late",
            "name=hello world",
            "optimizer.lr=1",
        ],
    )
    assert config.optimizer.lr == 1.0 and isinstance(config.optimizer.lr, float)
    assert config.data.batch_size == 128
    assert config.optimizer.nesterov is True
    assert config.model.encoders.image.features == (8, 16, 32)
    assert config.variants == ("early", "late")
    assert config.name == "hello world"


def test_overrides_do_not_touch_the_original():
    original = _config()
    config_lib.apply_overrides(original, ["seed=5"])
    assert original.seed == 0


def test_unknown_key_names_it_and_lists_valid_keys():
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.apply_overrides(_config(), ["optimizer.lrr=0.1"])
    message = str(error.value)
    assert "'optimizer.lrr'" in message
    assert "Did you mean optimizer.lr" in message
    assert "data.batch_size" in message  # The full list of valid keys.


def test_unknown_nested_group_is_named():
    with pytest.raises(config_lib.ConfigError, match="'model.encoders.video.name'"):
        config_lib.apply_overrides(_config(), ["model.encoders.video.name=vit"])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("data.batch_size=abc", "expects int"),
        ("data.batch_size=1.5", "expects int"),
        ("optimizer.lr=fast", "expects float"),
        ("optimizer.nesterov=maybe", "expects a bool"),
        ("model.encoders.image=3", "is a group"),
        ("seed", "key=value"),
    ],
)
def test_wrong_types_fail_with_the_key(override, expected):
    with pytest.raises(config_lib.ConfigError, match=expected):
        config_lib.apply_overrides(_config(), [override])


def test_save_and_load_round_trip(tmp_path):
    config = _config()
    config_lib.save(config, str(tmp_path))
    loaded = config_lib.load(str(tmp_path))
    assert config_lib.normalize(loaded.to_dict()) == config_lib.normalize(config.to_dict())


def test_cli_accepts_both_override_spellings():
    config, args = cli.parse(_config, ["--workdir", "/tmp/w", "--config.seed=3", "--config.data.batch_size", "16"])
    assert args.workdir == "/tmp/w"
    assert config.seed == 3 and config.data.batch_size == 16


def test_cli_bad_override_exits_2_with_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse(_config, ["--workdir", "/tmp/w", "--config.nope=1"])
    assert exit_info.value.code == 2
    assert "unknown config key 'nope'" in capsys.readouterr().err


def test_cli_rejects_stray_arguments(capsys):
    with pytest.raises(SystemExit):
        cli.parse(_config, ["--workdir", "/tmp/w", "--lr=1"])
    assert "unrecognised argument '--lr=1'" in capsys.readouterr().err


def test_a_group_is_replaced_whole_by_a_dict_literal_and_then_refined():
    base = ml_collections.ConfigDict({"model": {"encoders": {"image": {"name": "small_cnn", "features": (4,)}}}})
    config = apply_overrides(base, ["model.encoders.image={'name': 'vit', 'patch_size': 2}",
                                    "model.encoders.image.patch_size=4"])
    assert config.model.encoders.image.to_dict() == {"name": "vit", "patch_size": 4}
    with pytest.raises(ConfigError, match="is a group: give a dict"):
        apply_overrides(base, ["model.encoders.image={1: 2}"])
    with pytest.raises(ConfigError, match="replace it whole with a dict literal"):
        apply_overrides(base, ["model.encoders.image=vit"])


def test_base_config_holds_every_sections_defaults():
    base = config_lib.base_config()
    assert set(base) == {"seed", "data", "task", "optimizer", "train", "mesh", "eval", "checkpoint"}
    assert set(base.data) == {"data_dir", "train_split", "batch_size", "eval_batch_size", "num_threads", "num_workers",
                              "prefetch", "cache_in_memory"}
    assert set(base.optimizer) == {"name", "lr", "schedule", "warmup_steps", "end_lr_factor", "weight_decay", "b1",
                                   "b2", "momentum", "nesterov", "grad_clip_norm", "l1", "l2", "l1_params", "l2_params"}
    assert set(base.train) == {"num_steps", "log_every_steps", "eval_every_steps", "frozen", "init_from",
                               "grad_accum_steps"}
    assert set(base.mesh) == {"fsdp", "fsdp_min_size"} and set(base.eval) == {"splits"}
    assert set(base.checkpoint) == {"every_steps", "keep", "best_metric", "best_mode"}
    base.optimizer.lr = 1.0
    assert config_lib.base_config().optimizer.lr == 2e-3  # A fresh copy each time.
