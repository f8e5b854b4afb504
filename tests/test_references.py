"""Reference adapters and the attacks that read them (LiRA, RMIA): hand-computed scores from the papers'
equations, a record trained many times in the target and in no reference, references identical to the target,
and, end to end on llama-tiny, references shared by the cells of one recipe and retrained when it changes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError
from sklearn.metrics import roc_auc_score

from memlens.attacks.dataset_inference import DATASET_STAGE, SHARE_ATTACK
from memlens.attacks.lira_rmia import lira_fit, rmia_fit_a
from memlens.attacks.references import (
    REF_SEED,
    in_matrix,
    load_references,
    population_hash,
    reference_cell,
    reference_ids,
    reference_study,
    train_references,
)
from memlens.attacks.registry import (
    ATTACKS,
    AttackInputs,
    check_attack_inputs,
    check_attacks,
    configure_attacks,
    run_attacks,
)
from memlens.attacks.subject import with_groups
from memlens.config import ConfigError, MIAConfig
from memlens.context import StudyContext
from memlens.data import StudyData, load_study_data
from memlens.runner import run_study
from memlens.score import SequenceStats
from memlens.store import RunFile, StudyLayout, read_results
from memlens.store.records import ReferenceRecord
from memlens.study.stage import ReferencesStage, get_stage
from memlens.train.finetune import read_members

from .conftest import make_study

REFERENCE_ATTACKS = ["lira", "lira_offline", "rmia", "rmia_offline"]


def _inputs(target_ll, ref_models, ref_in, population, **kw) -> AttackInputs:
    """Attack inputs whose fine-tuned statistic is `target_ll` (one scored token per record)."""
    target_ll = np.asarray(target_ll, dtype=np.float64)
    n = len(target_ll)
    ft = SequenceStats(np.arange(n + 1, dtype=np.int64), np.zeros(n, np.int64), target_ll.astype(np.float32),
                       np.zeros(n, np.float32), np.ones(n, np.float32))
    # float32 storage: compare against what the attack reads
    return AttackInputs(texts=[f"r{i}" for i in range(n)], ft=ft, ref_models=np.asarray(ref_models, float),
                        ref_in=np.asarray(ref_in, bool), population=np.asarray(population, bool), **kw)


# ------------------------------------------------------------------------------------- hand-made example
S = [-1.0, -2.0, -1.5, -3.0]                      # target: mean token log-likelihood of records A, B, C, D
V = [[-1.2, -1.8, -1.1], [-2.5, -2.1, -2.6],      # 3 references
     [-1.4, -1.9, -1.7], [-3.2, -3.1, -3.6]]
IN = [[1, 0, 1], [0, 1, 0], [1, 0, 0], [0, 1, 1]]
POPULATION = [False, False, True, True]           # C and D are the non-members RMIA compares against


def _log_normal(x: float, mean: float, var: float) -> float:
    return -0.5 * math.log(2 * math.pi * var) - (x - mean) ** 2 / (2 * var)


def _log_phi(z: float) -> float:
    return math.log1p(-0.5 * math.erfc(z / math.sqrt(2)))


def test_lira_equals_hand_computation():
    # Means of each record's IN and OUT statistics, by hand:
    mu_in = [(-1.2 - 1.1) / 2, -2.1, -1.4, (-3.1 - 3.6) / 2]
    mu_out = [-1.8, (-2.5 - 2.6) / 2, (-1.9 - 1.7) / 2, -3.2]
    # Fixed variance: squared deviations from each record's own mean over the degrees of freedom, pooled over
    # the records (A and D hold two IN statistics each, B and C two OUT ones) and, online, over both sides.
    var = (0.05 ** 2 * 2 + 0.25 ** 2 * 2 + 0.05 ** 2 * 2 + 0.1 ** 2 * 2) / (1 + 1 + 1 + 1)
    var_out = (0.05 ** 2 * 2 + 0.1 ** 2 * 2) / (1 + 1)
    # Carlini et al. 2022, Algorithm 1: Lambda = p(s | N(mu_in, var)) / p(s | N(mu_out, var)).
    online = [_log_normal(S[i], mu_in[i], var) - _log_normal(S[i], mu_out[i], var) for i in range(4)]
    # Offline: 1 - Pr[Z > s], Z ~ N(mu_out, var_out), as a log.
    offline = [_log_phi((S[i] - mu_out[i]) / math.sqrt(var_out)) for i in range(4)]
    assert online[0] == pytest.approx(7.96774, abs=1e-4)  # the numbers written once, as a check of the check

    scores = run_attacks(["lira", "lira_offline"], _inputs(S, V, IN, POPULATION))
    assert scores["lira"] == pytest.approx(online, rel=1e-5)
    assert scores["lira_offline"] == pytest.approx(offline, rel=1e-5)
    fit = lira_fit(np.array(V), np.array(IN, bool))
    assert fit["mu_in"] == pytest.approx(mu_in) and fit["mu_out"] == pytest.approx(mu_out)
    assert fit["sigma_in"] == pytest.approx([math.sqrt(var)] * 4) and fit["sigma_out"] == pytest.approx(fit["sigma_in"])
    assert fit["sigma_offline"] == pytest.approx([math.sqrt(var_out)] * 4)


@pytest.mark.parametrize("gamma", [1.0, 1.2, 0.7])
def test_rmia_equals_hand_computation(gamma):
    a = 0.3
    s32 = [float(np.float32(v)) for v in S]  # the statistic is stored in float32

    def pr_online(i):  # Pr(x) = mean over the reference models of Pr(x | theta')
        return sum(math.exp(v) for v in V[i]) / 3

    def pr_offline(i):  # Pr(x) = ((1 + a) Pr_OUT(x) + (1 - a)) / 2
        out = [math.exp(v) for v, inside in zip(V[i], IN[i]) if not inside]
        return ((1 + a) * sum(out) / len(out) + (1 - a)) / 2

    for attack, prior in (("rmia", pr_online), ("rmia_offline", pr_offline)):
        def lr(x, z, prior=prior):  # LR(x, z) = (Pr(x|theta) / Pr(x)) / (Pr(z|theta) / Pr(z))
            return (math.exp(s32[x]) / prior(x)) / (math.exp(s32[z]) / prior(z))

        expected = []
        for x in range(4):
            zs = [z for z in range(4) if POPULATION[z] and z != x]
            expected.append(sum(lr(x, z) >= gamma for z in zs) / len(zs))
        params = {"gamma": gamma, **({"a": a} if attack == "rmia_offline" else {})}
        scores = run_attacks([{"type": attack, "params": params, "name": attack}], _inputs(S, V, IN, POPULATION))
        assert scores[attack].tolist() == pytest.approx(expected), attack


def test_rmia_offline_a_fit():
    """a minimises sum over records of (Pr_IN - 1 - a (Pr_OUT - 1))^2: a = sum xy / sum x^2, x = 1 - Pr_OUT,
    y = 1 - Pr_IN, Pr_side the mean probability over that side's references."""
    p_in = [(math.exp(-1.2) + math.exp(-1.1)) / 2, math.exp(-2.1), math.exp(-1.4),
            (math.exp(-3.1) + math.exp(-3.6)) / 2]
    p_out = [math.exp(-1.8), (math.exp(-2.5) + math.exp(-2.6)) / 2, (math.exp(-1.9) + math.exp(-1.7)) / 2,
             math.exp(-3.2)]
    x, y = [1 - p for p in p_out], [1 - p for p in p_in]
    expected = sum(a * b for a, b in zip(x, y)) / sum(a * a for a in x)
    assert rmia_fit_a(np.array(V), np.array(IN, bool)) == pytest.approx(expected)
    with pytest.raises(ConfigError, match="between 0 and 1"):
        configure_attacks([{"type": "rmia_offline", "params": {"a": 1.5}}])
    with pytest.raises(ConfigError, match="between 0 and 1"):  # a study file from before settings were per attack
        check_attacks(make_study(Path("unused"), mia={"attacks": ["lira", "rmia_offline"], "references": 2,
                                                      "rmia_offline_a": 1.5}))


