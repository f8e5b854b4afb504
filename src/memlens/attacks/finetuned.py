"""Attacks built for fine-tuned models: EZ-MIA and WBC. Both compare, token by token, the fine-tuned model's
log-probability of each true token with the base model's (the reference, scored once per study), so they read
the one scoring pass and need no training. Registered in :mod:`memlens.attacks.registry`; higher = member.

Written from the equations as memlens' issue 26 states them, read beside the EZ-MIA authors' scoring function
(as forked in SirbayC/ez-mia and ported in LeakPro) and LeakPro's EZ-MIA and WBC attacks (aidotse/LeakPro pull
requests #454 and #461). Only the papers' abstracts were available here, not their full text: the sections cited
are those LeakPro's port cites (equation numbers are not), and where an implementation departs from the stated
equation the docstring says which one memlens follows and why.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from memlens.attacks.registry import AttackInputs, AttackSettings, register
from memlens.config import ConfigError


def _token_deltas(x: AttackInputs) -> np.ndarray:
    """(scored tokens,) d_t = log p_ft(x_t | x_<t) - log p_base(x_t | x_<t): the fine-tuned model's log-probability
    of each true token over the base model's, in float64 (the two statistics cover the same tokens)."""
    ft, ref = x.ft, x.ref
    if not np.array_equal(ft.offsets, ref.offsets):
        raise RuntimeError("the fine-tuned and the base model's statistics do not cover the same tokens")
    return ft.logprob.astype(np.float64) - ref.logprob.astype(np.float64)


@register("ez_mia", needs={"ref"},
          description="EZ-MIA (Ilic et al. 2026): over the error positions E (the fine-tuned model's top-1 token is "
          "not the true one), P = sum of the positive d_t and N = sum of |d_t| of the negative ones, d_t = log "
          "p_ft(x_t) - log p_base(x_t); the paper's EZ = P / N, reported as P / (P + N) = EZ / (1 + EZ) (same "
          "ranking; N = 0 < P, EZ = +inf, gives 1; no shift at all, 0/0, gives 1/2).")
def ez_mia(x: AttackInputs, s: AttackSettings) -> np.ndarray:
    """EZ-MIA, the Error Zone score (Ilic, Stanojevic & Cvejoski 2026, arXiv:2601.12104, Sections 3.3-3.4), per
    record:

        d_t  = log p_ft(x_t | x_<t) - log p_base(x_t | x_<t)          (the shift fine-tuning gave token t)
        E    = {t : argmax_v p_ft(v | x_<t) != x_t}                    (error positions of the fine-tuned model)
        P    = sum over t in E of max(d_t, 0)                         (probability moved up at the errors)
        N    = sum over t in E of max(-d_t, 0)                        (... moved down)
        EZ   = P / N                                                  (higher = member)

    Returned as P / (P + N) = EZ / (1 + EZ), an increasing function of EZ on [0, +inf]: every ROC point, TPR at
    any FPR and audit guess is the one EZ gives, and the two degenerate cases get finite values (the metrics
    refuse infinities):

    - N = 0 < P (fine-tuning raised every error token): EZ = +inf, the strongest member evidence the statistic can
      show, so the top of the scale, 1. The authors' released code returns 0 there (and below 2 error tokens),
      ranking that evidence below every non-member; LeakPro's port ranks it first, citing the paper's appendix.
      memlens follows the limit of P / N, which is also LeakPro's reading.
    - P = N = 0 (no error position: the fine-tuned model's top-1 token is right everywhere; or no shift at all):
      0/0, no directional imbalance either way, so the balance point EZ = 1, i.e. 1/2. (A record the model
      predicts perfectly is often one the base model predicts too; the statistic has no evidence on it, and
      neither the top nor the bottom of the scale would say so.)

    A record without a scored token is NaN, as for the other attacks. E is the fine-tuned model's top-1 flags of
    the same scoring pass (`SequenceStats.is_top1`; a tie for the highest logit counts as top-1)."""
    ft = x.ft
    if ft.is_top1 is None:
        raise ConfigError("mia.attacks: 'ez_mia' needs whether each true token is the fine-tuned model's top-1 "
                          "prediction, which these statistics did not record")
    delta = _token_deltas(x)
    error = ~ft.is_top1.astype(bool)
    up = ft.segment_sums(np.where(error, np.maximum(delta, 0.0), 0.0))     # P
    down = ft.segment_sums(np.where(error, np.maximum(-delta, 0.0), 0.0))  # N
    total = up + down
    with np.errstate(invalid="ignore", divide="ignore"):
        score = np.where(total > 0, up / np.where(total > 0, total, 1.0), 0.5)
    return np.where(ft.n_tokens > 0, score, np.nan)


# The default window sizes (it names them; LeakPro's port derives a geometric grid from the paper's
# w_min = 2, w_max = 40, |W| = 10 instead: 2, 3, 4, 5, 8, 11, 15, 21, 29, 40).
WBC_WINDOWS = (2, 3, 4, 6, 9, 13, 18, 25, 32, 40)


