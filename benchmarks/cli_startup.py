"""How long the `memlens` command takes to answer what needs no model: `--help`, `--version`, and an audit refused
for a missing members file; each the median wall time of N fresh processes, against the same `--help` after
importing what the command line imported before it imported lazily (the runner, the audit workflow, the demo,
the docs: torch, transformers, PEFT), measured in the same run.

    python benchmarks/cli_startup.py              # 5 runs each
    python benchmarks/cli_startup.py --runs 11
    python benchmarks/cli_startup.py --smoke      # one run each, no baseline: checks the script (the suite runs it)

Target (issue #33): each under 1 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What memlens/cli.py imported at its top before it imported lazily
EAGER = ("import memlens.auditing.run, memlens.runner, memlens.demo, memlens.docs, memlens.study.cell, "
         "memlens.study.status, memlens.store.lock; from memlens.cli import app; app()")


def _environment() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _seconds(command: list[str], runs: int, env: dict[str, str], cwd: str, expect: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd)
        times.append(time.perf_counter() - start)
        if done.returncode != expect:
            raise SystemExit(f"{' '.join(command)}: exit {done.returncode}, expected {expect}\n{done.stderr[-2000:]}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="processes timed per command (median)")
    parser.add_argument("--smoke", action="store_true", help="one run each, no baseline")
    args = parser.parse_args()
    runs = 1 if args.smoke else args.runs
    env = _environment()
    cli = [sys.executable, "-m", "memlens.cli"]
    with tempfile.TemporaryDirectory() as cwd:
        (Path(cwd) / "adapter").mkdir()
        commands = {
            "memlens --help": (cli + ["--help"], 0),
            "memlens --version": (cli + ["--version"], 0),
            "memlens audit (members file missing)": (cli + ["audit", "--target", "adapter", "--members",
                                                            "missing.jsonl", "--non-members", "missing.jsonl"], 2),
        }
        if not args.smoke:
            commands["baseline: --help after the eager imports"] = ([sys.executable, "-c", EAGER, "--help"], 0)
        timed = {name: statistics.median(_seconds(command, runs, env, cwd, expect))
                 for name, (command, expect) in commands.items()}
    load = os.getloadavg()[0]
    print(f"median wall time of {runs} process(es) each, load {load:.1f}")
    baseline = timed.get("baseline: --help after the eager imports")
    for name, seconds in timed.items():
        ratio = f"  {baseline / seconds:5.1f}x faster than the baseline" if baseline and "baseline" not in name else ""
        print(f"{name:42s} {seconds:6.2f} s{ratio}")
    slow = [name for name, seconds in timed.items() if "baseline" not in name and seconds >= 1.0]
    print("target: each under 1 s: " + (f"missed by {slow}" if slow else "met"))


if __name__ == "__main__":
    main()
