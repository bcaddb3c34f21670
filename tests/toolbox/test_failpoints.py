"""shards/failpoints.py: named test faults from one variable, off unless named."""

import subprocess
import sys

import pytest

from toolbox import failpoints


def test_points_parse_and_an_unknown_one_is_refused():
    assert failpoints.parse("nan-loss=4,5;release=/tmp/x") == {"nan-loss": "4,5", "release": "/tmp/x"}
    assert failpoints.parse("") == {}
    with pytest.raises(ValueError, match="unknown failpoint"):
        failpoints.parse("nan-los=4")


def test_env_builds_one_variable_for_all_points():
    env = failpoints.env(hold_after_step=3, release="/tmp/t/go")
    assert env == {"FAILPOINTS": "hold-after-step=3;release=/tmp/t/go"}


def test_every_point_is_read_where_the_product_reads_it():
    """Each listed point is used by some module, and the module reads nothing but this one."""
    code = (
        "from toolbox import failpoints; import trainer.training.loop, trainer.training.checkpoint;"
        "print(sorted(trainer.training.loop.NAN_STEPS), trainer.training.loop.HOLD_STEP, failpoints.step('pause-checkpoint'))"
    )
    env = {"FAILPOINTS": "nan-loss=4,5;hold-after-step=3;pause-checkpoint=7", "PATH": ""}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[4,", "5]", "3", "7"]
    off = subprocess.run([sys.executable, "-c", code], env={"PATH": ""}, capture_output=True, text=True, check=True)
    assert off.stdout.split() == ["[]", "0", "0"]
