"""Empirical privacy: lower bounds on epsilon from one training run, by two analyses of the same guesses.

- Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1) Training Run", NeurIPS 2023,
  arXiv:2305.08846 (`eps_lower`): the (eps, delta)-DP analysis below.
- Mahloujifar, Melis & Chaudhuri 2024, "Auditing f-Differential Privacy in One Run", ICML 2025,
  arXiv:2410.22235 (`eps_lower_gdp`): the f-DP analysis of the same guesses with the Gaussian trade-off
  curve (mu-GDP, Dong, Roth & Su 2019), then mu converted to eps at the same delta (:func:`gdp_lower_bound`).
  It tests the hypothesis "training is mu-GDP": exact for the Gaussian mechanism, and DP-SGD's composition of
  many subsampled Gaussian steps is close to Gaussian (the central limit theorem of f-DP), so it is tighter than
  the (eps, delta) analysis when the guesses are good; near chance level the two are about equal (either can be
  the larger by a few thousandths).

Setting: m audited records, each included in training independently with probability 1/2. After
training the auditor scores every record (higher = more likely a member), guesses "member" for the k+
highest-scored and "non-member" for the k- lowest-scored ones, abstains on the rest, and counts the
correct guesses v among r = k+ + k- guesses. If training is (eps, delta)-DP, v is (up to a delta term)
stochastically dominated by Binomial(r, e^eps / (1 + e^eps)) (their Theorem 3.1); the lower bound is the
largest eps under which observing >= v correct guesses has probability < 1 - confidence.

Assumption (the bound is void without it): the member / non-member assignment of the audited records
is an independent fair coin flip per record, made before training. memlens' default membership
experiment (members = the `train` split, non-members = the `test` split) does NOT satisfy it, so
:func:`memlens.attacks.privacy_audit.run_privacy_audit` reports the bound only when `dp.audit_random_split` asserts it.

Hand-written because no maintained library implements these tests for PyTorch models (Google's
jax_privacy has Steinke's for JAX; Meta's PrivacyGuard has the f-DP one on a grid of 1,000 noise levels); they
are a few lines over scipy's binomial and normal distributions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import optimize, special, stats
from scipy.special import ndtr, ndtri

ASSUMPTION = ("valid only if each audited record was made a member by an independent fair coin flip before "
              "training (Steinke, Nasr & Jagielski 2023)")


def default_delta(n_records: int) -> float:
    """1 / n^1.1: below 1/n, so the guarantee does not allow leaking one whole record."""
    return 1.0 / n_records ** 1.1


def p_value_dp_audit(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Probability of >= v correct guesses out of r (m audited records) if training were (eps, delta)-DP:
    P[Binomial(r, q) >= v] + 2 m delta max_i P[v > Binomial(r, q) >= v - i] / i, with q = e^eps/(1+e^eps)
    (Theorem 3.1 of the paper)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct ({v}) <= guesses ({r}) <= audited records ({m})")
    q = special.expit(eps)
    p = stats.binom.sf(v - 1, r, q)
    if delta > 0 and v > 0:
        # pmf(v-1), pmf(v-2), ..., pmf(0): cumulative sums are P[v > B >= v - i] for i = 1..v
        tail = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))
        p += 2 * m * delta * float(np.max(tail / np.arange(1, v + 1)))
    return float(min(p, 1.0))


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, alpha: float) -> float:
    """Largest eps such that >= v correct guesses has p-value < alpha under (eps, delta)-DP (0 if none)."""
    if r == 0 or p_value_dp_audit(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    high = 1.0
    while p_value_dp_audit(m, r, v, high, delta) < alpha:
        high *= 2
        if high > 1e3:  # v == r with delta == 0 and huge r: the bound is effectively unbounded
            return math.inf
    return float(optimize.brentq(lambda e: p_value_dp_audit(m, r, v, e, delta) - alpha, 0.0, high, xtol=1e-6))


# --------------------------------------------------------------------------------------- Gaussian DP (f-DP)
def gdp_delta(eps: float, mu: float) -> float:
    """delta(eps) of mu-GDP: Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2) (Dong, Roth & Su 2019, Corollary
    2.13); the second term in log space so that a large eps does not overflow."""
    if mu <= 0:
        return 0.0
    first = stats.norm.cdf(-eps / mu + mu / 2)
    second = math.exp(eps + stats.norm.logcdf(-eps / mu - mu / 2))
    return float(max(first - second, 0.0))


def gdp_epsilon(mu: float, delta: float) -> float:
    """The smallest eps >= 0 with :func:`gdp_delta` (eps, mu) <= delta: the (eps, delta) that mu-GDP implies
    (delta(eps) decreases in eps, so a bracketing root-find)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if math.isinf(mu):
        return math.inf
    if gdp_delta(0.0, mu) <= delta:
        return 0.0
    high = 1.0
    while gdp_delta(high, mu) > delta:
        high *= 2
    return float(optimize.brentq(lambda e: gdp_delta(e, mu) - delta, 0.0, high, xtol=1e-9))


