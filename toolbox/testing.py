"""What the tests and the benches both start: the `accelerate launch` command line and moto's S3
server on loopback. Plain functions without pytest, so bench/ imports this module, never
tests/conftest.py; moto and s3fs are imported only when a server or a client is asked for."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

from toolbox.ports import free_port

# The launcher chooses no precision and no compile: the config's train.mixed_precision and
# train.compile (or their no / none defaults) are what runs.
LAUNCHER_CHOOSES_NOTHING = ("--mixed_precision", "no", "--dynamo_backend", "no")


def accelerate_launch(
    script: str | Path,
    args: Sequence = (),
    processes: int = 1,
    launcher_args: Sequence[str] = LAUNCHER_CHOOSES_NOTHING,
) -> list[str]:
    """`accelerate launch` of ``script`` with ``args`` in ``processes`` processes on this machine
    (--multi_gpu and a free rendezvous port from 2 on, so launches started together never meet on
    torch's 29500), as a command line for subprocess."""
    multi = ["--multi_gpu", "--main_process_port", str(free_port())] if processes > 1 else []
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *multi,
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        *launcher_args,
        str(script),
        *map(str, args),
    ]


@contextmanager
def s3_server():
    """moto's S3 server on loopback; -> the environment that points a process at it."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "AKIDLOOPBACKTEST",
        "AWS_SECRET_ACCESS_KEY": "loopback-secret-7f3a",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    try:
        yield server, env
    finally:
        server.stop()


def s3_fs(env: dict):
    """An s3fs client of the caller's own (the caller's environment is left alone)."""
    import s3fs

    return s3fs.S3FileSystem(
        key=env["AWS_ACCESS_KEY_ID"],
        secret=env["AWS_SECRET_ACCESS_KEY"],
        endpoint_url=env["AWS_ENDPOINT_URL"],
        skip_instance_cache=True,
    )
