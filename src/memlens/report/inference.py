"""The statistics behind the findings' verdicts. Written here only where SciPy has none (and said so at each):

- :class:`MeanTest`: a one-sample t-test of paired differences (`scipy.stats.ttest_1samp`) and its verdict rule,
  with a multiplicity-corrected p-value and interval when several are tested together;
- :func:`holm`: Holm's step-down correction (SciPy has Benjamini-Hochberg only, `stats.false_discovery_control`);
- :func:`block_f_test`: the F test of a fixed factor with replicates as blocks (a randomized complete block design
  without interaction; `scipy.stats.f_oneway` has no blocks);
- :func:`bonferroni`: the adjusted p whose rejections agree with Bonferroni intervals;
- Steiger's test of two dependent correlations, the partial correlation, and correlations combined over runs with a
  two-way bootstrap over runs and records.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

ALPHA = 0.05
NEGLIGIBLE_AUC = 0.01   # a mean AUC difference whose interval lies within +-this is "no difference"
N_BOOTSTRAP = 400       # resamples (of runs and records) for the intervals of combined correlations


def holm(p_values) -> np.ndarray:
    """Holm's (1979) step-down adjusted p-values, (tests,) -> (tests,): the i-th smallest p times (m - i + 1),
    made monotone and capped at 1. Reject where the adjusted p < alpha: the family-wise error stays <= alpha
    under any dependence between the tests (DeLong tests on shared records are dependent)."""
    p = np.asarray(p_values, dtype=float)
    order = np.argsort(p)
    m = len(p)
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return adjusted


@dataclass
class BlockF:
    """The F test of a fixed factor in a randomized complete block design (no interaction)."""

    f: float
    df_factor: int
    df_error: int
    p_value: float

    def describe(self, factor: str) -> str:
        return f"{factor}: F({self.df_factor}, {self.df_error}) = {self.f:.3g}, p = {self.p_value:.3g}"


def block_f_test(values: np.ndarray) -> BlockF | None:
    """F test that the factor's levels (rows) share one mean, with blocks (columns) as a nuisance factor.
    `values`: (levels, blocks), complete (a block with a missing level is dropped). SS_factor = b sum (row mean -
    grand)^2, SS_blocks = a sum (column mean - grand)^2, SS_error = SS_total - both; F = (SS_factor / (a - 1)) /
    (SS_error / ((a - 1)(b - 1))). None when there are fewer than 2 levels, 2 complete blocks or no error."""
    values = np.asarray(values, dtype=float)
    values = values[:, ~np.isnan(values).any(axis=0)]
    a, b = values.shape
    if a < 2 or b < 2:
        return None
    grand = values.mean()
    ss_factor = b * ((values.mean(axis=1) - grand) ** 2).sum()
    ss_blocks = a * ((values.mean(axis=0) - grand) ** 2).sum()
    ss_error = ((values - grand) ** 2).sum() - ss_factor - ss_blocks
    df1, df2 = a - 1, (a - 1) * (b - 1)
    if ss_error <= 0:
        return None
    f = (ss_factor / df1) / (ss_error / df2)
    return BlockF(float(f), df1, df2, float(stats.f.sf(f, df1, df2)))


HOLDS, REVERSED, NULL, INCONCLUSIVE = "holds", "reversed", "does not hold", "inconclusive"
VERDICTS = (HOLDS, REVERSED, NULL, INCONCLUSIVE)


def bonferroni(p_value: float, tests: int) -> float:
    """Bonferroni's adjusted p-value, min(1, p x tests): rejecting where it is < alpha is rejecting where the
    interval at level 1 - alpha / tests excludes 0, so the verdict and its interval never disagree."""
    return float(min(1.0, p_value * tests))


@dataclass
class MeanTest:
    """A one-sample t-test of paired differences (one per replicate: a record draw, or a seed) against 0."""

    n: int
    mean: float
    ci_low: float
    ci_high: float
    p_value: float
    sd: float = 0.0

    @classmethod
    def of(cls, diffs: np.ndarray) -> "MeanTest":
        """The test of `diffs` (replicates,), one difference per replicate."""
        diffs = np.asarray(diffs, float)
        n, mean = len(diffs), float(np.mean(diffs))
        if n < 2 or np.std(diffs) == 0:
            return cls(n, mean, mean, mean, 0.0 if n >= 2 and mean != 0 else 1.0)
        test = stats.ttest_1samp(diffs, 0.0)
        ci = test.confidence_interval(1 - ALPHA)
        return cls(n, mean, float(ci.low), float(ci.high), float(test.pvalue), float(np.std(diffs, ddof=1)))

    @property
    def df(self) -> int:
        return max(self.n - 1, 0)

    def interval(self, level: float) -> tuple[float, float]:
        """The t interval of the mean at `level` (e.g. 1 - alpha / m for m tests, Bonferroni)."""
        if self.n < 2 or self.sd == 0:
            return self.mean, self.mean
        half = stats.t.ppf(0.5 + level / 2, self.n - 1) * self.sd / np.sqrt(self.n)
        return self.mean - half, self.mean + half

    def describe(self, what: str, unit: str = "replicates") -> str:
        return (f"{what}: mean {self.mean:+.4f} (95% CI {self.ci_low:+.4f} to {self.ci_high:+.4f}), one-sample t "
                f"over {self.n} {unit} (df {self.df}) p = {self.p_value:.3g}")

    def effect(self, tests: int = 1, unit: str = "AUC", digits: int = 3) -> str:
        """The mean with its interval at the level of the correction (Bonferroni over `tests`), labelled."""
        level = 1 - ALPHA / tests
        low, high = self.interval(level)
        label = f"Bonferroni {level:.1%} interval, {tests} tests" if tests > 1 else f"{level:.0%} interval"
        return f"{self.mean:+.{digits}f} {unit} [{low:+.{digits}f}, {high:+.{digits}f}] ({label})"

    def verdict(self, tests: int = 1, negligible: float | None = NEGLIGIBLE_AUC) -> str:
        """`holds` (significantly > 0), `reversed` (significantly < 0), `does not hold` (a null: the interval lies
        within +-`negligible`; None: no such threshold for this unit, so never), else `inconclusive`. With `tests`
        tested together, Bonferroni: the p-value times `tests` and the interval at 1 - alpha / tests, which agree."""
        p = bonferroni(self.p_value, tests)
        if p < ALPHA and self.mean > 0:
            return HOLDS
        if p < ALPHA and self.mean < 0:
            return REVERSED
        low, high = self.interval(1 - ALPHA / tests)
        if negligible is not None and -negligible < low and high < negligible:
            return NULL
        return INCONCLUSIVE


def fisher(r) -> np.ndarray:
    """Fisher's z of correlations, clipped off +-1 (where it is infinite)."""
    return np.arctanh(np.clip(np.asarray(r, float), -0.999999, 0.999999))