def gdp_audit_margin(mu: float, m: int, r: int, v: int, alpha: float) -> float:
    """How far v correct guesses out of r (m audited records, each in with probability 1/2) are from what mu-GDP
    allows at level alpha: > 0 rejects mu-GDP, <= 0 does not (Mahloujifar, Melis & Chaudhuri 2024, the
    recursion of their audit with abstentions, for k = 2 possible answers per record; the same recursion as
    Meta PrivacyGuard's `FDPAnalysisNode.audit_rh_with_cap`).

    With the blow-up inverse of the Gaussian trade-off curve, f^-1(x) = Phi(Phi^-1(x) - mu), and
    tau = alpha r / m, start at i = v with r_v = tau v / r and h_v = tau (r - v) / r, and for i = v-1, ..., 0:
    h_i = max(h_{i+1}, (k - 1) f^-1(r_{i+1})) and r_i = r_{i+1} + i / (r - i) (h_i - h_{i+1}).
    mu-GDP is rejected when r_0 + h_0 > r / m. Returns r_0 + h_0 - r / m."""
    tau = alpha * r / m
    r_i, h_i = tau * v / r, tau * (r - v) / r
    for i in range(v - 1, -1, -1):
        # (k - 1) f^-1(r_{i+1}) with k = 2; r only grows as i falls, and once r_i > r / m (<= 1) mu is rejected
        # whatever follows, so clipping f^-1's argument to its domain [0, 1] changes no decision
        h_next = max(h_i, float(ndtr(ndtri(min(r_i, 1.0)) - mu)))
        r_i = r_i + i / (r - i) * (h_next - h_i)
        h_i = h_next
    return r_i + h_i - r / m


def gdp_lower_bound(m: int, r: int, v: int, alpha: float) -> float:
    """mu_lower: the smallest mu that v correct guesses out of r do not reject at level alpha
    (:func:`gdp_audit_margin` <= 0); every mu below it is rejected. 0 when even mu = 0 (perfect privacy) is not
    rejected. A root-find of the margin, which falls as mu grows (PrivacyGuard steps through a grid of 1,000
    noise levels 1/mu instead, and reports its last grid point, not 0, when nothing is rejected)."""
    if r == 0 or v == 0 or gdp_audit_margin(0.0, m, r, v, alpha) <= 0:
        return 0.0
    high = 1.0
    while gdp_audit_margin(high, m, r, v, alpha) > 0:
        high *= 2
        if high > 1e3:
            return math.inf
    return float(optimize.brentq(lambda mu: gdp_audit_margin(mu, m, r, v, alpha), 0.0, high, xtol=1e-7))


def default_guesses(m: int) -> list[tuple[int, int]]:
    """(k+, k-) options tried by default: 5%, 10%, 25% and 50% of the records, half as member guesses and
    half as non-member guesses (at least one of each)."""
    options = []
    for fraction in (0.05, 0.1, 0.25, 0.5):
        k = max(1, round(fraction * m / 2))
        if (k, k) not in options and 2 * k <= m:
            options.append((k, k))
    return options


