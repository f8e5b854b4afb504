"""EZ-MIA and WBC against hand computations of their equations (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from memlens.attacks.finetuned import WBC_WINDOWS, WbcSettings
from memlens.attacks.registry import AttackInputs, configure, run_attacks
from memlens.config import ConfigError
from memlens.score import SequenceStats


def _stats(seqs: list[list[float]], top1: list[list[bool]] | None = None) -> SequenceStats:
    """Statistics of sequences with these per-token log-probabilities (and top-1 flags)."""
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64)
    flat = np.array([v for s in seqs for v in s], dtype=np.float32)
    n = len(flat)
    flags = None if top1 is None else np.array([f for t in top1 for f in t], dtype=bool)
    return SequenceStats(offsets, np.zeros(n, np.int64), flat, np.zeros(n, np.float32), np.zeros(n, np.float32), flags)


def _inputs(ft: SequenceStats, ref: SequenceStats) -> AttackInputs:
    return AttackInputs(texts=[""] * len(ft), ft=ft, ref=ref)


def test_ez_mia_by_hand_including_the_empty_denominator():
    ft = _stats([[-1, -2, -0.5, -3], [-1, -1], [-0.1, -0.2], [], [-1, -1]],
                [[False, False, True, False], [False, False], [True, True], [], [False, False]])
    ref = _stats([[-2, -1, -0.5, -4], [-2, -3], [-0.3, -0.1], [], [-1, -1]])
    scores = run_attacks(["ez_mia"], _inputs(ft, ref))["ez_mia"]
    # record 0: d = [1, -1, 0, 1] over E = {0, 1, 3} (token 2 is top-1): P = 2, N = 1, EZ = 2 -> 2 / (1 + 2)
    assert scores[0] == pytest.approx(2 / 3)
    # record 1: d = [1, 2], both errors: P = 3, N = 0, EZ = +inf -> the top of the scale
    assert scores[1] == 1.0
    # record 2: no error position (every token top-1; its d = [0.2, -0.1] is ignored): 0/0 -> EZ = 1 -> 1/2
    assert scores[2] == 0.5
    assert np.isnan(scores[3])  # no scored token
    assert scores[4] == 0.5  # errors, but fine-tuning moved nothing: P = N = 0
    # the +inf record ranks above every finite EZ, as P / N would rank it
    assert scores[1] > scores[0] > scores[2]


def test_ez_mia_ranks_records_as_the_papers_ratio():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 40, 200)  # long enough for both signs among the errors
    ft_lp = [list(rng.normal(-2, 1, n)) for n in lengths]
    ref_lp = [list(np.array(f) + rng.normal(-0.1, 0.5, len(f))) for f in ft_lp]
    top1 = [list(rng.random(n) < 0.3) for n in lengths]
    scores = run_attacks(["ez_mia"], _inputs(_stats(ft_lp, top1), _stats(ref_lp)))["ez_mia"]
    for i in range(len(lengths)):  # the paper's ratio, one record at a time
        d = np.float32(ft_lp[i]).astype(float) - np.float32(ref_lp[i]).astype(float)
        errors = d[~np.array(top1[i])]
        ez = errors[errors > 0].sum() / -errors[errors < 0].sum()
        assert scores[i] == pytest.approx(ez / (1 + ez), rel=1e-9)


def test_ez_mia_needs_the_top1_flags():
    ft, ref = _stats([[-1.0, -2.0]]), _stats([[-1.5, -2.5]])
    with pytest.raises(ConfigError, match="top-1"):
        run_attacks(["ez_mia"], _inputs(ft, ref))


def test_wbc_by_hand_clip():
    # short_records: clip. W = (2, 3, 10), each size longer than the record clipped to its length.
    # record 0: Delta = [1, -2, 0.5, 0.5]; sizes 2, 3, min(10, 4) = 4
    #   w=2: window sums [-1, -1.5, 1] -> 1/3 vote member; w=3: [-0.5, -1] -> 0; w=4: [0] -> a tie is no vote -> 0
    # record 1: one token, Delta = 0.25: every size clips to 1, one window, > 0 -> 1
    # record 2: Delta = [1, 1, -3]; sizes 2, 3, min(10, 3) = 3
    #   w=2: [2, -2] -> 1/2; w=3: [-1] -> 0; the clipped 10 votes as w=3 again -> 0
    ft = _stats([[-1, -3, -1, -1], [-1], [-1, -1, -4]])
    ref = _stats([[-2, -1, -1.5, -1.5], [-1.25], [-2, -2, -1]])
    attack = configure({"type": "wbc", "params": {"windows": [2, 3, 10], "short_records": "clip"}})
    scores = run_attacks([attack], _inputs(ft, ref))[attack.name]
    assert scores[0] == pytest.approx((1 / 3 + 0 + 0) / 3)
    assert scores[1] == 1.0
    assert scores[2] == pytest.approx((1 / 2 + 0 + 0) / 3)


def test_wbc_by_hand_skip():
    # short_records: skip (LeakPro's port). The same records and W = (2, 3, 10): sizes longer than the record are
    # left out of the mean; a record shorter than every size votes with one whole-record window.
    # record 0 (4 tokens): sizes 2, 3 -> (1/3 + 0) / 2
    # record 1 (1 token): no size fits -> one window of 1 token, 0.25 > 0 -> 1
    # record 2 (3 tokens): sizes 2, 3 -> (1/2 + 0) / 2
    # record 3 (2 tokens), W = (2, 3, 10) -> size 2 only: Delta = [0.5, -1], one window, -0.5 -> 0
    ft = _stats([[-1, -3, -1, -1], [-1], [-1, -1, -4], [-1, -2]])
    ref = _stats([[-2, -1, -1.5, -1.5], [-1.25], [-2, -2, -1], [-1.5, -1]])
    attack = configure({"type": "wbc", "params": {"windows": [2, 3, 10], "short_records": "skip"}})
    scores = run_attacks([attack], _inputs(ft, ref))[attack.name]
    assert scores[0] == pytest.approx((1 / 3 + 0) / 2)
    assert scores[1] == 1.0
    assert scores[2] == pytest.approx((1 / 2 + 0) / 2)
    assert scores[3] == 0.0
    # a record shorter than every size: W = (3, 10) and Delta = [1, -0.25] -> one window of 2 tokens, 0.75 > 0 -> 1
    attack = configure({"type": "wbc", "params": {"windows": [3, 10], "short_records": "skip"}})
    assert run_attacks([attack], _inputs(_stats([[-1, -1.25]]), _stats([[-2, -1]])))[attack.name][0] == 1.0
    # where the conventions differ: record 2 (Delta = [1, 1, -3]) with W = (2, 10): skip keeps w=2 alone, 1/2;
    # clip also votes with the 10 clipped to 3 (one window, -1 -> 0): (1/2 + 0) / 2
    short = _inputs(_stats([[-1, -1, -4]]), _stats([[-2, -2, -1]]))
    skip, clip = (configure({"type": "wbc", "params": {"windows": [2, 10], "short_records": mode}, "name": mode})
                  for mode in ("skip", "clip"))
    scores = run_attacks([skip, clip], short)
    assert scores["skip"][0] == pytest.approx(1 / 2) and scores["clip"][0] == pytest.approx((1 / 2 + 0) / 2)


@pytest.mark.parametrize("short_records", ["clip", "skip"])
def test_wbc_default_windows_match_a_loop_over_every_window(short_records):
    rng = np.random.default_rng(1)
    lengths = [1, 5, 17, 60]
    ft_lp = [list(rng.normal(-2, 1, n)) for n in lengths]
    ref_lp = [list(rng.normal(-2, 1, n)) for n in lengths]
    attack = configure({"type": "wbc", "params": {"short_records": short_records}})
    scores = run_attacks([attack], _inputs(_stats(ft_lp), _stats(ref_lp)))[attack.name]
    for i, n in enumerate(lengths):
        d = np.float32(ft_lp[i]).astype(float) - np.float32(ref_lp[i]).astype(float)
        if short_records == "clip":
            sizes = [min(w, n) for w in WBC_WINDOWS]
        else:
            sizes = [w for w in WBC_WINDOWS if w <= n] or [n]
        shares = []
        for w in sizes:
            votes = [d[j:j + w].sum() > 0 for j in range(n - w + 1)]
            shares.append(sum(votes) / len(votes))
        assert scores[i] == pytest.approx(np.mean(shares))


def test_wbc_settings():
    assert configure({"type": "wbc", "params": {"windows": [2, 4]}}).settings.windows == (2, 4)
    assert configure("wbc").settings.short_records == WbcSettings().short_records
    with pytest.raises(ConfigError, match="windows"):
        configure({"type": "wbc", "params": {"windows": [0, 2]}})
    with pytest.raises(ConfigError, match="short_records"):
        configure({"type": "wbc", "params": {"short_records": "pad"}})
    with pytest.raises(ConfigError, match=r"has 2 \(\['windows', 'short_records'\]\)"):
        configure("wbc@[2, 4]")  # two settings now: `name@value` no longer says which


def _moments_stats(logprob, mu, sigma2, offsets) -> SequenceStats:
    n = len(logprob)
    return SequenceStats(np.array(offsets), np.zeros(n, np.int64), np.array(logprob, np.float32),
                         np.array(mu, np.float32), np.array(sigma2, np.float32))


def test_min_k_pp_calibrated_by_the_base_model_by_hand():
    # record 0: fine-tuned z = (logp - mu) / sigma = [1, 0, -0.5, -1], base z = [-1, -0.5, -2, -1];
    # record 1: fine-tuned z = [0, 1], base z = [1, -1]
    ft = _moments_stats([-1, -2, -3, -4, -1, -1], [-2, -2, -2, -2, -1, -3], [1, 1, 4, 4, 1, 4], [0, 4, 6])
    ref = _moments_stats([-2, -2, -6, -3, -1, -5], [-1, -1, -2, -2, -2, -1], [1, 4, 4, 1, 1, 16], [0, 4, 6])
    inputs = AttackInputs(texts=["a", "b"], ft=ft, ref=ref)
    scores = run_attacks(["min_k_pp_ref@0.5", "min_k_pp_ref"], inputs)
    # k = 50%: record 0 mean(-1, -0.5) - mean(-2, -1) = -0.75 + 1.5; record 1 (k = 1 token): 0 - (-1)
    np.testing.assert_allclose(scores["min_k_pp_ref@0.5"], [0.75, 1.0])
    # k = 20% (the default): one token each: -1 - (-2), 0 - (-1)
    np.testing.assert_allclose(scores["min_k_pp_ref"], [1.0, 1.0])
    # the plain attack is the first term
    np.testing.assert_allclose(run_attacks(["min_k_pp@0.5"], inputs)["min_k_pp@0.5"], [-0.75, 0.0])
    # a base model scored without its moments is refused, never read as numbers
    bare = _moments_stats([-2, -2, -6, -3, -1, -5], [np.nan] * 6, [np.nan] * 6, [0, 4, 6])
    with pytest.raises(ConfigError, match=r"'min_k_pp_ref' needs \[\"the base model's mean and variance of log p"):
        run_attacks(["min_k_pp_ref"], AttackInputs(texts=["a", "b"], ft=ft, ref=bare))
    with pytest.raises(ValueError, match="Min-K%\\+\\+ needs the moments of log p under the base model"):
        configure("min_k_pp_ref").score(AttackInputs(texts=["a", "b"], ft=ft, ref=bare))
