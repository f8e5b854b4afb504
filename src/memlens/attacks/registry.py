"""Membership-inference attacks as small functions over shared, precomputed token statistics.

Every attack maps an :class:`AttackInputs` (statistics of the same records under the fine-tuned model,
the reference model and, where needed, of the lowercased records) to one score per record, with one
convention for all: **a higher score means "more likely a member"**. Scoring happens once (see
:mod:`memlens.score`); adding an attack is a function and a decorator:

    @register("my_attack", needs={"ref"}, description="...")
    def my_attack(x: AttackInputs) -> np.ndarray: ...
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy import special, stats

from memlens.config import ConfigError
from memlens.score import SequenceStats


@dataclass
class AttackInputs:
    """What the attacks read. `ft`/`ref`/`ft_lower` hold the same records in the same order."""

    texts: list[str]
    ft: SequenceStats                          # fine-tuned model (adapter active)
    ref: SequenceStats | None = None           # reference: the base model (adapters disabled)
    ft_lower: SequenceStats | None = None      # fine-tuned model on the lowercased texts
    min_k_fraction: float = 0.2
    token_log_freq: np.ndarray | None = None   # log reference-corpus frequency per token id (DC-PDD)
    dc_pdd_clip: float = 0.01
    # reference adapters (LiRA, RMIA; memlens.attacks.references): K adapters of the target's recipe
    ref_models: np.ndarray | None = None       # (n, K) mean token log-likelihood of each record under each
    ref_in: np.ndarray | None = None           # (n, K) whether the record was in that reference's training half
    population: np.ndarray | None = None       # (n,) records RMIA compares against (the run's non-members)
    rmia_offline_a: float | str = "auto"      # a number, or `auto` (fitted: rmia_fit_a)
    rmia_gamma: float = 1.0
    # ReCaLL / Con-ReCall (memlens.attacks.recall): mean token log-likelihood of each record after a prefix
    ll_nonmember_prefix: np.ndarray | None = None  # (n,) given known non-members (the utility split)
    ll_member_prefix: np.ndarray | None = None     # (n,) given known members (some of the run's own)
    in_member_prefix: np.ndarray | None = None     # (n,) records used in that member prefix (left unscored)
    conrecall_gamma: float = 0.5
    cache: dict = field(default_factory=dict)


# What each need names, for messages.
NEEDS = {"ref": "the base model's scores", "lower": "the lowercased texts' scores",
         "moments": "the mean and variance of log p under each predicted distribution (an extra vocabulary-sized "
                    "pass; skipped when no attack needs it)",
         "token_freq": "mia.reference_corpus", "references": "reference adapters (mia.references)",
         "nonmember_prefix": "a non-member prefix (data.utility_split)",
         "member_prefix": "a member prefix (the run's members)"}


@dataclass(frozen=True)
class Attack:
    name: str
    fn: Callable[[AttackInputs], np.ndarray]
    needs: frozenset[str]  # subset of NEEDS
    description: str
    partial: bool = False  # leaves some records unscored (NaN) by design; metrics use the others


ATTACKS: dict[str, Attack] = {}


def register(name: str, *, needs: set[str] | frozenset[str] = frozenset(), description: str = "",
             partial: bool = False):
    """Decorator adding an attack to :data:`ATTACKS` under `name`."""
    unknown = set(needs) - set(NEEDS)
    if unknown:
        raise ValueError(f"attack {name!r}: unknown needs {sorted(unknown)}; known: {sorted(NEEDS)}")

    def wrap(fn: Callable[[AttackInputs], np.ndarray]) -> Callable[[AttackInputs], np.ndarray]:
        if name in ATTACKS:
            raise ValueError(f"attack {name!r} is registered twice")
        ATTACKS[name] = Attack(name, fn, frozenset(needs), description or (fn.__doc__ or "").strip(), partial)
        return fn
    return wrap


def get_attack(name: str) -> Attack:
    try:
        return ATTACKS[name]
    except KeyError:
        raise ConfigError(f"mia.attacks: unknown attack {name!r}; valid choices: {sorted(ATTACKS)}") from None


def check_attacks(attacks: list[str], reference_corpus: str | None, audit_attack: str | None = None, *,
                  references: int = 0, utility: bool = True) -> list[str]:
    """The one check of attack names (`mia.attacks`, and `dp.audit_attack`, which must be among them): known
    to the registry, not empty, and with the inputs they need configured: `references` is `mia.references`
    (reference adapters trained, 0 where none can be: `attack_models`), `utility` whether there is a utility
    split (ReCaLL's non-member prefix). Returns the names."""
    if not attacks:
        raise ConfigError(f"mia.attacks: empty; choose from {sorted(ATTACKS)}")
    needs = needs_of(attacks)  # unknown names fail here, with the valid choices

    def wanting(need: str) -> list[str]:
        return [a for a in attacks if need in ATTACKS[a].needs]

    if "token_freq" in needs and reference_corpus is None:
        raise ConfigError(f"mia.attacks: {wanting('token_freq')} need mia.reference_corpus (a text file, one document "
                          "per line, for token frequencies); set it or remove them from mia.attacks")
    if "references" in needs and references < 2:
        raise ConfigError(f"mia.attacks: {wanting('references')} need reference adapters and mia.references is "
                          f"{references}; set mia.references to 2 or more (each is one more fine-tune per recipe; "
                          "Carlini et al. use 64+) or remove them from mia.attacks")
    if references and "references" not in needs:
        with_refs = [name for name, a in ATTACKS.items() if "references" in a.needs]
        raise ConfigError(f"mia.references: {references} reference adapters would be trained for every recipe but no "
                          f"attack of mia.attacks uses them; add some of {with_refs} to mia.attacks or set "
                          "mia.references: 0")
    if "nonmember_prefix" in needs and not utility:
        raise ConfigError(f"mia.attacks: {wanting('nonmember_prefix')} need known non-members for their prefix, drawn "
                          "from data.utility_split, which is null; set data.utility_split to a held-out split that is "
                          "neither member nor non-member, or remove them from mia.attacks")
    if audit_attack is not None and audit_attack not in attacks:
        raise ConfigError(f"dp.audit_attack: {audit_attack!r} is not among mia.attacks {list(attacks)}; the audit "
                          "reads that attack's scores: choose one of them or add it to mia.attacks")
    if audit_attack is not None and ATTACKS[audit_attack].partial:
        raise ConfigError(f"dp.audit_attack: {audit_attack!r} leaves some records unscored (those of its member "
                          "prefix) and the audit needs a score for every record; choose another attack")
    return list(attacks)


def needs_of(names: list[str]) -> set[str]:
    """Union of the inputs the named attacks need."""
    return set().union(*(get_attack(n).needs for n in names)) if names else set()


def run_attacks(names: list[str], inputs: AttackInputs) -> dict[str, np.ndarray]:
    """Score every record with each named attack (float64 arrays, higher = member)."""
    out = {}
    for name in names:
        attack = get_attack(name)
        given = {"ref": inputs.ref, "lower": inputs.ft_lower, "token_freq": inputs.token_log_freq,
                 "references": inputs.ref_models, "nonmember_prefix": inputs.ll_nonmember_prefix,
                 "member_prefix": inputs.ll_member_prefix,
                 # token_stats(moments=False) leaves them NaN
                 "moments": None if len(inputs.ft.mu) and np.isnan(inputs.ft.mu).all() else inputs.ft.mu}
        missing = [NEEDS[n] for n in sorted(attack.needs) if given[n] is None]
        if missing:
            raise ConfigError(f"mia.attacks: {name!r} needs {missing} which were not computed")
        scores = np.asarray(attack.fn(inputs), dtype=np.float64)
        if scores.shape != (len(inputs.texts),):
            raise RuntimeError(f"attack {name!r} returned shape {scores.shape}, expected ({len(inputs.texts)},)")
        out[name] = scores
    return out


# ------------------------------------------------------------------------------------- helpers
def _mean_nll(x: AttackInputs, which: str = "ft") -> np.ndarray:
    key = f"mean_nll_{which}"
    if key not in x.cache:
        x.cache[key] = getattr(x, which).mean_nll()
    return x.cache[key]


def _lowest_k_mean(stats: SequenceStats, values: np.ndarray, fraction: float) -> np.ndarray:
    """Per sequence: mean of the `max(1, int(fraction * n))` smallest per-token values."""
    out = np.full(len(stats), np.nan)
    for i in range(len(stats)):
        seq = values[stats.offsets[i]:stats.offsets[i + 1]]
        if len(seq) == 0:
            continue
        k = max(1, int(fraction * len(seq)))
        out[i] = np.partition(seq, k - 1)[:k].mean()
    return out


# ------------------------------------------------------------------------------------- attacks
@register("loss", description="LOSS (Yeom et al. 2018): minus the mean token NLL under the fine-tuned model.")
def loss(x: AttackInputs) -> np.ndarray:
    return -_mean_nll(x)


@register("ref_ratio", needs={"ref"},
          description="The study's reference ratio: mean NLL under the base model / mean NLL under the "
          "fine-tuned model (the study's LR = P_ref/P_ft is small for members; this is large).")
def ref_ratio(x: AttackInputs) -> np.ndarray:
    return _mean_nll(x, "ref") / _mean_nll(x, "ft")


@register("ref_llr", needs={"ref"},
          description="Textbook log-likelihood ratio: summed NLL under the base model minus summed NLL "
          "under the fine-tuned model, i.e. log P_ft(x) - log P_ref(x).")
def ref_llr(x: AttackInputs) -> np.ndarray:
    return x.ft.reduce("logprob", "sum") - x.ref.reduce("logprob", "sum")


@register("zlib", description="zlib ratio (Carlini et al. 2021): minus the mean NLL over the zlib-compressed "
          "length of the text in bytes.")
def zlib_ratio(x: AttackInputs) -> np.ndarray:
    lengths = np.array([len(zlib.compress(t.encode("utf-8"))) for t in x.texts], dtype=np.float64)
    return -_mean_nll(x) / lengths


@register("lowercase", needs={"lower"},
          description="Lowercase ratio (Carlini et al. 2021): log perplexity of the lowercased text minus "
          "that of the text, both under the fine-tuned model.")
def lowercase(x: AttackInputs) -> np.ndarray:
    return _mean_nll(x, "ft_lower") - _mean_nll(x)


@register("min_k", description="Min-K% Prob (Shi et al. 2024): mean log-prob of the k% least likely tokens "
          "(k = mia.min_k_fraction).")
def min_k(x: AttackInputs) -> np.ndarray:
    return _lowest_k_mean(x.ft, x.ft.logprob.astype(np.float64), x.min_k_fraction)


@register("min_k_pp", needs={"moments"}, description="Min-K%++ (Zhang et al. 2024): per token (log p - mu) / sigma under the "
          "predicted distribution, mean of the k% smallest.")
def min_k_pp(x: AttackInputs) -> np.ndarray:
    s = x.ft
    z = (s.logprob.astype(np.float64) - s.mu) / np.sqrt(np.maximum(s.sigma2.astype(np.float64), 1e-12))
    return _lowest_k_mean(s, z, x.min_k_fraction)


@register("dc_pdd", needs={"token_freq"},
          description="DC-PDD (Zhang et al. 2024): mean over each token's first occurrence of "
          "min(p(token) * -log f(token), a), f from mia.reference_corpus (Laplace-smoothed), "
          "a = mia.dc_pdd_clip.")
def dc_pdd(x: AttackInputs) -> np.ndarray:
    s, out = x.ft, np.full(len(x.ft), np.nan)
    prob = np.exp(s.logprob.astype(np.float64))
    for i in range(len(s)):
        ids = s.token_ids[s.offsets[i]:s.offsets[i + 1]]
        if len(ids) == 0:
            continue
        _, first = np.unique(ids, return_index=True)
        alpha = prob[s.offsets[i] + first] * -x.token_log_freq[ids[first]]
        out[i] = np.minimum(alpha, x.dc_pdd_clip).mean()
    return out


# ------------------------------------------------------------------------------------- reference attacks
# LiRA and RMIA compare the target's statistic of a record with the same statistic under K reference adapters
# of the target's recipe, each trained on a random half of the records (memlens.attacks.references), so that
# every record is IN for about half of them and OUT for the rest.
LIRA_MIN_SIGMA = 1e-6        # floor of a fitted standard deviation (references identical to each other)
LIRA_PER_RECORD_VARIANCE = 64  # from this many references, one variance per record (Carlini et al.'s default)


def _references(x: AttackInputs) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(x.ref_models, dtype=np.float64)
    is_in = np.asarray(x.ref_in, dtype=bool)
    if values.ndim != 2 or values.shape != is_in.shape or values.shape[0] != len(x.ft):
        raise ValueError(f"reference statistics {values.shape} and IN flags {is_in.shape} must both be "
                         f"(records, references) with {len(x.ft)} records")
    return values, is_in


def _side_mean(values: np.ndarray, side: np.ndarray, log_mean_exp: bool = False) -> np.ndarray:
    """Per record, the mean (or log-mean-exp) of its references on one side; NaN for a record with none."""
    n = side.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        if log_mean_exp:
            return np.where(n > 0, special.logsumexp(np.where(side, values, -np.inf), axis=1) - np.log(n), np.nan)
        return np.where(n > 0, np.where(side, values, 0.0).sum(axis=1) / n, np.nan)


def _fill_sides(m_in: np.ndarray, m_out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A record with no IN (or no OUT) reference gets that side's mean from its other side and the mean IN-OUT
    shift of the records that have both: for a record without IN references the online LiRA score is then an
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
    """(sum of squared deviations of the side's statistics from each record's own mean, degrees of freedom)."""
    dev = np.where(side, values - mean[:, None], 0.0)
    return float((dev ** 2).sum()), int(np.maximum(side.sum(axis=1) - 1, 0).sum())


def _sigma(ss: float, dof: int) -> float:
    return max(float(np.sqrt(ss / dof)), LIRA_MIN_SIGMA) if dof > 0 else LIRA_MIN_SIGMA


def lira_fit(values: np.ndarray, is_in: np.ndarray) -> dict[str, np.ndarray]:
    """LiRA's Gaussians per record: mu_in, mu_out (see :func:`_fill_sides` for a record lacking a side) and their
    standard deviations. Below LIRA_PER_RECORD_VARIANCE references (Carlini et al.'s "fixed variance", better
    with few shadow models): `sigma_in` = `sigma_out` = one value for every record, the within-record deviation
    pooled over the records and both sides, and `sigma_offline` the same pooled over the OUT statistics only.
    From LIRA_PER_RECORD_VARIANCE references on: one per record and side (pooled where a record has fewer than
    two statistics on a side), as the paper's default.

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
def lira(x: AttackInputs) -> np.ndarray:
    """Statistic: s(x) = mean token log-likelihood (minus the mean NLL). Carlini et al. fit Gaussians to the
    logit of a classifier's confidence because it is close to Gaussian across models; a sequence's mean token
    log-likelihood is its language-model analogue (an average over tokens, close to Gaussian across
    fine-tunes, and comparable between records of different lengths), as in LiRA on language models.
    Score (Algorithm 1): Lambda = p(s | N(mu_in, sigma_in^2)) / p(s | N(mu_out, sigma_out^2)), returned as
    log Lambda. With fewer than 64 references sigma_in = sigma_out = one value for all records (the paper's
    fixed variance; see :func:`lira_fit` for why one and not one per side). A record with no IN reference (probability 2^-K) takes mu_in = mu_out + the mean
    IN-OUT shift, which orders it as the paper's offline test does (see _fill_sides); no OUT reference:
    symmetric."""
    values, is_in = _references(x)
    fit = lira_fit(values, is_in)
    s = -_mean_nll(x)
    return (stats.norm.logpdf(s, fit["mu_in"], fit["sigma_in"])
            - stats.norm.logpdf(s, fit["mu_out"], fit["sigma_out"]))


@register("lira_offline", needs={"references"},
          description="LiRA offline (Carlini et al. 2022): log Phi((s - mu_out) / sigma_out), the one-sided test "
          "against the Gaussian of the references trained without the record (OUT only); s as for lira.")
def lira_offline(x: AttackInputs) -> np.ndarray:
    """Statistic as :func:`lira`. Score: the one-sided test 1 - Pr[Z > s], Z ~ N(mu_out(x), sigma_out^2),
    returned as its log, log Phi((s - mu_out) / sigma_out) (a log keeps the ranking of records far in the
    tail, where Phi rounds to 1). Only OUT statistics are fitted (below 64 references one variance pooled over
    the records' OUT statistics); a record with no OUT reference takes mu_out = mu_in - the mean IN-OUT shift."""
    values, is_in = _references(x)
    fit = lira_fit(values, is_in)
    return stats.norm.logcdf((-_mean_nll(x) - fit["mu_out"]) / fit["sigma_offline"])


def rmia_fit_a(values: np.ndarray, is_in: np.ndarray) -> float:
    """The offline `a` that fits the references' own Pr_IN(x) - 1 = a (Pr_OUT(x) - 1) best (least squares over
    the records with both IN and OUT references; Pr_side the mean of exp(statistic) over that side), in [0, 1]."""
    p_in, p_out = (_side_mean(np.exp(values), side) for side in (is_in, ~is_in))
    both = ~np.isnan(p_in) & ~np.isnan(p_out)
    x, y = 1 - p_out[both], 1 - p_in[both]
    if not both.any() or not (x ** 2).sum() > 0:
        raise ValueError("no record has both an IN and an OUT reference to fit RMIA's offline a: train more "
                         "reference adapters (mia.references) or set mia.rmia_offline_a")
    return float(np.clip((x * y).sum() / (x ** 2).sum(), 0.0, 1.0))


def rmia_ratio(s: np.ndarray, values: np.ndarray, is_in: np.ndarray, offline_a: float | str | None) -> np.ndarray:
    """log (Pr(x|theta) / Pr(x)) per record, with log Pr(x|theta) = s (mean token log-likelihood, so Pr is the
    geometric-mean token probability) and Pr(x) the mean of Pr(x|theta') over the references (online,
    `offline_a` None) or ((1 + a) Pr_OUT(x) + (1 - a)) / 2 with Pr_OUT the mean over OUT references (offline;
    `a` a number or `auto`, :func:`rmia_fit_a`)."""
    if offline_a is None:
        log_pr = special.logsumexp(values, axis=1) - np.log(values.shape[1])
    else:
        a = rmia_fit_a(values, is_in) if offline_a == "auto" else float(offline_a)
        _, log_out = _fill_sides(_side_mean(values, is_in, True), _side_mean(values, ~is_in, True))
        log_pr = np.logaddexp(np.log1p(a) + log_out, np.log(1 - a) if a < 1 else -np.inf) - np.log(2)
    return s - log_pr


def rmia_score(ratio: np.ndarray, population: np.ndarray, gamma: float) -> np.ndarray:
    """Score_MIA(x) = Pr_z(LR(x, z) >= gamma) over the population records z other than x, with
    log LR(x, z) = ratio(x) - ratio(z)."""
    population = np.asarray(population, dtype=bool)
    z = np.sort(ratio[population])
    if len(z) < 2:
        raise ValueError(f"RMIA needs at least 2 population records, got {len(z)}")
    threshold = ratio - np.log(gamma)
    count = np.searchsorted(z, threshold, side="right")  # z with ratio(z) <= ratio(x) - log gamma
    count = count - (population & (ratio <= threshold))   # x itself (LR(x, x) = 1) is not a population record
    return count / (len(z) - population.astype(np.int64))


def _rmia(x: AttackInputs, offline: bool) -> np.ndarray:
    values, is_in = _references(x)
    if x.population is None:
        raise ValueError("RMIA needs its population records (AttackInputs.population)")
    ratio = rmia_ratio(-_mean_nll(x), values, is_in, x.rmia_offline_a if offline else None)
    return rmia_score(ratio, x.population, x.rmia_gamma)


@register("rmia", needs={"references"},
          description="RMIA (Zarifzadeh et al. 2024): the share of population records z (the run's non-members but "
          "x) with LR(x, z) = (Pr(x|theta) / Pr(x)) / (Pr(z|theta) / Pr(z)) >= gamma (mia.rmia_gamma), Pr(.|theta) "
          "the geometric-mean token probability, Pr(x) its mean over all reference adapters.")
def rmia(x: AttackInputs) -> np.ndarray:
    """Statistic: Pr(x|theta) = exp(mean token log-likelihood), the geometric-mean token probability. RMIA
    compares records pairwise through LR(x, z); whole-sequence probabilities of records of different lengths
    differ by orders of magnitude, so the per-token mean is what makes two records comparable. Equations of
    Zarifzadeh et al. 2024: LR_theta(x, z) = (Pr(x|theta) / Pr(x)) (Pr(z|theta) / Pr(z))^-1 and
    Score_MIA(x; theta) = Pr_{z ~ pi}(LR_theta(x, z) >= gamma), Pr(x) = the average of Pr(x|theta') over the
    reference models (online: every reference, about half of them IN for x). Computed in log space; the
    population z are the run's non-members other than x."""
    return _rmia(x, offline=False)


@register("rmia_offline", needs={"references"},
          description="RMIA offline (Zarifzadeh et al. 2024): as rmia with Pr(x) = ((1 + a) Pr_OUT(x) + (1 - a)) / 2 "
          "from the reference adapters trained without x only, a = mia.rmia_offline_a (auto: fitted to the "
          "references' own IN and OUT probabilities).")
def rmia_offline(x: AttackInputs) -> np.ndarray:
    """As :func:`rmia`, with the paper's offline approximation Pr(x) = ((1 + a) Pr_OUT(x) + (1 - a)) / 2, Pr_OUT(x)
    the mean of Pr(x|theta') over the OUT references of x (a record with none: from its IN references and the
    mean IN-OUT shift, as LiRA). The approximation reads Pr_IN(x) = a Pr_OUT(x) + (1 - a): members' probabilities
    pulled toward 1. A small a (0.3, say) suits a classifier's confidence in the true label, close to 1; a
    sequence's geometric-mean token probability is ~0.05-0.3 and fine-tuning moves it little, so with a = 0.3
    the constant (1 - a) dominates Pr(x) and the score is nearly the loss attack's. `auto` (the default) fits a
    to the reference adapters' own IN and OUT probabilities (:func:`rmia_fit_a`): it uses the IN references to
    set one number, the per-record prior still comes from OUT references only."""
    return _rmia(x, offline=True)


# ------------------------------------------------------------------------------------- ReCaLL family
@register("recall", needs={"nonmember_prefix"},
          description="ReCaLL (Xie et al. 2024): LL(x | P) / LL(x), LL the mean token log-likelihood under the "
          "fine-tuned model and P a prefix of mia.recall_shots known non-members (the utility split).")
def recall(x: AttackInputs) -> np.ndarray:
    """Conditioning a member on non-member context lowers its log-likelihood more than a non-member's, so the
    ratio of two negative numbers is higher for members (Xie et al. 2024, the ReCaLL score). Only x's tokens
    are scored in LL(x | P)."""
    return x.ll_nonmember_prefix / -_mean_nll(x)


@register("con_recall", needs={"nonmember_prefix", "member_prefix"}, partial=True,
          description="Con-ReCall (Wang et al. 2024): (LL(x | P_non) - gamma LL(x | P_mem)) / LL(x), P_mem a prefix "
          "of the run's own members (those records are left unscored), gamma = mia.conrecall_gamma.")
def con_recall(x: AttackInputs) -> np.ndarray:
    """Wang et al. 2024's score s(x) = (LL(x|P_non) - gamma LL(x|P_mem)) / LL(x). Their member prefix is of known
    members; here it is mia.recall_shots records of the run's own members, whose own scores would be biased
    (each is in its own prefix): they are NaN, and the metrics are computed over the other records."""
    score = (x.ll_nonmember_prefix - x.conrecall_gamma * x.ll_member_prefix) / -_mean_nll(x)
    return np.where(np.asarray(x.in_member_prefix, dtype=bool), np.nan, score)


def token_log_frequencies(token_lists, vocab_size: int) -> np.ndarray:
    """Laplace-smoothed log frequency of every token id over a reference corpus (DC-PDD)."""
    counts = np.zeros(vocab_size, dtype=np.float64)
    for ids in token_lists:
        np.add.at(counts, np.asarray(ids, dtype=np.int64), 1)
    return np.log((counts + 1) / (counts.sum() + vocab_size))
