from pathlib import Path

import pytest

from memlens.config import ConfigError, DataConfig, ModelConfig, StudyConfig, load_study
from tests.conftest import make_study

# the two fields without a default (a study must say which data and which model)
REQUIRED = {"data": {"source": "some/dataset"}, "model": {"name_or_path": "some/model"}}


def _raw(**sections) -> dict:
    return {**{k: dict(v) for k, v in REQUIRED.items()}, **sections}


def test_defaults_are_the_studys_recipe():
    study = load_study(raw=_raw())
    assert (study.lora.alpha, study.lora.dropout, study.lora.bias) == (16, 0.05, "none")
    t = study.train
    assert (t.learning_rate, t.batch_size, t.grad_accum, t.warmup_steps, t.epochs) == (1e-3, 16, 4, 100, 3)


def test_unknown_key_names_path_and_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_study(raw=_raw(train={"epoch": 3}))
    msg = str(err.value)
    assert "train.epoch: unknown key" in msg and "epochs" in msg and "learning_rate" in msg


def test_wrong_type_and_impossible_values():
    with pytest.raises(ConfigError) as err:
        load_study(raw=_raw(train={"learning_rate": "fast"}, grid={"rank": [0]}))
    msg = str(err.value)
    assert "train.learning_rate" in msg and "grid.rank" in msg and ">= 1" in msg


def test_bad_choice_lists_valid_choices():
    # (attack names are the registry's, checked before a study runs: tests/test_mia.py)
    with pytest.raises(ConfigError) as err:
        load_study(raw=_raw(model={"name_or_path": "m", "dtype": "float8"}))
    assert "model.dtype" in str(err.value) and "bfloat16" in str(err.value)


def test_set_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("data: {source: d}\nmodel: {name_or_path: m}\ngrid:\n  rank: [1]\n")
    study = load_study(path, ["grid.rank=[2, 4]", "train.epochs=1", "model.load_in_8bit=true"])
    assert study.grid.rank == [2, 4] and study.train.epochs == 1 and study.model.load_in_8bit is True
    with pytest.raises(ConfigError, match="key=value"):
        load_study(path, ["grid.rank"])


def test_run_id_stable_and_sensitive(tmp_path):
    a = make_study(tmp_path)
    b = make_study(tmp_path)
    assert [c.run_id(a) for c in a.cells()] == [c.run_id(b) for c in b.cells()]
    c = make_study(tmp_path, train={"learning_rate": 5e-4})
    assert a.cells()[0].run_id(a) != c.cells()[0].run_id(c)
    # the output folder and logging do not change what is trained
    d = make_study(tmp_path / "elsewhere", train={"logging_steps": 7})
    assert a.cells()[0].run_id(a) == d.cells()[0].run_id(d)


def test_grid_cells_product(tmp_path):
    study = make_study(tmp_path, grid={"target_modules": [["q"], ["v"], ["q", "k"]], "rank": [1, 2],
                                       "canary_copies": [1, 8], "seed": [0, 1], "method": ["lora", "full"]})
    cells = study.cells()
    assert len(cells) == 3 * 2 * 2 * 2 + 2 * 2
    assert len({c.run_id(study) for c in cells}) == len(cells)


def test_run_ids_survive_dump_and_reload(tmp_path):
    """The resolved study.yaml written next to the results must give back the same run_ids."""
    import yaml

    from memlens.config import dump_study

    study = make_study(tmp_path, grid={"target_modules": [["q"], ["v"]], "method": ["lora", "full"]})
    reloaded = load_study(raw=yaml.safe_load(dump_study(study)))
    assert [c.run_id(study) for c in study.cells()] == [c.run_id(reloaded) for c in reloaded.cells()]
    assert load_study(raw=_raw()).lora.alpha == 16.0 and isinstance(load_study(raw=_raw()).lora.alpha, float)


def test_data_source_and_model_are_required_not_defaulted_to_a_sibling_folder():
    """#13: the defaults were `../shared/...`, a path that exists only beside the project's own checkout."""
    for cls, field in ((DataConfig, "source"), (ModelConfig, "name_or_path")):
        assert cls.model_fields[field].is_required()
    for section in ("data", "model"):
        assert StudyConfig.model_fields[section].is_required()
    with pytest.raises(ConfigError) as err:
        load_study(raw={})
    msg = str(err.value)
    assert "  data: required; add the section with at least data.source: a hub dataset id" in msg
    assert "  model: required; add the section with at least model.name_or_path: a hub model id" in msg
    with pytest.raises(ConfigError) as err:
        load_study(raw={"data": {"subset": 4}, "model": {"dtype": "float32"}})
    msg = str(err.value)
    assert "data.source: required; a hub dataset id" in msg and "a folder of" in msg
    assert "model.name_or_path: required; a hub model id" in msg and "Field required" not in msg


def test_an_unparsable_set_value_names_the_override():
    with pytest.raises(ConfigError) as err:
        load_study(raw=_raw(), overrides=["grid.rank=[2"])
    msg = str(err.value)
    assert msg.startswith("--set 'grid.rank=[2': the value '[2' is not valid YAML")
    assert "expected ',' or ']'" in msg and "[2, 4]" in msg


