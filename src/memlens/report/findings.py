"""The study's three findings, tested on this study's data.

Each verdict is `holds`, `does not hold` or `inconclusive`, with the numbers behind it. The thresholds
are stated in the reason so a reader can disagree with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

ALPHA = 0.05
QK = ("q", "k")
VO = ("v", "o")


@dataclass
class Finding:
    title: str
    verdict: str  # "holds" | "does not hold" | "inconclusive"
    reason: str


def finding_value_output(primary: pd.DataFrame, delong: pd.DataFrame) -> Finding:
    """(1) Adapting value/output matrices memorizes more than query/key at equal rank."""
    title = "(1) Adapting value/output matrices memorizes more than query/key at equal rank"
    if primary.empty:
        return Finding(title, "inconclusive", "no membership-inference results")
    lora = primary[primary.method == "lora"] if "method" in primary else primary
    vo = lora[lora.target_modules.isin(VO)]
    qk = lora[lora.target_modules.isin(QK)]
    ranks = sorted(set(vo["rank"]) & set(qk["rank"]))
    if not ranks:
        return Finding(title, "inconclusive", "needs single-matrix runs of [v] or [o] and of [q] or [k] at a "
                       f"common rank; this grid has {sorted(lora.target_modules.unique())} at ranks "
                       f"{sorted(int(r) for r in lora['rank'].unique())}")
    per_rank = []
    for rank in ranks:
        a, b = vo[vo["rank"] == rank].auc.mean(), qk[qk["rank"] == rank].auc.mean()
        per_rank.append((rank, a, b))
    text = "; ".join(f"rank {r}: v/o {a:.3f} vs q/k {b:.3f}" for r, a, b in per_rank)
    tests = pd.DataFrame()
    if len(delong):
        is_pair = (delong.set_a.isin(VO) & delong.set_b.isin(QK)) | (delong.set_a.isin(QK) & delong.set_b.isin(VO))
        tests = delong[is_pair & delong["rank"].isin(ranks)].copy()
        if len(tests):
            flip = tests.set_a.isin(QK)  # orient every test as v/o minus q/k
            tests["diff_vo"] = np.where(flip, -tests.auc_diff, tests.auc_diff)
    if tests.empty:
        return Finding(title, "inconclusive", f"mean AUC {text}; no paired DeLong test available between v/o "
                       "and q/k runs (the same records scored under both), so the difference is untested")
    vo_sig = int(((tests.diff_vo > 0) & (tests.p_value < ALPHA)).sum())
    qk_sig = int(((tests.diff_vo < 0) & (tests.p_value < ALPHA)).sum())
    detail = (f"mean AUC {text}; paired DeLong tests (p < {ALPHA}): {vo_sig} of {len(tests)} favour v/o, "
              f"{qk_sig} favour q/k (median p = {tests.p_value.median():.3g})")
    if all(a > b for _, a, b in per_rank) and vo_sig > len(tests) / 2 and qk_sig == 0:
        return Finding(title, "holds", detail)
    if qk_sig > 0 and qk_sig >= vo_sig or all(a <= b for _, a, b in per_rank) and vo_sig == 0:
        return Finding(title, "does not hold", detail)
    return Finding(title, "inconclusive", detail + " (mixed or not significant in most pairs)")


def finding_perplexity(members: pd.DataFrame) -> Finding:
    """(2) Lower fine-tuned perplexity goes with more verbatim reproduction; base perplexity does not."""
    title = ("(2) Records with lower perplexity under the fine-tuned model are reproduced more; "
             "base-model perplexity shows no such link")
    needed = {"ngram_share", "ppl_ft", "ppl_base"}
    if members.empty or not needed <= set(members.columns):
        return Finding(title, "inconclusive", "no extraction results on member records")
    frame = members.dropna(subset=list(needed))
    if len(frame) < 10 or frame.ngram_share.nunique() < 2:
        return Finding(title, "inconclusive", f"too few member records with varied n-gram share ({len(frame)})")
    ft = stats.spearmanr(frame.ngram_share, frame.ppl_ft)
    base = stats.spearmanr(frame.ngram_share, frame.ppl_base)
    detail = (f"Spearman r(n-gram share, fine-tuned ppl) = {ft.statistic:.3f} (p = {ft.pvalue:.3g}); "
              f"r(n-gram share, base ppl) = {base.statistic:.3f} (p = {base.pvalue:.3g}); n = {len(frame)} "
              "member records pooled over runs")
    ft_link = ft.statistic < 0 and ft.pvalue < ALPHA
    base_weaker = base.pvalue >= ALPHA or abs(base.statistic) < abs(ft.statistic)
    if ft_link and base_weaker:
        return Finding(title, "holds", detail)
    if not ft_link and ft.pvalue < ALPHA or ft_link and not base_weaker:
        return Finding(title, "does not hold", detail)
    return Finding(title, "inconclusive", detail + " (no significant link with fine-tuned perplexity)")


def finding_rank(primary: pd.DataFrame) -> Finding:
    """(3) AUC rises with LoRA rank, with diminishing returns."""
    title = "(3) Membership AUC rises with LoRA rank, with diminishing returns"
    lora = primary[primary.method == "lora"] if len(primary) and "method" in primary else primary
    if lora.empty:
        return Finding(title, "inconclusive", "no LoRA membership-inference results")
    curves = lora.groupby(["target_modules", "rank"]).auc.mean().reset_index()
    usable = {t: g.sort_values("rank") for t, g in curves.groupby("target_modules") if g["rank"].nunique() >= 3}
    if not usable:
        return Finding(title, "inconclusive", f"needs at least 3 ranks per matrix set; ranks here: "
                       f"{sorted(int(r) for r in lora['rank'].unique())}")
    rising = diminishing = 0
    parts = []
    for targets, g in usable.items():
        log_rank, auc = np.log2(g["rank"].to_numpy(float)), g.auc.to_numpy()
        rho = stats.spearmanr(g["rank"], auc).statistic
        # Gain per doubling of the rank in the lower and the upper half of the rank range.
        half = len(g) // 2
        low = (auc[half] - auc[0]) / max(log_rank[half] - log_rank[0], 1e-9)
        high = (auc[-1] - auc[half]) / max(log_rank[-1] - log_rank[half], 1e-9)
        rising += rho > 0 and auc[-1] > auc[0]
        diminishing += low > 0 and high < low
        parts.append(f"[{targets}] AUC {' -> '.join(f'{a:.3f}' for a in auc)} over ranks "
                     f"{[int(r) for r in g['rank']]} (Spearman {rho:.2f}; gain per doubling {low:+.3f} then {high:+.3f})")
    detail = "; ".join(parts)
    if rising == len(usable) and diminishing == len(usable):
        return Finding(title, "holds", detail)
    if rising == 0:
        return Finding(title, "does not hold", detail)
    return Finding(title, "inconclusive", detail)
