"""launch/scan.py on hostile files: nothing but a regular file is read, never more than
--max-file-size, never blocking; a name that is not UTF-8 is one skip reason, not a traceback."""

from __future__ import annotations

import multiprocessing
import os
import queue
from pathlib import Path

import pytest

from launch import scan
from launch.make_shards import file_size, parse_args
from launch.scan import NOT_UTF8, NotRead, inspect_chunk, inspect_file, printable, read_source
from tests.launch.test_make_shards import encode, noise
from toolbox.errors import UserError

PIXELS = 89_478_485


def within(seconds: float, fn, *args):
    """fn(*args) in a forked process, killed and failed if it blocks or runs away (reading
    /dev/zero whole would take the machine's memory, a FIFO would wait for ever)."""
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    child = ctx.Process(target=lambda: results.put(fn(*args)), daemon=True)
    child.start()
    try:
        return results.get(timeout=seconds)
    except queue.Empty:
        pytest.fail(f"{fn.__name__}{args} blocked or ran away for {seconds} s")
    finally:
        child.kill()
        child.join()


def test_a_fifo_is_skipped_without_waiting_for_a_writer(tmp_path):
    os.mkfifo(tmp_path / "x.jpg")
    result = within(10, inspect_file, str(tmp_path / "x.jpg"), PIXELS)
    assert result[6] == "not a regular file (a FIFO)"


def test_a_symlink_to_dev_zero_is_skipped_unread(tmp_path):
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    result = within(10, inspect_file, str(tmp_path / "zero.png"), PIXELS)
    assert result[6] == "not a regular file (a character device, via a symlink)"


def test_a_symlink_to_a_regular_image_is_still_read(tmp_path):
    (tmp_path / "real.png").write_bytes(encode(noise((9, 7)), "PNG"))
    (tmp_path / "link.png").symlink_to(tmp_path / "real.png")
    assert inspect_file(str(tmp_path / "link.png"), PIXELS)[2:4] == (9, 7)


def test_a_file_over_the_limit_is_skipped_and_one_at_it_kept(tmp_path):
    data = encode(noise((20, 20)), "PNG")
    (tmp_path / "a.png").write_bytes(data)
    assert inspect_file(str(tmp_path / "a.png"), PIXELS, len(data))[6] is None
    reason = inspect_file(str(tmp_path / "a.png"), PIXELS, len(data) - 1)[6]
    assert reason == f"too large ({len(data)} bytes > --max-file-size {len(data) - 1} bytes)"


def test_a_file_that_grows_after_its_stat_is_read_no_further_than_the_limit(tmp_path, monkeypatch):
    (tmp_path / "a.png").write_bytes(b"x" * 10_000)
    real_stat, real_fstat = os.stat, os.fstat

    def stale(stat):  # as if the file were 50 bytes when checked and grew while read
        return lambda where, **kw: os.stat_result((*stat(where, **kw)[:6], 50, *stat(where, **kw)[7:]))

    reads = []
    real_open = open

    class Counting:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def read(self, n):
            reads.append(n)
            return self.f.read(n)

    monkeypatch.setattr(scan.os, "stat", stale(real_stat))
    monkeypatch.setattr(scan.os, "fstat", stale(real_fstat))
    monkeypatch.setattr(scan, "open", lambda fd, mode: Counting(real_open(fd, mode)), raising=False)
    with pytest.raises(NotRead, match="grew past --max-file-size 100 bytes"):
        read_source(str(tmp_path / "a.png"), 100)
    assert sum(reads) == 101  # the limit and one byte to know it is passed, not the 10,000


def test_a_name_that_is_not_utf8_is_skipped_with_a_reason(tmp_path):
    name = os.fsdecode(b"caf\xe9.png")  # as os.walk hands it over: the byte as a lone surrogate
    (tmp_path / name).write_bytes(encode(noise((8, 8)), "PNG"))
    (tmp_path / "ok.png").write_bytes(encode(noise((8, 8)), "PNG"))
    bad, good = inspect_chunk((str(tmp_path), [name, "ok.png"], PIXELS, 10**6, False))
    assert bad[6] == NOT_UTF8 and good[6] is None
    assert printable(name) == "caf\\xe9.png" and printable("狗.png") == "狗.png"
    printable(name).encode("utf-8")  # what the manifest and summary hold can be written


@pytest.mark.parametrize(
    "text,size", [("256MB", 256_000_000), ("2GB", 2_000_000_000), ("64", 64_000_000), ("500k", 500_000), ("7b", 7)]
)
def test_max_file_size_takes_a_size_with_a_unit(text, size):
    assert file_size(text) == size


@pytest.mark.parametrize("text", ["lots", "0", "12 parsecs", ""])
def test_max_file_size_refuses_what_is_not_a_size_in_one_line(tmp_path, text):
    with pytest.raises(UserError, match="--max-file-size") as e:
        parse_args(["SRC", "OUT", "--max-file-size", text])
    assert "\n" not in str(e.value)


def test_the_default_limit_is_above_an_uncompressed_image_at_the_default_pixel_limit():
    args = parse_args(["SRC", "OUT"])
    assert args.max_file_size == scan.DEFAULT_MAX_FILE_BYTES >= 4 * args.max_pixels
    assert Path(args.paths[1]) == Path("OUT")


def test_an_absurd_aspect_ratio_is_refused_from_the_header_everywhere(tmp_path):
    """A 1-pixel strip under every pixel limit would be resized into gigabytes: make_shards skips it,
    and the loader, evaluate and predict (which all open images through shards.format) refuse it."""
    from PIL import Image

    from shards.format import decode_rgb
    from toolbox.errors import DataError
    from trainer.trained.images import read_image

    path = tmp_path / "strip.png"
    Image.new("RGB", (20_000, 1)).save(path)
    reason = inspect_file(str(path), PIXELS)[6]
    assert reason.startswith("aspect ratio over 100:1 (20000x1)"), reason
    with pytest.raises(ValueError, match=r"aspect ratio over 100:1"):
        decode_rgb(path.read_bytes())
    with pytest.raises(DataError, match=r"strip\.png cannot be read as an image \(aspect ratio over 100:1"):
        read_image(path)
    Image.new("RGB", (5_000, 50)).save(path)  # 100:1 itself is fine
    assert inspect_file(str(path), PIXELS)[6] is None
