"""Packed rows isolate records: losses and gradients equal those of the records run one at a time."""

from __future__ import annotations

from contextlib import nullcontext

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from memlens.models.varlen import varlen_attention
from memlens.train.collate import CausalLMCollator, PackedCollator, pack_rows
from tests.conftest import GPT2_SMALL, LLAMA_TINY, PHEE

N_RECORDS = 5


@pytest.fixture(scope="module")
def records() -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(LLAMA_TINY)  # the shared models share one tokenizer
    texts = pd.read_json(PHEE / "train.jsonl", lines=True).context.tolist()[:N_RECORDS]
    return tok(texts)["input_ids"]


def _model(path, attn: str):
    attn = "sdpa" if attn == "varlen" else attn  # varlen: switched on around the packed forward
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)
    return model.eval()  # no dropout: the comparison is deterministic


def _token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position NLL of the next token (0 where the next label is -100)."""
    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(shift_logits.transpose(1, 2), shift_labels.clamp(min=0), reduction="none")
    return nll * (shift_labels != -100)


def _per_record_losses_packed(model, batch, records, pack_tokens) -> list[torch.Tensor]:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    nll = _token_nll(model(**inputs).logits, batch["labels"])
    where = {}
    for r, row in enumerate(pack_rows([len(x) for x in records], pack_tokens)):  # the collator's layout
        start = 0
        for index in row:
            where[index] = (r, start)
            start += len(records[index])
    losses = []
    for index, rec in enumerate(records):
        r, s = where[index]
        assert batch["input_ids"][r, s:s + len(rec)].tolist() == rec
        losses.append(nll[r, s:s + len(rec) - 1].sum() / (len(rec) - 1))  # positions s.. predict tokens 1..n-1
    return losses


def _single_loss(model, rec) -> torch.Tensor:
    ids = torch.tensor([rec])
    return _token_nll(model(input_ids=ids).logits, ids).sum() / (len(rec) - 1)


@pytest.mark.parametrize("path,attn", [(LLAMA_TINY, "sdpa"), (LLAMA_TINY, "eager"), (LLAMA_TINY, "varlen"),
                                       (GPT2_SMALL, "sdpa"), (GPT2_SMALL, "eager"), (GPT2_SMALL, "varlen")],
                         ids=["llama-tiny-sdpa", "llama-tiny-eager", "llama-tiny-varlen", "gpt2-small-sdpa",
                              "gpt2-small-eager", "gpt2-small-varlen"])
def test_packed_losses_and_gradients_equal_single_records(records, path, attn):
    model = _model(path, attn)
    params = [p for p in model.parameters() if p.requires_grad]
    # Two rows (first-fit): records share rows and the shorter row is padded.
    pack_tokens = sum(len(r) for r in records) // 2 + 8
    batch = PackedCollator(pad_token_id=0, pack_tokens=pack_tokens)(
        [{"input_ids": r} for r in records])
    assert batch["input_ids"].shape[0] >= 2 and "attention_mask" not in batch
    assert (batch["position_ids"] == 0).sum() > batch["input_ids"].shape[0]  # several records per row

    with varlen_attention(model) if attn == "varlen" else nullcontext(False) as switched:
        assert switched == (attn == "varlen")
        packed = _per_record_losses_packed(model, batch, records, pack_tokens)
    for i in (0, N_RECORDS - 1) if attn != "eager" else (N_RECORDS - 1,):  # per-record gradients, packed forward
        single = _single_loss(model, records[i])
        torch.testing.assert_close(packed[i], single, rtol=1e-5, atol=1e-5)
        g_packed = torch.autograd.grad(packed[i], params, retain_graph=True, allow_unused=True)
        g_single = torch.autograd.grad(single, params, allow_unused=True)
        for gp, gs in zip(g_packed, g_single):
            if gs is None:
                assert gp is None or gp.abs().max() == 0
                continue
            torch.testing.assert_close(gp, gs, rtol=1e-4, atol=1e-6)
    singles = torch.stack([_single_loss(model, r) for r in records])
    torch.testing.assert_close(torch.stack(packed), singles.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", [LLAMA_TINY, GPT2_SMALL], ids=["llama-tiny", "gpt2-small"])
def test_packed_batch_loss_equals_padded_batch_loss(records, path):
    """The model's own loss (what the Trainer optimises) is the same mean over the same tokens."""
    model = _model(path, "sdpa")
    features = [{"input_ids": r} for r in records]
    padded = CausalLMCollator(pad_token_id=0)(features)
    packed = PackedCollator(pad_token_id=0, pack_tokens=4096)(features)
    assert packed["input_ids"].shape[0] == 1  # everything fits one row: no padding at all
    assert int((packed["labels"] != -100).sum()) == int((padded["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(model(**packed).loss, model(**padded).loss, rtol=1e-5, atol=1e-6)


def test_unisolated_packing_would_differ(records):
    """Control: without restarting positions the same row mixes records, so the check above has teeth."""
    model = _model(LLAMA_TINY, "sdpa")
    batch = PackedCollator(pad_token_id=0, pack_tokens=4096)([{"input_ids": r} for r in records])
    naive = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    assert not torch.allclose(naive, model(**batch).loss, rtol=1e-4)


def test_pack_rows_balanced():
    lengths = [5, 9, 3, 4, 12, 2]
    rows = pack_rows(lengths, pack_tokens=12)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 12 for row in rows)
    assert len(rows) == 3 and max(sum(lengths[i] for i in row) for row in rows) == 12
    rows = pack_rows([30] * 7, pack_tokens=100)  # 210 tokens: 3 rows of 90/60/60, not 90/90/30
    assert sorted(len(row) for row in rows) == [2, 2, 3]
    assert pack_rows([20], pack_tokens=12) == [[0]]  # too long: a row of its own
