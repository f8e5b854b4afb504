"""A saturating curve fitted to membership AUC against LoRA rank (the study's finding 3).

    auc(r) = plateau - (plateau - auc0) * exp(-r / scale)

`plateau` is the AUC the curve tends to, `auc0` its (extrapolated) value at rank 0, and
`rank_90 = scale * ln 10` the rank that reaches 90% of the gain from rank 0 to the plateau. A fit that
cannot be trusted is reported with null values and the reason, never with made-up numbers.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy.optimize import OptimizeWarning, curve_fit

MIN_RANKS = 4  # 3 parameters: at least one residual degree of freedom, or the "fit" is an interpolation
SCALE_BOUNDS = (1e-3, 1e5)


def saturating(rank: np.ndarray, plateau: float, auc0: float, scale: float) -> np.ndarray:
    """The fitted form: rises from `auc0` at rank 0 towards `plateau`, by e-folds of `scale` ranks. `rank` (points,)
    gives (points,)."""
    return plateau - (plateau - auc0) * np.exp(-np.asarray(rank, dtype=float) / scale)


@dataclass
class SaturationFit:
    """One matrix set's fit; the numeric fields are None when `reason` says why they are not computed."""

    target_modules: str
    ranks: list[int]
    plateau: float | None = None
    plateau_se: float | None = None
    auc0: float | None = None
    scale: float | None = None
    rank_90: float | None = None
    rmse: float | None = None
    reason: str | None = None  # why (some) values are null
    note: str | None = None  # caveats of a fit that was computed

    @property
    def ok(self) -> bool:
        return self.plateau is not None


def fit_saturation(target_modules: str, ranks, aucs) -> SaturationFit:
    """Least-squares fit of :func:`saturating` to the mean AUC per rank of one matrix set."""
    frame = pd.DataFrame({"rank": np.asarray(ranks, dtype=float), "auc": np.asarray(aucs, dtype=float)})
    frame = frame.dropna().groupby("rank", as_index=False).auc.mean().sort_values("rank")
    fit = SaturationFit(target_modules, [int(r) for r in frame["rank"]])
    if len(frame) < MIN_RANKS:
        fit.reason = (f"needs at least {MIN_RANKS} ranks to fit 3 parameters with a residual; this set has "
                      f"{len(frame)} ({fit.ranks})")
        return fit
    r, y = frame["rank"].to_numpy(), frame.auc.to_numpy()
    p0 = (min(y.max() + 0.01, 1.0), max(y.min() - 0.01, 0.0), float(np.median(r)))
    bounds = ([0.0, 0.0, SCALE_BOUNDS[0]], [1.0, 1.0, SCALE_BOUNDS[1]])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", OptimizeWarning)
            params, cov = curve_fit(saturating, r, y, p0=p0, bounds=bounds, maxfev=20000)
    except (RuntimeError, ValueError, OptimizeWarning) as exc:
        fit.reason = f"the least-squares fit did not converge ({exc})"
        return fit
    if not np.all(np.isfinite(cov)):
        fit.reason = "the parameters are not identifiable from these points (their covariance is not finite)"
        return fit
    plateau, auc0, scale = (float(v) for v in params)
    fit.plateau, fit.auc0, fit.scale = plateau, auc0, scale
    fit.plateau_se = float(math.sqrt(max(cov[0, 0], 0.0)))
    fit.rmse = float(np.sqrt(np.mean((saturating(r, *params) - y) ** 2)))
    notes = []
    gain, gain_se = plateau - auc0, math.sqrt(max(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1], 0.0))
    if gain <= 0:
        fit.reason = "the fitted curve does not rise with rank (plateau <= AUC at rank 0): no gain to reach 90% of"
    elif gain <= 2 * gain_se:
        fit.reason = (f"the gain from rank 0 to the plateau ({gain:.3g} +- {gain_se:.2g}) is not distinguishable "
                      "from zero: no rank reaching 90% of it")
    else:
        fit.rank_90 = scale * math.log(10)
        if fit.rank_90 > r.max():
            notes.append(f"rank_90 lies beyond the largest rank measured ({int(r.max())}): extrapolated")
    lower, upper = np.array(bounds[0]), np.array(bounds[1])
    if np.any(np.isclose(params, lower, rtol=0, atol=1e-6)) or np.any(np.isclose(params, upper, rtol=1e-6, atol=1e-6)):
        notes.append("a parameter sits at its bound (plateau or AUC at rank 0 at 0 or 1, or scale at its limit): "
                     "the form does not describe these points well")
    fit.note = "; ".join(notes) or None
    return fit


def fit_table(curve: pd.DataFrame) -> tuple[pd.DataFrame, list[SaturationFit]]:
    """Fits for every matrix set of an AUC-vs-rank table (columns target_modules, rank, auc)."""
    fits = [fit_saturation(t, g["rank"], g.auc) for t, g in curve.groupby("target_modules")]
    rows = [{**asdict(f), "ranks": " ".join(str(r) for r in f.ranks), "n_ranks": len(f.ranks)} for f in fits]
    columns = ["target_modules", "n_ranks", "ranks", "plateau", "plateau_se", "auc0", "scale", "rank_90", "rmse",
               "reason", "note"]
    return pd.DataFrame(rows, columns=columns), fits
