"""Finding (1) at matched fit: v/o against q/k at equal held-out perplexity gain rather than at equal rank.

Equal rank asks whether v/o memorize more per trainable parameter; matched fit asks whether they memorize more for
what they learn (v/o adapters lower held-out perplexity more at the same rank and learning rate, so part of their
AUC may be fit). Per replicate unit (the record draw; :mod:`memlens.report.replicates`) and rank, each side's curve
over the learning rates (at each rate the mean over its matrix sets of the gain and the AUC, points sorted by gain)
is interpolated linearly: AUC at equal gain over the gains both sides reach, and gain at equal AUC over the AUCs
both reach. A one-sample t over units tests each. Where no unit has a common range, the nearest pairs of
configurations (v/o against q/k, closest in gain) are printed with what they suggest.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from memlens.report.findings import QK, TITLE_VO, VO, Finding
from memlens.report.inference import INCONCLUSIVE, REVERSED, MeanTest
from memlens.report.replicates import per_unit, unit_of

MATCHED_POINTS = 20  # values at which the two sides' curves are compared, over their common range
MIN_UNITS = 2
NEAREST = 3          # nearest pairs printed when the ranges do not overlap
SCOPE = "matched fit"


def utility_gain(primary: pd.DataFrame, utility: pd.DataFrame) -> pd.DataFrame:
    """The primary attack's rows with each run's fit: `gain` = 1 - utility-split perplexity under the fine-tuned
    model / under the base model (what fine-tuning gained on held-out text)."""
    if primary.empty or utility.empty or not {"utility_ppl", "base_utility_ppl"} <= set(utility.columns):
        return pd.DataFrame()
    fit = utility.assign(gain=1 - utility.utility_ppl / utility.base_utility_ppl)[["run_id", "gain"]]
    return primary.merge(fit, on="run_id", how="inner").dropna(subset=["gain", "auc"])


def side_curves(points: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """{side: (rates,) rows of mean `gain` and `auc` over the side's matrix sets at each learning rate}, sorted by
    gain; `points` are one unit's runs at one rank."""
    return {side: g.groupby("learning_rate")[["gain", "auc"]].mean().sort_values("gain")
            for side, g in points.groupby("side")}


def matched_differences(curves: dict[str, pd.DataFrame]) -> tuple[float | None, float | None]:
    """(mean AUC(v/o) - AUC(q/k) at equal gain, mean gain(q/k) - gain(v/o) at equal AUC), each over
    :data:`MATCHED_POINTS` values spread over the two curves' common range; None where the ranges do not overlap.
    Both are positive when v/o memorize more for what they learn."""
    if set(curves) != {"vo", "qk"} or min(len(c) for c in curves.values()) < 2:
        return None, None

    def compare(x: str, y: str) -> float | None:
        sorted_ = {s: c.sort_values(x) for s, c in curves.items()}
        low = max(c[x].min() for c in sorted_.values())
        high = min(c[x].max() for c in sorted_.values())
        if not high > low:
            return None
        grid = np.linspace(low, high, MATCHED_POINTS)
        vo, qk = (np.interp(grid, sorted_[s][x].to_numpy(), sorted_[s][y].to_numpy()) for s in ("vo", "qk"))
        return float(np.mean(vo - qk))

    auc_at_gain = compare("gain", "auc")
    gain_at_auc = compare("auc", "gain")
    return auc_at_gain, None if gain_at_auc is None else -gain_at_auc


def nearest_pairs(points: pd.DataFrame, n: int = NEAREST) -> tuple[list[str], str]:
    """The `n` (v/o, q/k) configuration pairs closest in held-out gain (means over replicates), described, and what
    they suggest: which side reaches a higher AUC with no more gain (it memorizes more per unit of fit)."""
    keys = ["target_modules", "rank", "learning_rate"]
    configs = points.groupby([*keys, "side"])[["gain", "auc"]].mean().reset_index()
    vo, qk = configs[configs.side == "vo"], configs[configs.side == "qk"]
    pairs = vo.merge(qk, how="cross", suffixes=("_vo", "_qk"))
    pairs = pairs.assign(distance=(pairs.gain_vo - pairs.gain_qk).abs()).nsmallest(n, "distance")

    def label(row, side: str) -> str:
        return (f"[{row[f'target_modules_{side}']}] r{int(row[f'rank_{side}'])} lr{row[f'learning_rate_{side}']:g} "
                f"gain {row[f'gain_{side}']:.3f} AUC {row[f'auc_{side}']:.3f}")

    said = [f"{label(r, 'vo')} vs {label(r, 'qk')}" for _, r in pairs.iterrows()]
    qk_more = int(((pairs.auc_qk >= pairs.auc_vo) & (pairs.gain_qk <= pairs.gain_vo)).sum())
    vo_more = int(((pairs.auc_vo >= pairs.auc_qk) & (pairs.gain_vo <= pairs.gain_qk)).sum())
    if qk_more == len(pairs):
        suggests = "in every nearest pair q/k reach an AUC at least as high with no more gain: q/k memorize more per "
        suggests += "unit of fit (the opposite of finding 1), untested"
    elif vo_more == len(pairs):
        suggests = ("in every nearest pair v/o reach an AUC at least as high with no more gain: v/o memorize more per "
                    "unit of fit (finding 1's direction), untested")
    else:
        suggests = (f"mixed: q/k dominate in {qk_more}, v/o in {vo_more} of {len(pairs)} nearest pairs, the others "
                    "trade gain for AUC")
    return said, suggests


def finding_matched_fit(primary: pd.DataFrame, utility: pd.DataFrame) -> list[Finding]:
    """(1) at matched fit: AUC at equal gain and gain at equal AUC, each tested over replicate units, or the
    nearest pairs where the two sides' ranges do not overlap."""
    points = utility_gain(primary[primary.method == "lora"] if "method" in primary else primary, utility)
    if points.empty:
        return [Finding(TITLE_VO, INCONCLUSIVE, "no run has both a primary-attack AUC and a utility-split perplexity "
                        "(data.utility_split)", number=1, scope=SCOPE)]
    points = points[points.target_modules.isin(VO + QK)].assign(
        side=lambda f: np.where(f.target_modules.isin(VO), "vo", "qk"))
    levels = points.learning_rate.nunique() if "learning_rate" in points else 1
    if levels < 2:
        return [Finding(TITLE_VO, INCONCLUSIVE, "needs a learning-rate ladder (grid.learning_rate with 2 or more "
                        "values) so each matrix set reaches several fits", number=1, scope=SCOPE)]
    unit = unit_of(points, ["target_modules", "rank", "learning_rate"])
    per = per_unit(points, ["target_modules", "side", "rank", "learning_rate"], ["gain", "auc"], unit)
    by_unit: dict[object, list[tuple[float | None, float | None]]] = {}
    ranks_used: list[dict[int, int]] = [{}, {}]  # per comparison: rank -> units with a common range there
    for key, g in per.groupby([unit.column, "rank"] if unit.column else ["rank"]):
        replicate, rank = (key[0], key[1]) if unit.column else (0, key[0])
        found = matched_differences(side_curves(g))
        by_unit.setdefault(replicate, []).append(found)
        for index, value in enumerate(found):
            if value is not None:
                ranks_used[index][int(rank)] = ranks_used[index].get(int(rank), 0) + 1
    gains = points.groupby("side").gain.agg(["min", "max"])
    reached = (f"held-out perplexity gain reached: v/o {gains.loc['vo', 'min']:.3f}-{gains.loc['vo', 'max']:.3f}, "
               f"q/k {gains.loc['qk', 'min']:.3f}-{gains.loc['qk', 'max']:.3f} over {levels} learning rates")
    findings = []
    for index, (what, label, unit_word, digits) in enumerate((
            ("AUC at equal gain", "AUC(v/o) - AUC(q/k) at equal held-out gain", "AUC", 3),
            ("gain at equal AUC", "gain(q/k) - gain(v/o) at equal AUC", "gain", 4))):
        values = [float(np.mean(v)) for v in ([d[index] for d in diffs if d[index] is not None]
                                              for diffs in by_unit.values()) if v]
        scope = f"{SCOPE}, {what}"
        if len(values) < MIN_UNITS:
            said, suggests = nearest_pairs(points)
            reason = (f"no common range of {what.split(' at ')[1].removeprefix('equal ')} between v/o and q/k "
                      f"({reached}); the two sides overlap in {len(values)} {unit.name}(s) and a test needs "
                      f"{MIN_UNITS}, so it cannot be compared at any fit this grid reaches; nearest pairs (mean over "
                      f"{unit.name}s): {'; '.join(said)}; {suggests}")
            findings.append(Finding(TITLE_VO, INCONCLUSIVE, reason, number=1, scope=scope,
                                    effect=f"untested; nearest pairs: {'; '.join(said)}; {suggests}"))
            continue
        test = MeanTest.of(np.array(values))
        verdict = test.verdict(tests=2, negligible=0.01 if unit_word == "AUC" else None)
        ranks = ", ".join(f"{r} ({unit.plural(n)})" for r, n in sorted(ranks_used[index].items()))
        reason = (f"{reached}; {test.describe(label, unit.plural(test.n).split(' ', 1)[1])}, each unit's value the "
                  f"mean over the ranks where both sides' curves overlap in it (ranks: {ranks}); positive: v/o "
                  f"memorize more for what they learn{' (reversed: q/k do)' if verdict == REVERSED else ''}")
        findings.append(Finding(TITLE_VO, verdict, reason, number=1, scope=scope,
                                test=f"one-sample t over {unit.describe(test.n)} of curves over learning rates "
                                     f"interpolated at {MATCHED_POINTS} common values",
                                correction="Bonferroni over the 2 matched-fit tests",
                                effect=test.effect(tests=2, unit=unit_word, digits=digits)))
    return findings


__all__ = ["finding_matched_fit", "matched_differences", "nearest_pairs", "utility_gain"]
