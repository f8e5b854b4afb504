"""The scoring engine against plain one-sample-at-a-time Hugging Face forwards on llama-tiny."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from memlens.models import AdapterBank, save_adapter
from memlens.score import SequenceStats, cached_token_stats, perplexity, sequence_nll, token_stats

from .conftest import LLAMA_TINY, PHEE


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(LLAMA_TINY, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(LLAMA_TINY)


@pytest.fixture(scope="module")
def sequences(tokenizer):
    texts = pd.read_json(PHEE / "dev.jsonl", lines=True).context.tolist()[:20]
    ids = tokenizer(texts)["input_ids"]
    ids.append(ids[0][:2])  # a two-token record: one scored token
    return ids


@pytest.fixture(scope="module")
def reference(model, sequences):
    """Per-token log-probs, mean NLL and whether the true token is the argmax, from a plain HF forward of one
    sequence at a time."""
    logprobs, nll, top1 = [], [], []
    with torch.no_grad():
        for seq in sequences:
            x = torch.tensor([seq])
            out = model(x, labels=x)
            logp = torch.log_softmax(out.logits[0, :-1].float(), -1)
            logprobs.append(logp.gather(-1, x[0, 1:, None]).squeeze(-1).numpy())
            nll.append(out.loss.item())
            top1.append((out.logits[0, :-1].argmax(-1) == x[0, 1:]).numpy())
    return logprobs, np.array(nll), top1


@pytest.mark.parametrize("batch_size,padding_side,shuffle,max_tokens", [
    (1, "right", False, None), (4, "right", True, None), (32, "right", False, None), (7, "left", True, None),
    (256, "right", True, 160)])
def test_nll_matches_one_at_a_time(model, tokenizer, sequences, reference, batch_size, padding_side, shuffle,
                                   max_tokens):
    order = np.random.default_rng(batch_size).permutation(len(sequences)) if shuffle else np.arange(len(sequences))
    stats = token_stats(model, [sequences[i] for i in order], batch_size=batch_size, max_batch_tokens=max_tokens,
                        pad_token_id=tokenizer.pad_token_id, padding_side=padding_side)
    logprobs, nll, top1 = reference
    np.testing.assert_allclose(stats.mean_nll(), nll[order], atol=1e-4)
    for row, i in enumerate(order):
        np.testing.assert_allclose(stats.sequence(row), logprobs[i], atol=1e-4)
        np.testing.assert_array_equal(stats.sequence(row, "is_top1"), top1[i])  # EZ-MIA's error positions
        assert stats.n_tokens[row] == len(sequences[i]) - 1  # bos not scored
        np.testing.assert_array_equal(stats.sequence(row, "token_ids"), sequences[i][1:])


def test_distribution_statistics(model, tokenizer, sequences):
    stats = token_stats(model, sequences[:3], batch_size=2, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(torch.tensor([sequences[1]])).logits[0, :-1].double()
    logp = torch.log_softmax(logits, -1)
    p = logp.exp()
    entropy = torch.distributions.Categorical(logits=logits).entropy().numpy()
    variance = (p * logp.square()).sum(-1) - (p * logp).sum(-1).square()
    np.testing.assert_allclose(stats.sequence(1, "mu"), -entropy, atol=1e-4)
    np.testing.assert_allclose(stats.entropy[stats.offsets[1]:stats.offsets[2]], entropy, atol=1e-4)
    np.testing.assert_allclose(stats.sequence(1, "sigma2"), variance.numpy(), rtol=1e-3, atol=1e-4)


def test_without_moments_log_probs_are_bit_identical_and_moments_nan(model, tokenizer, sequences):
    """`moments=False` (no attack needs Min-K%++'s statistics) skips them and changes no log-probability."""
    full = token_stats(model, sequences, batch_size=3, pad_token_id=tokenizer.pad_token_id)
    lean = token_stats(model, sequences, batch_size=3, pad_token_id=tokenizer.pad_token_id, moments=False)
    np.testing.assert_array_equal(lean.logprob, full.logprob)
    np.testing.assert_array_equal(lean.offsets, full.offsets)
    assert np.isnan(lean.mu).all() and np.isnan(lean.sigma2).all()
    assert np.isfinite(full.mu).all()


def test_sliding_window_matches_hf_recipe(model, tokenizer, sequences):
    context, stride = 12, 5
    sequences = sequences[:6] + sequences[-1:]
    got = sequence_nll(model, sequences, batch_size=8, pad_token_id=tokenizer.pad_token_id,
                       context=context, stride=stride)
    expected = []
    with torch.no_grad():  # the Hugging Face perplexity recipe, one window at a time
        for seq in sequences:
            x = torch.tensor([seq])
            total, count, prev_end = 0.0, 0, 0
            for begin in range(0, len(seq), stride):
                end = min(begin + context, len(seq))
                labels = x[:, begin:end].clone()
                labels[:, :max(prev_end - begin, 1)] = -100
                n = int((labels[:, 1:] != -100).sum())
                if n:
                    total += model(x[:, begin:end], labels=labels).loss.item() * n
                    count += n
                prev_end = end
                if end == len(seq):
                    break
            expected.append(total / count)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert any(len(s) > context for s in sequences)
    # and nothing is truncated: every token but the first is scored exactly once
    stats = token_stats(model, sequences, pad_token_id=tokenizer.pad_token_id, context=context, stride=stride)
    assert list(stats.n_tokens) == [len(s) - 1 for s in sequences]


def test_adapter_disabled_equals_bare_base(model, tokenizer, sequences, tmp_path):
    base = AutoModelForCausalLM.from_pretrained(LLAMA_TINY, dtype=torch.float32)
    torch.manual_seed(0)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    save_adapter(peft_model, tmp_path / "run" / "adapter", [])
    bank = AdapterBank(AutoModelForCausalLM.from_pretrained(LLAMA_TINY, dtype=torch.float32).eval())
    bank.add("random", tmp_path / "run")
    pad = tokenizer.pad_token_id
    bare = token_stats(model, sequences, batch_size=8, pad_token_id=pad)
    with bank.use(None) as m:
        disabled = token_stats(m, sequences, batch_size=8, pad_token_id=pad)
    with bank.use("random") as m:
        adapted = token_stats(m, sequences, batch_size=8, pad_token_id=pad)
    np.testing.assert_allclose(disabled.logprob, bare.logprob, atol=1e-6)
    assert np.abs(adapted.logprob - bare.logprob).max() > 1e-3  # the adapter really was active


def test_cache_roundtrip(model, tokenizer, sequences, tmp_path):
    calls = []

    def compute() -> SequenceStats:
        calls.append(1)
        return token_stats(model, sequences, pad_token_id=tokenizer.pad_token_id)

    first, hit1 = cached_token_stats(tmp_path, {"k": 1}, compute)
    second, hit2 = cached_token_stats(tmp_path, {"k": 1}, compute)
    assert (hit1, hit2, len(calls)) == (False, True, 1)
    for field in ("offsets", "token_ids", "logprob", "mu", "sigma2", "is_top1"):
        np.testing.assert_array_equal(getattr(first, field), getattr(second, field))
    _, hit3 = cached_token_stats(tmp_path, {"k": 2}, compute)
    assert not hit3 and len(calls) == 2
    # an entry written before the top-1 flags existed still reads (the base model's: no attack reads its flags)
    older = {k: v for k, v in first.to_arrays().items() if k != "is_top1"}
    read = SequenceStats.from_arrays(older)
    assert read.is_top1 is None and read.select([1, 0]).is_top1 is None
    np.testing.assert_array_equal(read.logprob, first.logprob)
    total = first.logprob.astype(np.float64).sum()
    assert perplexity(first) == pytest.approx(np.exp(-total / first.n_tokens.sum()))


def test_a_sequence_without_scored_tokens_is_nan_wherever_it_stands():
    """A one-token record scores no token (nothing predicts its first token without BOS): its sums and means are
    NaN first, in the middle and last (np.add.reduceat cannot start a segment at the end of the array)."""
    import numpy as np

    from memlens.score import SequenceStats

    for lengths in ([0, 2, 3], [2, 0, 3], [2, 3, 0], [0]):
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        logprob = -np.arange(1, offsets[-1] + 1, dtype=np.float32)
        zeros = np.zeros(offsets[-1], np.float32)
        stats = SequenceStats(offsets, np.zeros(offsets[-1], np.int64), logprob, zeros, zeros)
        sums, means = stats.reduce("logprob", "sum"), stats.mean_nll()
        for i, n in enumerate(lengths):
            part = logprob[offsets[i]:offsets[i + 1]].astype(float)
            if n == 0:
                assert np.isnan(sums[i]) and np.isnan(means[i]), lengths
            else:
                assert sums[i] == part.sum() and means[i] == -part.mean(), lengths
