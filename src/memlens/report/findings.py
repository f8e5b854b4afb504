"""The study's three findings, tested on this study's data.

Each verdict is `holds`, `does not hold` or `inconclusive`, with the numbers behind it. The thresholds
are stated in the reason so a reader can disagree with them.

Two levels of evidence. Record level: paired DeLong tests between runs scored on the same records, and
rank correlations over the member records. Seed level, when the grid has at least :data:`MIN_SEEDS` seeds:
each test's unit is one fine-tune (a configuration at one seed), so the seed-to-seed variation of training
decides, not the number of records: a paired t-test over (configuration, seed) differences, and for
finding (2) the correlations computed per run and combined over runs (mean Fisher z, with an interval from a
bootstrap that resamples both the runs and the records they share). A difference whose 95% interval lies
within +-:data:`NEGLIGIBLE_AUC` AUC is called absent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

ALPHA = 0.05
QK = ("q", "k")
VO = ("v", "o")
MIN_SEEDS = 2           # seed-level tests need at least this many seeds per configuration
NEGLIGIBLE_AUC = 0.01   # a mean AUC difference whose 95% interval lies within +-this is "no difference"
MIN_RECORDS = 10        # member records with extraction results a run needs for its own correlations
N_BOOTSTRAP = 400       # resamples (of runs and records) for the intervals of combined correlations
# Columns that, with the matrix set, identify a configuration (whatever else the grid varies).
CONFIG_COLUMNS = ("method", "rank", "canary_copies", "membership", "noise_multiplier", "model")


@dataclass
class Finding:
    title: str
    verdict: str  # "holds" | "does not hold" | "inconclusive"
    reason: str


@dataclass
class MeanTest:
    """A one-sample t-test of paired differences (one per fine-tune pair) against 0."""

    n: int
    mean: float
    ci_low: float
    ci_high: float
    p_value: float

    @classmethod
    def of(cls, diffs: np.ndarray) -> "MeanTest":
        """The test of `diffs` (pairs,), one difference per fine-tune pair."""
        diffs = np.asarray(diffs, float)
        n, mean = len(diffs), float(np.mean(diffs))
        if n < 2 or np.std(diffs) == 0:
            return cls(n, mean, mean, mean, 0.0 if n >= 2 and mean != 0 else 1.0)
        test = stats.ttest_1samp(diffs, 0.0)
        ci = test.confidence_interval(1 - ALPHA)
        return cls(n, mean, float(ci.low), float(ci.high), float(test.pvalue))

    def describe(self, what: str) -> str:
        return (f"{what}: mean {self.mean:+.4f} (95% CI {self.ci_low:+.4f} to {self.ci_high:+.4f}), paired t-test "
                f"over {self.n} fine-tune pairs p = {self.p_value:.3g}")

    def verdict(self) -> str:
        """holds (significantly > 0), does not hold (significantly < 0, or within +-NEGLIGIBLE_AUC), else
        inconclusive."""
        if self.p_value < ALPHA and self.mean > 0:
            return "holds"
        if self.p_value < ALPHA and self.mean < 0:
            return "does not hold"
        if -NEGLIGIBLE_AUC < self.ci_low and self.ci_high < NEGLIGIBLE_AUC:
            return "does not hold"
        return "inconclusive"


def _seeds(frame: pd.DataFrame) -> int:
    if "seed" not in frame or frame.empty:
        return 1
    return int(frame.groupby([c for c in ("target_modules", "rank") if c in frame]).seed.nunique().min())


def _config_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in CONFIG_COLUMNS if c in frame and frame[c].notna().any()]


def vo_minus_qk(primary: pd.DataFrame) -> pd.DataFrame:
    """Per (configuration but the matrices, seed): mean AUC of the v/o runs minus that of the q/k runs."""
    keys = [*_config_columns(primary), "seed"]
    frame = primary.assign(side=np.where(primary.target_modules.isin(VO), "vo",
                                         np.where(primary.target_modules.isin(QK), "qk", None)))
    frame = frame.dropna(subset=["side"])
    wide = frame.pivot_table(index=keys, columns="side", values="auc", aggfunc="mean").dropna()
    if wide.empty or not {"vo", "qk"} <= set(wide.columns):
        return pd.DataFrame(columns=[*keys, "diff"])
    return (wide["vo"] - wide["qk"]).rename("diff").reset_index()


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
    record_level = ""
    vo_sig = qk_sig = 0
    if len(tests):
        vo_sig = int(((tests.diff_vo > 0) & (tests.p_value < ALPHA)).sum())
        qk_sig = int(((tests.diff_vo < 0) & (tests.p_value < ALPHA)).sum())
        record_level = (f"paired DeLong tests (p < {ALPHA}): {vo_sig} of {len(tests)} favour v/o, {qk_sig} favour "
                        f"q/k (median p = {tests.p_value.median():.3g})")
    if _seeds(lora[lora.target_modules.isin(VO + QK)]) >= MIN_SEEDS:
        diffs = vo_minus_qk(lora)
        test = MeanTest.of(diffs["diff"].to_numpy())
        per_seed = diffs.groupby("seed")["diff"].mean()
        detail = (f"mean AUC {text}; seed level: {test.describe('AUC(v/o) - AUC(q/k)')}; per seed "
                  + ", ".join(f"{int(s)}: {d:+.4f}" for s, d in per_seed.items())
                  + (f"; record level: {record_level}" if record_level else ""))
        verdict = test.verdict()
        if verdict == "holds" and not (per_seed > 0).all():
            verdict = "inconclusive"
            detail += " (significant overall, but not in every seed)"
        return Finding(title, verdict, detail)
    if tests.empty:
        return Finding(title, "inconclusive", f"mean AUC {text}; no paired DeLong test available between v/o "
                       "and q/k runs (the same records scored under both), so the difference is untested")
    detail = f"mean AUC {text}; {record_level}"
    if all(a > b for _, a, b in per_rank) and vo_sig > len(tests) / 2 and qk_sig == 0:
        return Finding(title, "holds", detail)
    if qk_sig > 0 and qk_sig >= vo_sig or all(a <= b for _, a, b in per_rank) and vo_sig == 0:
        return Finding(title, "does not hold", detail)
    return Finding(title, "inconclusive", detail + " (mixed or not significant in most pairs)")


# ----------------------------------------------------------------------------------------- finding (2)
def _fisher(r) -> np.ndarray:
    """Fisher's z of correlations, clipped off +-1 (where it is infinite)."""
    return np.arctanh(np.clip(np.asarray(r, float), -0.999999, 0.999999))


