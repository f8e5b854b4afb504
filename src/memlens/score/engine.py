"""Batched per-token scoring: one forward pass gives every statistic the membership attacks need.

For each sequence and each scored token (every token but the first, which has no prediction) we keep
the log-probability of the true token, whether the true token is the model's top-1 prediction (EZ-MIA's
error positions are the tokens where it is not) and, under the predicted distribution p, the mean
mu = E_p[log p] and variance sigma^2 = Var_p[log p] of the log-probabilities (Min-K%++ standardises with
them; the entropy is -mu). Sequences are sorted by length and right-padded in buckets, so padding is
small and never attended to by real tokens under the causal mask; the log-softmax runs in float32 over
the real (non-padding) positions only, in chunks that bound memory whatever the vocabulary.
Sequences longer than the context are scored with a sliding window (the Hugging Face perplexity
recipe): each window conditions on up to `context` previous tokens and scores only its new tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

# Log-softmax chunk: at most this many float32 logits live at once (8 MiB), whatever the vocabulary; small
# enough to stay in cache between the output layer and the statistics (measured ~20% faster on CPU than 64 MiB).
_CHUNK_LOGITS = 1 << 21


@dataclass
class SequenceStats:
    """Per-token statistics of many sequences, stored flat with offsets (CSR layout).

    Sequence i owns the rows ``offsets[i]:offsets[i+1]`` of the flat arrays: one row per scored token.
    """

    offsets: np.ndarray      # int64, (n_sequences + 1,)
    token_ids: np.ndarray    # int64, the scored (true) tokens
    logprob: np.ndarray      # float32, log p(true token | prefix)
    mu: np.ndarray           # float32, E_p[log p] under the predicted distribution (= -entropy)
    sigma2: np.ndarray       # float32, Var_p[log p]
    # bool, the true token has the highest logit (ties count as top-1); None: not recorded (statistics made
    # before it existed, e.g. base-model scores read from an older cache, which no attack reads it from)
    is_top1: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def entropy(self) -> np.ndarray:
        """Per-token entropy (nats) of the predicted distribution."""
        return -self.mu

    def sequence(self, i: int, field: str = "logprob") -> np.ndarray:
        return getattr(self, field)[self.offsets[i]:self.offsets[i + 1]]

    def segment_sums(self, values: np.ndarray) -> np.ndarray:
        """(sequences,) the sum of `values` (scored tokens,) over each sequence's tokens; NaN for a sequence with
        no scored token, wherever it stands (a one-token record under a tokenizer without BOS)."""
        # reduceat needs every start index < len: one trailing 0 makes the last sequence's start valid when empty
        padded = np.append(np.asarray(values, dtype=np.float64), 0.0)
        sums = np.add.reduceat(padded, self.offsets[:-1]) if len(self) else np.zeros(0)
        return np.where(self.n_tokens > 0, sums, np.nan)  # reduceat repeats a value for empty segments

    def reduce(self, field: str = "logprob", op: str = "sum") -> np.ndarray:
        """Per-sequence sum or mean of a per-token field (float64); NaN for a sequence with no token."""
        sums = self.segment_sums(getattr(self, field))
        n = self.n_tokens
        if op == "sum":
            return sums
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(n > 0, sums / np.maximum(n, 1), np.nan)

    def mean_nll(self) -> np.ndarray:
        """Mean negative log-likelihood per sequence (nats per scored token)."""
        return -self.reduce("logprob", "mean")

    def select(self, index: Sequence[int] | np.ndarray) -> "SequenceStats":
        """The statistics of the sequences at `index` (selected,), in that order."""
        index = np.asarray(index, dtype=np.int64)
        starts, ends = self.offsets[index], self.offsets[index + 1]
        rows = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)]) if len(index) else np.zeros(0, np.int64)
        offsets = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)
        return SequenceStats(offsets, self.token_ids[rows], self.logprob[rows], self.mu[rows], self.sigma2[rows],
                             None if self.is_top1 is None else self.is_top1[rows])

    @staticmethod
    def concat(parts: Sequence["SequenceStats"]) -> "SequenceStats":
        offsets, shift = [np.zeros(1, np.int64)], 0
        for part in parts:
            offsets.append(part.offsets[1:] + shift)
            shift += int(part.offsets[-1])
        top1 = None if any(p.is_top1 is None for p in parts) else np.concatenate([p.is_top1 for p in parts])
        return SequenceStats(np.concatenate(offsets),
                             *(np.concatenate([getattr(p, f) for p in parts]) for f in _FLAT_FIELDS), top1)

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {"offsets": self.offsets, **{f: getattr(self, f) for f in _FLAT_FIELDS}}
        return arrays if self.is_top1 is None else {**arrays, "is_top1": self.is_top1}

    @classmethod
    def from_arrays(cls, arrays) -> "SequenceStats":
        """The statistics `to_arrays` gave; `is_top1` is None when absent (a cache entry written before it existed:
        the base model's scores, read by no attack for it, keep their cache key)."""
        top1 = np.asarray(arrays["is_top1"]) if "is_top1" in arrays else None
        return cls(*(np.asarray(arrays[f]) for f in ("offsets", *_FLAT_FIELDS)), top1)


_FLAT_FIELDS = ("token_ids", "logprob", "mu", "sigma2")


def context_length(model: torch.nn.Module) -> int | None:
    """The model's maximum number of positions, when its config says."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@dataclass(frozen=True)
class _Window:
    seq: int          # which input sequence
    start: int        # first token of the window in the sequence
    end: int          # one past its last token
    score_from: int   # first position (in the sequence) whose token this window scores


def _windows(lengths: Sequence[int], context: int | None, stride: int | None) -> list[_Window]:
    """Split sequences longer than `context` into overlapping windows that together score every token
    but the first exactly once; each new token sees up to `context - 1` previous ones."""
    out: list[_Window] = []
    for i, n in enumerate(lengths):
        if context is None or n <= context:
            out.append(_Window(i, 0, n, 1))
            continue
        step = stride or context // 2
        if not 0 < step <= context - 1:
            raise ValueError(f"sliding-window stride must be in [1, {context - 1}], got {step}")
        prev_end, start = 0, 0
        while prev_end < n:
            end = min(start + context, n)
            out.append(_Window(i, start, end, max(prev_end, 1)))
            prev_end, start = end, start + step
    return out


def _head_and_body(model: torch.nn.Module):
    """(body, head) so that head(body(...).last_hidden_state) are the logits, when that is exactly what the
    model computes; lets us apply the output layer to real positions only, in chunks. None when the model
    post-processes its logits (soft-capping, scaling) or has no standard decoder."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if any(getattr(config, a, None) for a in ("final_logit_softcapping", "logit_scale", "logits_scaling")):
        return None
    try:
        body, head = base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if body is None or head is None or body is base:
        return None
    return body, head


def _chunk_stats(logits: torch.Tensor, targets: torch.Tensor, moments: bool = True) -> tuple[torch.Tensor, ...]:
    """log p(target), E_p[log p], Var_p[log p] and whether the target is the top-1 token, of a chunk of logits,
    in float32 (the moments NaN when not `moments`: the two dot products are then skipped, and log p is computed
    by the same operations).

    With x = logits - max and Z = sum exp(x): log p = x - log Z, E_p[log p] = E_p[x] - log Z and
    Var_p[log p] = Var_p[x]; the target is top-1 exactly when its x is 0 (its logit is the max; a tie counts).
    Two in-place passes and two dot products instead of materialising log p and p * log p: the
    vocabulary-sized work stays a small share of the forward pass."""
    x = logits.float()  # callers pass a temporary chunk: modified in place
    x.sub_(x.amax(-1, keepdim=True))
    target_x = x.gather(-1, targets[:, None]).squeeze(-1)
    top1 = target_x >= 0
    e = torch.exp(x)
    z = e.sum(-1)
    log_z = z.log()
    if not moments:
        nan = torch.full_like(log_z, float("nan"))
        return target_x - log_z, nan, nan, top1
    # Row-wise dot products as in-place products and row sums on the exp buffer: on CPU about 4x faster
    # than einsum (a batched matrix-vector product, ~10 ms per 256 x 8,192 chunk vs ~2.5 ms) and 10x
    # faster than linalg.vecdot, which multiplies into a temporary (benchmarks/README.md, 2026-12-01).
    mean_x = e.mul_(x).sum(-1) / z  # e becomes e * x
    mean_x2 = e.mul_(x).sum(-1) / z  # e * x^2
    return target_x - log_z, mean_x - log_z, (mean_x2 - mean_x.square()).clamp_(min=0), top1


@torch.inference_mode()
def token_stats(model: torch.nn.Module, sequences: Sequence[Sequence[int]], *, batch_size: int = 32,
                pad_token_id: int, context: int | None = None, stride: int | None = None,
                max_batch_tokens: int | None = None, padding_side: str = "right",
                on_batch: Callable[[int], None] | None = None, moments: bool = True) -> SequenceStats:
    """Per-token statistics of `sequences` (token ids, bos included) under `model`.

    Length-bucketed batches of at most `batch_size` windows (and `max_batch_tokens` padded tokens, if
    given); `context` defaults to the model's positions, `stride` (sliding window step for longer
    sequences) to half of it. `on_batch(n_windows_done)` is called after each batch (progress bars).
    The results do not depend on batch composition or `padding_side`: padded positions are masked out
    of attention, positions restart at 0 on each sequence's first real token, and padding is never scored.
    `moments=False` skips E_p[log p] and Var_p[log p] (left NaN; only Min-K%++ reads them), about a fifth
    of the pass when the output layer is cheap; log p is bit-identical either way.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    lengths = [len(s) for s in sequences]
    context = context or context_length(model)
    windows = _windows(lengths, context, stride)
    order = sorted(range(len(windows)), key=lambda w: windows[w].end - windows[w].start)
    device = next(model.parameters()).device
    split = _head_and_body(model)

    per_window: list[tuple[np.ndarray, ...] | None] = [None] * len(windows)
    batches: list[list[int]] = []
    for w in order:
        width = windows[w].end - windows[w].start
        if batches and len(batches[-1]) < batch_size and (
                max_batch_tokens is None or width * (len(batches[-1]) + 1) <= max_batch_tokens):
            batches[-1].append(w)
        else:
            batches.append([w])
    for batch in batches:
        wins = [windows[w] for w in batch]
        width = max(w.end - w.start for w in wins)
        ids = torch.full((len(wins), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(wins), width), dtype=torch.long)
        score = torch.zeros((len(wins), width), dtype=torch.bool)  # position t scores token t
        for row, w in enumerate(wins):
            n = w.end - w.start
            first = 0 if padding_side == "right" else width - n
            ids[row, first:first + n] = torch.as_tensor(sequences[w.seq][w.start:w.end], dtype=torch.long)
            mask[row, first:first + n] = 1
            score[row, first + w.score_from - w.start:first + n] = True
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        # Predictions come from position t-1 for the token at t.
        pred_mask = score[:, 1:].to(device)
        targets = ids[:, 1:][pred_mask]
        if split is not None:
            body, head = split
            hidden = body(input_ids=ids, attention_mask=mask, position_ids=positions).last_hidden_state
            hidden = hidden[:, :-1][pred_mask]
            rows_per_chunk = max(1, _CHUNK_LOGITS // head.out_features) if hasattr(head, "out_features") else 1024
            parts = [_chunk_stats(head(hidden[i:i + rows_per_chunk]), targets[i:i + rows_per_chunk], moments)
                     for i in range(0, len(hidden), rows_per_chunk)]
        else:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, :-1][pred_mask]
            rows_per_chunk = max(1, _CHUNK_LOGITS // logits.shape[-1])
            parts = [_chunk_stats(logits[i:i + rows_per_chunk], targets[i:i + rows_per_chunk], moments)
                     for i in range(0, len(logits), rows_per_chunk)]
        if parts:
            true, mu, sigma2, top1 = (torch.cat(x).cpu().numpy() for x in zip(*parts))
        else:
            true = mu = sigma2 = np.zeros(0, np.float32)
            top1 = np.zeros(0, bool)
        tgt = targets.cpu().numpy()
        counts = pred_mask.sum(1).cpu().numpy()
        bounds = np.concatenate([[0], np.cumsum(counts)])
        for row, w in enumerate(batch):
            sl = slice(bounds[row], bounds[row + 1])
            per_window[w] = (tgt[sl], true[sl], mu[sl], sigma2[sl], top1[sl])
        if on_batch is not None:
            on_batch(len(batch))

    # Reassemble windows into sequences (windows of one sequence are consecutive, in order).
    by_seq: list[list[tuple[np.ndarray, ...]]] = [[] for _ in sequences]
    for w, stats in zip(windows, per_window):
        by_seq[w.seq].append(stats)
    flat = [[np.concatenate([s[k] for s in parts]) if parts else np.zeros(0) for parts in by_seq] for k in range(5)]
    counts = np.array([len(x) for x in flat[0]], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def cat(chunks, dtype):
        return np.concatenate(chunks).astype(dtype) if chunks else np.zeros(0, dtype)

    return SequenceStats(offsets, cat(flat[0], np.int64), cat(flat[1], np.float32),
                         cat(flat[2], np.float32), cat(flat[3], np.float32), cat(flat[4], bool))


def sequence_nll(model: torch.nn.Module, sequences: Sequence[Sequence[int]], *, batch_size: int = 32,
                 pad_token_id: int, context: int | None = None, stride: int | None = None) -> np.ndarray:
    """Mean negative log-likelihood per sequence (nats/token, bos not scored), batched; sequences longer
    than the context are scored with a sliding window. NaN for a sequence of fewer than two tokens."""
    stats = token_stats(model, sequences, batch_size=batch_size, pad_token_id=pad_token_id,
                        context=context, stride=stride, moments=False)
    return stats.mean_nll()


def perplexity(stats: SequenceStats) -> float:
    """Corpus perplexity: exp of the total NLL over the total number of scored tokens."""
    total = int(stats.n_tokens.sum())
    if total == 0:
        return float("nan")
    return float(np.exp(-stats.logprob.astype(np.float64).sum() / total))
