"""Reference-adapter attacks: LiRA (Carlini et al. 2022) and RMIA (Zarifzadeh et al. 2024) compare the target's
statistic of a record with the same statistic under K reference adapters of the target's recipe, each trained
on a random half of the records (:mod:`memlens.attacks.references`), so that every record is IN for about half
of them and OUT for the rest. Registered in :mod:`memlens.attacks.registry`; higher score = member.

Arrays: `values` and `is_in` are (records, references): the statistic of each record under each reference
adapter and whether the record was in that reference's training half."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field, field_validator
from scipy import special, stats

from memlens.attacks.registry import AttackInputs, AttackSettings, mean_nll, register

LIRA_MIN_SIGMA = 1e-6        # floor of a fitted standard deviation (references identical to each other)
LIRA_PER_RECORD_VARIANCE = 64  # from this many references, one variance per record (Carlini et al.'s default)


class RmiaSettings(AttackSettings):
    gamma: float = Field(1.0, gt=0, description="gamma: the likelihood-ratio threshold a record must reach against a "
                         "population record to count.")


class RmiaOfflineSettings(RmiaSettings):
    a: float | Literal["auto"] = Field(
        "auto", description="`a` of Pr(x) = ((1 + a) Pr_OUT(x) + (1 - a)) / 2, the paper's linear approximation "
        "Pr_IN(x) = a Pr_OUT(x) + (1 - a), or `auto`: fitted by least squares to the reference adapters' own IN and "
        "OUT probabilities. A sequence's geometric-mean token probability is far from 1 and moves little in "
        "training, so a small `a` (e.g. 0.3) reduces RMIA offline to the loss attack.")

    @field_validator("a")
    @classmethod
    def _unit_interval(cls, value: float | str) -> float | str:
        if not isinstance(value, str) and not 0 <= value <= 1:
            raise ValueError("must be between 0 and 1, or auto")
        return value


def _references(x: AttackInputs) -> tuple[np.ndarray, np.ndarray]:
    """The (records, references) statistics and IN flags of the inputs, checked."""
    values = np.asarray(x.ref_models, dtype=np.float64)
    is_in = np.asarray(x.ref_in, dtype=bool)
    if values.ndim != 2 or values.shape != is_in.shape or values.shape[0] != len(x.ft):
        raise ValueError(f"reference statistics {values.shape} and IN flags {is_in.shape} must both be "
                         f"(records, references) with {len(x.ft)} records")
    return values, is_in


def _side_mean(values: np.ndarray, side: np.ndarray, log_mean_exp: bool = False) -> np.ndarray:
    """(records,): per record, the mean (or log-mean-exp) of its references on one side (`side`, (records,
    references)); NaN for a record with none."""
    n = side.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        if log_mean_exp:
            return np.where(n > 0, special.logsumexp(np.where(side, values, -np.inf), axis=1) - np.log(n), np.nan)
        return np.where(n > 0, np.where(side, values, 0.0).sum(axis=1) / n, np.nan)


def _fill_sides(m_in: np.ndarray, m_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both (records,). A record with no IN (or no OUT) reference gets that side's mean from its other side and the
    mean IN-OUT shift of the records that have both: for a record without IN references the online LiRA score is then an
    increasing function of (s - mu_out) / sigma_out, i.e. the offline test's ordering, on the online scale."""
    has_in, has_out = ~np.isnan(m_in), ~np.isnan(m_out)
    both = has_in & has_out
    if (~both).any():
        if not both.any():
            raise ValueError("no record has both an IN and an OUT reference: train more reference adapters "
                             "(mia.references)")
        shift = float(np.mean(m_in[both] - m_out[both]))
        m_in, m_out = np.where(has_in, m_in, m_out + shift), np.where(has_out, m_out, m_in - shift)
    return m_in, m_out