def steiger_z(r_xy: float, r_xz: float, r_yz: float, n: int) -> float:
    """Steiger's (1980) z for the difference between two dependent correlations sharing x, r(x, y) - r(x, z),
    with r(y, z) between the other two (his eq. 14, pooled r). Written here: scipy has no test for
    dependent correlations."""
    z_xy, z_xz = _fisher([r_xy, r_xz])
    r_mean = (r_xy + r_xz) / 2
    psi = r_yz * (1 - 2 * r_mean ** 2) - 0.5 * r_mean ** 2 * (1 - 2 * r_mean ** 2 - r_yz ** 2)
    covariance = psi / (1 - r_mean ** 2) ** 2
    return float((z_xy - z_xz) * np.sqrt((n - 3) / (2 - 2 * covariance)))


def partial_correlation(r_xy: float, r_xz: float, r_yz: float) -> float:
    """Correlation of x and y given z, from the three pairwise correlations."""
    return float((r_xy - r_xz * r_yz) / np.sqrt(max((1 - r_xz ** 2) * (1 - r_yz ** 2), 1e-12)))


def per_run_correlations(members: pd.DataFrame) -> pd.DataFrame:
    """Per run: Spearman r of the n-gram share with the fine-tuned and the base perplexity, r between the two
    perplexities, the partial r(share, fine-tuned | base), and Steiger's z for r_ft - r_base (negative: the
    fine-tuned link is the stronger negative one). Runs with fewer than MIN_RECORDS varied records are left out."""
    rows = []
    for run_id, g in members.dropna(subset=["ngram_share", "ppl_ft", "ppl_base"]).groupby("run_id"):
        if len(g) < MIN_RECORDS or g.ngram_share.nunique() < 2 or g.ppl_ft.nunique() < 2 or g.ppl_base.nunique() < 2:
            continue
        r_ft = stats.spearmanr(g.ngram_share, g.ppl_ft)
        r_base = stats.spearmanr(g.ngram_share, g.ppl_base)
        r_fb = float(stats.spearmanr(g.ppl_ft, g.ppl_base).statistic)
        z = steiger_z(r_ft.statistic, r_base.statistic, r_fb, len(g))
        rows.append({"run_id": run_id, "n": len(g), "r_ft": float(r_ft.statistic), "p_ft": float(r_ft.pvalue),
                     "r_base": float(r_base.statistic), "p_base": float(r_base.pvalue), "r_ft_base": r_fb,
                     "partial_r_ft": partial_correlation(r_ft.statistic, r_base.statistic, r_fb),
                     "steiger_z": z, "steiger_p": float(2 * stats.norm.sf(abs(z)))})
    return pd.DataFrame(rows)


