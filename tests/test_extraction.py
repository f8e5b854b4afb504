"""The extraction stage end to end on llama-tiny: an adapter trained on a canary repeated 32 times
reproduces its suffix greedily while the base model does not; outputs, aggregates and resumption."""

from __future__ import annotations

import pandas as pd
import pytest

from memlens.attacks.extraction import run_extraction, select_targets
from memlens.config import ConfigError, ExtractionConfig
from memlens.context import StudyContext
from memlens.data import load_study_data
from memlens.models import load_tokenizer
from memlens.store import StudyLayout
from memlens.train import finetune_cell

from .conftest import make_study

ROW_COLUMNS = ["run_id", "sample_id", "is_canary", "is_member", "decoding", "prefix_len", "suffix_len",
               "longest_common_ngram", "ngram_share", "exact_match", "common_prefix_len", "lcs_ratio", "relaxed_match",
               "bleu", "rouge_l", "edit_distance", "tfidf_cosine", "ppl_base", "ppl_ft", "ppl_generated",
               "generated_text", "suffix_text", "model", "group"]


@pytest.fixture(scope="module")
def canary_run(tmp_path_factory):
    study = make_study(
        tmp_path_factory.mktemp("extraction") / "study",
        data={"subset": 40},
        grid={"target_modules": [["q", "v", "o"]], "rank": [4], "canary_copies": [32], "seed": [0]},
        train={"epochs": 8, "batch_size": 16, "grad_accum": 1, "warmup_steps": 0, "learning_rate": 1e-2},
        extraction={"members": 6, "non_members": 6, "batch_size": 8, "decodings": [
            {"name": "greedy"},
            {"name": "t0.5-best2", "temperature": 0.5, "num_samples": 2},
        ]},
    )
    layout = StudyLayout(study.out_dir)
    run_dir = finetune_cell(study, study.cells()[0], load_study_data(study.data), layout)
    rows = run_extraction(StudyContext(study))
    return study, layout, run_dir, rows


def test_memorized_canary_is_extracted_by_finetuned_not_base(canary_run):
    study, _, run_dir, _ = canary_run
    rows = pd.read_parquet(run_dir / "extraction.parquet")
    canary = rows[rows.is_canary & (rows.decoding == "greedy")].set_index("model")
    ft, base = canary.loc["finetuned"], canary.loc["base"]
    assert ft.ngram_share == 1.0 and ft.exact_match and ft.generated_text == ft.suffix_text
    assert ft.bleu == pytest.approx(100.0) and ft.edit_distance == 0.0
    assert not base.exact_match and base.ngram_share < 0.5
    assert ft.ppl_ft < ft.ppl_base  # the fine-tuned model finds its canary far more likely
    # the row's text and counts agree with the record it came from
    tok = load_tokenizer(study.model)
    members = pd.read_parquet(run_dir / "members.parquet")
    ids = tok(members[members.is_canary].text.iloc[0])["input_ids"]
    assert ft.prefix_len == 1 + (len(ids) - 1) // 2 and ft.prefix_len + ft.suffix_len == len(ids)
    assert tok.decode(ids[ft.prefix_len:]) == ft.suffix_text


