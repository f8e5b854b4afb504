import pytest

from memlens.config import ConfigError, load_study
from tests.conftest import make_study


def test_defaults_are_the_studys_recipe():
    study = load_study(raw={})
    assert (study.lora.alpha, study.lora.dropout, study.lora.bias) == (16, 0.05, "none")
    t = study.train
    assert (t.learning_rate, t.batch_size, t.grad_accum, t.warmup_steps, t.epochs) == (1e-3, 16, 4, 100, 3)


def test_unknown_key_names_path_and_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_study(raw={"train": {"epoch": 3}})
    msg = str(err.value)
    assert "train.epoch: unknown key" in msg and "epochs" in msg and "learning_rate" in msg


def test_wrong_type_and_impossible_values():
    with pytest.raises(ConfigError) as err:
        load_study(raw={"train": {"learning_rate": "fast"}, "grid": {"rank": [0]}})
    msg = str(err.value)
    assert "train.learning_rate" in msg and "grid.rank" in msg and ">= 1" in msg


def test_bad_choice_lists_valid_choices():
    with pytest.raises(ConfigError) as err:
        load_study(raw={"mia": {"attacks": ["loss", "magic"]}})
    assert "magic" in str(err.value) and "min_k_pp" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_study(raw={"model": {"dtype": "float8"}})
    assert "model.dtype" in str(err.value) and "bfloat16" in str(err.value)


def test_set_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("grid:\n  rank: [1]\n")
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
    assert load_study(raw={}).lora.alpha == 16.0 and isinstance(load_study(raw={}).lora.alpha, float)
