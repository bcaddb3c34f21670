import subprocess
import sys

import pytest

from trainer.config import ConfigError, config_from_dict, load_config, to_dict

REQUIRED = ["data.shards=s", "run.dir=r"]


def test_defaults_yaml_and_overrides_layer(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.5\ntrain:\n  epochs: 3\n")
    config = load_config(path, REQUIRED + ["optim.lr=0.25", "model.block_config=[2,3]"])
    assert config.optim.lr == 0.25  # CLI beats YAML
    assert config.train.epochs == 3  # YAML beats default
    assert config.train.batch_size == 64  # default
    assert config.model.block_config == [2, 3]


@pytest.mark.parametrize("configs", ["demo", "densenet121-imagenet", "cifar-style"])
def test_shipped_configs_load(configs):
    load_config(f"configs/{configs}.yaml")


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