def _spearman3(x: np.ndarray) -> tuple[float, float, float]:
    """Spearman r(share, ft), r(share, base), r(ft, base) of the columns of x (share, ft, base), computed as
    `stats.spearmanr(x)` does (Pearson r of the ranks) without its p-values, which made it 2.5x slower in the
    bootstrap of `combined_correlations` (~18,000 calls for 45 runs)."""
    c = np.corrcoef(stats.rankdata(x, axis=0), rowvar=False)
    return c[0, 1], c[0, 2], c[1, 2]


def combined_correlations(members: pd.DataFrame, runs: pd.DataFrame, n_resamples: int = N_BOOTSTRAP,
                          seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """Over the runs of `runs` (:func:`per_run_correlations`): the mean (as Fisher z, reported as r) of
    r(share, fine-tuned ppl), r(share, base ppl), the partial r(share, fine-tuned | base), and the mean
    z(r_ft) - z(r_base), each with a 95% percentile interval from a two-way bootstrap that resamples the
    runs and, jointly in every run, the records (by sample_id): the runs score the same records, so an
    interval over runs alone would ignore which records happened to be drawn."""
    frame = members.dropna(subset=["ngram_share", "ppl_ft", "ppl_base"])
    frame = frame[frame.run_id.isin(runs.run_id)]
    record_ids = pd.Index(frame.sample_id.astype(str).unique())
    per_run = []  # (row of each record id in the run or -1, the run's (share, ft, base) values)
    for _, g in frame.groupby("run_id"):
        where = np.full(len(record_ids), -1)
        where[record_ids.get_indexer(g.sample_id.astype(str))] = np.arange(len(g))
        per_run.append((where, g[["ngram_share", "ppl_ft", "ppl_base"]].to_numpy(float)))

    def summary(r: np.ndarray) -> np.ndarray:
        """(4,) mean Fisher z of r_ft, of r_base, of the partial r, and of their difference; `r` (runs, 3) of r_ft,
        r_base, r_fb."""
        z_ft, z_base = _fisher(r[:, 0]), _fisher(r[:, 1])
        partial = [partial_correlation(*row) for row in r]
        return np.array([z_ft.mean(), z_base.mean(), _fisher(partial).mean(), (z_ft - z_base).mean()])

    point = summary(runs[["r_ft", "r_base", "r_ft_base"]].to_numpy(float))
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_resamples):
        records = rng.integers(0, len(record_ids), len(record_ids))
        rows = []
        for k in rng.integers(0, len(per_run), len(per_run)):
            where, values = per_run[k]
            picked = where[records]
            picked = picked[picked >= 0]
            if len(picked) >= 3 and all(np.ptp(values[picked], axis=0) > 0):
                rows.append(_spearman3(values[picked]))
        if rows:
            draws.append(summary(np.array(rows)))
    low, high = np.percentile(np.array(draws), [100 * ALPHA / 2, 100 * (1 - ALPHA / 2)], axis=0)
    names = ("r_ft", "r_base", "partial_r_ft", "z_gap")
    out = {}
    for i, name in enumerate(names):
        back = (lambda v: v) if name == "z_gap" else np.tanh
        out[name] = (float(back(point[i])), float(back(low[i])), float(back(high[i])))
    return out


def finding_perplexity(members: pd.DataFrame, per_run: pd.DataFrame | None = None) -> Finding:
    """(2) Lower fine-tuned perplexity goes with more verbatim reproduction; base perplexity does not.
    `per_run`: :func:`per_run_correlations` of `members`, when already computed."""
    title = ("(2) Records with lower perplexity under the fine-tuned model are reproduced more; "
             "base-model perplexity shows no such link")
    needed = {"ngram_share", "ppl_ft", "ppl_base"}
    if members.empty or not needed <= set(members.columns):
        return Finding(title, "inconclusive", "no extraction results on member records")
    frame = members.dropna(subset=list(needed))
    if len(frame) < 10 or frame.ngram_share.nunique() < 2:
        return Finding(title, "inconclusive", f"too few member records with varied n-gram share ({len(frame)})")
    runs = per_run if per_run is not None else (per_run_correlations(frame) if "run_id" in frame else pd.DataFrame())
    if len(runs) >= 2:
        return _perplexity_per_run(title, frame, runs)
    ft = stats.spearmanr(frame.ngram_share, frame.ppl_ft)
    base = stats.spearmanr(frame.ngram_share, frame.ppl_base)
    detail = (f"Spearman r(n-gram share, fine-tuned ppl) = {ft.statistic:.3f} (p = {ft.pvalue:.3g}); "
              f"r(n-gram share, base ppl) = {base.statistic:.3f} (p = {base.pvalue:.3g}); n = {len(frame)} "
              "member records pooled over runs (fewer than 2 runs with enough records for per-run correlations)")
    ft_link = ft.statistic < 0 and ft.pvalue < ALPHA
    base_weaker = base.pvalue >= ALPHA or abs(base.statistic) < abs(ft.statistic)
    if ft_link and base_weaker:
        return Finding(title, "holds", detail)
    if not ft_link and ft.pvalue < ALPHA or ft_link and not base_weaker:
        return Finding(title, "does not hold", detail)
    return Finding(title, "inconclusive", detail + " (no significant link with fine-tuned perplexity)")


