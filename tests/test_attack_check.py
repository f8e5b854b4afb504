"""One attack check per membership stage, and one builder of the base model's datasets."""

from __future__ import annotations

from memlens.attacks import mia as mia_module
from memlens.attacks import registry
from memlens.attacks.mia import record_datasets, run_mia
from memlens.context import StudyContext
from memlens.study.stage import MIAStage

from .conftest import make_study


def test_the_membership_stage_checks_its_attacks_once(tmp_path, monkeypatch):
    study = make_study(tmp_path / "study", mia={"attacks": ["loss", "ref_ratio", "zlib"]})
    calls = []
    original = registry.check_attack_inputs

    def counted(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(registry, "check_attack_inputs", counted)
    monkeypatch.setattr(registry, "_CHECKED", {})
    ctx = StudyContext(study)
    MIAStage().check(ctx)  # the pre-flight
    run_mia(ctx)  # no finished run: nothing to score, but the attacks are read
    assert [a.name for a in registry.check_attacks(study)] == ["loss", "ref_ratio", "zlib"]
    assert len(calls) == 1
    other = study.model_copy(update={"mia": study.mia.model_copy(update={"attacks": ["ref_ratio"]})})
    assert [a.name for a in registry.check_attacks(other)] == ["ref_ratio"] and len(calls) == 2  # other settings


def test_the_base_models_datasets_have_one_builder(tmp_path):
    study = make_study(tmp_path / "study")
    ctx = StudyContext(study)
    data = ctx.data(study.cells()[0].membership)
    built = mia_module._base_datasets(ctx.designs())
    assert built == record_datasets(data.members, data.non_members, data.utility)
    assert list(record_datasets(data.members, data.non_members, None, "random:")) == ["random:members",
                                                                                       "random:non_members"]
