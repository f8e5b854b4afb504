"""The prefixes of ReCaLL (Xie et al. 2024) and Con-ReCall (Wang et al. 2024), and the log-likelihood of a
record after a prefix.

Both attacks compare a record's mean token log-likelihood under the fine-tuned model with and without a
prefix of known records in front of it. The prefixes come from the study's own records, never from a hub:

- the non-member prefix: `shots` records (the attack's setting) of the utility split (`data.utility_split`), which is
  neither member nor non-member in any design (the random design's pool may not include it), drawn with a
  fixed seed, so every run of a study gets the same prefix;
- Con-ReCall's member prefix: `shots` of the run's own members (the canary excepted), drawn with
  a fixed seed. Those records are then in their own prefix and are left unscored by Con-ReCall (see
  :func:`con_recall`).

A prefix is the records' texts joined by newlines (and a final newline), tokenized once with the tokenizer's
special tokens; each record's tokens (without its own leading BOS) follow it. Only the record's tokens are
scored, i.e. the last `n` statistics of the joined sequence, `n` the number the record alone has scored, so
LL(x | P) and LL(x) average over exactly the same tokens. A joined sequence longer than the model's context
is scored with the engine's sliding window (its record tokens then see the end of the prefix only).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from pydantic import Field

from memlens.attacks.registry import AttackInputs, AttackSettings, mean_nll, register
from memlens.score import SequenceStats

RECALL_SEED = 0x5EC_A11  # seed of the prefix draws (fixed: every run of a study gets the same non-member prefix)


def draw_prefix(records: pd.DataFrame, shots: int, salt: int = 0) -> pd.DataFrame:
    """`shots` records of `records` (sample_id, text[, is_canary]) drawn with a fixed seed, never the canary;
    the draw depends on the records, not on their order. Fewer when there are fewer."""
    pool = records
    if "is_canary" in pool:
        pool = pool[~pool.is_canary.astype(bool)]
    pool = pool.sort_values("sample_id", kind="stable").reset_index(drop=True)
    rng = np.random.default_rng([RECALL_SEED, salt])
    take = np.sort(rng.choice(len(pool), size=min(shots, len(pool)), replace=False))
    return pool.iloc[take].reset_index(drop=True)


def prefix_text(records: pd.DataFrame) -> str:
    """The prefix: the records' texts, one per line."""
    return "\n".join(records.text.astype(str)) + "\n"


def with_prefix(prefix_ids: Sequence[int], record_ids: Sequence[Sequence[int]], bos_token_id: int | None
                ) -> list[list[int]]:
    """Each record's token ids after the prefix's (the record's own leading BOS dropped)."""
    out = []
    for ids in record_ids:
        body = list(ids[1:]) if len(ids) and bos_token_id is not None and ids[0] == bos_token_id else list(ids)
        out.append(list(prefix_ids) + body)
    return out


def tail_mean_logprob(stats: SequenceStats, n_tail: np.ndarray) -> np.ndarray:
    """(sequences,): per sequence, the mean log-probability of its last `n_tail` (sequences,) scored tokens (NaN
    where `n_tail` is 0)."""
    n_tail = np.asarray(n_tail, dtype=np.int64)
    if len(n_tail) != len(stats):
        raise ValueError(f"{len(n_tail)} tail lengths for {len(stats)} sequences")
    if (n_tail > stats.n_tokens).any():
        raise ValueError("a tail is longer than its sequence's scored tokens")
    out = np.full(len(stats), np.nan)
    logprob = stats.logprob.astype(np.float64)
    for i, n in enumerate(n_tail):
        if n > 0:
            end = stats.offsets[i + 1]
            out[i] = logprob[end - n:end].mean()
    return out


class RecallSettings(AttackSettings):
    shots: int = Field(5, ge=1, description="Records in the prefix (known non-members from `data.utility_split`).")


class ConRecallSettings(RecallSettings):
    shots: int = Field(5, ge=1, description="Records in each prefix (non-member prefix from `data.utility_split`, "
                       "member prefix from the run's own members).")
    gamma: float = Field(0.5, ge=0, description="Weight of the member-prefix likelihood. The paper sweeps 0.1-1.0 "
                         "and reports the best; 0.5 lies mid-range.")


@register("recall", needs={"nonmember_prefix"}, settings=RecallSettings,
          description="ReCaLL (Xie et al. 2024): LL(x | P) / LL(x), LL the mean token log-likelihood under the "
          "fine-tuned model and P a prefix of `shots` known non-members (the utility split).")
def recall(x: AttackInputs, s: RecallSettings) -> np.ndarray:
    """Conditioning a member on non-member context lowers its log-likelihood more than a non-member's, so the
    ratio of two negative numbers is higher for members (Xie et al. 2024, the ReCaLL score). Only x's tokens
    are scored in LL(x | P)."""
    return x.ll_nonmember_prefix[s.shots] / -mean_nll(x)


@register("con_recall", needs={"nonmember_prefix", "member_prefix"}, settings=ConRecallSettings, partial=True,
          description="Con-ReCall (Wang et al. 2024): (LL(x | P_non) - gamma LL(x | P_mem)) / LL(x), P_mem a prefix "
          "of `shots` of the run's own members (those records are left unscored), gamma: `gamma`.")
def con_recall(x: AttackInputs, s: ConRecallSettings) -> np.ndarray:
    """Wang et al. 2024's score s(x) = (LL(x|P_non) - gamma LL(x|P_mem)) / LL(x). Their member prefix is of known
    members; here it is `shots` records of the run's own members, whose own scores would be biased (each is in
    its own prefix): they are NaN, and the metrics are computed over the other records."""
    score = (x.ll_nonmember_prefix[s.shots] - s.gamma * x.ll_member_prefix[s.shots]) / -mean_nll(x)
    return np.where(np.asarray(x.in_member_prefix[s.shots], dtype=bool), np.nan, score)


__all__ = ["RECALL_SEED", "ConRecallSettings", "RecallSettings", "draw_prefix", "prefix_text", "tail_mean_logprob",
           "with_prefix"]