def test_a_scalar_set_on_a_list_field_suggests_the_list():
    with pytest.raises(ConfigError) as err:
        load_study(raw=_raw(), overrides=["grid.rank=4"])
    assert "grid.rank: expected a list, got 4 (from --set grid.rank=4); write: --set 'grid.rank=[4]'" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_study(raw=_raw(), overrides=["grid.target_modules=[q, v]"])
    assert "--set 'grid.target_modules=[[q], [v]]'" in str(err.value)
    with pytest.raises(ConfigError) as err:  # the same mistake in a study file
        load_study(raw=_raw(grid={"rank": 4}))
    assert "grid.rank: expected a list, got 4; write a list, e.g. rank: [4]" in str(err.value)


def test_negative_seeds_are_refused():
    with pytest.raises(ConfigError, match=r"grid.seed: seeds must be integers >= 0; got \[-1\]"):
        load_study(raw=_raw(grid={"seed": [0, -1]}))
    with pytest.raises(ConfigError, match="data.subset_seed: Input should be greater than or equal to 0"):
        load_study(raw=_raw(data={"source": "d", "subset_seed": -1}))


# ----------------------------------------------------------------------------------- attack settings
OLD_MIA = {"attacks": ["loss", "min_k", "min_k_pp", "rmia_offline", "con_recall"], "min_k_fraction": 0.1,
           "dc_pdd_clip": 0.01, "rmia_offline_a": 0.3, "rmia_gamma": 1.0, "recall_shots": 3, "conrecall_gamma": 0.5}


def test_a_study_file_from_before_attack_settings_loads_with_its_run_ids_and_result_names():
    """The former mia.* settings fold into the attacks that read them (non-default values only), under the
    attacks' old result names; the mia section enters no run id, so the runs are the same."""
    from memlens.attacks.registry import configure_attacks

    old, new = load_study(raw=_raw(mia=OLD_MIA)), load_study(raw=_raw())
    assert [c.run_id(old) for c in old.cells()] == [c.run_id(new) for c in new.cells()]
    attacks = {a.name: a.settings for a in configure_attacks(old.mia.attacks)}
    assert list(attacks) == ["loss", "min_k", "min_k_pp", "rmia_offline", "con_recall"]
    assert attacks["min_k"].fraction == attacks["min_k_pp"].fraction == 0.1
    assert attacks["rmia_offline"].a == 0.3 and attacks["rmia_offline"].gamma == 1.0  # default: left as it was
    assert attacks["con_recall"].shots == 3 and attacks["con_recall"].gamma == 0.5
    dumped = old.model_dump(mode="json")["mia"]
    assert not set(dumped) & set(OLD_MIA) - {"attacks"}  # written back without the old fields
    assert load_study(raw=_raw(mia=dumped)).mia == old.mia


def test_one_attack_runs_at_two_settings_and_bad_settings_name_the_valid_ones():
    import numpy as np

    from memlens.attacks.registry import AttackInputs, configure_attacks, run_attacks
    from memlens.score import SequenceStats

    logprob = np.array([-1, -2, -3, -4, -5, -6, -7, -8, -9, -10], np.float32)
    ft = SequenceStats(np.array([0, 10]), np.zeros(10, np.int64), logprob, np.zeros(10, np.float32),
                       np.ones(10, np.float32))
    scores = run_attacks(["min_k@0.1", "min_k@0.5", {"type": "min_k", "name": "default"}],
                         AttackInputs(texts=["x"], ft=ft))
    assert {k: v.tolist() for k, v in scores.items()} == {"min_k@0.1": [-10.0], "min_k@0.5": [-8.0],
                                                          "default": [-9.5]}  # lowest 1, 5 and 2 tokens
    with pytest.raises(ConfigError, match=r"mia\.attacks\[1\]: 'min_k@2': fraction: .*less than or equal to 1"):
        configure_attacks(["loss", "min_k@2"])
    with pytest.raises(ConfigError, match=r"'min_k@0.1'.* occur twice"):
        configure_attacks(["min_k@0.1", {"type": "min_k", "params": {"fraction": 0.1}}])
    with pytest.raises(ConfigError, match=r"frac: Extra inputs.*the settings of 'min_k': \{'fraction'"):
        configure_attacks([{"type": "min_k", "params": {"frac": 0.1}}])
    with pytest.raises(ConfigError, match=r"`name@value` sets an attack's only setting.*'con_recall' has 2"):
        configure_attacks(["con_recall@3"])


# ----------------------------------------------------------------------------------- lora.alpha_per_rank
def test_alpha_per_rank_scales_alpha_with_rank_and_leaves_older_run_ids_alone(tmp_path):
    """`lora.alpha_per_rank: 2` gives each cell alpha = 2 x rank (a constant update scale); unset, the run ids are
    those of the commit before the field existed (the id below is of the third-round llama-tiny study's first
    cell, run from that commit)."""
    from memlens.train.finetune import lora_config

    study = load_study(Path(__file__).parents[1] / "studies" / "draws-llama-tiny.yaml")
    assert study.cells()[0].run_id(study) == "q-r1-c1-s0-rand-lr0.001-85d5c0426b"
    scaled = make_study(tmp_path, grid={"rank": [1, 4, 16]}, lora={"alpha_per_rank": 2})
    plain = make_study(tmp_path, grid={"rank": [1, 4, 16]})
    assert [lora_config(scaled, c, ["q_proj"]).lora_alpha for c in scaled.cells()] == [2, 8, 32]
    assert [lora_config(plain, c, ["q_proj"]).lora_alpha for c in plain.cells()] == [16, 16, 16]
    assert {c.run_id(scaled) for c in scaled.cells()}.isdisjoint(c.run_id(plain) for c in plain.cells())
