"""The canary-repetition half of finding (3): a secret inserted more often is exposed and reproduced more.

Per replicate unit (the record draw: each draw picks its own canary record and members; seeds averaged within it,
:mod:`memlens.report.replicates`) and configuration, the least-squares slope over the canary-copies values against
log2(copies) of two outcomes: the exposure gained over the base model (fine-tuned minus base exposure of the same
run's secret, bits; the base model never saw the secret, so its exposure is the floor) and the canary's suffix
n-gram share under the fine-tuned model (one decoding, greedy when it ran). Configurations are averaged within a
unit; a one-sample t over units tests each slope. It holds only if both rise (an intersection-union test needs no
correction); it is reversed if either falls.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from memlens.report.findings import Finding
from memlens.report.inference import HOLDS, INCONCLUSIVE, REVERSED, MeanTest
from memlens.report.replicates import per_unit, unit_of

TITLE = "(3) A canary repeated more often is exposed and reproduced more"
MIN_COPIES = 3  # canary-copies values a slope needs
CONFIG = ["target_modules", "rank", "learning_rate"]


def slopes(frame: pd.DataFrame, value: str) -> pd.DataFrame:
    """Per (configuration, unit): the slope of `value` on log2(canary_copies) over at least MIN_COPIES values;
    `frame`: one row per run with CONFIG, canary_copies, seed, draw and `value`. Columns: unit, `slope`."""
    unit = unit_of(frame, [*CONFIG, "canary_copies"])
    keys = [c for c in CONFIG if c in frame]
    means = per_unit(frame, [*keys, "canary_copies"], [value], unit).dropna(subset=[value])
    rows = []
    for key, g in means.groupby([*keys, *([unit.column] if unit.column else [])]):
        if g.canary_copies.nunique() >= MIN_COPIES:
            slope = np.polyfit(np.log2(g.canary_copies.astype(float)), g[value].astype(float), 1)[0]
            rows.append({"unit": key[-1] if unit.column else 0, "slope": float(slope)})
    out = pd.DataFrame(rows, columns=["unit", "slope"])
    return out.groupby("unit").slope.mean().reset_index()


def exposure_gain(exposure: pd.DataFrame) -> pd.DataFrame:
    """One row per run: the fine-tuned model's exposure minus the base model's for the same run's secret."""
    if exposure.empty:
        return exposure
    wide = exposure.pivot_table(index="run_id", columns="model", values="exposure", aggfunc="mean")
    if not {"finetuned", "base"} <= set(wide.columns):
        return pd.DataFrame()
    gain = (wide.finetuned - wide.base).rename("exposure_gain").reset_index()
    return gain.merge(exposure.drop_duplicates("run_id").drop(columns=["model", "exposure"]), on="run_id")


def finding_copies(exposure: pd.DataFrame, canary_share: pd.DataFrame) -> Finding | None:
    """The repetition verdict, or None when the study varies the canary copies over fewer than MIN_COPIES values
    (it is then not a copies study). `exposure`: `StudyResults.exposure()`; `canary_share`: one row per run with
    CONFIG, canary_copies, seed, draw and the canary's `ngram_share`."""
    copies = set(exposure.canary_copies) | (set(canary_share.canary_copies) if len(canary_share) else set())
    if len(copies) < MIN_COPIES:
        return None
    scope = f"canary copies {', '.join(str(int(c)) for c in sorted(copies))}"
    gained = exposure_gain(exposure)
    tests = {}
    if len(gained):
        tests["exposure"] = ("exposure gained over the base model per doubling of the copies", "bits",
                             slopes(gained, "exposure_gain"))
    if len(canary_share):
        tests["extraction"] = ("canary suffix n-gram share per doubling of the copies", "share",
                               slopes(canary_share, "ngram_share"))
    tests = {k: v for k, v in tests.items() if len(v[2]) >= 2}
    if not tests:
        return Finding(TITLE, INCONCLUSIVE, "fewer than 2 replicate units with exposure or canary extraction at "
                       f"{MIN_COPIES} or more copies values", number=3, scope=scope)
    frame = gained if len(gained) else canary_share
    unit = unit_of(frame, [*CONFIG, "canary_copies"])
    results = {k: (what, units, MeanTest.of(s.slope.to_numpy())) for k, (what, units, s) in tests.items()}
    verdicts = {k: t.verdict(negligible=None) for k, (_, _, t) in results.items()}
    top = max(copies)
    at_top = (canary_share[canary_share.canary_copies == top].ngram_share.mean() if len(canary_share) else np.nan)
    reason = "; ".join(f"{t.describe(what, unit.plural(t.n).split(' ', 1)[1])}" for what, _, t in results.values())
    reason += f"; canary n-gram share at {int(top)} copies: {at_top:.3f} (mean over runs)"
    missing = [k for k in ("exposure", "extraction") if k not in results]
    if missing:
        reason += f"; not measured: {', '.join(missing)}"
    if REVERSED in verdicts.values():
        verdict = REVERSED
    elif all(v == HOLDS for v in verdicts.values()) and not missing:
        verdict = HOLDS
    else:
        verdict = INCONCLUSIVE
    n = min(t.n for *_, t in results.values())
    return Finding(TITLE, verdict, reason, number=3, scope=scope,
                   test=f"slope on log2(copies) per {unit.name}, one-sample t over {unit.describe(n)}, for "
                        f"{' and '.join(results)}",
                   correction="none needed: it holds only if both rise (intersection-union)",
                   effect="; ".join(f"{k} {t.effect(unit=units + ' per doubling')}" for k, (_, units, t) in
                                    results.items()))