def _perplexity_per_run(title: str, members: pd.DataFrame, runs: pd.DataFrame) -> Finding:
    """Finding (2) from per-run correlations: both halves tested over runs and records."""
    k = len(runs)
    combined = combined_correlations(members, runs)
    (ft, ft_lo, ft_hi), (base, base_lo, base_hi) = combined["r_ft"], combined["r_base"]
    (partial, partial_lo, partial_hi), (gap, gap_lo, gap_hi) = combined["partial_r_ft"], combined["z_gap"]
    steiger_ft_stronger = int(((runs.steiger_z < 0) & (runs.steiger_p < ALPHA)).sum())
    ft_sig = int(((runs.r_ft < 0) & (runs.p_ft < ALPHA)).sum())
    base_sig = int((runs.p_base < ALPHA).sum())
    detail = (f"over {k} runs ({int(runs.n.median())} member records each, median), Spearman correlations per run "
              f"then averaged as Fisher z, with 95% intervals from a bootstrap over runs and records: r(n-gram share, "
              f"fine-tuned ppl) = {ft:.3f} [{ft_lo:.3f}, {ft_hi:.3f}], significant (p < {ALPHA}) in {ft_sig} of {k} "
              f"runs; r(n-gram share, base ppl) = {base:.3f} [{base_lo:.3f}, {base_hi:.3f}], significant in {base_sig} "
              f"of {k}; partial r(share, fine-tuned ppl | base ppl) = {partial:.3f} [{partial_lo:.3f}, "
              f"{partial_hi:.3f}]; z(r_ft) - z(r_base) = {gap:+.3f} [{gap_lo:+.3f}, {gap_hi:+.3f}]; Steiger's test "
              f"(fine-tuned link stronger than base link) significant in {steiger_ft_stronger} of {k} runs")
    ft_link = ft_hi < 0
    base_absent = base_lo <= 0 <= base_hi
    base_weaker = gap_hi < 0 and partial_hi < 0  # fine-tuned link more negative, and still there given base
    if ft_link and (base_absent or base_weaker):
        why = ("the base link is absent" if base_absent else
               "the base link is present but significantly weaker, and the fine-tuned link survives controlling for it")
        return Finding(title, "holds", f"{detail}. Both halves: the fine-tuned link is negative, and {why}")
    if ft_lo > 0:
        return Finding(title, "does not hold", f"{detail}. The fine-tuned link is positive")
    if ft_link:
        return Finding(title, "does not hold", f"{detail}. First half holds; second half does not: the base-model "
                       "link is present and not significantly weaker than the fine-tuned one")
    return Finding(title, "inconclusive", f"{detail}. The fine-tuned link's interval includes 0")


# ----------------------------------------------------------------------------------------- finding (3)
def rank_gains(lora: pd.DataFrame) -> pd.DataFrame:
    """Per (matrix set, other configuration, seed) with at least 3 ranks: the AUC gain per doubling of the rank
    in the lower and the upper half of the rank range, and over the whole range."""
    keys = ["target_modules", *[c for c in _config_columns(lora) if c != "rank"], "seed"]
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
    if _seeds(lora) >= MIN_SEEDS:
        gains = rank_gains(lora)
        if len(gains) >= 2:
            rise = MeanTest.of(gains.gain.to_numpy())
            slowing = MeanTest.of((gains.gain_low - gains.gain_high).to_numpy())
            detail += (f"; seed level, one curve per matrix set and seed: {rise.describe('AUC(top rank) - AUC(lowest rank)')}; "
                       f"{slowing.describe('gain per doubling, lower minus upper half of the ranks')}")
            if rise.verdict() == "holds" and slowing.verdict() == "holds":
                return Finding(title, "holds", detail)
            if rise.verdict() == "does not hold":
                return Finding(title, "does not hold", detail + " (no rise with rank)")
            if rise.verdict() == "holds" and slowing.verdict() == "does not hold":
                return Finding(title, "does not hold", detail + " (it rises, but without diminishing returns)")
            return Finding(title, "inconclusive", detail)
    if rising == len(usable) and diminishing == len(usable):
        return Finding(title, "holds", detail)
    if rising == 0:
        return Finding(title, "does not hold", detail)
    return Finding(title, "inconclusive", detail)
