import subprocess
import sys
from pathlib import Path

import pytest

from trainer.config import ConfigError, config_from_dict, load_config, to_dict
from trainer.runtime import resolve_launch

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


# ------------------------------------------------ precision and compile: the config against `accelerate launch`


def launcher_env(precision: str | None = None, backend: str | None = None, mode: str | None = None) -> dict:
    """What `accelerate launch` puts in the processes' environment (it always sets all three)."""
    env = {
        "ACCELERATE_MIXED_PRECISION": precision,
        "ACCELERATE_DYNAMO_BACKEND": backend,
        "ACCELERATE_DYNAMO_MODE": mode,
    }
    return {k: v for k, v in env.items() if v is not None}


def test_precision_and_compile_default_to_the_launcher():
    config = load_config(None, REQUIRED)
    assert config.train.mixed_precision is None and config.train.compile is None
    path = Path("configs/densenet121-imagenet.yaml")
    assert load_config(path, REQUIRED).train.mixed_precision == "bf16"  # a shipped config's own choice stays
    assert load_config(path, REQUIRED + ["train.mixed_precision=null"]).train.mixed_precision is None


@pytest.mark.parametrize("config_value", [None, "no", "bf16", "fp16"])
@pytest.mark.parametrize("launcher", [None, "no", "bf16", "fp16"])
def test_precision_resolution(config_value, launcher):
    train = load_config(None, REQUIRED + [f"train.mixed_precision={config_value or 'null'}"]).train
    got = resolve_launch(train, launcher_env(launcher, "NO", "default"))
    chose = launcher not in (None, "no")  # the launcher fills in "no" for "not chosen"
    if config_value is not None:
        assert (got.mixed_precision, got.precision_from) == (config_value, "config")
    elif chose:
        assert (got.mixed_precision, got.precision_from) == (launcher, "accelerate launch")
    else:
        assert (got.mixed_precision, got.precision_from) == ("no", "default")
    conflict = config_value is not None and chose and launcher != config_value
    expected = [f"note: train.mixed_precision={config_value} (config) overrides accelerate launch's {launcher}"]
    assert list(got.notes) == (expected if conflict else [])
    assert (got.compile, got.backend) == ("none", "no")


LAUNCHED_COMPILE = [
    None,
    ("NO", "default"),
    ("INDUCTOR", "default"),
    ("INDUCTOR", "max-autotune"),
    ("EAGER", "default"),
]


@pytest.mark.parametrize("config_value", [None, "none", "default", "max-autotune"])
@pytest.mark.parametrize("launcher", LAUNCHED_COMPILE)
def test_compile_resolution(config_value, launcher):
    train = load_config(None, REQUIRED + [f"train.compile={config_value or 'null'}"]).train
    backend, mode = launcher or (None, None)
    got = resolve_launch(train, launcher_env("no", backend, mode))
    chose = backend not in (None, "NO")
    if config_value is not None:  # the config's modes are inductor's
        assert (got.compile, got.compile_from) == (config_value, "config")
        assert got.backend == ("no" if config_value == "none" else "inductor")
    elif chose:  # the launcher's backend with its mode
        assert (got.compile, got.backend, got.compile_from) == (mode, backend.lower(), "accelerate launch")
    else:
        assert (got.compile, got.backend, got.compile_from) == ("none", "no", "default")
    conflict = config_value is not None and chose and (backend, mode) != ("INDUCTOR", config_value)
    expected = [
        f"note: train.compile={config_value} (config) overrides accelerate launch's {str(backend).lower()} (mode {mode})"
    ]
    assert list(got.notes) == (expected if conflict else [])
    assert got.mixed_precision == "no"


def test_both_conflicts_give_one_line_each():
    train = load_config(None, REQUIRED + ["train.mixed_precision=no", "train.compile=none"]).train
    got = resolve_launch(train, launcher_env("bf16", "INDUCTOR", "reduce-overhead"))
    assert (got.mixed_precision, got.compile, got.backend) == ("no", "none", "no")
    assert got.notes == (
        "note: train.mixed_precision=no (config) overrides accelerate launch's bf16",
        "note: train.compile=none (config) overrides accelerate launch's inductor (mode reduce-overhead)",
    )


def test_outside_accelerate_launch_means_no_and_none():
    got = resolve_launch(load_config(None, REQUIRED).train, {})
    assert (got.mixed_precision, got.compile, got.backend, got.notes) == ("no", "none", "no", ())


def test_a_launcher_choice_the_trainer_lacks_is_a_one_line_error_unless_the_config_decides():
    train = load_config(None, REQUIRED).train
    with pytest.raises(ConfigError, match=r"^accelerate launch's mixed precision fp8 is not one of no, bf16, fp16 — "):
        resolve_launch(train, launcher_env("fp8"))
    with pytest.raises(ConfigError, match="dynamo mode max-autotune-no-cudagraphs is not one of default, "):
        resolve_launch(train, launcher_env(backend="INDUCTOR", mode="max-autotune-no-cudagraphs"))
    decided = load_config(None, REQUIRED + ["train.mixed_precision=bf16"]).train
    assert resolve_launch(decided, launcher_env("fp8")).notes == (
        "note: train.mixed_precision=bf16 (config) overrides accelerate launch's fp8",
    )


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


def test_fp16_on_the_cpu_is_a_setup_error_wherever_it_was_chosen(monkeypatch):
    from shards.errors import UserError as SetupError
    from trainer.runtime import make_accelerator

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    config = load_config(None, REQUIRED + ["train.device=cpu", "train.mixed_precision=fp16"])
    with pytest.raises(SetupError, match=r"^train.mixed_precision=fp16 needs a GPU — use bf16 or no on the CPU$"):
        make_accelerator(config)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(SetupError, match=r"^accelerate launch's fp16 needs a GPU — use bf16 or no on the CPU$"):
        make_accelerator(load_config(None, REQUIRED + ["train.device=cpu"]))


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
