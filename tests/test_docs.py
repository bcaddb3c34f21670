"""The command lines in README.md and docs/*.md stay true: each one's entry point answers --help,
every --flag it uses is in that help, every section.key=value names a key of the typed config, and
every configs/*.yaml and script it names exists. A renamed flag or key fails here, naming the page,
the line and what is missing. Nothing is trained and nothing needs a cluster or a network: Slurm and
object-storage lines are checked statically. Every entry point's --help runs once, all in one
subprocess, so torch is imported once (about 10 s in all on 2 busy cores)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import REPO
from trainer.training.config import all_keys

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# How a line that runs something begins; an inline `span` counts only when it names what it runs.
PREFIXES = ("python -m ", ".venv/bin/python -m ", "accelerate launch", "bash ", "sbatch ", ".venv/bin/")
OURS = ("launch", "trainer", "bench", "shards", "toolbox")
KEYS = set(all_keys())
SECTIONS = {key.split(".")[0] for key in KEYS}
# What a batch script hands its arguments to (the others are checked against their own text).
SCRIPT_TAKERS = {
    "slurm/train.sh": "trainer.main",
    "slurm/sweep.sh": "trainer.main",
    "slurm/make_shards.sh": "launch.make_shards",
}
OVERRIDE = re.compile(r"^(?:--)?([a-z_]+\.[a-z_.]+)(?:=|$)")
INLINE = re.compile(r"`([^`]+)`")
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")


@dataclass(frozen=True)
class Line:
    """A command line (or an inline span holding overrides) as the docs show it, and where."""

    where: str
    text: str
    inline: bool = False


@dataclass(frozen=True)
class Entry:
    """Something whose --help lists the flags a docs line may pass it: `python -m module *args`."""

    module: str
    args: tuple[str, ...]
    shown: str


@dataclass
class Analysis:
    """What one line asks of the repo: entry points with the arguments each gets, files that must exist,
    flags a script must know, config keys."""

    calls: list[tuple[Entry, list[str]]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    script_flags: list[tuple[str, list[str]]] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def runs_something(self) -> bool:
        return bool(self.calls or self.files)


def module_entry(module: str) -> Entry:
    return Entry(module, (), f"python -m {module}")


ACCELERATE = Entry("accelerate.commands.accelerate_cli", ("launch",), "accelerate launch")
# Runs each `python -m module *args --help` in turn in this one process and prints what each said.
HELP_RUNNER = """
import contextlib, io, json, runpy, sys
said = []
for module, *args in json.loads(sys.argv[1]):
    sys.argv, out, code = [module, *args, "--help"], io.StringIO(), 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except Exception as e:
        code, _ = 1, out.write(f"{type(e).__name__}: {e}")
    said.append((code, out.getvalue()))