def steiger_z(r_xy: float, r_xz: float, r_yz: float, n: int) -> float:
    """Steiger's (1980) z for the difference between two dependent correlations sharing x, r(x, y) - r(x, z),
    with r(y, z) between the other two (his eq. 14, pooled r). Written here: scipy has no test for
    dependent correlations."""
    z_xy, z_xz = fisher([r_xy, r_xz])
    r_mean = (r_xy + r_xz) / 2
    psi = r_yz * (1 - 2 * r_mean ** 2) - 0.5 * r_mean ** 2 * (1 - 2 * r_mean ** 2 - r_yz ** 2)
    covariance = psi / (1 - r_mean ** 2) ** 2
    return float((z_xy - z_xz) * np.sqrt((n - 3) / (2 - 2 * covariance)))


def partial_correlation(r_xy: float, r_xz: float, r_yz: float) -> float:
    """Correlation of x and y given z, from the three pairwise correlations."""
    return float((r_xy - r_xz * r_yz) / np.sqrt(max((1 - r_xz ** 2) * (1 - r_yz ** 2), 1e-12)))



def _spearman3(x: np.ndarray) -> tuple[float, float, float]:
    """Spearman r(share, ft), r(share, base), r(ft, base) of the columns of x (share, ft, base), computed as
    `stats.spearmanr(x)` does (Pearson r of the ranks) without its p-values, which made it 2.5x slower in the
    bootstrap of `combined_correlations` (~18,000 calls for 45 runs)."""
    c = np.corrcoef(stats.rankdata(x, axis=0), rowvar=False)
    return c[0, 1], c[0, 2], c[1, 2]


def combined_correlations(members: pd.DataFrame, runs: pd.DataFrame, n_resamples: int = N_BOOTSTRAP,
                          seed: int = 0, records: bool = True, outcome: str = "ngram_share"
                          ) -> dict[str, tuple[float, float, float]]:
    """Over the runs of `runs` (:func:`per_run_correlations`): the mean (as Fisher z, reported as r) of
    r(share, fine-tuned ppl), r(share, base ppl), the partial r(share, fine-tuned | base), and the mean
    z(r_ft) - z(r_base), each with a 95% percentile interval from a two-way bootstrap that resamples the
    runs and, jointly in every run, the records (by sample_id): the runs score the same records, so an
    interval over runs alone would ignore which records happened to be drawn. `records=False` resamples the runs
    only (the interval this study used before, kept to disclose what it said). `outcome`: the column correlated
    with the perplexities."""
    records_too = records
    frame = members.dropna(subset=[outcome, "ppl_ft", "ppl_base"])
    frame = frame[frame.run_id.isin(runs.run_id)]
    record_ids = pd.Index(frame.sample_id.astype(str).unique())
    per_run = []  # (row of each record id in the run or -1, the run's (share, ft, base) values)
    for _, g in frame.groupby("run_id"):
        where = np.full(len(record_ids), -1)
        where[record_ids.get_indexer(g.sample_id.astype(str))] = np.arange(len(g))
        per_run.append((where, g[[outcome, "ppl_ft", "ppl_base"]].to_numpy(float)))

    def summary(r: np.ndarray) -> np.ndarray:
        """(4,) mean Fisher z of r_ft, of r_base, of the partial r, and of their difference; `r` (runs, 3) of r_ft,
        r_base, r_fb."""
        z_ft, z_base = fisher(r[:, 0]), fisher(r[:, 1])
        partial = [partial_correlation(*row) for row in r]
        return np.array([z_ft.mean(), z_base.mean(), fisher(partial).mean(), (z_ft - z_base).mean()])

    point = summary(runs[["r_ft", "r_base", "r_ft_base"]].to_numpy(float))
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_resamples):
        records = rng.integers(0, len(record_ids), len(record_ids)) if records_too else np.arange(len(record_ids))
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


__all__ = ["ALPHA", "HOLDS", "INCONCLUSIVE", "NEGLIGIBLE_AUC", "NULL", "REVERSED", "VERDICTS", "BlockF", "MeanTest",
           "bonferroni", "block_f_test", "combined_correlations", "holm",
           "partial_correlation", "steiger_z"]
