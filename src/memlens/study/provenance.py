"""Where and how long: the environment a study ran in, stage wall times and the history of invocations.

- `<out>/environment.json`: package versions, Python, platform, torch device, git commit, hardware.
- `runs/<run_id>/timings.json`: wall seconds of each completed stage of the run.
- `<out>/history.jsonl`: one :class:`~memlens.store.records.HistoryEntry` per `run_study` invocation.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

from memlens.config import ConfigError, StudyConfig
from memlens.models import resolve_device
from memlens.store import RunFile, StudyLayout
from memlens.store.lock import write_lock
from memlens.store.records import HistoryEntry, StageTiming, TimingsRecord, append_history_line

PACKAGES = ("memlens", "torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors", "numpy",
            "pandas", "pyarrow", "scikit-learn", "scipy", "matplotlib", "opacus", "sacrebleu", "rouge-score",
            "rapidfuzz", "pydantic", "ray", "bitsandbytes")


def now() -> str:
    """Local time as memlens records it in every file."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def git_commit() -> str | None:
    """The memlens checkout's commit (`-dirty` when tracked files changed), None outside a checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def cpu_model() -> str | None:
    """The CPU's marketing name (Linux /proc/cpuinfo, else what platform knows), None when unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def hardware_info(device: str | None = None) -> dict:
    """What a wall time was measured on, without the host name: CPU model and cores, torch threads,
    GPU name and count (None without CUDA), the torch device the study used, OS and architecture."""
    import torch

    cuda = torch.cuda.is_available()
    return {"cpu": cpu_model(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if cuda else None,
            "gpu_count": torch.cuda.device_count() if cuda else 0,
            "device": device, "os": f"{platform.system()} {platform.machine()}"}


def environment_info(study: StudyConfig) -> dict:
    """Package versions, Python, platform, torch device and the memlens git commit (if a checkout)."""
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    try:
        device = str(resolve_device(study.model.device))
    except ConfigError as exc:
        device = f"unavailable: {exc}"
    return {
        "python": sys.version.split()[0], "platform": platform.platform(), "host": socket.gethostname(),
        "packages": versions, "device": device,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(), "git_commit": git_commit(),
        "hardware": hardware_info(device),
        "written": now(),
    }


def invocation() -> str:
    """The command line when memlens runs from its CLI (`memlens ...` or `python -m memlens.cli ...`),
    else "python API" (run_study called from Python code, whose arguments are not a command)."""
    argv0 = (sys.argv[0] if sys.argv else "").replace(os.sep, "/")
    if argv0.rsplit("/", 1)[-1] == "memlens" or argv0.endswith("memlens/cli.py"):
        return shlex.join(["memlens", *sys.argv[1:]])
    return "python API"


def record_stage_time(layout: StudyLayout, run_ids: list[str], stage: str, wall_s: float) -> None:
    """Record a completed stage's wall time in `runs/<run_id>/timings.json` of each of `run_ids`.

    A stage run for several cells at once (the local executor batches them, sharing the base model)
    has one wall time: each cell records the batch's time, its size and the per-cell share (`wall_s`)."""
    finished = now()
    for run_id in run_ids:
        if not layout.run_dir(run_id).is_dir():  # e.g. a run discarded meanwhile: nothing to annotate
            continue
        path = layout.run_file(run_id, RunFile.TIMINGS)
        timings = TimingsRecord.read(path)
        timings.root[stage] = StageTiming(wall_s=wall_s / len(run_ids), batch_wall_s=wall_s,
                                          batch_cells=len(run_ids), finished=finished)
        timings.save(path)


def append_history(layout: StudyLayout, entry: HistoryEntry) -> None:
    """Append one line to `<out>/history.jsonl`. The file is rewritten atomically under the study's
    write lock, so a kill leaves the old file or the new one, never a torn line."""
    with write_lock(layout.root):
        append_history_line(layout.history_file, entry)


__all__ = ["PACKAGES", "append_history", "cpu_model", "environment_info", "git_commit", "hardware_info",
           "invocation", "now", "record_stage_time"]