print(json.dumps(said))
"""


def help_texts(entries: list[Entry]) -> dict[Entry, tuple[int, str]]:
    """Each entry's (exit code, --help output)."""
    specs = json.dumps([[entry.module, *entry.args] for entry in entries])
    env = dict(os.environ, OMP_NUM_THREADS="1", COLUMNS="200")
    done = subprocess.run([sys.executable, "-c", HELP_RUNNER, specs], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return {entry: (code, text) for entry, (code, text) in zip(entries, json.loads(done.stdout.splitlines()[-1]))}


# --- reading the pages ------------------------------------------------------------------------


# A command's own output that names it ("python -m trainer: 2 process(es) ..."): no module ends in ":".
OUTPUT_LINE = re.compile(r"(\.venv/bin/)?python -m \S+:( |$)")


def lines_of(page: Path, name: str | None = None) -> list[Line]:
    """Commands in indented (4+ spaces) and fenced code, continuation lines joined; then the inline
    spans of the prose (a span may wrap onto the next line)."""
    name = name or page.relative_to(REPO).as_posix()
    found, fenced, pending, prose = [], False, None, []
    for number, raw in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        prose.append("" if fenced or raw.startswith("    ") or raw.lstrip().startswith("```") else raw)
        if raw.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if pending is not None:
            start, text = pending
            text += " " + raw.strip().removesuffix("\\").rstrip()
            pending = (start, text) if raw.rstrip().endswith("\\") else None
            if pending is None:
                found.append(Line(f"{name}:{start}", text))
            continue
        if fenced or raw.startswith("    "):
            text = raw.strip()
            if without_env(text).startswith(PREFIXES) and not OUTPUT_LINE.match(text):
                if text.endswith("\\"):
                    pending = (number, text.removesuffix("\\").rstrip())
                else:
                    found.append(Line(f"{name}:{number}", text))
    text = "\n".join(prose)
    for span in INLINE.finditer(text):
        number = text.count("\n", 0, span.start()) + 1
        found.append(Line(f"{name}:{number}", " ".join(span.group(1).split()), inline=True))
    return [line for line in found if not line.inline or analyse(line).runs_something or analyse(line).keys]


def without_env(text: str) -> str:
    return re.sub(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)+", "", text)


def command_words(text: str) -> tuple[str, list[str]]:
    """The line without its leading VAR=value assignments, and its shell words (comments dropped)."""
    words = shlex.split(text, comments=True)
    while words and ENV_ASSIGNMENT.match(words[0]):
        words.pop(0)
    joined = " ".join(words)
    return joined + " ", [w.strip("[]") for w in words if w.strip("[]") not in ("", "|", "...")]


# --- what a line asks for ---------------------------------------------------------------------


def analyse(line: Line) -> Analysis:
    analysis = Analysis()
    if line.inline and not without_env(line.text).startswith(PREFIXES):
        analysis.keys = [m.group(1) for w in line.text.split() if (m := OVERRIDE.match(w)) and "=" in w]
        analysis.keys = [k for k in analysis.keys if k.split(".")[0] in SECTIONS]
        return analysis
    try:
        text, words = command_words(line.text)
    except ValueError as e:
        analysis.problems.append(f"cannot be read as a shell line ({e})")
        return analysis
    if text.startswith(("python -m ", ".venv/bin/python -m ")):
        add_module(analysis, words[2], words[3:])
    elif text.startswith("accelerate launch "):
        add_accelerate(analysis, words[2:])
    elif text.startswith(("bash ", "sbatch ")):
        add_script(analysis, words[1:])
    elif text.startswith(".venv/bin/"):
        analysis.files.append(words[0])
    if not line.inline and not analysis.runs_something:
        analysis.problems.append("names nothing to run (no module, script or .py file)")
    return analysis


def add_module(analysis: Analysis, module: str, args: list[str]) -> None:
    if "<" in module or module.split(".")[0] not in OURS:
        return  # `python -m trainer.<command>` is a pattern; pytest and the like are not ours to check
    analysis.calls.append((module_entry(module), args))
    add_arguments(analysis, args)


def add_accelerate(analysis: Analysis, words: list[str]) -> None:
    """`accelerate launch [its options] (SCRIPT.py | -m MODULE) [the script's arguments]`."""
    at = next((i for i, w in enumerate(words) if w == "-m" or w.endswith(".py")), None)
    if at is None:
        return
    analysis.calls.append((ACCELERATE, words[:at]))
    if words[at] == "-m":
        add_module(analysis, words[at + 1], words[at + 2 :])
        return
    analysis.files.append(words[at])
    add_module(analysis, words[at].removesuffix(".py").replace("/", "."), words[at + 1 :])


def add_script(analysis: Analysis, words: list[str]) -> None:
    """`bash SCRIPT args` or `sbatch [its options] SCRIPT args`."""
    at = next((i for i, w in enumerate(words) if w.endswith(".sh")), None)
    if at is None:
        return
    script, args = words[at], words[at + 1 :]
    analysis.files.append(script)
    if script in SCRIPT_TAKERS:
        analysis.calls.append((module_entry(SCRIPT_TAKERS[script]), args))
    else:
        analysis.script_flags.append((script, [flag_name(w) for w in args if is_flag(w)]))
    add_arguments(analysis, args)


def add_arguments(analysis: Analysis, args: list[str]) -> None:
    """Config files that must exist and config keys that must be known, wherever they appear."""
    for word in args:
        path = word.split("=", 1)[-1]
        if path.startswith("configs/") and path.endswith((".yaml", ".yml")) and not placeholder(Path(path).stem):
            analysis.files.append(path)
        key = OVERRIDE.match(word)
        if key and key.group(1).split(".")[0] in SECTIONS:
            analysis.keys.append(key.group(1))


def placeholder(stem: str) -> bool:
    return re.fullmatch(r"[A-Z][A-Z0-9_-]*", stem) is not None  # configs/X.yaml, configs/CONFIG.yaml


def is_flag(word: str) -> bool:
    return re.match(r"^--[A-Za-z]", word) is not None


def flag_name(word: str) -> str:
    return word.split("=", 1)[0]


def problems(line: Line, helps: dict[Entry, tuple[int, str]]) -> list[str]:
    analysis = analyse(line)
    found = list(analysis.problems)
    found += [f"{path} does not exist" for path in analysis.files if not (REPO / path).exists()]
    found += [f"{key} is not a config key (trainer/training/config.py)" for key in analysis.keys if key not in KEYS]
    for script, flags in analysis.script_flags:
        if (REPO / script).exists():
            text = (REPO / script).read_text(encoding="utf-8")
            found += [f"{flag} is not in {script}" for flag in flags if not mentions(text, flag)]
    for entry, args in analysis.calls:
        code, help_text = helps[entry]
        if code != 0:
            found.append(f"`{entry.shown} --help` failed (exit {code}): {last_line(help_text)}")
            continue
        for flag in (flag_name(w) for w in args if is_flag(w)):
            if not OVERRIDE.match(flag) or flag[2:].split(".")[0] not in SECTIONS:
                found += [f"{flag} is not in `{entry.shown} --help`"] if not mentions(help_text, flag) else []
    return found


def mentions(text: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


# --- the tests --------------------------------------------------------------------------------

LINES = [line for page in PAGES for line in lines_of(page)]


@pytest.fixture(scope="module")
def helps() -> dict[Entry, tuple[int, str]]:
    return help_texts(sorted({entry for line in LINES for entry, _ in analyse(line).calls}, key=lambda e: e.shown))


@pytest.mark.parametrize("line", LINES, ids=[line.where for line in LINES])
def test_docs_line_is_true(line: Line, helps):
    found = problems(line, helps)
    assert not found, f"{line.where}: `{line.text}`:\n  " + "\n  ".join(found)


def test_the_pages_show_the_set_up_and_the_whole_way_through():
    commands = {line.text.split("#")[0].strip() for line in LINES if not line.inline}
    assert {"bash launch/run_demo.sh", "bash tests/run.sh", "bash tests/run.sh --quick"} <= commands
    used = {entry.shown for line in LINES for entry, _ in analyse(line).calls}
    for module in ("launch.make_shards", "trainer.main", "trainer.evaluate", "trainer.predict", "trainer.export"):
        assert f"python -m {module}" in used, module


def test_readme_is_short_and_links_every_page():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) < 200
    assert [p.name for p in PAGES[1:] if f"(docs/{p.name})" not in readme] == []


def test_links_between_pages_resolve():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
    assert broken == []


def test_the_reader_finds_each_kind_of_command(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "Run `python -m trainer.export runs/r1\n--letterbox` or set `optim.lr=0.1`, not `optim.lr`.\n\n"
        "    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu trainer/main.py \\\n"
        "        --config configs/demo.yaml train.epochs=2   # --not-a-flag: a comment\n"
        "```\nsbatch --nodes 2 slurm/train.sh configs/X.yaml data.shards=OUT\n```\n"
        "    epoch 1/12  step 25  val top-1 0.5531\n",
        encoding="utf-8",
    )
    lines = lines_of(page, "page.md")
    assert [(line.where, line.text, line.inline) for line in lines] == [
        (
            "page.md:4",
            "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu trainer/main.py "
            "--config configs/demo.yaml train.epochs=2   # --not-a-flag: a comment",
            False,
        ),
        ("page.md:7", "sbatch --nodes 2 slurm/train.sh configs/X.yaml data.shards=OUT", False),
        ("page.md:1", "python -m trainer.export runs/r1 --letterbox", True),
        ("page.md:2", "optim.lr=0.1", True),
    ]
    launch = analyse(lines[0])
    assert [(entry.shown, args) for entry, args in launch.calls] == [
        ("accelerate launch", ["--multi_gpu"]),
        ("python -m trainer.main", ["--config", "configs/demo.yaml", "train.epochs=2"]),
    ]
    assert launch.files == ["trainer/main.py", "configs/demo.yaml"] and launch.keys == ["train.epochs"]
    sbatch = analyse(lines[1])
    assert sbatch.files == ["slurm/train.sh"] and sbatch.keys == ["data.shards"]  # configs/X.yaml: a placeholder


def test_a_renamed_flag_key_or_file_is_reported():
    line = Line("page.md:1", "python -m launch.make_shards SRC OUT --val-fraction 0.2 --no-such-flag")
    helps = help_texts([module_entry("launch.make_shards"), module_entry("trainer.gone")])
    assert helps[module_entry("trainer.gone")][0] != 0
    assert problems(line, helps) == ["--no-such-flag is not in `python -m launch.make_shards --help`"]
    wrong = Line("page.md:2", "bash tests/run.sh --quik configs/nope.yaml optim.lrr=1")
    assert problems(wrong, {}) == [
        "configs/nope.yaml does not exist",
        "optim.lrr is not a config key (trainer/training/config.py)",
        "--quik is not in tests/run.sh",
    ]
    gone = Line("page.md:3", "python -m trainer.gone --help")
    assert problems(gone, {module_entry("trainer.gone"): (1, "No module named trainer.gone")}) == [
        "`python -m trainer.gone --help` failed (exit 1): No module named trainer.gone"
    ]