def _pooled_variance(values: np.ndarray, side: np.ndarray, mean: np.ndarray) -> tuple[float, int]:
    """(sum of squared deviations of the side's statistics from each record's own mean, degrees of freedom) over
    `values` and `side` (records, references), `mean` (records,)."""
    dev = np.where(side, values - mean[:, None], 0.0)
    return float((dev ** 2).sum()), int(np.maximum(side.sum(axis=1) - 1, 0).sum())


def _sigma(ss: float, dof: int) -> float:
    return max(float(np.sqrt(ss / dof)), LIRA_MIN_SIGMA) if dof > 0 else LIRA_MIN_SIGMA


def lira_fit(values: np.ndarray, is_in: np.ndarray) -> dict[str, np.ndarray]:
    """LiRA's Gaussians per record, each value (records,): mu_in, mu_out (see :func:`_fill_sides` for a record lacking a
    side) and their standard deviations. Below LIRA_PER_RECORD_VARIANCE references (Carlini et al.'s "fixed variance",
    better with few shadow models): `sigma_in` = `sigma_out` = one value for every record, the within-record deviation
    pooled over the records and both sides, and `sigma_offline` the same pooled over the OUT statistics only. From
    LIRA_PER_RECORD_VARIANCE references on: one per record and side (pooled where a record has fewer than two statistics
    on a side), as the paper's default.

    One shared variance: with few references the IN and OUT variances are each estimated from a handful of
    models, and a Gaussian likelihood ratio with sigma_in < sigma_out falls again for a record far above both
    means (the quadratic terms no longer cancel), so a record memorized far beyond what any reference shows would
    score low on a coin flip of the estimates. With one sigma, log Lambda = (mu_in - mu_out)(s - (mu_in +
    mu_out) / 2) / sigma^2 is monotone in s; the authors' code also uses one standard deviation for both sides
    in its fixed-variance mode."""
    m_in, m_out = _fill_sides(_side_mean(values, is_in), _side_mean(values, ~is_in))
    ss_in, dof_in = _pooled_variance(values, is_in, m_in)
    ss_out, dof_out = _pooled_variance(values, ~is_in, m_out)
    n = len(values)
    shared = np.full(n, _sigma(ss_in + ss_out, dof_in + dof_out))
    offline = _sigma(ss_out, dof_out) if dof_out else shared[0]
    fit = {"mu_in": m_in, "mu_out": m_out, "sigma_in": shared, "sigma_out": shared.copy(),
           "sigma_offline": np.full(n, offline)}
    if values.shape[1] >= LIRA_PER_RECORD_VARIANCE:
        for side, mean, keys in ((is_in, m_in, ("sigma_in",)), (~is_in, m_out, ("sigma_out", "sigma_offline"))):
            count = side.sum(axis=1)
            ss = (np.where(side, values - mean[:, None], 0.0) ** 2).sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                own = np.maximum(np.sqrt(ss / (count - 1)), LIRA_MIN_SIGMA)
            for key in keys:
                fit[key] = np.where(count >= 2, own, fit[key])
    return fit


@register("lira", needs={"references"},
          description="LiRA online (Carlini et al. 2022, Algorithm 1): log N(s; mu_in, sigma_in^2) - "
          "log N(s; mu_out, sigma_out^2), s the mean token log-likelihood under the fine-tuned model, the Gaussians "
          "fitted to s under the reference adapters trained with (IN) and without (OUT) the record; below 64 "
          "references one variance pooled over records and sides.")
def lira(x: AttackInputs, s: AttackSettings) -> np.ndarray:
    """Statistic: s(x) = mean token log-likelihood (minus the mean NLL). Carlini et al. fit Gaussians to the
    logit of a classifier's confidence because it is close to Gaussian across models; a sequence's mean token
    log-likelihood is its language-model analogue (an average over tokens, close to Gaussian across
    fine-tunes, and comparable between records of different lengths), as in LiRA on language models.
    Score (Algorithm 1): Lambda = p(s | N(mu_in, sigma_in^2)) / p(s | N(mu_out, sigma_out^2)), returned as
    log Lambda. With fewer than 64 references sigma_in = sigma_out = one value for all records (the paper's fixed
    variance; see :func:`lira_fit` for why one and not one per side). A record with no IN reference (probability 2^-K)
    takes mu_in = mu_out + the mean IN-OUT shift, which orders it as the paper's offline test does (see _fill_sides); no
    OUT reference: symmetric."""
    values, is_in = _references(x)
    fit = lira_fit(values, is_in)
    statistic = -mean_nll(x)
    return (stats.norm.logpdf(statistic, fit["mu_in"], fit["sigma_in"])
            - stats.norm.logpdf(statistic, fit["mu_out"], fit["sigma_out"]))


