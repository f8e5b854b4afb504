"""Likelihood attacks: each reads the one scoring pass of the fine-tuned model (and the base model's, as a
reference) and needs no training. Registered in :mod:`memlens.attacks.registry`; higher score = member."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
from pydantic import Field

from memlens.attacks.registry import AttackInputs, AttackSettings, mean_nll, register
from memlens.score import SequenceStats


class MinKSettings(AttackSettings):
    fraction: float = Field(0.2, gt=0, le=1, description="k: the fraction of a record's tokens averaged (the least "
                            "likely ones).")


class DcPddSettings(AttackSettings):
    clip: float = Field(0.01, gt=0, description="a: the upper bound on each token's calibrated score.")


def lowest_k_mean(stats: SequenceStats, values: np.ndarray, fraction: float) -> np.ndarray:
    """Per sequence, the mean of its `max(1, int(fraction * n))` smallest values. `values`: (scored tokens,), one
    per row of `stats`; returns (sequences,), NaN for a sequence without scored tokens."""
    out = np.full(len(stats), np.nan)
    for i in range(len(stats)):
        seq = values[stats.offsets[i]:stats.offsets[i + 1]]
        if len(seq) == 0:
            continue
        k = max(1, int(fraction * len(seq)))
        out[i] = np.partition(seq, k - 1)[:k].mean()
    return out


@register("loss", description="LOSS (Yeom et al. 2018): minus the mean token NLL under the fine-tuned model.")
def loss(x: AttackInputs, s: AttackSettings) -> np.ndarray:
    return -mean_nll(x)


@register("ref_ratio", needs={"ref"},
          description="The study's reference ratio: mean NLL under the base model / mean NLL under the "
          "fine-tuned model (the study's LR = P_ref/P_ft is small for members; this is large).")
def ref_ratio(x: AttackInputs, s: AttackSettings) -> np.ndarray:
    return mean_nll(x, "ref") / mean_nll(x, "ft")


@register("ref_llr", needs={"ref"},
          description="Textbook log-likelihood ratio: summed NLL under the base model minus summed NLL "
          "under the fine-tuned model, i.e. log P_ft(x) - log P_ref(x).")
def ref_llr(x: AttackInputs, s: AttackSettings) -> np.ndarray:
    return x.ft.reduce("logprob", "sum") - x.ref.reduce("logprob", "sum")


def zlib_lengths(texts: Sequence[str]) -> np.ndarray:
    """(records,) each text's zlib-compressed length in bytes (the zlib ratio's denominator)."""
    return np.array([len(zlib.compress(t.encode("utf-8"))) for t in texts], dtype=np.float64)


@register("zlib", description="zlib ratio (Carlini et al. 2021): minus the mean NLL over the zlib-compressed "
          "length of the text in bytes.")
def zlib_ratio(x: AttackInputs, s: AttackSettings) -> np.ndarray:
    return -mean_nll(x) / zlib_lengths(x.texts)


@register("lowercase", needs={"lower"},
          description="Lowercase ratio (Carlini et al. 2021): log perplexity of the lowercased text minus "
          "that of the text, both under the fine-tuned model.")
def lowercase(x: AttackInputs, s: AttackSettings) -> np.ndarray:
    return mean_nll(x, "ft_lower") - mean_nll(x)


@register("min_k", settings=MinKSettings,
          description="Min-K% Prob (Shi et al. 2024): mean log-prob of the k% least likely tokens (k: `fraction`).")
def min_k(x: AttackInputs, s: MinKSettings) -> np.ndarray:
    return lowest_k_mean(x.ft, x.ft.logprob.astype(np.float64), s.fraction)


@register("min_k_pp", needs={"moments"}, settings=MinKSettings,
          description="Min-K%++ (Zhang et al. 2024): per token (log p - mu) / sigma under the predicted "
          "distribution, mean of the k% smallest (k: `fraction`).")
def min_k_pp(x: AttackInputs, s: MinKSettings) -> np.ndarray:
    return min_k_pp_scores(x.ft, s.fraction)


def min_k_pp_scores(stats: SequenceStats, fraction: float, which: str = "the fine-tuned model") -> np.ndarray:
    """(records,) Min-K%++ of each record under one model (Zhang et al. 2024, "Min-K%++: Improved Baseline for
    Detecting Pre-Training Data from Large Language Models"): per token
    z_t = (log p(x_t | x_<t) - mu_t) / sigma_t, mu_t and sigma_t^2 the mean and variance of log p under the predicted
    distribution at t, averaged over the k% smallest z_t (`fraction`). `which` names the model in the error raised
    when its moments were not computed (NaN)."""
    if len(stats.mu) and np.isnan(stats.mu).all():
        raise ValueError(f"Min-K%++ needs the moments of log p under {which}, which were scored without them "
                         "(token_stats(moments=False))")
    z = (stats.logprob.astype(np.float64) - stats.mu) / np.sqrt(np.maximum(stats.sigma2.astype(np.float64), 1e-12))
    return lowest_k_mean(stats, z, fraction)


@register("min_k_pp_ref", needs={"moments", "ref", "ref_moments"}, settings=MinKSettings,
          description="Min-K%++ calibrated by the base model: the record's Min-K%++ (Zhang et al. 2024) under the "
          "fine-tuned model minus its Min-K%++ under the base model, each the mean of its own k% smallest z-scores "
          "(k: `fraction`): the reference-model calibration (Carlini et al. 2021; Mireshghallah et al. 2022) that "
          "ref_ratio applies to the loss, applied to Min-K%++ (memaudit's headline attack).")
def min_k_pp_ref(x: AttackInputs, s: MinKSettings) -> np.ndarray:
    return min_k_pp_scores(x.ft, s.fraction) - min_k_pp_scores(x.ref, s.fraction, "the base model")


@register("dc_pdd", needs={"token_freq"}, settings=DcPddSettings,
          description="DC-PDD (Zhang et al. 2024): mean over each token's first occurrence of "
          "min(p(token) * -log f(token), a), f from mia.reference_corpus (Laplace-smoothed), a: `clip`.")
def dc_pdd(x: AttackInputs, s: DcPddSettings) -> np.ndarray:
    ft, out = x.ft, np.full(len(x.ft), np.nan)
    prob = np.exp(ft.logprob.astype(np.float64))
    for i in range(len(ft)):
        ids = ft.token_ids[ft.offsets[i]:ft.offsets[i + 1]]
        if len(ids) == 0:
            continue
        _, first = np.unique(ids, return_index=True)
        alpha = prob[ft.offsets[i] + first] * -x.token_log_freq[ids[first]]
        out[i] = np.minimum(alpha, s.clip).mean()
    return out


def token_log_frequencies(token_lists, vocab_size: int) -> np.ndarray:
    """(vocab_size,) Laplace-smoothed log frequency of every token id over a reference corpus (DC-PDD)."""
    counts = np.zeros(vocab_size, dtype=np.float64)
    for ids in token_lists:
        np.add.at(counts, np.asarray(ids, dtype=np.int64), 1)
    return np.log((counts + 1) / (counts.sum() + vocab_size))


__all__ = ["DcPddSettings", "MinKSettings", "lowest_k_mean", "min_k_pp_scores", "token_log_frequencies"]
