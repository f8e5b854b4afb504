"""Finding (2)'s outcome, made member-specific.

The n-gram gain of a record (`ngram_gain`: the share of its suffix reproduced by the fine-tuned model minus by the
base model on the same prompt) also rises for records the model never trained on: fine-tuning on PHEE teaches
PHEE's phrasing, so non-members gain too (0.014 against members' 0.013 in the 2026 grids). What a member owes to
being trained on is its gain minus that of comparable non-members: `ngram_gain_specific` = the member's gain minus
the mean gain of its :data:`MATCHES` nearest non-members of the same run, nearest-neighbour matching (with
replacement) on the base model's share of the suffix (how predictable the record is without fine-tuning) and the
suffix length in tokens, each scaled by its standard deviation over the run's prompted records. Matching uses
scikit-learn's `NearestNeighbors`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.neighbors import NearestNeighbors

MATCHES = 5  # non-members averaged per member
MATCH_ON = ("ngram_share_base", "suffix_len")
OUTCOMES = {"ngram_gain_specific": "n-gram gain over that of non-members matched on base share and length",
            "ngram_gain": "n-gram share gained over the base model", "ngram_share": "n-gram share"}
MATCHING = (f"each member's n-gram gain minus the mean gain of its {MATCHES} nearest non-members of the same run "
            "(nearest-neighbour matching with replacement on the base model's share of the suffix and the suffix "
            "length, each scaled by its SD)")


def outcome_of(members: pd.DataFrame) -> str:
    """The per-record outcome finding (2) correlates with perplexity: the member-specific gain where non-members were
    prompted too, else the gain over the base model, else the share alone (the base model's rows missing)."""
    for column in ("ngram_gain_specific", "ngram_gain"):
        if column in members and members[column].notna().any():
            return column
    return "ngram_share"


def with_base(rows: pd.DataFrame, extraction: pd.DataFrame) -> pd.DataFrame:
    """Fine-tuned extraction `rows` with the base model's share on the same prompt and `ngram_gain`."""
    keys = ["run_id", "sample_id", "decoding"]
    base = extraction[extraction.model == "base"][[*keys, "ngram_share"]]
    rows = rows.merge(base.rename(columns={"ngram_share": "ngram_share_base"}), on=keys, how="left")
    return rows.assign(ngram_gain=rows.ngram_share - rows.ngram_share_base)


def member_specific_gain(members: pd.DataFrame, non_members: pd.DataFrame, k: int = MATCHES) -> pd.DataFrame:
    """`members` (with `ngram_gain` and the :data:`MATCH_ON` columns) with `ngram_gain_matched` (the mean gain of
    the matched non-members of the same run) and `ngram_gain_specific` (the member's gain minus it); NaN for a run
    with fewer than `k` non-members that have a gain (an explicit null, not a fallback)."""
    out = []
    usable = non_members.dropna(subset=["ngram_gain", *MATCH_ON])
    for run_id, m in members.groupby("run_id", sort=False):
        n = usable[usable.run_id == run_id]
        m = m.copy()
        m["ngram_gain_matched"] = np.nan
        ready = m[list(MATCH_ON)].notna().all(axis=1) & m.ngram_gain.notna()
        if len(n) >= k and ready.any():
            both = pd.concat([m.loc[ready, list(MATCH_ON)], n[list(MATCH_ON)]]).to_numpy(float)
            scale = both.std(axis=0)
            scale[scale == 0] = 1.0
            index = NearestNeighbors(n_neighbors=k).fit(n[list(MATCH_ON)].to_numpy(float) / scale)
            _, nearest = index.kneighbors(m.loc[ready, list(MATCH_ON)].to_numpy(float) / scale)
            m.loc[ready, "ngram_gain_matched"] = n.ngram_gain.to_numpy(float)[nearest].mean(axis=1)
        out.append(m.assign(ngram_gain_specific=m.ngram_gain - m.ngram_gain_matched))
    return pd.concat(out, ignore_index=True) if out else members.assign(ngram_gain_matched=np.nan,
                                                                         ngram_gain_specific=np.nan)