class WbcSettings(AttackSettings):
    windows: tuple[int, ...] = Field(WBC_WINDOWS, description="W: the window sizes (tokens); the score is the mean "
                                     "over W of the share of windows voting member.")
    short_records: Literal["skip", "clip"] = Field(
        "skip", description="A window size longer than the record: `skip` it (the mean over the sizes that fit; one "
        "whole-record window when none does: LeakPro's port; the stronger on memlens' runs), or `clip` it to the "
        "record's length (the record votes with its whole length for that size).")

    @field_validator("windows")
    @classmethod
    def _positive_windows(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(w < 1 for w in value):
            raise ValueError(f"one or more window sizes >= 1, e.g. {list(WBC_WINDOWS)}; got {list(value)}")
        return value


def window_share(deltas: np.ndarray, w: int) -> float:
    """The share of the n - w + 1 windows of w consecutive tokens whose sum of `deltas` (n,) is > 0, i.e. where the
    base model's loss sum exceeds the fine-tuned model's (the sum of d_t over a window is that difference)."""
    sums = np.convolve(deltas, np.ones(w), mode="valid")  # (n - w + 1,): window i covers tokens i .. i + w - 1
    return float((sums > 0).mean())


def window_sizes(windows: tuple[int, ...], n: int, short_records: str) -> list[int]:
    """The window sizes a record of n >= 1 scored tokens votes with: W clipped to n (`clip`), or the sizes of W that
    fit, n alone when none does (`skip`)."""
    if short_records == "clip":
        return [min(w, n) for w in windows]
    return [w for w in windows if w <= n] or [n]


@register("wbc", needs={"ref"}, settings=WbcSettings,
          description="WBC (Chen et al. 2026): for each window size w in W (`windows`; sizes longer than the record "
          "clipped to it or skipped, `short_records`), the share of the record's windows of w tokens where the base "
          "model's loss sum exceeds the fine-tuned model's; the mean over the sizes.")
def wbc(x: AttackInputs, s: WbcSettings) -> np.ndarray:
    """WBC, Window-Based Comparison (Chen, Du, Zhang, Kundu, Fleming, Ribeiro & Li 2026, arXiv:2601.02751,
    Sections 4.1.3-4.1.4), per record of n scored tokens:

        Delta_t = loss_base(x_t) - loss_ft(x_t) = log p_ft(x_t) - log p_base(x_t)
        S_i(w)  = sum over t = i .. i + w - 1 of Delta_t                        (a window's loss difference)
        T(w)    = #{i : S_i(w) > 0} / (n - w + 1)                                (the share of windows voting member)
        score   = mean over w in W_n of T(w)                                     (sign votes over every size)

    W is the `windows` setting (the issue's default set). The paper evaluates records of 512 tokens or more and
    leaves a window longer than the record undefined; `short_records` says what W_n is then:

    - `skip` (default): W_n = {w in W : w <= n}, LeakPro's port (aidotse/LeakPro, `wbc_scores`): the sizes that
      do not fit are left out of the mean; a record shorter than every size is scored with one whole-record
      window, T(n).
    - `clip`: W_n = {min(w, n) : w in W}, as memlens' issue 26 states it: a record shorter than a window size
      votes once with its whole length for that size, so its whole-length vote weighs as many sizes as do not
      fit (PHEE records have a median of 31 tokens; 3 in 4 are shorter than the largest size, 40).

    `skip` is the default because it was the stronger on every run measured (issue 32, both conventions from the
    same scores; benchmarks/README.md): AUC 0.881 against 0.858 and TPR at 1% FPR 0.34 against 0.32 on an
    adapter trained with plain PEFT and audited; on memlens' own runs (llama-tiny, PHEE) AUC 0.874 against 0.862
    (random design, every matrix rank 16, 4 epochs, 3 seeds; TPR at 10% FPR 0.549 against 0.469), 0.760 against
    0.749 (the same, 2 epochs) and 0.536 against 0.534 (studies/phee-llama-tiny-cpu.yaml's recipe, 4 cells): an
    AUC at or above `clip`'s in each of the 10 runs. TPR at 1% FPR tied there (0 on the random-design runs: 7-13
    non-members score 1, every window positive, under both).

    A tie (a window sum exactly 0) is not a vote for membership. NaN for a record without a scored token."""
    delta, ft = _token_deltas(x), x.ft
    out = np.full(len(ft), np.nan)
    for i in range(len(ft)):
        d = delta[ft.offsets[i]:ft.offsets[i + 1]]
        if len(d):
            out[i] = np.mean([window_share(d, w) for w in window_sizes(s.windows, len(d), s.short_records)])
    return out


__all__ = ["WBC_WINDOWS", "WbcSettings", "ez_mia", "wbc", "window_share", "window_sizes"]
