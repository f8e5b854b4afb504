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
    windows: tuple[int, ...] = Field(WBC_WINDOWS, description="W: the window sizes (tokens); each is clipped to the "
                                     "record's length and the score is the mean over W.")

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


@register("wbc", needs={"ref"}, settings=WbcSettings,
          description="WBC (Chen et al. 2026): for each window size w in W (`windows`, clipped to the record's length), "
          "the share of the record's windows of w tokens where the base model's loss sum exceeds the fine-tuned "
          "model's; the mean over W.")
def wbc(x: AttackInputs, s: WbcSettings) -> np.ndarray:
    """WBC, Window-Based Comparison (Chen, Du, Zhang, Kundu, Fleming, Ribeiro & Li 2026, arXiv:2601.02751,
    Sections 4.1.3-4.1.4), per record of n scored tokens:

        Delta_t = loss_base(x_t) - loss_ft(x_t) = log p_ft(x_t) - log p_base(x_t)
        S_i(w)  = sum over t = i .. i + w - 1 of Delta_t                        (a window's loss difference)
        T(w)    = #{i : S_i(w) > 0} / (n - w + 1)                                (the share of windows voting member)
        score   = mean over w in W of T(min(w, n))                               (sign votes over every size)

    W is the `windows` setting (the issue's default set), each w clipped to the record's length as the issue
    states it, so a record shorter than a window size votes once with its whole length for that size (LeakPro's
    port instead skips the sizes that do not fit and falls back to one whole-record window when none does). A
    tie (a window sum exactly 0) is not a vote for membership. NaN for a record without a scored token."""
    delta, ft = _token_deltas(x), x.ft
    out = np.full(len(ft), np.nan)
    for i in range(len(ft)):
        d = delta[ft.offsets[i]:ft.offsets[i + 1]]
        if len(d):
            out[i] = np.mean([window_share(d, min(w, len(d))) for w in s.windows])
    return out


__all__ = ["WBC_WINDOWS", "WbcSettings", "ez_mia", "wbc", "window_share"]