def test_rmia_counts_a_wider_population_exactly():
    rng = np.random.default_rng(3)
    n, k = 40, 4
    values = rng.normal(-2, 0.3, (n, k))
    is_in = rng.random((n, k)) < 0.5
    s = values.mean(axis=1) + rng.normal(0, 0.2, n)
    population = np.arange(n) >= 15
    score = run_attacks(["rmia"], _inputs(s, values, is_in, population))["rmia"]
    s = s.astype(np.float32).astype(np.float64)
    ratio = s - np.log(np.exp(values).mean(axis=1))
    for x in range(n):
        others = [z for z in np.flatnonzero(population) if z != x]
        assert score[x] == pytest.approx(np.mean([ratio[x] - ratio[z] >= 0 for z in others]))


def test_many_references_fit_one_variance_per_record():
    rng = np.random.default_rng(1)
    values = rng.normal(-2, 0.2, (5, 70))
    is_in = rng.random((5, 70)) < 0.5
    fit = lira_fit(values, is_in)
    for i in range(5):
        assert fit["sigma_in"][i] == pytest.approx(np.std(values[i, is_in[i]], ddof=1))
        assert fit["sigma_out"][i] == pytest.approx(np.std(values[i, ~is_in[i]], ddof=1))


def test_a_record_without_in_references_is_scored_on_the_online_scale():
    """No IN reference: mu_in = mu_out + the mean IN-OUT shift of the records that have both."""
    values = np.array(V + [[-2.0, -2.2, -2.1]])
    is_in = np.array(IN + [[0, 0, 0]], bool)
    fit = lira_fit(values, is_in)
    shift = np.mean([(-1.15) - (-1.8), (-2.1) - (-2.55), (-1.4) - (-1.8), (-3.35) - (-3.2)])
    assert fit["mu_out"][4] == pytest.approx(-2.1)
    assert fit["mu_in"][4] == pytest.approx(-2.1 + shift)
    scores = run_attacks(REFERENCE_ATTACKS, _inputs(S + [-1.9], values, is_in, POPULATION + [True]))
    assert all(np.isfinite(v).all() for v in scores.values())


