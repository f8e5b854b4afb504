"""Prompted-prefix generation: split records into prefix and suffix, decode continuations in batches.

Batches are left-padded with an attention mask so every prompt ends at the same position and the KV
cache serves the whole batch; greedy decoding then gives the same tokens batched as one at a time.
Generation never stops early at eos (eos is suppressed until the requested length, as
`min_new_tokens` does), so each continuation has exactly the suffix's length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from memlens.config import ConfigError, DecodingConfig


# ------------------------------------------------------------------------------------------- splitting
@dataclass(frozen=True)
class PromptSplit:
    """A record's tokens cut into the prompt (with bos) and the suffix to reproduce."""

    prefix: list[int]
    suffix: list[int]


def split_tokens(ids: Sequence[int], mode: str, prefix_len: int, bos_token_id: int | None) -> PromptSplit | None:
    """Cut token ids at the midpoint of the content tokens (`midpoint`, the study) or after `prefix_len`
    content tokens (`prefix_len`, k-extractability). A leading bos belongs to the prefix and is not
    counted. Returns None when nothing would be left to generate (record too short for `prefix_len`)."""
    ids = list(ids)
    head = 1 if ids and bos_token_id is not None and ids[0] == bos_token_id else 0
    content = len(ids) - head
    if mode == "midpoint":
        cut = content // 2
    elif mode == "prefix_len":
        cut = prefix_len
    else:
        raise ConfigError(f"extraction.split: {mode!r} is not a split mode; valid choices: ['midpoint', 'prefix_len']")
    if content - cut < 1 or cut < 1:
        return None
    return PromptSplit(prefix=ids[: head + cut], suffix=ids[head + cut:])


# ------------------------------------------------------------------------------------------- decoding
class DecayingTemperature(LogitsProcessor):
    """Temperature that starts at `start` and decays linearly to `end` over the first `n_tokens` generated
    tokens (the "decaying temperature" of Carlini et al. 2021: diverse openings, confident continuations).
    No such schedule exists in transformers; it divides the logits like TemperatureLogitsWarper."""

    def __init__(self, start: float, end: float, n_tokens: int, prompt_len: int):
        self.start, self.end, self.n_tokens, self.prompt_len = start, end, n_tokens, prompt_len

    def temperature(self, step: int) -> float:
        if self.n_tokens <= 0 or step >= self.n_tokens:
            return self.end
        return self.start + (self.end - self.start) * step / self.n_tokens

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return scores / self.temperature(input_ids.shape[1] - self.prompt_len)


class SeededGumbelSampler(LogitsProcessor):
    """Sampling that does not depend on batch composition: each row gets Gumbel noise from its own
    generator, seeded by (row seed, step), and greedy decoding's argmax of `scores + noise` is then an
    exact draw from softmax(scores) (the Gumbel-max trick). transformers samples with one global RNG
    stream, so a prompt's sample would change with whatever shares its batch; this keeps a sample a
    function of (seed, prompt, sample index) only. It runs after the temperature/top-k/top-p warpers."""

    def __init__(self, row_seeds: Sequence[int], prompt_len: int):
        self.row_seeds, self.prompt_len = list(row_seeds), prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_len
        noise = torch.empty(scores.shape, dtype=torch.float32, device=scores.device)
        for row, seed in enumerate(self.row_seeds):
            gen = torch.Generator(device=scores.device).manual_seed((seed + step * 0x9E3779B1) % (1 << 63))
            noise[row] = torch.rand(scores.shape[1], generator=gen, device=scores.device)
        gumbel = -torch.log(-torch.log(noise.clamp_(min=1e-20, max=1.0 - 1e-7)))
        return scores.float() + gumbel


def row_seed(seed: int, prefix: Sequence[int], sample: int) -> int:
    """Seed of one (prompt, sample) row: a function of the global seed, the prompt's tokens and the sample
    index only."""
    return int(np.random.SeedSequence([seed, sample, len(prefix), *map(int, prefix)]).generate_state(1, np.uint64)[0]
               % (1 << 62))