def one_run_epsilon_lower_bound(scores: Sequence[float], is_member: Sequence[bool], *, delta: float,
                                random_split: bool, confidence: float = 0.95,
                                guesses: Sequence[tuple[int, int]] | None = None, seed: int = 0) -> dict:
    """Empirical epsilon lower bounds of one training run from per-record membership scores.

    `scores`: higher means more likely a member. `guesses`: (k+, k-) options fixed before looking at the
    result; when several are given the best is reported and each is tested at level
    (1 - confidence) / len(guesses) (Bonferroni), so picking the best does not inflate the bound. Ties in
    scores are broken by a seeded random order. `random_split` must state whether the membership of the
    audited records was a fair coin flip per record (see the module docstring); the bounds are only
    reported (not NaN) when it is true. Both analyses read the same guesses of every option: `eps_lower`
    (Steinke et al.) and `eps_lower_gdp` (Mahloujifar et al.: :func:`gdp_lower_bound`, then
    :func:`gdp_epsilon` at `delta`), each the best over the options, with the option it came from.

    Returns eps_lower, k_plus, k_minus, n_guesses, n_correct, guess_accuracy, p_value (at eps = 0),
    eps_lower_gdp, mu_lower_gdp, gdp_k_plus, gdp_k_minus, gdp_n_correct, n_audited, n_members, confidence,
    delta, n_options, valid, note."""
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(is_member, dtype=bool)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError("scores and is_member must be 1-D and of the same length")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    if not 0 < confidence < 1:
        raise ValueError("confidence must be in (0, 1)")
    m = len(scores)
    options = list(guesses) if guesses is not None else default_guesses(m)
    if not options or any(kp < 0 or km < 0 or kp + km == 0 or kp + km > m for kp, km in options):
        raise ValueError(f"guesses must be (k+, k-) pairs with 0 < k+ + k- <= {m} audited records; got {options}")
    alpha = (1 - confidence) / len(options)
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(m)
    order = shuffled[np.argsort(-scores[shuffled], kind="stable")]  # highest score first, random tie order
    best = gdp = None
    for k_plus, k_minus in options:
        correct = int(labels[order[:k_plus]].sum()) + int((~labels[order[m - k_minus:]]).sum() if k_minus else 0)
        r = k_plus + k_minus
        eps = epsilon_lower_bound(m, r, correct, delta, alpha)
        if best is None or eps > best["eps_lower_raw"]:
            best = {"eps_lower_raw": eps, "k_plus": k_plus, "k_minus": k_minus, "n_guesses": r,
                    "n_correct": correct, "guess_accuracy": correct / r,
                    "p_value": p_value_dp_audit(m, r, correct, 0.0, delta)}
        mu = gdp_lower_bound(m, r, correct, alpha)
        if gdp is None or mu > gdp["mu_lower_gdp"]:
            gdp = {"mu_lower_gdp": mu, "gdp_k_plus": k_plus, "gdp_k_minus": k_minus, "gdp_n_correct": correct}
    raw = best.pop("eps_lower_raw")
    raw_gdp = gdp_epsilon(gdp["mu_lower_gdp"], delta) if delta > 0 else math.inf if gdp["mu_lower_gdp"] else 0.0
    return {
        "eps_lower": raw if random_split else math.nan,
        **best,
        "eps_lower_gdp": raw_gdp if random_split else math.nan,
        **gdp,
        "n_audited": m,
        "n_members": int(labels.sum()),
        "confidence": confidence,
        "delta": delta,
        "n_options": len(options),
        "valid": bool(random_split),
        "note": (f"one-run audit, {ASSUMPTION}" if random_split else
                 f"not reported: the membership split was not declared a per-record fair coin flip; the bound "
                 f"is {ASSUMPTION}"),
    }
