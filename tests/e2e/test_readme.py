"""The README runs as written.

Every fenced block of README.md is one of:

- ``sh`` / ``python``: run, in document order, in one scratch directory, on
  the test session's private database, vhost and Redis database, as a
  newcomer following the README would. A shell block runs line by line
  (``\\`` continues a line); a line ending in ``&`` starts a long-running
  process (the workers, the page) that must still be running when the
  README ends. ``export ISSUANCE_...=...`` lines for the services and the
  phone key are left out: the test session's private ones stand in.
- ``json`` / ``yaml`` with ``file=NAME``: written to the scratch directory
  before the blocks after it run. ``dates-from=YYYY-MM-DD`` shifts every date
  in the block by (today - that date), so the example stays current.
- ``norun=REASON`` (a command that runs this very suite, a deployment on
  another machine), or ``text`` / ``json`` without ``file=``: shown only.

Shell and Python blocks run unless they say why not, and a fence without a
language fails the test, so a new example cannot escape it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shlex
import signal
import subprocess
import time
from datetime import date
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)
RUNNABLE = {"sh", "shell", "bash", "python"}
FILES = {"json", "yaml", "yml"}
DATE = re.compile(r"\b(\d{4})-(\d{2})-(\d{2})(?=[T\s\"'])")
EXPORT = re.compile(r"^export (ISSUANCE_[A-Z_]+)=")
PER_BLOCK_SECONDS = 600


@dataclasses.dataclass(frozen=True)
class Block:
    line: int
    language: str
    attrs: dict[str, str]
    body: str

    @property
    def where(self) -> str:
        return f"README.md:{self.line} ({self.language})"


def blocks(text: str) -> list[Block]:
    found = []
    for match in FENCE.finditer(text):
        words = match.group("info").split()
        language = words[0] if words else ""
        attrs = dict(w.split("=", 1) if "=" in w else (w, "") for w in words[1:])
        line = text.count("\n", 0, match.start()) + 1
        found.append(Block(line, language, attrs, match.group("body")))
    return found


def shift_dates(body: str, anchor: str) -> str:
    delta = date.today() - date.fromisoformat(anchor)

    def moved(m: re.Match[str]) -> str:
        return (date(int(m[1]), int(m[2]), int(m[3])) + delta).isoformat()

    return DATE.sub(moved, body)


def commands(body: str) -> list[str]:
    joined = body.replace("\\\n", " ")
    out = []
    for raw in joined.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        # A trailing comment (two spaces, then #) explains the command.
        cut = line.find("  #")
        out.append(line[:cut].rstrip() if cut != -1 else line)
    return out


def test_every_code_block_says_what_it_is() -> None:
    found = blocks(README.read_text())
    unknown = [b.where for b in found if b.language not in RUNNABLE | FILES | {"text"}]
    assert not unknown, "fences need a language: sh, python, json, yaml or text"
    silent = [b.where for b in found if "norun" in b.attrs and not b.attrs["norun"]]
    assert not silent, "norun=REASON says why a block is not run"


def test_the_parser_sees_the_readme_examples() -> None:
    found = blocks(README.read_text())
    run = [b for b in found if b.language in RUNNABLE and "norun" not in b.attrs]
    assert len(run) >= 5, [b.where for b in found]
    assert any(b.attrs.get("file") for b in found)


def script(block: Block, service_env: dict[str, str]) -> str:
    """A shell block as one script: the environment of earlier blocks comes
    in, its own goes out (a newcomer types them into one terminal); `make`
    runs in the checkout with the project's variables unset, as a newcomer's
    first command would; `&` lines record their process for the end."""
    unset = " ".join(f"-u {name}" for name in sorted(service_env))
    lines = [
        "set -euo pipefail",
        "trap 'echo \"failed: $BASH_COMMAND\" >&2' ERR",
        "[ -f state.sh ] && source state.sh",
    ]
    for shown in commands(block.body):
        if (m := EXPORT.match(shown)) and m.group(1) in service_env:
            continue  # the private service stands in for the one shown
        line = f"(cd {shlex.quote(str(ROOT))} && env {unset} {shown})" if shown.startswith("make ") else shown
        if line.endswith("&"):
            # Its output goes to a file: a pipe held open would never end the block.
            line = f"{line[:-1].rstrip()} >> background.log 2>&1 & echo $! >> background.pids"
        lines.append(line)
    lines.append("export -p > state.sh")
    return "\n".join(lines) + "\n"


@pytest.mark.timeout(1800)
def test_the_readme_runs_as_written(service_env: dict[str, str], tmp_path: Path) -> None:
    env = {**os.environ, **service_env, "PYTHONUNBUFFERED": "1"}
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    pids = tmp_path / "background.pids"
    try:
        for block in blocks(README.read_text()):
            if "norun" in block.attrs:
                continue
            if block.language in FILES and "file" in block.attrs:
                body = block.body
                if "dates-from" in block.attrs:
                    body = shift_dates(body, block.attrs["dates-from"])
                (tmp_path / block.attrs["file"]).write_text(body)
                continue
            if block.language == "python":
                argv = [str(ROOT / ".venv" / "bin" / "python"), "-c", block.body]
            elif block.language in RUNNABLE:
                argv = ["bash", "-c", script(block, service_env)]
            else:
                continue
            ran = subprocess.run(
                argv,
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=PER_BLOCK_SECONDS,
                check=False,
            )
            background = (tmp_path / "background.log").read_text()[-2000:] if pids.exists() else ""
            assert ran.returncode == 0, (
                f"{block.where} exited {ran.returncode}\n{ran.stdout[-3000:]}\n{ran.stderr[-3000:]}\n"
                f"background processes:\n{background}"
            )
            time.sleep(1)
        for pid in _pids(pids):
            assert _alive(pid), f"a background command of the README (pid {pid}) stopped early"
    finally:
        for pid in _pids(pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def _pids(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    return state != "Z"


def test_dates_move_with_today() -> None:
    shifted = shift_dates('"starts_at": "2026-11-11T00:00:00+08:00"', "2026-11-11")
    assert date.today().isoformat() in shifted


def test_a_broken_command_fails_the_run(service_env: dict[str, str], tmp_path: Path) -> None:
    """The harness itself: a command that fails is reported, not passed over."""
    env = {**os.environ, **service_env}
    ran = subprocess.run(
        ["bash", "-c", "issuance activity show no-such-activity"],
        cwd=tmp_path,
        env={**env, "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{env['PATH']}"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ran.returncode != 0
    assert commands("a \\\n  b  # note\n# only a comment\nc &") == ["a    b", "c &"]
