"""How fast each ``erase`` command starts, in fresh processes, against the issue's goals.

Goals (issue 18, section 6): ``erase --help``, ``erase train --list`` and ``erase inspect PATCH`` finish within 1 s;
every other command starts working within 2 s. For a ``--help`` the time is the whole run (it exits when done);
for a command that works for minutes, "starts working" is its first line of output: the progress line it prints on a
terminal before loading torch, the method and the models (``erase train: loading uce (torch, diffusers) ...``),
measured on a pseudo-terminal, as a user sees it. ``python -c "import torch"`` is printed as the reference for what
one heavy import costs on this machine at this moment (the machine's load average is printed too: on a shared
machine every number moves with it).

After the first line the long commands are stopped with SIGINT, which also checks that a Ctrl-C during the imports
prints one line and exits 130.

Run from the checkout: ``PYTHONPATH=$PWD .venv/bin/python benchmarks/startup.py [--repeat 3]``;
``--root DIR`` measures another checkout (e.g. an older commit exported with ``git archive``).
"""

from __future__ import annotations

import argparse
import os
import pty
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def environment(root: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def wall(argv: list[str], env: dict[str, str], cwd: Path) -> float:
    """Seconds until ``argv`` exits (it must exit 0)."""
    start = time.perf_counter()
    result = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"startup benchmark: {' '.join(argv)} exited {result.returncode}: {result.stderr[-500:]}")
    return seconds


def first_line(argv: list[str], env: dict[str, str], cwd: Path, limit: float = 300.0) -> tuple[float, str, str]:
    """Seconds until ``argv``, run on a pseudo-terminal, prints its first non-empty line; that line; and how it
    ended after a SIGINT right then (``exit N``, ``exit N, traceback`` or ``finished exit N`` if it was done)."""
    master, slave = pty.openpty()
    start = time.perf_counter()
    run = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    output, line, seconds = b"", "", None
    while seconds is None and time.perf_counter() - start < limit:
        ready, _, _ = select.select([master], [], [], 0.05)
        if not ready:
            continue
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the process closed the terminal (it exited)
            break
        if not chunk:
            break
        output += chunk
        lines = [x.strip() for x in output.replace(b"\r", b"\n").split(b"\n")[:-1] if x.strip()]
        if lines:
            seconds, line = time.perf_counter() - start, lines[0].decode(errors="replace")
    finished = run.poll() is not None
    if not finished:
        run.send_signal(signal.SIGINT)
    while True:  # drain until the process closes the terminal
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    code = run.wait()
    os.close(master)
    if seconds is None:
        seconds, line = time.perf_counter() - start, "(no output)"
    ending = f"{'finished, ' if finished else ''}exit {code}"
    if b"Traceback" in output:
        ending += ", with a traceback"
    return seconds, line, ending


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each command; the median is shown")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout to measure (default: this one)")
    args = parser.parse_args()
    root = args.root.resolve()
    env = environment(root)
    erase = [sys.executable, "-m", "erase"]
    with tempfile.TemporaryDirectory(prefix="erase-startup-") as tmp:
        tmp = Path(tmp)
        patch = tmp / "uce-red.safetensors"
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs")
        print(f"making a small patch: erase train --method uce --concept red --out {patch.name} --quiet")
        subprocess.run([*erase, "train", "--method", "uce", "--concept", "red", "--out", patch, "--quiet"], env=env,
                       cwd=tmp, check=True, capture_output=True)  # fmt: skip
        finished = [
            ("python -c 'import torch' (reference)", [sys.executable, "-c", "import torch"], None),
            ("erase --help", [*erase, "--help"], 1.0),
            ("erase train --list", [*erase, "train", "--list"], 1.0),
            (f"erase inspect {patch.name}", [*erase, "inspect", patch], 1.0),
            ("erase train --method uce --help", [*erase, "train", "--method", "uce", "--help"], 2.0),
            ("erase eval --help", [*erase, "eval", "--help"], 2.0),
            ("erase attack --help", [*erase, "attack", "--help"], 2.0),
        ]
        starting = [
            (
                "erase train --method uce --concept red: first line",
                [*erase, "train", "--method", "uce", "--concept", "red", "--out", tmp / "again.safetensors"],
                2.0,
            ),
            (
                "erase eval --concept red --patch P: first line",
                [*erase, "eval", "--concept", "red", "--patch", patch, "--out", tmp / "eval"],
                2.0,
            ),
            (
                "erase attack --concept red --patch P: first line",
                [*erase, "attack", "--concept", "red", "--patch", patch, "--attacks", "prefix", "--out", tmp / "at"],
                2.0,
            ),
        ]
        print(f"\n{'command':<52} {'median':>7} {'min':>7} {'goal':>6}  verdict")
        for label, argv, goal in finished:
            times = [wall([str(a) for a in argv], env, tmp) for _ in range(args.repeat)]
            report(label, times, goal)
        for label, argv, goal in starting:
            runs = [first_line([str(a) for a in argv], env, tmp) for _ in range(args.repeat)]
            report(label, [r[0] for r in runs], goal)
            endings = "; ".join(sorted({r[2] for r in runs}))
            print(f"{'':<4}first line: {runs[0][1][:90]!r}; after Ctrl-C: {endings}")
        print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def report(label: str, times: list[float], goal: float | None) -> None:
    median = statistics.median(times)
    verdict = "" if goal is None else ("ok" if median <= goal else f"over ({median / goal:.1f}x the goal)")
    goal_text = "-" if goal is None else f"{goal:.0f} s"
    print(f"{label:<52} {median:6.2f}s {min(times):6.2f}s {goal_text:>6}  {verdict}")


if __name__ == "__main__":
    main()
