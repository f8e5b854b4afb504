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
    cache: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Attack:
    name: str
    fn: Callable[[AttackInputs], np.ndarray]
    needs: frozenset[str]  # subset of {"ref", "lower", "token_freq"}
    description: str


ATTACKS: dict[str, Attack] = {}


def register(name: str, *, needs: set[str] | frozenset[str] = frozenset(), description: str = ""):
    """Decorator adding an attack to :data:`ATTACKS` under `name`."""
    def wrap(fn: Callable[[AttackInputs], np.ndarray]) -> Callable[[AttackInputs], np.ndarray]:
        if name in ATTACKS:
            raise ValueError(f"attack {name!r} is registered twice")
        ATTACKS[name] = Attack(name, fn, frozenset(needs), description or (fn.__doc__ or "").strip())
        return fn
    return wrap


def get_attack(name: str) -> Attack:
    try:
        return ATTACKS[name]
    except KeyError:
        raise ConfigError(f"mia.attacks: unknown attack {name!r}; valid choices: {sorted(ATTACKS)}") from None


def check_attacks(attacks: list[str], reference_corpus: str | None, audit_attack: str | None = None) -> list[str]:
    """The one check of attack names (`mia.attacks`, and `dp.audit_attack`, which must be among them): known
    to the registry, not empty, and with the inputs they need configured. Returns the names."""
    if not attacks:
        raise ConfigError(f"mia.attacks: empty; choose from {sorted(ATTACKS)}")
    needs = needs_of(attacks)  # unknown names fail here, with the valid choices
    if "token_freq" in needs and reference_corpus is None:
        wanting = [a for a in attacks if "token_freq" in ATTACKS[a].needs]
        raise ConfigError(f"mia.attacks: {wanting} need mia.reference_corpus (a text file, one document per line, "
                          "for token frequencies); set it or remove them from mia.attacks")
    if audit_attack is not None and audit_attack not in attacks:
        raise ConfigError(f"dp.audit_attack: {audit_attack!r} is not among mia.attacks {list(attacks)}; the audit "
                          "reads that attack's scores: choose one of them or add it to mia.attacks")
    return list(attacks)


def needs_of(names: list[str]) -> set[str]:
    """Union of the inputs the named attacks need."""
    return set().union(*(get_attack(n).needs for n in names)) if names else set()


def run_attacks(names: list[str], inputs: AttackInputs) -> dict[str, np.ndarray]:
    """Score every record with each named attack (float64 arrays, higher = member)."""
    out = {}
    for name in names:
        attack = get_attack(name)
        missing = [n for n in attack.needs if {"ref": inputs.ref, "lower": inputs.ft_lower,
                                               "token_freq": inputs.token_log_freq}[n] is None]
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


@register("min_k_pp", description="Min-K%++ (Zhang et al. 2024): per token (log p - mu) / sigma under the "
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


def token_log_frequencies(token_lists, vocab_size: int) -> np.ndarray:
    """Laplace-smoothed log frequency of every token id over a reference corpus (DC-PDD)."""
    counts = np.zeros(vocab_size, dtype=np.float64)
    for ids in token_lists:
        np.add.at(counts, np.asarray(ids, dtype=np.int64), 1)
    return np.log((counts + 1) / (counts.sum() + vocab_size))
