import re
import subprocess
import sys

import pytest

from trainer.training.config import ConfigError, config_from_dict, load_config, to_dict

REQUIRED = ["data.shards=s", "run.dir=r"]


def test_defaults_yaml_and_overrides_layer(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.5\ntrain:\n  epochs: 3\n")
    config = load_config(path, REQUIRED + ["optim.lr=0.25", "model.block_config=[2,3]"])
    assert config.optim.lr == 0.25  # CLI beats YAML
    assert config.train.epochs == 3  # YAML beats default
    assert config.train.batch_size == 64  # default
    assert config.model.block_config == [2, 3]


@pytest.mark.parametrize(
    "configs",
    ["demo", "densenet121-imagenet", "densenet121-imagenet-fast", "cifar-style", "own-images", "own-images-imagenet"],
)
def test_shipped_configs_load(configs):
    load_config(f"configs/{configs}.yaml", ["data.shards=somewhere"])  # own-images asks for it


def test_own_images_asks_for_its_shards():
    with pytest.raises(ConfigError, match="data.shards is required"):
        load_config("configs/own-images.yaml")


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["optim.lrr=1"], "unknown config key 'optim.lrr' — did you mean 'optim.lr'?"),
        (["optm.lr=1"], "did you mean 'optim'?"),
        (["optim.lr=abc"], "optim.lr"),
        (["train.epochs=2.5"], "train.epochs"),
        (["optim.lr=-1"], "optim.lr=-1.0 is out of range"),
        (["train.mixed_precision=fp8"], "train.mixed_precision='fp8' is not one of no, bf16, fp16"),
        (["train.compile=yes"], "train.compile='True' is not one of"),
        (["model.compression=1.5"], "model.compression=1.5 is out of range"),
        (["lr=1"], "must look like section.key=value"),
        (["model.freeze_features=true"], "model.freeze_features needs model.pretrained"),
        (["data.image_size=big"], "data.image_size='big' is neither a side in pixels, e.g. 224 nor auto"),
        (["model.small_inputs=maybe"], "model.small_inputs='maybe' is neither true or false nor auto"),
    ],
)
def test_bad_values_are_one_line_errors(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, REQUIRED + overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_required_keys():
    with pytest.raises(ConfigError, match="data.shards is required"):
        load_config(None, ["run.dir=r"])


def test_cli_reports_config_error_without_traceback():
    result = subprocess.run(
        [sys.executable, "trainer/main.py", "--config", "configs/demo.yaml", "optim.lrr=0.1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown config key 'optim.lrr' — did you mean 'optim.lr'?"


def test_bare_no_means_no_mixed_precision(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(path, REQUIRED).train.mixed_precision == "no"
    assert load_config(None, REQUIRED + ["train.mixed_precision=no"]).train.mixed_precision == "no"


def test_saved_configs_old_and_new_load_back(tmp_path):
    """Old runs saved "no"/"none", new ones what was resolved; a None reads back as None."""
    for precision, compiled in [("no", "none"), ("bf16", "default"), (None, None)]:
        saved = to_dict(
            load_config(
                None, REQUIRED + [f"train.mixed_precision={precision or 'null'}", f"train.compile={compiled or 'null'}"]
            )
        )
        train = config_from_dict(saved).train
        assert (train.mixed_precision, train.compile) == (precision, compiled)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["optim.lr_base_size=0"], "optim.lr_base_size=0 is out of range — it must be >= 1"),
        (["optim.lr_base_size=-256"], "optim.lr_base_size=-256 is out of range"),
        (["optim.lr_base_size=2.5"], "optim.lr_base_size"),
        (["optim.lr_base_scale=log"], "optim.lr_base_scale='log' is not one of auto, linear, sqrt"),
    ],
)
def test_bad_lr_base_values_are_one_line_errors(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, REQUIRED + overrides)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_lr_base_defaults_keep_lr_as_given():
    config = load_config(None, REQUIRED)
    assert config.optim.lr_base_size is None and config.optim.lr_base_scale == "auto"
    config = load_config("configs/densenet121-imagenet.yaml", ["optim.lr_base_size=null", "optim.lr_base_scale=sqrt"])
    assert config.optim.lr_base_size is None and config.optim.lr_base_scale == "sqrt"


def test_progressive_resizing_size_is_a_function_of_the_epoch():
    from trainer.training.config import train_size

    config = load_config(None, [*REQUIRED, "data.image_size=224", "train.epochs=20"])
    assert {train_size(config.data, e, 20) for e in range(20)} == {224}  # off by default
    config = load_config(None, [*REQUIRED, "data.min_size=160", "data.image_size=224", "train.epochs=20"])
    # ramp [0, 16] by default (80% of the epochs), steps of 32, the rest at full size
    assert [train_size(config.data, e, 20) for e in range(20)] == [160] * 4 + [192] * 9 + [224] * 7
    ramp = [*REQUIRED, "data.min_size=160", "data.image_size=192", "train.epochs=88", "data.ramp_epochs=[65,76]"]
    config = load_config(None, ramp)  # FFCV's rn50_88_epochs resolution schedule
    sizes = [train_size(config.data, e, 88) for e in range(88)]
    assert sizes[:71] == [160] * 71 and sizes[71:] == [192] * 17


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.min_size=256"], "data.min_size=256 is above data.image_size=224"),
        (["data.min_size=128", "data.ramp_epochs=[5,2]"], "data.ramp_epochs must be [start, end]"),
        (["data.min_size=128", "data.ramp_epochs=[0,30]"], "ends at epoch 30, after the run's 10 epochs"),
        (["data.min_size=4"], "data.min_size=4 is out of range"),
        (["data.aug_repeats=0"], "data.aug_repeats=0 is out of range"),
        (["train.eval_tta=hflip"], "train.eval_tta='hflip' is not one of none, flip"),
    ],
)
def test_time_to_accuracy_settings_are_checked_up_front(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [*REQUIRED, *overrides])


def test_val_size_defaults_to_image_size():
    from trainer.training.config import eval_size

    assert eval_size(load_config(None, [*REQUIRED, "data.image_size=160"]).data) == 160
    assert eval_size(load_config(None, [*REQUIRED, "data.image_size=160", "data.val_size=224"]).data) == 224


def float_keys() -> list[str]:
    defaults = to_dict(load_config(None, REQUIRED))
    return [f"{s}.{k}" for s, values in defaults.items() for k, v in values.items() if isinstance(v, float)]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_float_key_refuses_nan_and_infinity(value):
    keys = float_keys()
    assert len(keys) >= 15 and "data.hflip" in keys and "schedule.warmup_epochs" in keys
    for key in keys:
        with pytest.raises(ConfigError, match=rf"^{re.escape(key)}=-?(nan|inf) is not a finite number — "):
            load_config(None, [*REQUIRED, f"{key}={value}"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochs=100000000", "train.epochs=100000000 is out of range — it must be >= 1 and <= 100000"),
        ("data.image_size=100000", "data.image_size=100000 is out of range — it must be >= 8 and <= 4096"),
        ("train.batch_size=10000000", "train.batch_size=10000000 is out of range"),
        ("data.workers=100000", "data.workers=100000 is out of range"),
        ("model.block_config=[2,100000]", "model.block_config must list 1 to 8 layer counts from 1 to 1000"),
    ],
)
def test_sizes_and_counts_have_a_ceiling(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [*REQUIRED, override])
