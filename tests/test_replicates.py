"""grid.draw (record draws as replicates) and grid.learning_rate (a learning-rate ladder): the cells they make, the
records each draw holds, and a study that trains and attacks each run on its own draw at its own rate."""

import pandas as pd
import pytest

from memlens.config import ConfigError, load_study
from memlens.context import StudyContext
from memlens.store import RunFile, StudyLayout
from memlens.train import read_train_info

from .conftest import make_study


def test_new_axes_leave_old_run_ids_alone_and_name_new_cells(tmp_path):
    plain = make_study(tmp_path / "a")
    explicit = make_study(tmp_path / "a", grid={"draw": [0]})
    assert [c.run_id(plain) for c in plain.cells()] == [c.run_id(explicit) for c in explicit.cells()]
    ladder = make_study(tmp_path / "a", data={"membership": ["random"]},
                        grid={"draw": [0, 1], "learning_rate": [1e-3, 3e-3]})
    ids = [c.run_id(ladder) for c in ladder.cells()]
    assert len(set(ids)) == 4
    assert sorted(i.rsplit("-", 1)[0] for i in ids) == ["q-r2-c1-s0-rand-lr0.001", "q-r2-c1-s0-rand-lr0.001-d1",
                                                        "q-r2-c1-s0-rand-lr0.003", "q-r2-c1-s0-rand-lr0.003-d1"]
    rates = {c.effective_learning_rate(ladder.train) for c in ladder.cells()}
    assert rates == {1e-3, 3e-3}
    assert plain.cells()[0].effective_learning_rate(plain.train) == plain.train.learning_rate


@pytest.mark.parametrize("grid, needle", [
    ({"draw": [0, 0]}, "distinct integers >= 0"),
    ({"draw": [-1]}, "distinct integers >= 0"),
    ({"learning_rate": [0.0]}, "learning rates > 0"),
    ({"learning_rate": []}, "learning rates > 0"),
])
def test_bad_axes_are_refused_by_name(tmp_path, grid, needle):
    with pytest.raises(ConfigError, match=needle) as info:
        make_study(tmp_path, grid=grid)
    assert "grid." in str(info.value)


def test_draws_of_the_named_splits_need_a_subset(tmp_path):
    with pytest.raises(ConfigError, match="one draw") as info:
        load_study(raw={"name": "x", "data": {"source": "d"}, "model": {"name_or_path": "m"}, "grid": {"draw": [0, 1]}})
    assert "data.subset" in str(info.value) and "membership: random" in str(info.value)


def test_each_draw_holds_other_records_and_draw_zero_the_studys(tmp_path):
    study = make_study(tmp_path, data={"membership": ["random", "splits"], "pool": ["train", "test"], "subset": 40},
                       grid={"draw": [0, 1]})
    ctx = StudyContext(study)
    for design in ("random", "splits"):
        zero, one = ctx.data(design, 0), ctx.data(design, 1)
        assert set(zero.members.sample_id) != set(one.members.sample_id)
        assert not set(one.members.sample_id) & set(one.non_members.sample_id)
        again = StudyContext(study.model_copy(update={"grid": study.grid.model_copy(update={"draw": [0]})}))
        assert again.data(design).members.sample_id.tolist() == zero.members.sample_id.tolist()
    assert set(ctx.designs()) == {("random", 0), ("random", 1), ("splits", 0), ("splits", 1)}


def test_a_study_trains_and_attacks_each_run_on_its_draw_at_its_rate(tmp_path):
    import memlens

    study = make_study(tmp_path / "study", data={"subset": 24, "membership": ["random"], "pool": ["train", "test"]},
                       grid={"draw": [0, 1], "learning_rate": [1e-3, 1e-2]},
                       mia={"bootstrap": 20, "attacks": ["loss", "ref_ratio"], "bag_of_words_baseline": False},
                       extraction={"enabled": False}, train={"epochs": 2, "batch_size": 4},
                       canary={"mode": "insert"})  # every member trained on, the canary added
    summary = memlens.run_study(study, show_progress=False, report=False)
    assert summary.ok, [o.error for o in summary.failed]
    layout, ctx = StudyLayout(study.out_dir), StudyContext(study)
    results = pd.read_parquet(layout.results_file)
    runs = results.drop_duplicates("run_id").set_index("run_id")
    assert sorted(zip(runs.draw, runs.learning_rate)) == [(0, 1e-3), (0, 1e-2), (1, 1e-3), (1, 1e-2)]
    losses = {}
    for run_id, cell in ctx.runs():
        trained = pd.read_parquet(layout.run_file(run_id, RunFile.MEMBERS))
        records = ctx.cell_data(cell)
        assert set(trained.sample_id[~trained.is_canary]) == set(records.members.sample_id)
        scores = pd.read_parquet(layout.run_file(run_id, RunFile.MIA_SCORES))
        assert set(scores.sample_id[~scores.is_member]) == set(records.non_members.sample_id)
        losses[(cell.draw, cell.learning_rate)] = read_train_info(layout.run_dir(run_id)).final_loss
    # the rate reached the optimiser: ten times the rate moves the loss further on both draws
    assert all(losses[(d, 1e-2)] < losses[(d, 1e-3)] for d in (0, 1))
    coins = pd.read_parquet(layout.membership_file)
    assert sorted(coins.draw.unique()) == [0, 1]
    for draw in (0, 1):
        members = set(coins.sample_id[(coins.draw == draw) & coins.is_member])
        assert members == set(ctx.data("random", draw).members.sample_id)
