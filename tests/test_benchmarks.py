"""Every benchmark's smoke mode runs here, so a refactor that breaks a benchmark fails the suite.

`--smoke` runs a benchmark's real code path at its smallest sizes (llama-tiny, a few records, one optimizer step):
its figures mean nothing, but it prints the same lines as a real run. Each script's `main(argv)` runs in this
process (the libraries are imported once for all of them); a benchmark that raises fails its test, and each test
checks that the script printed its closing figures. `shapes.py` is the scripts' helper module and `gpu-check.sh`
needs a GPU: neither is a benchmark of its own.
"""

from __future__ import annotations

import importlib
import logging
import re

import pytest
import torch
from transformers.utils import logging as hf_logging

from tests.conftest import LLAMA_TINY, PHEE, REPO

BENCHMARKS = REPO / "benchmarks"

# benchmark -> (extra arguments after --smoke, pattern of the figures it must print)
SMOKE = {
    "attacks_low_fpr": ([], r"^4\. wall seconds: fine-tune per cell plain \d+, DP \d+; membership stage per cell"),
    "callback_cost": ([], r"^records a side within 10% of this epoch: \d+"),
    "finetune_throughput": ([], r"^packed_block_mask +\d+ +\d+\.\d\dx$"),
    "generation_throughput": ([], r"^ratio: \d+\.\dx  \(identical greedy outputs: 4/4\)"),
    "learned_attack": ([], r"^target \(held-out base model\): TPR@1%FPR >= 1\.5x the best reference-free"),
    "mia_throughput": ([], r"^speed-up: +\d+\.\d\d x .*max \|ref_ratio difference\|"),
    "multi_adapter_throughput": ([], r"^ratio: \d+\.\d\d x \(references one at a time / together\)"),
    "references_mia": ([], r"^  whole steps: A \d+\.\d, B \d+\.\d, C \d+\.\d, D \d+\.\d$"),
    "study_stage_split": ([f"--set=data.source={PHEE}", f"--set=model.name_or_path={LLAMA_TINY}"],
                          r"^projected whole grid \(40 cells\): \d+\.\d min"),
    "study_throughput": ([], r"^ +whole study +\d+\.\d +\d+\.\d +\d+\.\d\dx$"),
}
# benchmarks that other work added, each smoke-tested beside the code it measures
OWN_TESTS = {"cli_startup", "dataset_inference"}
NOT_BENCHMARKS = {"shapes"}


@pytest.fixture
def benchmark(monkeypatch, tmp_path):
    """Imports a benchmark from benchmarks/ and restores what its main changes in this process (working folder,
    import path, loggers, torch threads, transformers' progress bars)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    memlens_log = logging.getLogger("memlens")
    saved = memlens_log.level, hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled(), \
        torch.get_num_threads()
    yield lambda name: importlib.import_module(name)
    memlens_log.setLevel(saved[0])
    hf_logging.set_verbosity(saved[1])
    (hf_logging.enable_progress_bar if saved[2] else hf_logging.disable_progress_bar)()
    torch.set_num_threads(saved[3])


def test_every_benchmark_has_a_smoke_run():
    scripts = {p.stem for p in BENCHMARKS.glob("*.py")} - NOT_BENCHMARKS - OWN_TESTS
    assert scripts == set(SMOKE), "a benchmark without a smoke test here (or a test of one that is gone)"
    for name in scripts:
        assert "--smoke" in (BENCHMARKS / f"{name}.py").read_text(), name


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_benchmark_smoke(name, benchmark, tmp_path, capsys):
    extra, figures = SMOKE[name]
    out = ["--out", str(tmp_path / "out")] if name in {"attacks_low_fpr", "references_mia"} else []
    benchmark(name).main(["--smoke", *out, *extra])
    printed = capsys.readouterr().out
    assert re.search(figures, printed, re.MULTILINE), f"{name} did not print its figures:\n{printed[-3000:]}"