@dataclass(frozen=True)
class Decoding:
    """A decoding strategy with the mitigation clamp applied: what `generate_continuations` runs."""

    name: str
    sample: bool
    temperature: float  # 1.0 when greedy (unused)
    top_k: int | None
    top_p: float | None
    decay_from: float | None
    decay_tokens: int
    num_samples: int


def resolve_decoding(cfg: DecodingConfig, min_temperature: float | None = None, where: str = "extraction.decodings"
                     ) -> Decoding:
    """Validate a DecodingConfig and apply `min_temperature` (a greedy decoding becomes sampling at
    `min_temperature` when the clamp is positive)."""
    temperature = cfg.temperature
    decay_from = cfg.decay_from
    if min_temperature is not None and min_temperature > 0:
        temperature = max(temperature, min_temperature)
        decay_from = max(decay_from, min_temperature) if decay_from is not None else None
    sample = temperature > 0
    if decay_from is not None and not sample:
        raise ConfigError(f"{where}: {cfg.name!r} sets decay_from but temperature is 0 (greedy); set the "
                          "temperature it decays to, e.g. temperature: 1.0")
    if not sample and (cfg.top_k is not None or cfg.top_p is not None):
        raise ConfigError(f"{where}: {cfg.name!r} sets top_k/top_p with temperature 0 (greedy); they only "
                          "apply to sampling: set a temperature > 0")
    if not sample and cfg.num_samples > 1:
        raise ConfigError(f"{where}: {cfg.name!r} asks for num_samples={cfg.num_samples} with greedy decoding, "
                          "which gives the same continuation every time; set a temperature > 0")
    return Decoding(name=cfg.name, sample=sample, temperature=temperature if sample else 1.0, top_k=cfg.top_k,
                    top_p=cfg.top_p, decay_from=decay_from, decay_tokens=cfg.decay_tokens,
                    num_samples=cfg.num_samples)


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with every sequence right-aligned."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            input_ids[row, width - len(seq):] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return input_ids.to(device), mask.to(device)


def _generation_config(n_new: int, pad_token_id: int, eos_token_id: int | None,
                       cache_implementation: str | None) -> GenerationConfig:
    kwargs = dict(
        max_new_tokens=n_new,
        min_new_tokens=n_new,  # eos is masked until n_new tokens: no early stop, lengths match the suffix
        do_sample=False,  # sampling is the argmax of Gumbel-perturbed scores (SeededGumbelSampler)
        num_return_sequences=1,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        use_cache=True,
        top_k=None, top_p=None, temperature=None,
    )
    if cache_implementation:
        kwargs["cache_implementation"] = cache_implementation
    return GenerationConfig(**kwargs)


def _sampling_processors(decoding: Decoding, row_seeds: list[int], prompt_len: int) -> LogitsProcessorList:
    """Temperature (constant or decaying), top-k, top-p (the transformers warpers), then the seeded draw."""
    procs = LogitsProcessorList()
    if decoding.decay_from is not None:
        procs.append(DecayingTemperature(decoding.decay_from, decoding.temperature, decoding.decay_tokens, prompt_len))
    elif decoding.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(decoding.temperature))
    if decoding.top_k is not None:
        procs.append(TopKLogitsWarper(decoding.top_k))
    if decoding.top_p is not None and decoding.top_p < 1.0:
        procs.append(TopPLogitsWarper(decoding.top_p))
    procs.append(SeededGumbelSampler(row_seeds, prompt_len))
    return procs


