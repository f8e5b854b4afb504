"""The command line: commands exist, errors are clear, the README's config reference is current."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from memlens.cli import app
from memlens.config import load_study
from memlens.docs import config_reference_markdown

REPO = Path(__file__).resolve().parents[1]


def test_readme_config_reference_is_current():
    readme = (REPO / "README.md").read_text()
    match = re.search(r"<!-- config-reference:start -->\n(.*)\n<!-- config-reference:end -->", readme, re.S)
    assert match, "README.md lacks the config-reference markers"
    assert match.group(1) == config_reference_markdown().rstrip("\n"), (
        "README.md's study file reference is stale: paste the output of `memlens config-reference` between "
        "the config-reference markers")


def test_readme_commands_pin_torch_run_the_demo_and_match_ci():
    readme = (REPO / "README.md").read_text()
    first, second = re.findall(r"```bash\n(.+?)\n```", readme, re.S)[:2]
    assert "pip install torch==2.13.0" in first and first.rstrip().endswith("memlens demo")
    assert second.startswith("HF_HUB_OFFLINE=1 python -m pytest")
    ci_test_line = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert second.removeprefix("HF_HUB_OFFLINE=1 ").strip() == ci_test_line  # CI runs the README's command
    # and, first, as on a fresh machine: no shared fixtures (issue #40)
    assert f'\nMEMLENS_SHARED="$fresh" {ci_test_line}' in (REPO / ".ci" / "run").read_text()
    assert (REPO / "docs" / "report-screenshot.png").exists()


@pytest.mark.parametrize("name", ["phee-llama2-7b.yaml", "phee-gpt2.yaml", "quickstart-tiny.yaml"])
def test_examples_are_valid_studies(name):
    study = load_study(REPO / "examples" / name)
    assert study.cells()


def test_examples_match_the_study_setting():
    study = load_study(REPO / "examples" / "phee-llama2-7b.yaml")
    assert study.model.load_in_8bit and study.model.name_or_path == "meta-llama/Llama-2-7b-hf"
    assert study.grid.target_modules == [["q"], ["k"], ["v"], ["o"], ["q", "k"]]
    assert study.lora.alpha == 16 and study.lora.dropout == 0.05 and study.train.grad_accum == 4
    assert load_study(REPO / "examples" / "phee-gpt2.yaml").model.name_or_path == "gpt2"


def test_commands_are_listed():
    result = CliRunner().invoke(app, ["--help"])
    for command in ("run", "status", "report", "demo", "finetune", "attack", "audit", "config-reference"):
        assert command in result.output


def test_status_and_report_refuse_a_folder_that_is_not_a_study(tmp_path):
    for command in ("status", "report"):
        result = CliRunner().invoke(app, [command, str(tmp_path)])
        assert result.exit_code == 2 and "not a memlens study folder" in result.output


def test_run_rejects_a_bad_override_and_an_unknown_stage(tmp_path):
    study = REPO / "examples" / "quickstart-tiny.yaml"
    result = CliRunner().invoke(app, ["run", str(study), "--out", str(tmp_path / "o"), "--set", "grid.rank=[0]"])
    assert result.exit_code == 2 and "grid.rank" in result.output
    result = CliRunner().invoke(app, ["run", str(study), "--out", str(tmp_path / "o"), "--force", "everything"])
    assert result.exit_code == 2 and "unknown stage" in result.output and "finetune" in result.output


def test_the_help_names_the_stages_the_runner_has():
    import memlens.cli
    from memlens.runner import FORCEABLE
    from memlens.study.stage import STAGE_NAMES

    assert memlens.cli.STAGE_NAMES == STAGE_NAMES and memlens.cli.FORCEABLE == FORCEABLE


def test_help_version_and_early_refusals_import_no_torch():
    import subprocess
    import sys

    import memlens

    code = ("import sys; from memlens.cli import app\n"
            "for argv in (['--help'], ['--version'], ['audit', '--help'], ['audit', '--target', 'no-such-adapter', "
            "'--members', 'm.jsonl', '--non-members', 'n.jsonl']):\n"
            "    try:\n        app(argv)\n    except SystemExit as exc:\n        print('exit', exc.code)\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules, 'peft' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO / "tests")
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == "False False False", done.stderr[-2000:]
    assert f"memlens {memlens.__version__}" in done.stdout and lines.count("exit 0") == 3 and "exit 2" in lines
    assert "there is no folder named 'no-such-adapter' here" in done.stderr
    # the benchmark of these timings runs (its smoke mode: one process each, no baseline)
    smoke = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cli_startup.py"), "--smoke"],
                           capture_output=True, text=True)
    assert smoke.returncode == 0 and "memlens --help" in smoke.stdout, smoke.stderr[-2000:]