# ------------------------------------------------------------------------------------- synthetic studies
def _synthetic(n=400, k=4, seed=0, effect=0.15):
    """Records with a difficulty each; references around it (+effect when IN); a target with members IN."""
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(-2.5, 0.6, n)
    is_member = rng.random(n) < 0.5
    ref_in = rng.random((n, k)) < 0.5
    noise = 0.05
    refs = difficulty[:, None] + effect * ref_in + rng.normal(0, noise, (n, k))
    target = difficulty + effect * is_member + rng.normal(0, noise, n)
    return target, refs, ref_in, is_member


def test_record_trained_many_times_in_the_target_and_in_no_reference_gets_the_top_score():
    target, refs, ref_in, is_member = _synthetic()
    canary = 7
    is_member[canary] = True
    ref_in[canary] = False                       # in no reference
    target[canary] = refs[canary].mean() + 1.0  # repeated in the target's training: far above its OUT fits
    scores = run_attacks(REFERENCE_ATTACKS, _inputs(target, refs, ref_in, ~is_member))
    for attack, values in scores.items():
        assert values[canary] == values.max(), attack
        assert roc_auc_score(is_member, values) > 0.8, attack  # and they beat the difficulty of each record


def test_references_identical_to_the_target_leave_nothing_to_detect():
    """Every reference equals the target model (so its statistic is the target's): the calibrated attacks see
    no difference between IN and OUT and sit at AUC 0.5, though the target's loss separates members."""
    target, _, ref_in, is_member = _synthetic(effect=0.3)
    s32 = target.astype(np.float32).astype(np.float64)
    refs = np.repeat(s32[:, None], ref_in.shape[1], axis=1)
    inputs = _inputs(target, refs, ref_in, ~is_member)  # rmia_offline's a: fitted, 1 (IN = OUT)
    assert rmia_fit_a(refs, ref_in) == pytest.approx(1.0)
    assert roc_auc_score(is_member, target) > 0.6
    for attack, values in run_attacks(REFERENCE_ATTACKS, inputs).items():
        assert roc_auc_score(is_member, values) == pytest.approx(0.5), attack


def test_checks_name_mia_references(tmp_path):
    with pytest.raises(ConfigError, match=r"mia\.references"):
        check_attack_inputs(["loss", "lira"], None, references=0)
    with pytest.raises(ConfigError, match=r"mia\.references: 4 .* no attack"):
        check_attack_inputs(["loss"], None, references=4)
    with pytest.raises(ValidationError, match=r"0 \(off\) or >= 2"):
        MIAConfig(references=1)
    assert [a.name for a in check_attack_inputs(["loss", "rmia"], None, "rmia", references=2)] == ["loss", "rmia"]
    assert {"lira", "lira_offline", "rmia", "rmia_offline"} <= set(ATTACKS)
    study = make_study(tmp_path, mia={"attacks": ["lira"]})  # a valid file, refused before any work
    with pytest.raises(ConfigError, match=r"mia\.references"):
        get_stage("mia").check(StudyContext(study))
    assert not get_stage("references").enabled(study)
    assert get_stage("references").enabled(make_study(tmp_path, mia={"attacks": ["lira"], "references": 2}))