@register("lira_offline", needs={"references"},
          description="LiRA offline (Carlini et al. 2022): log Phi((s - mu_out) / sigma_out), the one-sided test "
          "against the Gaussian of the references trained without the record (OUT only); s as for lira.")
def lira_offline(x: AttackInputs, s: AttackSettings) -> np.ndarray:
    """Statistic as :func:`lira`. Score: the one-sided test 1 - Pr[Z > s], Z ~ N(mu_out(x), sigma_out^2),
    returned as its log, log Phi((s - mu_out) / sigma_out) (a log keeps the ranking of records far in the
    tail, where Phi rounds to 1). Only OUT statistics are fitted (below 64 references one variance pooled over
    the records' OUT statistics); a record with no OUT reference takes mu_out = mu_in - the mean IN-OUT shift."""
    values, is_in = _references(x)
    fit = lira_fit(values, is_in)
    return stats.norm.logcdf((-mean_nll(x) - fit["mu_out"]) / fit["sigma_offline"])


def rmia_fit_a(values: np.ndarray, is_in: np.ndarray) -> float:
    """The offline `a` that fits the references' own Pr_IN(x) - 1 = a (Pr_OUT(x) - 1) best (least squares over
    the records with both IN and OUT references; Pr_side the mean of exp(statistic) over that side), in [0, 1].
    `values`, `is_in`: (records, references)."""
    p_in, p_out = (_side_mean(np.exp(values), side) for side in (is_in, ~is_in))
    both = ~np.isnan(p_in) & ~np.isnan(p_out)
    x, y = 1 - p_out[both], 1 - p_in[both]
    if not both.any() or not (x ** 2).sum() > 0:
        raise ValueError("no record has both an IN and an OUT reference to fit RMIA's offline a: train more "
                         "reference adapters (mia.references) or set rmia_offline's `a`")
    return float(np.clip((x * y).sum() / (x ** 2).sum(), 0.0, 1.0))


def rmia_ratio(s: np.ndarray, values: np.ndarray, is_in: np.ndarray, offline_a: float | str | None) -> np.ndarray:
    """(records,) log (Pr(x|theta) / Pr(x)) per record, with log Pr(x|theta) = s (records,) (mean token log-likelihood,
    so Pr is the geometric-mean token probability) and Pr(x) the mean of Pr(x|theta') over the references (online,
    `offline_a` None) or ((1 + a) Pr_OUT(x) + (1 - a)) / 2 with Pr_OUT the mean over OUT references (offline; `a` a
    number or `auto`, :func:`rmia_fit_a`)."""
    if offline_a is None:
        log_pr = special.logsumexp(values, axis=1) - np.log(values.shape[1])
    else:
        a = rmia_fit_a(values, is_in) if offline_a == "auto" else float(offline_a)
        _, log_out = _fill_sides(_side_mean(values, is_in, True), _side_mean(values, ~is_in, True))
        log_pr = np.logaddexp(np.log1p(a) + log_out, np.log(1 - a) if a < 1 else -np.inf) - np.log(2)
    return s - log_pr


