"""toolbox/errors.py: one user-error base with its exit code, the one line of any error, --debug."""

import pytest

from toolbox.errors import EXIT_USAGE, DataError, UserError, first_line


def test_a_user_error_carries_its_exit_code_and_line():
    assert UserError("x — fix it").exit_code == EXIT_USAGE
    assert UserError("x", exit_code=1).exit_code == 1
    assert isinstance(DataError("shard gone"), UserError)


@pytest.mark.parametrize(
    "message, line",
    [
        ("one line — the fix", "one line — the fix"),
        ("first\nsecond", "first"),
        ("", "DataError"),
        # A loader worker re-raises our error with the worker's traceback in the message.
        (
            "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
            '  File "x.py", line 1\nshards.errors.DataError: shard s-000001.tar is truncated — re-run make_shards',
            "shard s-000001.tar is truncated — re-run make_shards",
        ),
    ],
)
def test_first_line(message, line):
    assert first_line(DataError(message)) == line
