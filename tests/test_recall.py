"""ReCaLL and Con-ReCall: the prefixes (drawn from the study's own records), the log-likelihood of a record after
a prefix over the record's tokens only, the scores from synthetic statistics, and one real run on llama-tiny."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from memlens.attacks.mia import Scorer, result_rows, run_mia
from memlens.attacks.recall import draw_prefix, prefix_text, tail_mean_logprob, with_prefix
from memlens.attacks.registry import ATTACKS, AttackInputs, check_attack_inputs, configure_attacks, run_attacks
from memlens.config import ConfigError, MIAConfig
from memlens.context import StudyContext
from memlens.data import load_study_data
from memlens.score import SequenceStats
from memlens.store import RunFile, StudyLayout, read_results
from memlens.train import finetune_cell

from .conftest import make_study


def _stats(per_sequence: list[list[float]]) -> SequenceStats:
    offsets = np.r_[0, np.cumsum([len(s) for s in per_sequence])].astype(np.int64)
    flat = np.array([v for s in per_sequence for v in s], dtype=np.float32)
    n = len(flat)
    return SequenceStats(offsets, np.zeros(n, np.int64), flat, np.zeros(n, np.float32), np.ones(n, np.float32))


def test_tail_mean_and_prefixed_ids():
    stats = _stats([[-9.0, -9.0, -1.0, -3.0], [-5.0, -2.0]])
    assert tail_mean_logprob(stats, np.array([2, 1])).tolist() == [-2.0, -2.0]
    with pytest.raises(ValueError):
        tail_mean_logprob(stats, np.array([5, 1]))
    # the record's own BOS (0) is dropped after the prefix; a tokenizer without BOS keeps every token
    assert with_prefix([0, 7, 8], [[0, 4, 5], [0, 6]], bos_token_id=0) == [[0, 7, 8, 4, 5], [0, 7, 8, 6]]
    assert with_prefix([7, 8], [[4, 5]], bos_token_id=None) == [[7, 8, 4, 5]]


def test_prefix_draws_are_seeded_skip_the_canary_and_ignore_order():
    records = pd.DataFrame({"sample_id": [f"s{i}" for i in range(20)], "text": [f"text {i}" for i in range(20)],
                            "is_canary": [i == 3 for i in range(20)]})
    a = draw_prefix(records, 5)
    b = draw_prefix(records.sample(frac=1, random_state=1), 5)
    assert a.sample_id.tolist() == b.sample_id.tolist() and len(a) == 5 and "s3" not in set(a.sample_id)
    assert draw_prefix(records, 5, salt=1).sample_id.tolist() != a.sample_id.tolist()
    assert len(draw_prefix(records.head(4), 5)) == 3  # fewer records than shots: all but the canary
    assert prefix_text(a.head(2)) == "text " + a.sample_id[0][1:] + "\ntext " + a.sample_id[1][1:] + "\n"


def test_recall_and_con_recall_scores():
    ll = np.array([-2.0, -3.0, -4.0])            # LL(x)
    non = np.array([-2.5, -3.3, -4.0])           # LL(x | P_non)
    mem = np.array([-1.9, -3.1, -3.0])           # LL(x | P_mem)
    inputs = AttackInputs(texts=["a", "b", "c"], ft=_stats([[v] for v in ll]), ll_nonmember_prefix={5: non},
                          ll_member_prefix={5: mem}, in_member_prefix={5: np.array([False, False, True])})
    scores = run_attacks(["recall", "con_recall"], inputs)  # 5 shots and gamma 0.5: their defaults
    assert scores["recall"].tolist() == pytest.approx([-2.5 / -2.0, -3.3 / -3.0, 1.0])
    assert scores["con_recall"][:2].tolist() == pytest.approx([(-2.5 + 0.95) / -2.0, (-3.3 + 1.55) / -3.0])
    assert np.isnan(scores["con_recall"][2])  # in its own member prefix: unscored
    assert ATTACKS["con_recall"].partial and not ATTACKS["recall"].partial


def test_partial_scores_are_left_out_of_the_metrics_with_a_note():
    rng = np.random.default_rng(0)
    n = 60
    scores = pd.DataFrame({"is_member": np.arange(n) < 30, "is_canary": False, "con_recall": rng.normal(size=n),
                           "nll_ft": rng.uniform(2, 3, n), "nll_ref": rng.uniform(3, 4, n)})
    scores.loc[[0, 1, 2], "con_recall"] = np.nan
    rows = result_rows(scores, {}, configure_attacks(["con_recall"]), MIAConfig(bootstrap=0), {"run_id": "r"}, None)
    row = rows[rows.attack == "con_recall"].iloc[0]
    assert row.n_members == 27 and row.n_non_members == 30 and "3 member(s) left unscored" in row.note
    assert not row.model_unchanged and "base model" not in row.note


def test_checks():
    with pytest.raises(ConfigError, match=r"data\.utility_split"):
        check_attack_inputs(["recall"], None, utility=False)
    with pytest.raises(ConfigError, match=r"dp\.audit_attack: 'con_recall'"):
        check_attack_inputs(["con_recall"], None, "con_recall")
    assert [a.name for a in check_attack_inputs(["recall", "con_recall"], None, "recall")] == ["recall", "con_recall"]


@pytest.fixture(scope="module")
def recall_run(tmp_path_factory):
    study = make_study(tmp_path_factory.mktemp("recall") / "study", data={"subset": 24},
                       train={"max_steps": 3, "learning_rate": 1e-2},
                       mia={"attacks": ["loss", {"type": "recall", "params": {"shots": 3}, "name": "recall"},
                                        {"type": "con_recall", "params": {"shots": 3}, "name": "con_recall"}],
                            "bootstrap": 0,
                            "bag_of_words_baseline": False},
                       dp={"audit_attack": "loss"})
    layout = StudyLayout(study.out_dir)
    data = load_study_data(study.data)
    run_dir = finetune_cell(study, study.cells()[0], data, layout)
    run_mia(StudyContext(study))
    return study, layout, run_dir.name, data


def test_real_run_scores_every_record_but_the_member_prefix(recall_run):
    _, layout, run_id, _ = recall_run
    scores = pd.read_parquet(layout.run_file(run_id, RunFile.MIA_SCORES))
    assert scores.recall.notna().all()
    unscored = scores[scores.con_recall.isna()]
    assert len(unscored) == 3 and unscored.is_member.all() and not unscored.is_canary.any()
    rows = read_results(layout).set_index("attack")
    assert rows.loc["con_recall", "n_members"] == rows.loc["recall", "n_members"] - 3
    assert np.isfinite(rows.loc[["recall", "con_recall"], "auc"]).all()


def test_conditional_likelihood_counts_the_record_tokens_only(recall_run):
    """LL(x | P) from the batched engine equals a plain forward pass over prefix + record, averaged over the
    record's tokens; the non-member prefix is 3 records of the utility split, the same for every run."""
    study, layout, run_id, data = recall_run
    scores = pd.read_parquet(layout.run_file(run_id, RunFile.MIA_SCORES))
    scorer = Scorer(study.model, study.mia, None)
    scorer.bank.add(run_id, layout.run_dir(run_id))
    prefix = draw_prefix(data.utility, 3, salt=0)
    assert not set(prefix.sample_id) & (set(data.members.sample_id) | set(data.non_members.sample_id))
    prefix_ids = scorer.tokenize([prefix_text(prefix)])[0]
    for i in (0, len(scores) - 1):
        record_ids = scorer.tokenize([data.members.text.iloc[0] if i == 0 else data.non_members.text.iloc[-1]])[0]
        ids = torch.tensor([prefix_ids + record_ids[1:]])
        with scorer.bank.use(run_id) as model, torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float()
        logprob = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]
        conditional = logprob[-(len(record_ids) - 1):].mean().item()
        loss = scores.loss.iloc[i]  # minus the mean NLL: LL(x)
        assert scores.recall.iloc[i] == pytest.approx(conditional / loss, rel=1e-4)