def test_rows_and_aggregates(canary_run):
    _, layout, run_dir, returned = canary_run
    rows = pd.read_parquet(run_dir / "extraction.parquet")
    assert set(ROW_COLUMNS) <= set(rows.columns)
    # 1 canary + 6 members + 6 non-members, 2 decodings, 2 models
    assert len(rows) == 13 * 2 * 2
    assert rows.groupby(["model", "decoding"]).group.value_counts().unstack().loc[("finetuned", "greedy")].to_dict() \
        == {"canary": 1, "members": 6, "non_members": 6}
    assert (rows.is_member == (rows.group != "non_members")).all()
    # every generation has exactly the suffix's length (no early stop at eos)
    assert (rows.generated_len == rows.suffix_len).all()
    assert ((rows.ngram_share == rows.longest_common_ngram / rows.suffix_len)).all()

    results = pd.read_parquet(run_dir / "extraction_results.parquet")
    ft_canary = results[(results.model == "finetuned") & (results.group == "canary") & (results.decoding == "greedy")]
    assert ft_canary.exact_rate.item() == 1.0 and ft_canary.mean_ngram_share.item() == 1.0
    sel = rows[(rows.model == "finetuned") & (rows.decoding == "greedy") & (rows.group == "non_members")]
    nm = results[(results.model == "finetuned") & (results.group == "non_members") & (results.decoding == "greedy")]
    assert nm.mean_ngram_share.item() == pytest.approx(sel.ngram_share.mean())
    assert nm.bleu_rate.item() == pytest.approx((sel.bleu >= 50).mean())

    res = pd.read_parquet(layout.root / "results.parquet")
    ext = res[res.stage == "extraction"]
    expected = {f"extract:{d}:{g}{s}" for d in ("greedy", "t0.5-best2") for g in ("canary", "members", "non_members")
                for s in ("", ":base")}
    assert set(ext.attack) == expected and len(returned) == len(expected)
    assert (ext["rank"] == 4).all() and (ext.target_modules == "q+v+o").all()
    assert len(pd.read_parquet(layout.root / "extraction.parquet")) == len(rows)


def test_resume_skips_done_runs_and_force_recomputes(canary_run):
    study, layout, run_dir, _ = canary_run
    before = pd.read_parquet(run_dir / "extraction.parquet")
    ctx = StudyContext(study)
    assert run_extraction(ctx).empty  # nothing pending
    again = run_extraction(ctx, ctx.cells_of([run_dir.name]), force=True)
    assert len(again) == 12
    after = pd.read_parquet(run_dir / "extraction.parquet")
    pd.testing.assert_frame_equal(before, after)  # greedy and seeded sampling reproduce exactly
    # the base-model control came from the cache the first call wrote: 13 records x 2 decodings
    cache = list(layout.cache.glob("extraction-base-*.parquet"))
    assert len(cache) == 1 and len(pd.read_parquet(cache[0])) == 26
    seed_1 = study.model_copy(update={"grid": study.grid.model_copy(update={"seed": [1]})}).cells()
    with pytest.raises(ConfigError, match="no finished run"):
        run_extraction(ctx, seed_1)


def test_select_targets_is_seeded_and_keeps_the_canary():
    members = pd.DataFrame({"sample_id": [f"m{i}" for i in range(20)], "text": [f"t{i}" for i in range(20)],
                            "is_canary": [i == 7 for i in range(20)]})
    non_members = pd.DataFrame({"sample_id": [f"n{i}" for i in range(20)], "text": [f"u{i}" for i in range(20)]})
    cfg = ExtractionConfig(members=5, non_members=3, seed=1)
    a = select_targets(members, non_members, cfg)
    assert a.group.value_counts().to_dict() == {"members": 5, "non_members": 3, "canary": 1}
    assert a[a.is_canary].sample_id.tolist() == ["m7"]
    pd.testing.assert_frame_equal(a, select_targets(members, non_members, cfg))
    b = select_targets(members, non_members, ExtractionConfig(members=None, non_members=None))
    assert len(b) == 40



def test_results_written_before_relaxed_rate_read_their_lcs_rate_as_relaxed(tmp_path):
    """Older results called the relaxed match (LCS ratio >= threshold) `verbatim_rate`; it reads as `relaxed_rate`
    in the store and in the report's inputs, never as an exact continuation; newer results are left as they are."""
    from memlens.report.inputs import with_run_defaults
    from memlens.store import StudyLayout, read_results

    layout = StudyLayout(tmp_path)
    old = pd.DataFrame({"run_id": ["a"], "stage": ["extraction"], "attack": ["greedy"], "exact_rate": [0.0],
                        "verbatim_rate": [0.25]})
    old.to_parquet(layout.results_file)
    read = read_results(layout)
    assert "verbatim_rate" not in read and read.relaxed_rate.tolist() == [0.25] and read.exact_rate.tolist() == [0.0]
    assert with_run_defaults(old).relaxed_rate.tolist() == [0.25]
    new = old.rename(columns={"verbatim_rate": "relaxed_rate"}).assign(verbatim_rate=0.5)
    assert with_run_defaults(new).relaxed_rate.tolist() == [0.25]
