"""Prefix/suffix splitting and batched decoding on llama-tiny (real model, no mocks)."""

from __future__ import annotations

from collections import Counter

import pandas as pd
import pytest
import torch

from memlens.attacks.generate import (
    DecayingTemperature,
    generate_batch,
    generate_continuations,
    resolve_decoding,
    split_tokens,
)
from memlens.config import ConfigError, DecodingConfig, ModelConfig
from memlens.models import load_base_model, load_tokenizer

from .conftest import LLAMA_TINY, PHEE


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig(name_or_path=str(LLAMA_TINY), device="cpu")
    return load_base_model(cfg), load_tokenizer(cfg)


@pytest.fixture(scope="module")
def prompts(tiny):
    _, tok = tiny
    texts = pd.read_json(PHEE / "train.jsonl", lines=True).context.tolist()[:10]
    splits = [split_tokens(ids, "midpoint", 0, tok.bos_token_id) for ids in tok(texts)["input_ids"]]
    return [s.prefix for s in splits], [len(s.suffix) for s in splits]


def test_split_midpoint_keeps_bos_in_prefix():
    bos = 0
    s = split_tokens([bos, 10, 11, 12, 13, 14], "midpoint", 0, bos)
    assert s.prefix == [bos, 10, 11] and s.suffix == [12, 13, 14]
    s = split_tokens([bos, 10, 11, 12, 13], "midpoint", 0, bos)
    assert s.prefix == [bos, 10, 11] and s.suffix == [12, 13]
    s = split_tokens([bos, 10, 11, 12, 13], "prefix_len", 3, bos)
    assert s.prefix == [bos, 10, 11, 12] and s.suffix == [13]
    assert split_tokens([bos, 10, 11, 12], "prefix_len", 3, bos) is None  # nothing left to generate
    with pytest.raises(ConfigError, match="midpoint"):
        split_tokens([bos, 1, 2], "middle", 0, bos)


def test_batched_greedy_equals_one_at_a_time(tiny, prompts):
    model, tok = tiny
    prefixes, n_new = prompts
    greedy = resolve_decoding(DecodingConfig(name="greedy"))
    kw = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, seed=0)
    batched = generate_continuations(model, prefixes, n_new, greedy, batch_size=4, **kw)
    single = [generate_continuations(model, [p], [n], greedy, batch_size=1, **kw)[0] for p, n in zip(prefixes, n_new)]
    assert [len(g) for g in batched] == n_new  # exactly the suffix length, no early stop at eos
    assert batched == single
    # and equal to a plain argmax loop without generate, padding or cache
    with torch.inference_mode():
        ids = list(prefixes[0])
        for _ in range(n_new[0]):
            logits = model(torch.tensor([ids])).logits[0, -1]
            logits[tok.eos_token_id] = -float("inf")  # eos is suppressed until the suffix length
            ids.append(int(logits.argmax()))
    assert ids[len(prefixes[0]):] == batched[0]


def test_sampling_is_seeded_and_samples_are_ranked(tiny, prompts):
    model, tok = tiny
    prefixes, n_new = prompts
    prefixes, n_new = prefixes[:4], n_new[:4]
    kw = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, batch_size=4)
    dec = resolve_decoding(DecodingConfig(name="t1", temperature=1.0, top_k=50, top_p=0.95))
    a = generate_continuations(model, prefixes, n_new, dec, seed=3, **kw)
    assert a == generate_continuations(model, prefixes, n_new, dec, seed=3, **kw)
    assert a != generate_continuations(model, prefixes, n_new, dec, seed=4, **kw)
    # a prompt's sample does not depend on what shares its batch
    alone = generate_continuations(model, prefixes[2:3], n_new[2:3], dec, seed=3, **kw)
    assert alone[0] == a[2]

    seen = {"sequences": []}

    def rank(sequences, n_last):  # records what it was asked to rank; prefers the largest last token
        seen["sequences"] += sequences
        return [float(s[-1]) for s in sequences]

    dec4 = resolve_decoding(DecodingConfig(name="best-of-4", temperature=1.0, num_samples=4))
    chosen = generate_continuations(model, prefixes, n_new, dec4, seed=0, rank_fn=rank, **kw)
    assert len(seen["sequences"]) == 4 * len(prefixes)
    for i, (p, n) in enumerate(zip(prefixes, n_new)):
        candidates = [s[len(p):] for s in seen["sequences"] if s[:len(p)] == p and len(s) == len(p) + n]
        assert chosen[i] == max(candidates, key=lambda c: c[-1])


def test_seeded_sampling_draws_from_the_model_distribution(tiny, prompts):
    model, tok = tiny
    prefix = prompts[0][0]
    dec = resolve_decoding(DecodingConfig(name="t0.7-k5", temperature=0.7, top_k=5, num_samples=600))
    first = generate_batch(model, [prefix], 1, dec, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                           seed=0)[:, 0]
    with torch.inference_mode():
        logits = model(torch.tensor([prefix])).logits[0, -1] / 0.7
    top = logits.topk(5)
    expected = dict(zip(top.indices.tolist(), torch.softmax(top.values, -1).tolist()))
    counts = Counter(first.tolist())
    assert set(counts) <= set(expected)
    for token, p in expected.items():  # 600 draws: binomial sd <= 0.021
        assert abs(counts[token] / 600 - p) < 0.07, (token, counts[token] / 600, p)


def test_decaying_temperature_schedule():
    proc = DecayingTemperature(start=5.0, end=1.0, n_tokens=4, prompt_len=10)
    assert [proc.temperature(s) for s in range(6)] == [5.0, 4.0, 3.0, 2.0, 1.0, 1.0]
    scores = torch.ones(1, 3)
    assert torch.allclose(proc(torch.zeros(1, 12, dtype=torch.long), scores), scores / 3.0)


def test_decoding_validation_and_min_temperature_clamp():
    assert not resolve_decoding(DecodingConfig(name="greedy")).sample
    clamped = resolve_decoding(DecodingConfig(name="greedy"), min_temperature=0.7)
    assert clamped.sample and clamped.temperature == 0.7
    assert resolve_decoding(DecodingConfig(name="t", temperature=1.0), min_temperature=0.7).temperature == 1.0
    with pytest.raises(ConfigError, match="num_samples"):
        resolve_decoding(DecodingConfig(name="g", num_samples=3))
    with pytest.raises(ConfigError, match="decay_from"):
        resolve_decoding(DecodingConfig(name="g", decay_from=5.0, decay_tokens=4))
