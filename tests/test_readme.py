"""The commands shown in README.md and docs/*.md name only real flags and real make targets.

Every fenced code block (```bash, ```sh, ``` ...) of README.md and docs/*.md is read line by line, with
backslash continuations joined and comments dropped, and split into commands at |, &&, || and ;. A command
that runs one of the project's scripts (`image_gen.py`, `audio_gen.py`, `api.py`, `benchmarks/*.py`), however
it is launched (`.venv/bin/python`, `python`, `torchrun ...`, `OMP_NUM_THREADS=1 ...`), has each `--flag`
after the script's name looked up in that script's `--help`, which runs once per script. In README.md the
inline code spans that run a script are checked the same way, since its tables give a command per figure.
A `make` command's targets must be targets of the Makefile.
"""

import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = ["image_gen.py", "audio_gen.py", "api.py",
           *sorted(f"benchmarks/{p.name}" for p in (ROOT / "benchmarks").glob("*.py"))]
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})(.*)$")
INLINE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
SEPARATORS = {"|", "||", "&&", ";", "&"}
HELP_FLAG = re.compile(r"(?<![\w-])--[A-Za-z0-9][\w.-]*")


def code_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, text) of each fenced code block."""
    blocks, lines, start, fence = [], [], 0, None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if fence is None:
            if match:
                fence, start, lines = match.group(2), number + 1, []
        elif match and match.group(2).startswith(fence) and not match.group(3).strip():
            blocks.append((start, "\n".join(lines)))
            fence = None
        else:
            lines.append(line)
    return blocks


def inline_spans(text: str) -> list[tuple[int, str]]:
    """(line number, text) of each inline code span outside the fenced blocks."""
    spans, inside = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            inside = not inside
            continue
        if not inside:
            spans.extend((number, span) for span in INLINE.findall(line))
    return spans


def logical_lines(block: str, first_line: int) -> list[tuple[int, str]]:
    """Join backslash continuations: (line number where the command starts, command text)."""
    out, pending, start = [], "", first_line
    for offset, line in enumerate(block.splitlines()):
        if not pending:
            start = first_line + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    if pending:
        out.append((start, pending))
    return out


def commands(line: str) -> list[list[str]]:
    """Shell words of each command on one line, comments dropped, split at |, &&, || and ;."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    try:
        words = list(lexer)
    except ValueError:  # an unbalanced quote: not a shell command (a JSON fragment, say)
        return []
    result, current = [], []
    for word in words:
        if word in SEPARATORS:
            result.append(current)
            current = []
        else:
            current.append(word)
    result.append(current)
    return [c for c in result if c]


def script_of(word: str) -> str | None:
    """The project script a shell word runs, if any."""
    for script in SCRIPTS:
        name = script.rsplit("/", 1)[-1]
        if word in (script, name) or word.endswith("/" + name):
            return script
    return None


def invocations(text: str, inline: bool) -> list[tuple[int, str, str, list[str]]]:
    """(line, command, script, flags) for every command in the text that runs a project script, and
    (line, command, "make", targets) for every make command."""
    found = []
    pieces = [(n, line) for start, block in code_blocks(text) for n, line in logical_lines(block, start)]
    if inline:
        pieces += inline_spans(text)
    for number, line in pieces:
        for words in commands(line):
            while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
                words = words[1:]  # VAR=value prefixes
            if not words:
                continue
            if words[0] == "make" or words[0].endswith("/make"):
                targets = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
                found.append((number, " ".join(words), "make", targets))
                continue
            for index, word in enumerate(words):
                script = script_of(word)
                if script:
                    flags = [w.split("=", 1)[0] for w in words[index + 1:] if w.startswith("--") and len(w) > 2]
                    found.append((number, " ".join(words), script, flags))
                    break
    return found


@cache
def all_invocations() -> dict[Path, list[tuple[int, str, str, list[str]]]]:
    return {doc: invocations(doc.read_text(encoding="utf-8"), inline=doc.name == "README.md")
            for doc in DOCUMENTS}


@cache
def help_flags() -> dict[str, frozenset[str]]:
    """Every --flag that each script named in the documents lists in its --help (one run per script)."""
    scripts = sorted({script for found in all_invocations().values() for _, _, script, _ in found
                      if script != "make"})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(script: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(scripts, pool.map(run, scripts)))
    flags = {}
    for script, result in results.items():
        assert result.returncode == 0, f"{script} --help exited {result.returncode}:\n{result.stderr[-2000:]}"
        flags[script] = frozenset(HELP_FLAG.findall(result.stdout))
    return flags


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set()
    for line in text.splitlines():
        match = re.match(r"^([^\s:=#][^:=]*?)\s*:(?!=)", line)
        if match:
            targets.update(match.group(1).split())
    return targets


def test_the_documents_show_commands():
    readme = all_invocations()[ROOT / "README.md"]
    assert {script for _, _, script, _ in readme} >= {"image_gen.py", "audio_gen.py", "make"}, \
        "README.md should show commands for both scripts and make"


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_commands_name_only_flags_that_help_lists(doc):
    known = help_flags()
    unknown = []
    for number, command, script, flags in all_invocations()[doc]:
        if script == "make":
            continue
        missing = [f for f in flags if f not in known[script]]
        if missing:
            unknown.append(f"  {doc.name}:{number}: {script} has no {', '.join(missing)}\n      {command}")
    assert not unknown, (f"{len(unknown)} command(s) in {doc.relative_to(ROOT)} name flags that their script's "
                         "--help does not list:\n" + "\n".join(unknown))


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_make_targets_exist(doc):
    targets = make_targets()
    unknown = [f"  {doc.name}:{number}: no target {', '.join(t for t in named if t not in targets)}\n      {command}"
               for number, command, script, named in all_invocations()[doc]
               if script == "make" and any(t not in targets for t in named)]
    assert not unknown, f"make targets in {doc.relative_to(ROOT)} that the Makefile lacks:\n" + "\n".join(unknown)


def test_the_parser_reads_what_a_reader_would_type():
    text = "\n".join([
        "```bash",
        "OMP_NUM_THREADS=1 .venv/bin/python image_gen.py --mode train --epochs 2 \\",
        "    --sampler=ddim   # a comment --not_a_flag",
        "torchrun --nproc_per_node 2 audio_gen.py --mode train && make test",
        "python benchmarks/bench_image.py --only speed | tail -1",
        "curl -s 127.0.0.1:8000/v1/models -d '--not_a_flag api.py'",
        "```",
        "Inline: `audio_gen.py --mode sample --num_samples 4`.",
    ])
    found = [(script, flags) for _, _, script, flags in invocations(text, inline=True)]
    assert found == [("image_gen.py", ["--mode", "--epochs", "--sampler"]),
                     ("audio_gen.py", ["--mode"]), ("make", ["test"]),
                     ("benchmarks/bench_image.py", ["--only"]),
                     ("audio_gen.py", ["--mode", "--num_samples"])]
    assert {"demo", "test", "serve", "webapp", "bench-image", "bench-audio"} <= make_targets()