def rmia_score(ratio: np.ndarray, population: np.ndarray, gamma: float) -> np.ndarray:
    """Score_MIA(x) = Pr_z(LR(x, z) >= gamma) over the population records z other than x, with
    log LR(x, z) = ratio(x) - ratio(z). `ratio`, `population` and the result: (records,)."""
    population = np.asarray(population, dtype=bool)
    z = np.sort(ratio[population])
    if len(z) < 2:
        raise ValueError(f"RMIA needs at least 2 population records, got {len(z)}")
    threshold = ratio - np.log(gamma)
    count = np.searchsorted(z, threshold, side="right")  # z with ratio(z) <= ratio(x) - log gamma
    count = count - (population & (ratio <= threshold))   # x itself (LR(x, x) = 1) is not a population record
    return count / (len(z) - population.astype(np.int64))


def _rmia(x: AttackInputs, s: RmiaSettings, offline_a: float | str | None) -> np.ndarray:
    values, is_in = _references(x)
    if x.population is None:
        raise ValueError("RMIA needs its population records (AttackInputs.population)")
    ratio = rmia_ratio(-mean_nll(x), values, is_in, offline_a)
    return rmia_score(ratio, x.population, s.gamma)


@register("rmia", needs={"references"}, settings=RmiaSettings,
          description="RMIA (Zarifzadeh et al. 2024): the share of population records z (the run's non-members but "
          "x) with LR(x, z) = (Pr(x|theta) / Pr(x)) / (Pr(z|theta) / Pr(z)) >= gamma (`gamma`), Pr(.|theta) "
          "the geometric-mean token probability, Pr(x) its mean over all reference adapters.")
def rmia(x: AttackInputs, s: RmiaSettings) -> np.ndarray:
    """Statistic: Pr(x|theta) = exp(mean token log-likelihood), the geometric-mean token probability. RMIA
    compares records pairwise through LR(x, z); whole-sequence probabilities of records of different lengths
    differ by orders of magnitude, so the per-token mean is what makes two records comparable. Equations of
    Zarifzadeh et al. 2024: LR_theta(x, z) = (Pr(x|theta) / Pr(x)) (Pr(z|theta) / Pr(z))^-1 and
    Score_MIA(x; theta) = Pr_{z ~ pi}(LR_theta(x, z) >= gamma), Pr(x) = the average of Pr(x|theta') over the
    reference models (online: every reference, about half of them IN for x). Computed in log space; the
    population z are the run's non-members other than x."""
    return _rmia(x, s, offline_a=None)


@register("rmia_offline", needs={"references"}, settings=RmiaOfflineSettings,
          description="RMIA offline (Zarifzadeh et al. 2024): as rmia with Pr(x) = ((1 + a) Pr_OUT(x) + (1 - a)) / 2 "
          "from the reference adapters trained without x only (`a`; auto: fitted to the references' own IN and "
          "OUT probabilities).")
def rmia_offline(x: AttackInputs, s: RmiaOfflineSettings) -> np.ndarray:
    """As :func:`rmia`, with the paper's offline approximation Pr(x) = ((1 + a) Pr_OUT(x) + (1 - a)) / 2, Pr_OUT(x)
    the mean of Pr(x|theta') over the OUT references of x (a record with none: from its IN references and the
    mean IN-OUT shift, as LiRA). The approximation reads Pr_IN(x) = a Pr_OUT(x) + (1 - a): members' probabilities
    pulled toward 1. A small a (0.3, say) suits a classifier's confidence in the true label, close to 1; a
    sequence's geometric-mean token probability is ~0.05-0.3 and fine-tuning moves it little, so with a = 0.3
    the constant (1 - a) dominates Pr(x) and the score is nearly the loss attack's. `auto` (the default) fits a
    to the reference adapters' own IN and OUT probabilities (:func:`rmia_fit_a`): it uses the IN references to
    set one number, the per-record prior still comes from OUT references only."""
    return _rmia(x, s, offline_a=s.a)


__all__ = ["LIRA_MIN_SIGMA", "LIRA_PER_RECORD_VARIANCE", "RmiaOfflineSettings", "RmiaSettings", "lira_fit",
           "rmia_fit_a", "rmia_ratio", "rmia_score"]
