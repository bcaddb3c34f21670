"""toolbox/cli.py: how every command ends (one line, its exit code, --debug) and says its lines."""

import errno
import os
import signal
import subprocess
import sys

import pytest

from toolbox.cli import Console, run_command
from toolbox.errors import EXIT_INTERRUPTED, EXIT_TERMINATED, DataError, UserError


def fails_with(error: BaseException):
    def body() -> int:
        raise error

    return body


def chained() -> DataError:
    try:
        raise OSError("the cause")
    except OSError as cause:
        try:
            raise DataError("cannot read it — retry") from cause
        except DataError as e:
            return e


def test_a_user_error_is_its_line_and_code_and_the_chain_only_when_debugging(capsys, monkeypatch):
    monkeypatch.delenv("SE_DENSENET_DEBUG", raising=False)
    assert run_command(fails_with(chained())) == 2
    assert capsys.readouterr().err == "error: cannot read it — retry\n"
    assert run_command(fails_with(UserError("no — fix", exit_code=1)), debug=True) == 1
    err = capsys.readouterr().err
    assert "UserError: no — fix" in err and err.endswith("error: no — fix\n")
    monkeypatch.setenv("SE_DENSENET_DEBUG", "1")
    assert run_command(fails_with(chained())) == 2
    err = capsys.readouterr().err
    assert "OSError: the cause" in err and "direct cause" in err and err.endswith("error: cannot read it — retry\n")


def test_ctrl_c_a_full_disk_and_a_bug(capsys):
    assert run_command(fails_with(KeyboardInterrupt())) == EXIT_INTERRUPTED
    assert capsys.readouterr().err == ("error: interrupted — no output was left half-written; run the command again\n")
    full = OSError(errno.ENOSPC, "No space left on device", "/data/out.csv")
    assert run_command(fails_with(full), kept="OUT was left as it was") == 2
    assert capsys.readouterr().err == (
        "error: cannot write /data/out.csv: no space left on the device — free space, then run the command again\n"
    )
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_command(lambda: 1 // 0)


def test_sigterm_ends_a_command_as_ctrl_c_does_and_the_handler_is_put_back(capsys):
    cleaned = []

    def body() -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        return 0  # not reached: the signal raises at the next bytecode

    before = signal.getsignal(signal.SIGTERM)
    assert run_command(body, cleanup=lambda: cleaned.append(True)) == EXIT_TERMINATED
    assert capsys.readouterr().err == "error: terminated — no output was left half-written; run the command again\n"
    assert cleaned == [True] and signal.getsignal(signal.SIGTERM) == before


def test_the_trainer_keeps_sigterm_for_itself():
    seen = []
    handler = lambda signum, frame: seen.append(signum)
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        assert run_command(lambda: os.kill(os.getpid(), signal.SIGTERM) or 0, stop_on_sigterm=False) == 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == [signal.SIGTERM]


def test_console_speaks_once_per_job(capsys):
    Console(speaks=True).say("from the main process")
    Console(speaks=False).say("from another rank")
    assert capsys.readouterr().out == "from the main process\n"


def test_a_locale_without_the_characters_still_prints_them(tmp_path):
    code = "from toolbox.cli import run_command; run_command(lambda: print('\\u7c7b\\u522b caf\\xe9') or 0)"
    env = {**os.environ, "PYTHONIOENCODING": "ascii", "LC_ALL": "C", "PYTHONUTF8": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, check=True).stdout
    assert out == b"\\u7c7b\\u522b caf\\xe9\n"


def test_a_process_forked_from_a_command_dies_of_sigterm_quietly():
    """A process pool's workers inherit the command's handler: Pool.terminate() SIGTERMs them, and
    each must end as SIGTERM ends a process, not as the command does (a Terminated traceback)."""
    code = (
        "import os, signal, time\n"
        "from toolbox.cli import run_command\n"
        "def body():\n"
        "    ready, tell = os.pipe()\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        os.write(tell, b'r')\n"  # running its own Python code now: the signal reaches it
        "        time.sleep(30)\n"
        "        os._exit(0)\n"
        "    os.read(ready, 1)\n"
        "    os.kill(pid, signal.SIGTERM)\n"
        "    status = os.waitpid(pid, 0)[1]\n"
        "    print(os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM)\n"
        "    return 0\n"
        "raise SystemExit(run_command(body))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout == "True\n" and result.stderr == "", result
