"""The study's three findings, tested on this study's data.

Each verdict is `holds`, `does not hold` or `inconclusive`, with the test, the correction for the tests made
together and the effect behind it; the thresholds are stated in the reason so a reader can disagree with them.

Two levels of evidence. Replicate level, when the grid has at least :data:`MIN_SEEDS` replicates of each
configuration: a replicate is one fine-tune, and replicates vary everything that is random (the training seed
and, with `grid.draw`, the record draw), so their variation decides, not the number of records: paired t-tests
over replicates (:mod:`memlens.report.inference`). Record level, with one replicate: DeLong tests between runs
scored on the same records, which leave the training variance out (said in the reason). A factor whose effect
may change sign is not pooled away: finding (1) is tested at each rank, with Holm's correction over the ranks
and a test of whether the difference depends on rank. A difference whose interval lies within
+-:data:`memlens.report.inference.NEGLIGIBLE_AUC` AUC is called absent.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from scipy import stats

from memlens.report.inference import (
    ALPHA,
    MeanTest,
    block_f_test,
    combined_correlations,
    holm,
    partial_correlation,
    steiger_z,
)

QK = ("q", "k")
VO = ("v", "o")
MIN_SEEDS = 2           # replicate-level tests need at least this many replicates per configuration
MIN_RECORDS = 10        # member records with extraction results a run needs for its own correlations
# Columns that, with the matrix set, identify a configuration (whatever else the grid varies).
CONFIG_COLUMNS = ("method", "rank", "canary_copies", "membership", "noise_multiplier", "model", "learning_rate")
# What varies between fine-tunes of one configuration: the training seed and the record draw.
REPLICATES = ("seed", "draw")
TITLE_VO = "(1) Adapting value/output matrices memorizes more than query/key at equal rank"


@dataclass
class Finding:
    title: str
    verdict: str  # "holds" | "does not hold" | "inconclusive"
    reason: str
    number: int = 0               # which of the 2024 study's findings: 1, 2 or 3
    scope: str | None = None      # where it is tested, e.g. "rank 4" (finding 1 per rank) or "matched fit"
    test: str | None = None       # the test behind the verdict
    correction: str | None = None  # the correction for the tests made together, if any
    effect: str | None = None     # the effect size with its interval


def _replicate_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in REPLICATES if c in frame and frame[c].notna().any()]


def _seeds(frame: pd.DataFrame) -> int:
    """The fewest replicates (distinct seeds x record draws) any (matrix set, rank) has."""
    replicate = _replicate_columns(frame)
    if not replicate or frame.empty:
        return 1
    keys = [c for c in ("target_modules", "rank") if c in frame]
    return int(frame.groupby(keys)[replicate].apply(lambda g: len(g.drop_duplicates())).min())


def _config_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in CONFIG_COLUMNS if c in frame and frame[c].notna().any()]


def at_rate(rows: pd.DataFrame, learning_rate: float) -> pd.DataFrame:
    """The rows (of runs, or of tests between runs) trained at `learning_rate` (the study's `train.learning_rate`):
    with a learning-rate ladder (grid.learning_rate) the findings at equal rank and across ranks compare runs of
    one recipe; the ladder's other rates serve the matched-fit comparison."""
    if rows.empty or "learning_rate" not in rows or rows.learning_rate.nunique() < 2:
        return rows
    return rows[np.isclose(rows.learning_rate.astype(float), learning_rate)]


def vo_minus_qk(primary: pd.DataFrame) -> pd.DataFrame:
    """Per (configuration but the matrices, replicate): mean AUC of the v/o runs minus that of the q/k runs."""
    keys = [*_config_columns(primary), *_replicate_columns(primary)]
    frame = primary.assign(side=np.where(primary.target_modules.isin(VO), "vo",
                                         np.where(primary.target_modules.isin(QK), "qk", None)))
    frame = frame.dropna(subset=["side"])
    wide = frame.pivot_table(index=keys, columns="side", values="auc", aggfunc="mean").dropna()
    if wide.empty or not {"vo", "qk"} <= set(wide.columns):
        return pd.DataFrame(columns=[*keys, "diff"])
    return (wide["vo"] - wide["qk"]).rename("diff").reset_index()


def vo_qk_tests(delong: pd.DataFrame) -> pd.DataFrame:
    """The DeLong tests between a v/o and a q/k run, oriented v/o minus q/k (`diff_vo`)."""
    if delong.empty:
        return delong
    is_pair = (delong.set_a.isin(VO) & delong.set_b.isin(QK)) | (delong.set_a.isin(QK) & delong.set_b.isin(VO))
    tests = delong[is_pair].copy()
    tests["diff_vo"] = np.where(tests.set_a.isin(QK), -tests.auc_diff, tests.auc_diff)
    return tests


def finding_value_output(primary: pd.DataFrame, delong: pd.DataFrame) -> list[Finding]:
    """(1) Adapting value/output matrices memorizes more than query/key at equal rank: one verdict per rank
    shared by v/o and q/k runs (the effect may change sign with rank, so it is never pooled over ranks), with
    Holm's correction over the ranks. `delong`: the verdict design's DeLong tests (with `p_holm`, Holm over the
    design's tests)."""
    if primary.empty:
        return [Finding(TITLE_VO, "inconclusive", "no membership-inference results", number=1)]
    lora = primary[primary.method == "lora"] if "method" in primary else primary
    vo, qk = lora[lora.target_modules.isin(VO)], lora[lora.target_modules.isin(QK)]
    ranks = sorted(set(vo["rank"]) & set(qk["rank"]))
    if not ranks:
        return [Finding(TITLE_VO, "inconclusive", "needs single-matrix runs of [v] or [o] and of [q] or [k] at a "
                        f"common rank; this grid has {sorted(lora.target_modules.unique())} at ranks "
                        f"{sorted(int(r) for r in lora['rank'].unique())}", number=1)]
    if _seeds(lora[lora.target_modules.isin(VO + QK)]) >= MIN_SEEDS:
        return _vo_qk_per_rank(lora, ranks)
    return _vo_qk_records(lora, ranks, vo_qk_tests(delong))


def _rank_dependence(diffs: pd.DataFrame) -> str:
    """Whether v/o - q/k depends on rank: the block F test of rank with the replicates (and any other
    configuration) as blocks."""
    blocks = [c for c in diffs.columns if c not in ("rank", "diff")]
    table = diffs.pivot_table(index="rank", columns=blocks, values="diff", aggfunc="mean") if blocks else None
    test = block_f_test(table.to_numpy()) if table is not None else None
    if test is None:
        return ""
    depends = "depends on rank" if test.p_value < ALPHA else "shows no significant dependence on rank"
    return (f"; the difference {depends} ({test.describe('rank x (v/o - q/k), replicates as blocks')}), so it is "
            "tested at each rank")


def _vo_qk_per_rank(lora: pd.DataFrame, ranks: list[int]) -> list[Finding]:
    diffs = vo_minus_qk(lora)
    replicate = " x ".join({"seed": "seeds", "draw": "record draws"}[c] for c in _replicate_columns(lora))
    tests = {rank: MeanTest.of(diffs[diffs["rank"] == rank]["diff"].to_numpy()) for rank in ranks}
    tested = [r for r in ranks if tests[r].n >= MIN_SEEDS]
    adjusted = dict(zip(tested, holm([tests[r].p_value for r in tested]))) if tested else {}
    dependence = _rank_dependence(diffs[diffs["rank"].isin(tested)])
    findings = []
    for rank in ranks:
        test, means = tests[rank], lora[lora["rank"] == rank].groupby(lora.target_modules.isin(VO)).auc.mean()
        level = f"mean AUC v/o {means.get(True, np.nan):.3f} vs q/k {means.get(False, np.nan):.3f}"
        if rank not in adjusted:
            findings.append(Finding(TITLE_VO, "inconclusive", f"{level}; fewer than {MIN_SEEDS} replicates with both "
                                    "sides at this rank", number=1, scope=f"rank {rank}"))
            continue
        low, high = test.interval(1 - ALPHA / len(tested))
        verdict = test.verdict(adjusted[rank], tests=len(tested))
        reversed_ = " (reversed: q/k memorizes more)" if verdict == "does not hold" and adjusted[rank] < ALPHA else ""
        reason = (f"{level}; {test.describe('AUC(v/o) - AUC(q/k)')}, Holm-adjusted p = {adjusted[rank]:.3g} over "
                  f"{len(tested)} rank(s){reversed_}{dependence}")
        findings.append(Finding(
            TITLE_VO, verdict, reason, number=1, scope=f"rank {rank}",
            test=f"paired t over {test.n} replicates ({replicate})", correction=f"Holm over {len(tested)} rank(s)",
            effect=f"{test.mean:+.3f} AUC [{low:+.3f}, {high:+.3f}] ({1 - ALPHA / len(tested):.1%} interval)"))
    return findings


def _vo_qk_records(lora: pd.DataFrame, ranks: list[int], tests: pd.DataFrame) -> list[Finding]:
    """One replicate per configuration: the DeLong tests at each rank, with Holm's correction over every v/o - q/k
    test of the design. A verdict needs a majority of a rank's tests significant one way after correction and
    none the other way; training variance is not in these tests, which the reason says."""
    caveat = ("; one fine-tune per configuration: these record-level tests leave out the variation between "
              "fine-tunes (add seeds for replicate-level tests)")
    p_holm = tests.p_holm if "p_holm" in tests else pd.Series(holm(tests.p_value), index=tests.index) \
        if len(tests) else pd.Series(dtype=float)
    findings = []
    for rank in ranks:
        means = lora[lora["rank"] == rank].groupby(lora.target_modules.isin(VO)).auc.mean()
        level = f"mean AUC v/o {means.get(True, np.nan):.3f} vs q/k {means.get(False, np.nan):.3f}"
        here = tests[tests["rank"] == rank] if len(tests) else tests
        if here.empty:
            findings.append(Finding(TITLE_VO, "inconclusive",
                                    f"{level}; no paired DeLong test between v/o and q/k runs at this rank{caveat}",
                                    number=1, scope=f"rank {rank}"))
            continue
        significant = p_holm[here.index] < ALPHA
        n_vo, n_qk = int((significant & (here.diff_vo > 0)).sum()), int((significant & (here.diff_vo < 0)).sum())
        reason = (f"{level}; paired DeLong tests after Holm over {len(tests)}: {n_vo} of {len(here)} favour v/o, "
                  f"{n_qk} favour q/k (median raw p = {here.p_value.median():.3g}){caveat}")
        verdict = ("holds" if n_vo > len(here) / 2 and n_qk == 0 else
                   "does not hold" if n_qk > len(here) / 2 and n_vo == 0 else "inconclusive")
        findings.append(Finding(TITLE_VO, verdict, reason, number=1, scope=f"rank {rank}",
                                test=f"DeLong, {len(here)} pair(s) of runs on the same records",
                                correction=f"Holm over {len(tests)} test(s)",
                                effect=f"{here.diff_vo.mean():+.3f} AUC (mean over pairs)"))
    return findings


def utility_gain(primary: pd.DataFrame, utility: pd.DataFrame) -> pd.DataFrame:
    """The primary attack's rows with each run's fit: `gain` = 1 - utility-split perplexity under the fine-tuned
    model / under the base model (what fine-tuning gained on held-out text)."""
    if primary.empty or utility.empty or not {"utility_ppl", "base_utility_ppl"} <= set(utility.columns):
        return pd.DataFrame()
    fit = utility.assign(gain=1 - utility.utility_ppl / utility.base_utility_ppl)[["run_id", "gain"]]
    return primary.merge(fit, on="run_id", how="inner").dropna(subset=["gain", "auc"])


MATCHED_POINTS = 20  # gains at which the two sides' AUC curves are compared, over their common range


def _matched_difference(points: pd.DataFrame) -> float | None:
    """Mean over a grid of gains in the two sides' common range of AUC(v/o at that gain) - AUC(q/k at that gain),
    each side's AUC interpolated linearly between its runs sorted by gain; None without a common range."""
    sides = {side: g.groupby("gain").auc.mean().sort_index() for side, g in points.groupby("side")}
    if set(sides) != {"vo", "qk"} or min(len(c) for c in sides.values()) < 2:
        return None
    low, high = max(c.index.min() for c in sides.values()), min(c.index.max() for c in sides.values())
    if not high > low:
        return None
    grid = np.linspace(low, high, MATCHED_POINTS)
    vo, qk = (np.interp(grid, sides[s].index.to_numpy(), sides[s].to_numpy()) for s in ("vo", "qk"))
    return float(np.mean(vo - qk))


def finding_matched_fit(primary: pd.DataFrame, utility: pd.DataFrame) -> Finding:
    """(1) at matched fit: v/o against q/k at equal held-out perplexity gain rather than at equal rank. Equal rank
    asks whether v/o memorize more per trainable parameter; matched fit asks whether they memorize more for what
    they learn (v/o adapters lower held-out perplexity more at the same rank and learning rate, so part of their
    AUC may be fit). Per replicate, each side's AUC against its runs' gains (a learning-rate ladder, and ranks) is
    interpolated and compared over the gains both reach; a paired t over replicates tests the mean difference."""
    scope = "matched fit"
    points = utility_gain(primary[primary.method == "lora"] if "method" in primary else primary, utility)
    if points.empty:
        return Finding(TITLE_VO, "inconclusive", "no run has both a primary-attack AUC and a utility-split perplexity "
                       "(data.utility_split)", number=1, scope=scope)
    points = points[points.target_modules.isin(VO + QK)].assign(
        side=lambda f: np.where(f.target_modules.isin(VO), "vo", "qk"))
    levels = points.learning_rate.nunique() if "learning_rate" in points else 1
    if levels < 2:
        return Finding(TITLE_VO, "inconclusive", "needs a learning-rate ladder (grid.learning_rate with 2 or more "
                       "values) so each matrix set reaches several fits", number=1, scope=scope)
    replicate = _replicate_columns(points)
    diffs = [d for _, g in points.groupby(replicate or (lambda _: 0)) if (d := _matched_difference(g)) is not None]
    gains = points.groupby("side").gain.agg(["min", "max"])
    reached = (f"held-out perplexity gain reached: v/o {gains.loc['vo', 'min']:.3f}-{gains.loc['vo', 'max']:.3f}, "
               f"q/k {gains.loc['qk', 'min']:.3f}-{gains.loc['qk', 'max']:.3f} over {levels} learning rates")
    if len(diffs) < MIN_SEEDS:
        return Finding(TITLE_VO, "inconclusive", f"no common range of fit between v/o and q/k ({reached}); the two "
                       f"sides of a replicate overlap in {len(diffs)} replicate(s) and a test needs {MIN_SEEDS}, so "
                       "memorization at matched fit cannot be compared at any fit this grid reaches",
                       number=1, scope=scope)
    test = MeanTest.of(np.array(diffs))
    reason = (f"{reached}; "
              f"{test.describe('AUC(v/o) - AUC(q/k) at equal gain')}; this tests memorization for what is learned, "
              "the per-rank verdicts test it per trainable parameter")
    return Finding(TITLE_VO, test.verdict(), reason, number=1, scope=scope,
                   test=f"paired t over {test.n} replicates of curves interpolated at {MATCHED_POINTS} common gains",
                   correction="none: one test (a separate claim from the per-rank family)",
                   effect=f"{test.mean:+.3f} AUC [{test.ci_low:+.3f}, {test.ci_high:+.3f}]")


# ----------------------------------------------------------------------------------------- finding (2)
OUTCOMES = {"ngram_gain": "n-gram share gained over the base model", "ngram_share": "n-gram share"}
DETECTABLE_R = 0.07  # the size of correlation finding (2) was seen at (llama-tiny, 2026): the power statement's


def outcome_of(members: pd.DataFrame) -> str:
    """The per-record outcome finding (2) correlates with perplexity: the share of the suffix reproduced under the
    fine-tuned model minus under the base model on the same prompt (`ngram_gain`: what fine-tuning added, off the
    floor of records nobody reproduces), or the share alone where the base model's rows are missing."""
    return "ngram_gain" if "ngram_gain" in members and members.ngram_gain.notna().any() else "ngram_share"


def per_run_correlations(members: pd.DataFrame, outcome: str | None = None) -> pd.DataFrame:
    """Per run: Spearman r of the outcome (:func:`outcome_of`) with the fine-tuned and the base perplexity, r between
    the two perplexities, the partial r(outcome, fine-tuned | base), and Steiger's z for r_ft - r_base (negative:
    the fine-tuned link is the stronger negative one). Runs with fewer than MIN_RECORDS varied records are left
    out."""
    outcome = outcome or outcome_of(members)
    rows = []
    for run_id, g in members.dropna(subset=[outcome, "ppl_ft", "ppl_base"]).groupby("run_id"):
        if len(g) < MIN_RECORDS or g[outcome].nunique() < 2 or g.ppl_ft.nunique() < 2 or g.ppl_base.nunique() < 2:
            continue
        r_ft = stats.spearmanr(g[outcome], g.ppl_ft)
        r_base = stats.spearmanr(g[outcome], g.ppl_base)
        r_fb = float(stats.spearmanr(g.ppl_ft, g.ppl_base).statistic)
        z = steiger_z(r_ft.statistic, r_base.statistic, r_fb, len(g))
        rows.append({"run_id": run_id, "outcome": outcome, "n": len(g), "r_ft": float(r_ft.statistic),
                     "p_ft": float(r_ft.pvalue), "r_base": float(r_base.statistic), "p_base": float(r_base.pvalue),
                     "r_ft_base": r_fb, "partial_r_ft": partial_correlation(r_ft.statistic, r_base.statistic, r_fb),
                     "steiger_z": z, "steiger_p": float(2 * stats.norm.sf(abs(z)))})
    return pd.DataFrame(rows)


def finding_perplexity(members: pd.DataFrame, per_run: pd.DataFrame | None = None) -> Finding:
    """(2) Lower fine-tuned perplexity goes with more verbatim reproduction; base perplexity does not.
    `per_run`: :func:`per_run_correlations` of `members`, when already computed."""
    return replace(_finding_perplexity(members, per_run), number=2)


def _finding_perplexity(members: pd.DataFrame, per_run: pd.DataFrame | None) -> Finding:
    title = ("(2) Records with lower perplexity under the fine-tuned model are reproduced more; "
             "base-model perplexity shows no such link")
    if members.empty or not {"ngram_share", "ppl_ft", "ppl_base"} <= set(members.columns):
        return Finding(title, "inconclusive", "no extraction results on member records")
    outcome = outcome_of(members)
    frame = members.dropna(subset=[outcome, "ppl_ft", "ppl_base"])
    if len(frame) < 10 or frame[outcome].nunique() < 2:
        return Finding(title, "inconclusive", f"too few member records with a varied {OUTCOMES[outcome]} "
                       f"({len(frame)})")
    runs = per_run if per_run is not None else (per_run_correlations(frame, outcome) if "run_id" in frame
                                                else pd.DataFrame())
    if len(runs) >= 2:
        return _perplexity_per_run(title, frame, runs, outcome)
    ft = stats.spearmanr(frame[outcome], frame.ppl_ft)
    base = stats.spearmanr(frame[outcome], frame.ppl_base)
    detail = (f"Spearman r({OUTCOMES[outcome]}, fine-tuned ppl) = {ft.statistic:.3f} (p = {ft.pvalue:.3g}); "
              f"r({OUTCOMES[outcome]}, base ppl) = {base.statistic:.3f} (p = {base.pvalue:.3g}); n = {len(frame)} "
              "member records pooled over runs (fewer than 2 runs with enough records for per-run correlations)")
    ft_link = ft.statistic < 0 and ft.pvalue < ALPHA
    base_weaker = base.pvalue >= ALPHA or abs(base.statistic) < abs(ft.statistic)
    test = dict(test=f"Spearman r over {len(frame)} pooled records", effect=f"r_ft = {ft.statistic:+.3f}")
    if ft_link and base_weaker:
        return Finding(title, "holds", detail, **test)
    if not ft_link and ft.pvalue < ALPHA or ft_link and not base_weaker:
        return Finding(title, "does not hold", detail, **test)
    return Finding(title, "inconclusive", detail + " (no significant link with fine-tuned perplexity)", **test)


def _perplexity_verdict(combined: dict) -> tuple[str, str]:
    """(verdict, why) from combined correlations: the fine-tuned link negative (its interval below 0), and the base
    link absent (its interval includes 0) or significantly weaker and the fine-tuned link surviving it."""
    (_, ft_lo, ft_hi), (_, base_lo, base_hi) = combined["r_ft"], combined["r_base"]
    (_, _, partial_hi), (_, _, gap_hi) = combined["partial_r_ft"], combined["z_gap"]
    ft_link, base_absent = ft_hi < 0, base_lo <= 0 <= base_hi
    if ft_link and (base_absent or gap_hi < 0 and partial_hi < 0):
        why = ("the base link is absent" if base_absent else
               "the base link is present but significantly weaker, and the fine-tuned link survives controlling for it")
        return "holds", f"Both halves: the fine-tuned link is negative, and {why}"
    if ft_lo > 0:
        return "does not hold", "The fine-tuned link is positive"
    if ft_link:
        return "does not hold", ("First half holds; second half does not: the base-model link is present and not "
                                 "significantly weaker than the fine-tuned one")
    return "inconclusive", "The fine-tuned link's interval includes 0"


def _perplexity_per_run(title: str, members: pd.DataFrame, runs: pd.DataFrame, outcome: str) -> Finding:
    """Finding (2) from per-run correlations: both halves tested over runs and records."""
    k = len(runs)
    combined = combined_correlations(members, runs, outcome=outcome)
    (ft, ft_lo, ft_hi), (base, base_lo, base_hi) = combined["r_ft"], combined["r_base"]
    (partial, partial_lo, partial_hi), (gap, gap_lo, gap_hi) = combined["partial_r_ft"], combined["z_gap"]
    steiger_ft_stronger = int(((runs.steiger_z < 0) & (runs.steiger_p < ALPHA)).sum())
    ft_sig = int(((runs.r_ft < 0) & (runs.p_ft < ALPHA)).sum())
    base_sig = int((runs.p_base < ALPHA).sum())
    what = OUTCOMES[outcome]
    distinct = members.sample_id.nunique() if "sample_id" in members else int(runs.n.max())
    detail = (f"over {k} runs ({int(runs.n.median())} member records each, median; {distinct} distinct), outcome: "
              f"the {what}; Spearman correlations per run then averaged as Fisher z, with 95% intervals from a "
              f"bootstrap over runs and records: r({what}, fine-tuned ppl) = {ft:.3f} [{ft_lo:.3f}, {ft_hi:.3f}], "
              f"significant (p < {ALPHA}) in {ft_sig} of {k} runs; r({what}, base ppl) = {base:.3f} [{base_lo:.3f}, "
              f"{base_hi:.3f}], significant in {base_sig} of {k}; partial r(outcome, fine-tuned ppl | base ppl) = "
              f"{partial:.3f} [{partial_lo:.3f}, {partial_hi:.3f}]; z(r_ft) - z(r_base) = {gap:+.3f} [{gap_lo:+.3f}, "
              f"{gap_hi:+.3f}]; Steiger's test (fine-tuned link stronger than base link) significant in "
              f"{steiger_ft_stronger} of {k} runs")
    verdict, why = _perplexity_verdict(combined)
    runs_only, _ = _perplexity_verdict(combined_correlations(members, runs, outcome=outcome, records=False))
    disclosed = (f". Under a bootstrap over runs only (the interval this study used until it was replaced, after "
                 f"the 2026 grids had run, because it ignores which records were drawn) the verdict is: {runs_only}")
    needed = records_to_detect(DETECTABLE_R)
    scale = (f". Finding (2) cannot be tested at this scale: a correlation of {DETECTABLE_R} needs about {needed} "
             f"distinct member records for 80% power at alpha {ALPHA} (Fisher z); this study has {distinct}"
             if verdict == "inconclusive" and distinct < needed else "")
    return Finding(title, verdict, f"{detail}. {why}{scale}{disclosed}",
                   test=f"Spearman r per run, combined over {k} runs; bootstrap over runs and records",
                   correction="none: one test of each half; it holds only if both hold",
                   effect=f"r_ft = {ft:+.3f} [{ft_lo:+.3f}, {ft_hi:+.3f}], r_base = {base:+.3f}")


def records_to_detect(r: float, power: float = 0.8) -> int:
    """Records needed to detect a correlation of size `r` with a two-sided test at ALPHA and `power`, from Fisher's
    z (its standard error 1 / sqrt(n - 3)): n = ((z_{1 - alpha/2} + z_power) / atanh |r|)^2 + 3."""
    z = (stats.norm.ppf(1 - ALPHA / 2) + stats.norm.ppf(power)) / np.arctanh(abs(r))
    return int(np.ceil(z ** 2 + 3))


# ----------------------------------------------------------------------------------------- finding (3)
def rank_gains(lora: pd.DataFrame) -> pd.DataFrame:
    """Per (matrix set, other configuration, replicate) with at least 3 ranks: the AUC gain per doubling of the rank
    in the lower and the upper half of the rank range, and over the whole range."""
    keys = ["target_modules", *[c for c in _config_columns(lora) if c != "rank"], *_replicate_columns(lora)]
    keys = [k for k in keys if k in lora]
    rows = []
    for key, g in lora.groupby(keys, dropna=False):
        g = g.groupby("rank").auc.mean().reset_index().sort_values("rank")
        if len(g) < 3:
            continue
        log_rank, auc = np.log2(g["rank"].to_numpy(float)), g.auc.to_numpy()
        half = len(g) // 2
        low = (auc[half] - auc[0]) / max(log_rank[half] - log_rank[0], 1e-9)
        high = (auc[-1] - auc[half]) / max(log_rank[-1] - log_rank[half], 1e-9)
        rows.append({**dict(zip(keys, key if isinstance(key, tuple) else (key,))), "gain": auc[-1] - auc[0],
                     "gain_low": low, "gain_high": high})
    return pd.DataFrame(rows)


def finding_rank(primary: pd.DataFrame) -> Finding:
    """(3) AUC rises with LoRA rank, with diminishing returns."""
    return replace(_finding_rank(primary), number=3)


def _finding_rank(primary: pd.DataFrame) -> Finding:
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
                     f"{[int(r) for r in g['rank']]} (Spearman {rho:.2f}; "
                     f"gain per doubling {low:+.3f} then {high:+.3f})")
    detail = "; ".join(parts)
    if _seeds(lora) >= MIN_SEEDS:
        gains = rank_gains(lora)
        if len(gains) >= 2:
            rise = MeanTest.of(gains.gain.to_numpy())
            slowing = MeanTest.of((gains.gain_low - gains.gain_high).to_numpy())
            detail += (f"; replicate level, one curve per matrix set and replicate: "
                       f"{rise.describe('AUC(top rank) - AUC(lowest rank)')}; "
                       f"{slowing.describe('gain per doubling, lower minus upper half of the ranks')}")
            tested = dict(test=f"paired t over {rise.n} curves (matrix set x replicate), for the rise and for the "
                               "slowing", correction="none needed: it holds only if both hold (an intersection-union "
                               "test keeps its level)",
                          effect=f"rise {rise.mean:+.3f} AUC [{rise.ci_low:+.3f}, {rise.ci_high:+.3f}]; slowing "
                                 f"{slowing.mean:+.3f} [{slowing.ci_low:+.3f}, {slowing.ci_high:+.3f}] per doubling")
            if rise.verdict() == "holds" and slowing.verdict() == "holds":
                return Finding(title, "holds", detail, **tested)
            if rise.verdict() == "does not hold":
                return Finding(title, "does not hold", detail + " (no rise with rank)", **tested)
            if rise.verdict() == "holds" and slowing.verdict() == "does not hold":
                return Finding(title, "does not hold", detail + " (it rises, but without diminishing returns)",
                               **tested)
            return Finding(title, "inconclusive", detail, **tested)
    if rising == len(usable) and diminishing == len(usable):
        return Finding(title, "holds", detail)
    if rising == 0:
        return Finding(title, "does not hold", detail)
    return Finding(title, "inconclusive", detail)