def test_reference_run_ids_ignore_the_target_seed_and_copies_but_not_the_recipe(tmp_path):
    study = make_study(tmp_path, grid={"canary_copies": [1, 8], "seed": [0, 3]}, mia={"references": 3,
                                                                                        "attacks": ["lira"]})
    cells = study.cells()
    ids = {tuple(reference_ids(study, c)) for c in cells}
    assert len(cells) == 4 and len(ids) == 1 and len(next(iter(ids))) == 3
    assert reference_cell(cells[0], 2).seed == REF_SEED + 2
    other = make_study(tmp_path, grid={"rank": [4]}, mia={"references": 3, "attacks": ["lira"]})
    assert set(reference_ids(other, other.cells()[0])).isdisjoint(next(iter(ids)))
    dp = make_study(tmp_path, train={"epochs": 2}, mia={"references": 3, "attacks": ["lira"]})
    assert set(reference_ids(dp, dp.cells()[0])).isdisjoint(next(iter(ids)))
    assert reference_study(study).canary.mode == "repeat"


def test_workers_split_the_references_of_a_recipe(tmp_path, monkeypatch):
    """A reference another worker is training (its lock held) is skipped, the others are trained, then this
    worker waits for it instead of training it twice."""
    import fcntl
    import os
    import threading

    from memlens.attacks import references as refs_module

    study = make_study(tmp_path / "study", mia={"references": 3, "attacks": ["lira"]})
    layout = StudyLayout(study.out_dir)
    cell = study.cells()[0]
    ids = reference_ids(study, cell)
    trained_here = []

    def fake_train(study, cell, k, data, layout, tokenizer=None, progress=None):
        trained_here.append(k)
        mark_done(ids[k])

    data = load_study_data(study.data)

    def mark_done(ref_id):
        folder = layout.references.run_dir(ref_id)
        folder.mkdir(parents=True, exist_ok=True)
        ReferenceRecord(run_id=ref_id, index=0, seed=0, unit="record", n_in=1, n_population=2,
                        population_hash=refs_module.population_hash(data),
                        identity=refs_module.reference_identity(study, cell, data, ids.index(ref_id))
                        ).save(folder / RunFile.REFERENCE)

    monkeypatch.setattr(refs_module, "train_reference", fake_train)
    lock = layout.references.lock_file(ids[1])
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another worker is training reference 1

    def other_worker():
        mark_done(ids[1])
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    timer = threading.Timer(1.0, other_worker)
    timer.start()
    done = train_references(study, [cell, cell], lambda c: data, layout, wait_s=0.05)
    timer.join()
    assert trained_here == [0, 2] and done == [ids[0], ids[2]]
    assert all(refs_module.is_trained(layout, r) for r in ids)