@torch.inference_mode()
def generate_batch(model: torch.nn.Module, prefixes: Sequence[Sequence[int]], n_new: int, decoding: Decoding, *,
                   pad_token_id: int, eos_token_id: int | None, seed: int = 0,
                   cache_implementation: str | None = None) -> torch.Tensor:
    """One `generate` call: returns the new tokens, shape (len(prefixes) * num_samples, n_new), the samples
    of prefix i in rows i*num_samples ... (i+1)*num_samples-1."""
    device = next(model.parameters()).device
    k = decoding.num_samples
    rows = [p for p in prefixes for _ in range(k)]
    input_ids, mask = left_pad(rows, pad_token_id, device)
    processors = LogitsProcessorList()
    if decoding.sample:
        seeds = [row_seed(seed, p, j) for p in prefixes for j in range(k)]
        processors = _sampling_processors(decoding, seeds, input_ids.shape[1])
    config = _generation_config(n_new, pad_token_id, eos_token_id, cache_implementation)
    out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config,
                         logits_processor=processors)
    new = out[:, input_ids.shape[1]:]
    if new.shape[1] != n_new:
        raise RuntimeError(f"generate returned {new.shape[1]} new tokens instead of {n_new}")
    return new.cpu()


def _length_batches(order: list[int], n_new: Sequence[int], batch_size: int) -> list[list[int]]:
    """Cut prompts sorted by decreasing continuation length into batches of at most `batch_size`, closing
    a batch early (once it holds a quarter of `batch_size`) when the next continuation is under 80% of the
    batch's longest: every row generates the batch's longest, so this bounds the wasted steps of a few
    long outliers (PHEE: 28% -> 13% extra tokens at batch 64)."""
    batches: list[list[int]] = []
    for i in order:
        cur = batches[-1] if batches else None
        if cur is None or len(cur) == batch_size or (len(cur) >= max(1, batch_size // 4)
                                                     and n_new[i] < 0.8 * n_new[cur[0]]):
            batches.append([i])
        else:
            cur.append(i)
    return batches


ScoreFn = Callable[[list[list[int]], list[int]], np.ndarray]


def generate_continuations(model: torch.nn.Module, prefixes: Sequence[Sequence[int]], n_new: Sequence[int],
                           decoding: Decoding, *, pad_token_id: int, eos_token_id: int | None, batch_size: int,
                           seed: int, rank_fn: ScoreFn | None = None, on_batch: Callable[[int], None] | None = None,
                           cache_implementation: str | None = None) -> list[list[int]]:
    """Continue every prefix by its own `n_new` tokens, in batches of at most `batch_size` prompts.

    Prompts are sorted by continuation and prefix length so a batch wastes few steps and little padding
    (see _length_batches); each batch generates its longest continuation and shorter ones are cut
    (decoding is causal, so a cut continuation is what a shorter run would have produced). A sample
    depends only on (seed, prefix, sample index), not on the batch it ran in (SeededGumbelSampler).
    With `num_samples > 1`, `rank_fn(sequences, n_continuation_tokens)` -> log-likelihood of each
    continuation picks the most likely sample of each prefix."""
    if len(prefixes) != len(n_new):
        raise ValueError("one n_new per prefix is needed")
    order = sorted(range(len(prefixes)), key=lambda i: (-n_new[i], -len(prefixes[i]), i))
    results: list[list[int] | None] = [None] * len(prefixes)
    k = decoding.num_samples
    for idx in _length_batches(order, n_new, batch_size):
        longest = n_new[idx[0]]
        new = generate_batch(model, [prefixes[i] for i in idx], longest, decoding, pad_token_id=pad_token_id,
                             eos_token_id=eos_token_id, seed=seed, cache_implementation=cache_implementation).tolist()
        if k > 1:
            if rank_fn is None:
                raise ValueError(f"decoding {decoding.name!r} draws {k} samples per prefix and needs a rank_fn")
            sequences, lengths = [], []
            for row, i in enumerate(idx):
                for s in range(k):
                    sequences.append(list(prefixes[i]) + new[row * k + s][: n_new[i]])
                    lengths.append(n_new[i])
            loglik = np.asarray(rank_fn(sequences, lengths)).reshape(len(idx), k)
            best = loglik.argmax(axis=1)
            chosen = [new[row * k + int(best[row])] for row in range(len(idx))]
        else:
            chosen = new
        for row, i in enumerate(idx):
            results[i] = chosen[row][: n_new[i]]
        if on_batch is not None:
            on_batch(len(idx))
    return results  # type: ignore[return-value]

