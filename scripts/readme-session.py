#!/usr/bin/env python3
"""Runs the README's curl session against a real server and checks every answer.

The session is the ```sh block between `<!-- session` and `<!-- /session -->` in README.md.
In it, a line starting with `curl ` is a command (a trailing backslash continues it on the
next line), and the lines right after it are the answer a reader sees:

    # → 201 {"task_id":"job_1",…}      the HTTP status, then the body when it is one line
    #   event: connected                 further body lines, one per non-blank output line

`…` stands for any text within a line. Other comment lines are prose. Every command must be
followed by its answer, so the front door cannot drift from the code unnoticed.

The script starts `eventqueue serve` on a free loopback port (`--bind 127.0.0.1:0`, the
address read back from its log) with a temporary data directory and no EVENTQUEUE_*
settings from the environment, runs each command with `localhost:8000` replaced by that
address, compares status and body, and stops the server. The binary is $EVENTQUEUE_BIN, else
${CARGO_TARGET_DIR:-target}/release/eventqueue. Exit status: 0 when every answer matched,
1 otherwise.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
HOST = "localhost:8000"
START_MARK = "<!-- session"
END_MARK = "<!-- /session -->"
ANSWER = re.compile(r"^# → (\d{3})(?: (.*))?$")
MORE = re.compile(r"^#   (.*)$")


@dataclass
class Step:
    line: int
    command: str
    status: int = 0
    body: list[str] = field(default_factory=list)


def fail(message: str) -> NoReturn:
    print(f"readme-session: {message}", file=sys.stderr)
    sys.exit(1)


def parse(text: str) -> list[Step]:
    """The commands of the marked block with their expected answers."""
    lines = text.split("\n")
    starts = [i for i, l in enumerate(lines) if l.startswith(START_MARK)]
    ends = [i for i, l in enumerate(lines) if l.strip() == END_MARK]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        fail(f"README.md needs exactly one {START_MARK} … {END_MARK} block")
    block = lines[starts[0] : ends[0]]
    try:
        fence = next(i for i, l in enumerate(block) if l.strip() == "```sh")
        close = next(i for i, l in enumerate(block) if i > fence and l.strip() == "```")
    except StopIteration:
        fail("the session block holds no ```sh … ``` fence")
    first = starts[0] + fence + 2  # 1-based number of the fence's first line
    body = block[fence + 1 : close]

    steps: list[Step] = []
    i = 0
    while i < len(body):
        line, number = body[i], first + i
        if line.startswith("curl "):
            parts = [line]
            while parts[-1].endswith("\\"):
                parts[-1] = parts[-1][:-1]
                i += 1
                if i >= len(body):
                    fail(f"README.md:{number}: the command's continuation runs off the block")
                parts.append(body[i].strip())
            step = Step(number, " ".join(p.strip() for p in parts))
            i += 1
            m = ANSWER.match(body[i]) if i < len(body) else None
            if not m:
                fail(f"README.md:{number}: a command must be followed by `# → STATUS [BODY]`")
            step.status = int(m.group(1))
            if m.group(2):
                step.body.append(m.group(2))
            i += 1
            while i < len(body) and (body[i] == "#" or MORE.match(body[i])):
                more = MORE.match(body[i])
                if more:
                    step.body.append(more.group(1))
                i += 1
            steps.append(step)
        elif line.startswith("#") or not line.strip():
            if ANSWER.match(line) or MORE.match(line):
                fail(f"README.md:{number}: an answer that follows no command")
            i += 1
        else:
            fail(f"README.md:{number}: only curl commands and comments belong in the session")
    if not steps:
        fail("the session block holds no curl command")
    return steps


def pattern(expected: str) -> re.Pattern[str]:
    return re.compile(".*".join(re.escape(part) for part in expected.split("…")))


def start_server(binary: Path, work: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTQUEUE_")}
    env["RUST_LOG"] = "info"  # the address is read from the start-up line
    log = work / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [str(binary), "serve", "--data-dir", str(work / "data"), "--bind", "127.0.0.1:0"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = re.search(r"listening on http://(\S+)", log.read_text(errors="replace"))
        if found:
            return server, found.group(1), log
        if server.poll() is not None:
            break
        time.sleep(0.05)
    server.kill()
    server.wait()
    fail(f"the server did not start; its log:\n{log.read_text(errors='replace')}")


def run(step: Step, address: str, work: Path) -> list[str]:
    """Runs one command; returns what differs from the expected answer (nothing: it matched)."""
    if HOST not in step.command:
        return [f"the command does not name {HOST}, so it would not reach the test server"]
    try:
        argv = shlex.split(step.command)
    except ValueError as e:
        return [f"the command is not valid shell: {e}"]
    body_file = work / "body"
    body_file.unlink(missing_ok=True)
    argv = [a.replace(HOST, address) for a in argv] + [
        "--silent",
        "--show-error",
        "--noproxy",
        "*",
        "--max-time",
        "10",
        "--output",
        str(body_file),
        "--write-out",
        "%{http_code}",
    ]
    done = subprocess.run(argv, check=False, capture_output=True, text=True, cwd=work, timeout=30)
    if done.returncode != 0:
        return [f"curl exited {done.returncode}: {done.stderr.strip()}"]
    status = int(done.stdout.strip() or 0)
    got = body_file.read_text() if body_file.exists() else ""
    got_lines = [l for l in got.split("\n") if l.strip()]
    problems = []
    if status != step.status:
        problems.append(f"status {status}, the README says {step.status}")
    if len(got_lines) != len(step.body):
        problems.append(f"{len(got_lines)} non-blank body lines, the README shows {len(step.body)}")
    for want, have in zip(step.body, got_lines):
        if not pattern(want).fullmatch(have):
            problems.append(f"README: {want}\n      got:    {have}")
    if problems:
        problems.append("the whole answer:\n" + got)
    return problems


def main() -> None:
    steps = parse(README.read_text())
    binary = Path(
        os.environ.get("EVENTQUEUE_BIN")
        or Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release" / "eventqueue"
    )
    if not binary.is_absolute():
        binary = ROOT / binary
    if not binary.is_file():
        fail(f"{binary} does not exist: cargo build --release --bin eventqueue")
    with tempfile.TemporaryDirectory(prefix="readme-session-") as tmp:
        work = Path(tmp)
        server, address, log = start_server(binary, work)
        failed = False
        try:
            for step in steps:
                problems = run(step, address, work)
                print(f"{'ok  ' if not problems else 'FAIL'} README.md:{step.line}: {step.command}")
                for p in problems:
                    print(f"      {p}")
                failed |= bool(problems)
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        if failed:
            print("the server's log:\n" + log.read_text(errors="replace"), file=sys.stderr)
            fail("the README's session does not match the server's answers")
    print(f"readme-session: {len(steps)} commands, every answer as the README shows")


if __name__ == "__main__":
    main()