# ------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """Two cells of one recipe (a secret inserted once or 16 times), 3 references (the usage share needs 3), random
    record-level design with document groups (the inserted secret has none)."""
    study = make_study(
        tmp_path_factory.mktemp("refs") / "study",
        data={"subset": 24, "membership": "random", "group": r"^(\d+)_", "membership_unit": "record"},
        grid={"canary_copies": [1, 16]},
        canary={"mode": "insert"},
        train={"epochs": 2, "learning_rate": 1e-2, "batch_size": 16},
        mia={"references": 3, "bootstrap": 0, "bag_of_words_baseline": False,
             "attacks": ["loss", "ref_ratio", *REFERENCE_ATTACKS]},
        extraction={"enabled": False},
    )
    summary = run_study(study, show_progress=False, report=False)
    assert summary.ok, [o.error for o in summary.failed]
    return study, StudyLayout(study.out_dir)


def test_references_are_trained_once_for_the_cells_of_a_recipe(shared):
    study, layout = shared
    folders = layout.references.finished_runs()
    assert len(folders) == 3
    cells = study.cells()
    assert all(reference_ids(study, c) == folders for c in cells)
    stage = ReferencesStage()
    assert all(stage.done(StudyContext(study), c.run_id(study)) for c in cells)
    population = load_study_data(study.data, "random")
    for k, ref_id in enumerate(folders):
        record = ReferenceRecord.load(layout.references.run_file(ref_id, RunFile.REFERENCE))
        trained = pd.read_parquet(layout.references.run_file(ref_id, RunFile.MEMBERS))
        assert record.index == k and record.seed == REF_SEED + k and record.unit == "record"
        assert (record.n_population == len(population.members) + len(population.non_members)
                > record.n_in == len(trained))
        assert "canary" not in set(trained.sample_id)  # the inserted secret is in no reference
        assert record.population_hash == population_hash(population)  # its identity holds the records' contents
    other = StudyData(members=population.members.iloc[1:], non_members=population.non_members, utility=None)
    with pytest.raises(RuntimeError, match="was trained on other records"):
        load_references(study, cells[0], layout, other)  # never read for other records
    refs = load_references(study, cells[0], layout, population)
    both = in_matrix(refs, population.members.text.tolist() + population.non_members.text.tolist())
    assert 0.2 < both.mean() < 0.8  # about half of the records are IN for each reference
    timings = pd.read_json(layout.run_file(cells[0].run_id(study), RunFile.TIMINGS))
    assert "references" in timings


def test_every_cell_gets_a_usage_share_by_document_with_the_secret_its_own_document(shared):
    """The dataset-level share of a study with 3 or more references and document groups, the inserted secret (a
    member without a group) counted as a document of its own (a null group once crashed the share's counts)."""
    study, layout = shared
    results = read_results(layout)
    shares = results[(results.stage == DATASET_STAGE) & (results.attack == SHARE_ATTACK)]
    assert sorted(shares.run_id) == sorted(c.run_id(study) for c in study.cells())
    assert (shares.fraction.notna() | shares.note.notna()).all()  # a share, or the reason there is none
    for cell in study.cells():
        members = with_groups(read_members(layout.run_dir(cell.run_id(study))), load_study_data(study.data, "random"))
        assert members.group.map(lambda g: isinstance(g, str)).all()
        secret = members[members.is_canary]
        assert secret.group.tolist() == [f"canary:{s}" for s in secret.sample_id]


def test_the_secret_repeated_in_the_target_tops_the_reference_attacks(shared):
    study, layout = shared
    results = read_results(layout)
    repeated = next(c.run_id(study) for c in study.cells() if c.canary_copies == 16)
    rows = results[(results.run_id == repeated) & (results.stage == "mia")].set_index("attack")
    scores = pd.read_parquet(layout.run_file(repeated, RunFile.MIA_SCORES))
    canary = scores[scores.is_canary]
    assert len(canary) == 1
    for attack in REFERENCE_ATTACKS:
        # RMIA's top non-member beats every other one: with gamma 1 it ties the canary at 1.0
        assert (scores[attack][~scores.is_member] <= canary[attack].iloc[0]).all(), attack
        assert canary[attack].iloc[0] == scores[attack].max(), attack
        assert np.isfinite(rows.loc[attack, "auc"]) and {"tpr_at_1pct_fpr", "tpr_at_10pct_fpr"} <= set(rows.columns)


def test_references_are_scored_once_and_retrained_when_the_recipe_changes(shared, monkeypatch):
    study, layout = shared
    ref_dir = layout.references.run_dir(layout.references.finished_runs()[0])
    assert len(list(ref_dir.glob("ref-scores-*.parquet"))) == 1  # two cells, one scoring pass per reference

    # rank 4 (and one step, to keep the test short): a new recipe, so new references
    changed = study.model_copy(update={"grid": study.grid.model_copy(update={"rank": [4]}),
                                       "train": study.train.model_copy(update={"max_steps": 1})})
    cell = changed.cells()[0]
    trained = train_references(changed, [cell], lambda c: load_study_data(changed.data, c.membership), layout)
    assert trained == reference_ids(changed, cell)
    assert len(layout.references.finished_runs()) == 2 * study.mia.references  # both recipes' references
    assert train_references(changed, [cell], lambda c: load_study_data(changed.data, c.membership), layout) == []


def test_force_references_removes_them_and_the_membership_results(shared):
    study, layout = shared
    run_ids = [c.run_id(study) for c in study.cells()]
    ctx = StudyContext(study)
    get_stage("references").invalidate(ctx, run_ids)
    stage = ReferencesStage()
    assert not any(stage.done(ctx, r) for r in run_ids)
    assert not any(get_stage("mia").done(ctx, r) for r in run_ids)
    assert set(reference_ids(study, study.cells()[0])).isdisjoint(layout.references.finished_runs())
