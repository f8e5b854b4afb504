"""Scoring engine: batched per-token statistics of sequences under a model, and their on-disk cache."""

from memlens.score.cache import cached_token_stats, model_fingerprint, tokens_hash
from memlens.score.engine import SequenceStats, context_length, perplexity, sequence_nll, token_stats

__all__ = [
    "SequenceStats",
    "cached_token_stats",
    "context_length",
    "model_fingerprint",
    "perplexity",
    "sequence_nll",
    "token_stats",
    "tokens_hash",
]
