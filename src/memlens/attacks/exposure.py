"""Exposure of an inserted secret (Carlini et al. 2019, "The Secret Sharer").

The canary record is `prefix + secret + rest`, the secret drawn uniformly from a space R
(`digits:N` or `hex:N`). Every candidate secret r gives a record whose log-perplexity under the model is
its total negative log-likelihood; the secret's rank among all candidates (1 = most likely) gives
exposure = log2|R| - log2 rank. When R is small enough it is enumerated and the rank is exact. Otherwise
a uniform sample of candidates estimates the rank (exposure_rank, capped at log2(n+1) by the sample
size) and a skew-normal fitted to the candidates' log-perplexities extrapolates the tail:
exposure_skewnorm = -log2 CDF(secret's log-perplexity).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
from scipy import stats

from memlens.data.repeated_canary import Canary, secret_alphabet
from memlens.score import token_stats


def space_size(secret_format: str) -> int:
    alphabet, length = secret_alphabet(secret_format)
    return len(alphabet) ** length


def draw_candidates(secret_format: str, secret: str, n: int, seed: int) -> tuple[list[str], bool]:
    """Candidate secrets other than `secret`: all of them when |R| - 1 <= n (enumerated, True), else `n`
    distinct uniform draws (False). Seeded."""
    alphabet, length = secret_alphabet(secret_format)
    size = len(alphabet) ** length
    if size - 1 <= n:
        return ["".join(t) for t in itertools.product(alphabet, repeat=length) if "".join(t) != secret], True
    rng = np.random.default_rng([seed, 0xE4])
    chosen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        for row in rng.integers(0, len(alphabet), size=(n, length)):
            cand = "".join(alphabet[i] for i in row)
            if cand != secret and cand not in chosen:
                chosen.add(cand)
                out.append(cand)
                if len(out) == n:
                    break
    return out, False


def log_perplexities(model: torch.nn.Module, tokenizer, texts: list[str], *, batch_size: int,
                     pad_token_id: int) -> np.ndarray:
    """Total negative log-likelihood (nats) of each text, bos not scored: Carlini's log-perplexity (up to
    the log base, which changes neither ranks nor the skew-normal CDF). Totals, not means: candidates may
    tokenize to different lengths, and the mean would favour longer ones."""
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    stats = token_stats(model, ids, batch_size=batch_size, pad_token_id=pad_token_id, moments=False)
    return -stats.reduce("logprob", "sum")


def exposure_from_rank(secret_logppl: float, candidate_logppl: np.ndarray) -> tuple[int, float]:
    """(rank of the secret among itself and the candidates, 1 = lowest log-perplexity; exposure estimate), the
    candidates' log-perplexities `candidate_logppl` (candidates,).

    The exposure is -log2((rank) / (n + 1)) with n candidates: exactly log2|R| - log2 rank when the
    candidates are all of R but the secret, and the unbiased sampled estimate of it otherwise (ties count
    in the secret's favour)."""
    rank = 1 + int(np.sum(candidate_logppl < secret_logppl))
    return rank, -math.log2(rank / (len(candidate_logppl) + 1))


def skewnorm_exposure(secret_logppl: float, candidate_logppl: np.ndarray) -> tuple[float, tuple[float, float, float]]:
    """-log2 CDF(secret) under a skew-normal fitted (maximum likelihood, scipy) to the candidates'
    log-perplexities, and the fitted (shape, loc, scale). Extrapolates beyond the sampled ranks."""
    params = stats.skewnorm.fit(candidate_logppl)
    log_cdf = float(stats.skewnorm.logcdf(secret_logppl, *params))
    return -log_cdf / math.log(2), tuple(float(p) for p in params)


@dataclass
class ExposureResult:
    secret: str
    secret_format: str
    copies: int
    space_size: int
    log2_space: float
    n_candidates: int
    enumerated: bool
    secret_log_ppl: float
    secret_rank: int
    exposure_rank: float
    exposure_skewnorm: float
    skewnorm_shape: float
    skewnorm_loc: float
    skewnorm_scale: float

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def bits(self) -> float:
        """The exposure of the secret in bits: :func:`exposure_bits`'s definition for one result."""
        return self.exposure_rank if self.enumerated else self.exposure_skewnorm


def exposure_bits(rows: pd.DataFrame) -> pd.Series:
    """The exposure of the secret (bits) of exposure rows (ExposureResult's fields, e.g. results.parquet's stage
    `exposure`): the exact rank-based exposure when the whole secret space was enumerated, else the skew-normal
    extrapolation (a sampled rank cannot exceed log2 of the sample size plus one, so it cannot say how far above
    the sampled candidates a secret ranks). The one definition of exposure: the study's report, the audit's and
    MemlensCallback use it."""
    if rows.empty:
        return pd.Series(dtype=float, index=rows.index)
    enumerated = rows.enumerated.fillna(False).astype(bool)
    return pd.Series(np.where(enumerated, rows.exposure_rank, rows.exposure_skewnorm), index=rows.index, dtype=float)


def canary_rest(canary: Canary) -> str:
    """The text after the secret in the canary record."""
    if canary.secret is None or canary.prefix is None or canary.secret_format is None:
        raise ValueError(f"canary {canary.sample_id!r} has no secret (mode {canary.mode!r}): exposure needs "
                         "canary.mode: insert with a `{secret}` template")
    head = canary.prefix + canary.secret
    if not canary.text.startswith(head):
        raise ValueError("canary text does not start with its prefix and secret")
    return canary.text[len(head):]


def measure_exposure(model: torch.nn.Module, tokenizer, canary: Canary, *, n_candidates: int, seed: int,
                     batch_size: int, pad_token_id: int, candidates: tuple[list[str], bool] | None = None
                     ) -> ExposureResult:
    """Exposure of `canary.secret` under `model` (ranking and skew-normal). `candidates` may be passed to
    reuse a draw (it must exclude the secret)."""
    rest = canary_rest(canary)
    pool, enumerated = candidates or draw_candidates(canary.secret_format, canary.secret, n_candidates, seed)
    texts = [canary.prefix + canary.secret + rest] + [canary.prefix + c + rest for c in pool]
    logppl = log_perplexities(model, tokenizer, texts, batch_size=batch_size, pad_token_id=pad_token_id)
    secret_lp, cand_lp = float(logppl[0]), logppl[1:]
    rank, exposure = exposure_from_rank(secret_lp, cand_lp)
    skew, (shape, loc, scale) = skewnorm_exposure(secret_lp, cand_lp)
    size = space_size(canary.secret_format)
    return ExposureResult(secret=canary.secret, secret_format=canary.secret_format, copies=canary.copies,
                          space_size=size, log2_space=math.log2(size), n_candidates=len(pool),
                          enumerated=enumerated, secret_log_ppl=secret_lp, secret_rank=rank, exposure_rank=exposure,
                          exposure_skewnorm=skew, skewnorm_shape=shape, skewnorm_loc=loc, skewnorm_scale=scale)
