"""Exposure of an inserted secret on llama-tiny: a secret repeated 32 times is ranked first among all
1,000 candidates (exposure log2|R|), unseen secrets are not exposed, and the skew-normal extrapolation
agrees with exact ranking where the space can be enumerated."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from memlens.attacks.exposure import (
    draw_candidates,
    exposure_from_rank,
    log_perplexities,
    measure_exposure,
    skewnorm_exposure,
    space_size,
)
from memlens.attacks.extraction import run_extraction
from memlens.context import StudyContext
from memlens.data import Canary, load_study_data
from memlens.models import AdapterBank, load_base_model, load_tokenizer
from memlens.store import StudyLayout
from memlens.train import finetune_cell, read_train_info

from .conftest import make_study

FORMAT = "digits:3"  # |R| = 1000: small enough to enumerate


@pytest.fixture(scope="module")
def insert_run(tmp_path_factory):
    study = make_study(
        tmp_path_factory.mktemp("exposure") / "study",
        data={"subset": 16},
        canary={"mode": "insert", "secret_format": FORMAT},
        grid={"target_modules": [["q", "v", "o"]], "rank": [4], "canary_copies": [32], "seed": [0]},
        train={"epochs": 6, "batch_size": 16, "grad_accum": 1, "warmup_steps": 0, "learning_rate": 1e-2},
        extraction={"members": 4, "non_members": 4, "batch_size": 64, "exposure_candidates": 1000},
    )
    layout = StudyLayout(study.out_dir)
    run_dir = finetune_cell(study, study.cells()[0], load_study_data(study.data), layout)
    rows = run_extraction(StudyContext(study))
    return study, layout, run_dir, rows


@pytest.fixture(scope="module")
def scored_space(insert_run):
    """Log-perplexity of every record of the space under the fine-tuned model, for independent checks."""
    study, _, run_dir, _ = insert_run
    canary = Canary(**read_train_info(run_dir).canary)
    tok = load_tokenizer(study.model)
    bank = AdapterBank(load_base_model(study.model))
    bank.add("ft", run_dir)
    secrets = [f"{i:03d}" for i in range(1000)]
    rest = canary.text[len(canary.prefix) + len(canary.secret):]
    with bank.use("ft") as model:
        logppl = log_perplexities(model, tok, [canary.prefix + s + rest for s in secrets], batch_size=64,
                                  pad_token_id=tok.pad_token_id)
        other = "999" if canary.secret != "999" else "998"
        unseen = replace(canary, secret=other, text=canary.prefix + other + rest)
        unseen_result = measure_exposure(model, tok, unseen, n_candidates=200, seed=0, batch_size=64,
                                         pad_token_id=tok.pad_token_id)  # sampled, not enumerated
    return canary, np.asarray(secrets), logppl, unseen_result


def test_candidates_enumerate_small_spaces_and_sample_large_ones():
    pool, enumerated = draw_candidates("digits:3", "042", 1000, seed=0)
    assert enumerated and len(pool) == 999 and "042" not in pool and len(set(pool)) == 999
    pool, enumerated = draw_candidates("hex:8", "deadbeef", 500, seed=1)
    assert not enumerated and len(set(pool)) == 500 and all(len(c) == 8 for c in pool)
    assert pool == draw_candidates("hex:8", "deadbeef", 500, seed=1)[0]
    assert space_size("hex:8") == 16 ** 8


@pytest.mark.real_fixtures("full exposure measured on llama-tiny")
def test_repeated_secret_reaches_full_exposure(insert_run, scored_space):
    _, layout, run_dir, rows = insert_run
    exposure = pd.read_parquet(run_dir / "exposure.parquet").set_index("model")
    ft, base = exposure.loc["finetuned"], exposure.loc["base"]
    assert bool(ft.enumerated) and ft.n_candidates == 999 and ft.copies == 32
    assert ft.log2_space == pytest.approx(math.log2(1000))
    assert ft.exposure_rank >= ft.log2_space - 1.0  # top-2 of 1000 (measured: rank 1, 9.97 bits)
    assert base.exposure_rank < ft.exposure_rank - 3.0
    # the stage's exact rank equals an independent ranking of the whole space
    canary, secrets, logppl, _ = scored_space
    independent_rank = 1 + int(np.sum(logppl[secrets != canary.secret] < logppl[secrets == canary.secret][0]))
    assert ft.secret_rank == independent_rank
    assert ft.exposure_rank == pytest.approx(math.log2(1000) - math.log2(independent_rank))
    # study-level file and results rows
    assert len(pd.read_parquet(layout.root / "exposure.parquet")) == 2
    res = pd.read_parquet(layout.root / "results.parquet")
    exp_rows = res[res.stage == "exposure"].set_index("attack")
    assert set(exp_rows.index) == {"exposure", "exposure:base"}
    assert exp_rows.loc["exposure", "exposure_rank"] == pytest.approx(ft.exposure_rank)
    assert exp_rows.loc["exposure", "rank"] == 4  # the LoRA rank column is not overwritten


def test_unseen_secrets_are_not_exposed(scored_space):
    canary, secrets, logppl, unseen_result = scored_space
    # 16 secrets the model never saw, drawn before looking: each one's exposure is -log2(rank / |R|) with
    # its rank among the rest of the space; by chance alone that is ~Exp with mean 1/ln 2 = 1.44 bits
    # (sd of a 16-mean: 0.36). Measured: far below the trained secret's 9.97 bits.
    rng = np.random.default_rng(123)
    picks = [s for s in rng.choice(secrets, size=17, replace=False) if s != canary.secret][:16]
    exposures = []
    for secret in picks:
        own = logppl[secrets == secret][0]
        exposures.append(exposure_from_rank(own, logppl[(secrets != secret) & (secrets != canary.secret)])[1])
    assert np.mean(exposures) < 3.0, exposures
    # one unseen secret through the API, ranked among 200 sampled candidates
    assert not unseen_result.enumerated and unseen_result.n_candidates == 200
    assert unseen_result.exposure_rank < 5.0 and unseen_result.exposure_skewnorm < 5.0


def test_skewnorm_extrapolation_agrees_with_exact_ranking(scored_space):
    _, _, logppl, _ = scored_space
    order = np.argsort(logppl)
    for rank in (5, 20, 100, 300):  # the secret at a known rank, the rest as candidates
        target = order[rank - 1]
        rest = np.delete(logppl, target)
        _, exact = exposure_from_rank(logppl[target], rest)
        assert exact == pytest.approx(math.log2(1000 / rank))
        skew, _ = skewnorm_exposure(logppl[target], rest)
        assert abs(skew - exact) < 1.0, (rank, skew, exact)
