"""The recipe an audit's reference models repeat (`audit.train_config`): memlens' names or the Trainer's, YAML or
JSON or the callback's memlens-recipe.json, and the Trainer's defaults (not the study's) for what is left out."""

from __future__ import annotations

import json

import pytest

from memlens.config import TRAINER_DEFAULTS, ConfigError, TrainConfig, find_recipe, read_recipe, read_train_config
from memlens.config.recipe import recipe_document


def test_the_trainer_defaults_are_the_installed_trainers():
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir="unused")
    assert TRAINER_DEFAULTS == {"epochs": args.num_train_epochs, "max_steps": None,
                                "batch_size": args.per_device_train_batch_size,
                                "grad_accum": args.gradient_accumulation_steps, "warmup_steps": args.warmup_steps,
                                "learning_rate": args.learning_rate, "weight_decay": args.weight_decay,
                                "lr_scheduler": args.lr_scheduler_type.value}
    assert args.max_steps == -1  # "none": read as max_steps null


def test_an_incomplete_recipe_is_the_full_one_with_the_trainers_defaults(tmp_path):
    full = {"epochs": 2, "learning_rate": 0.02, "batch_size": 4, "grad_accum": 1, "warmup_steps": 0,
            "lr_scheduler": "linear", "weight_decay": 0.0}
    (tmp_path / "full.yaml").write_text(json.dumps({"train": full}))
    (tmp_path / "ours.yaml").write_text("epochs: 2\nlearning_rate: 0.02\nbatch_size: 4\n")
    (tmp_path / "hf.json").write_text(json.dumps({"num_train_epochs": 2, "learning_rate": 0.02,
                                                  "per_device_train_batch_size": 4}))
    expected = read_train_config(tmp_path / "full.yaml")
    assert expected.grad_accum == 1 and expected.warmup_steps == 0  # not the study's 4 and 100
    assert read_train_config(tmp_path / "ours.yaml") == expected == read_train_config(tmp_path / "hf.json")
    recipe = read_recipe(tmp_path / "hf.json")
    assert recipe.given == {"epochs": 2, "learning_rate": 0.02, "batch_size": 4}
    assert recipe.named["batch_size"] == "per_device_train_batch_size"
    assert recipe.from_defaults == {"max_steps": None, "grad_accum": 1, "warmup_steps": 0, "weight_decay": 0.0,
                                    "lr_scheduler": "linear"}
    assert recipe.describe() == ("references trained with epochs=2, learning_rate=0.02, batch_size=4 (from hf.json); "
                                 "from the Trainer's defaults: max_steps=None, grad_accum=1, warmup_steps=0, "
                                 "weight_decay=0.0, lr_scheduler=linear")
    # an empty file: every setting the Trainer's default; memlens' own trainer settings stay memlens'
    (tmp_path / "empty.yaml").write_text("")
    empty = read_train_config(tmp_path / "empty.yaml")
    assert (empty.batch_size, empty.learning_rate, empty.epochs) == (8, 5e-5, 3)
    assert empty.packing == TrainConfig().packing


def test_a_warmup_ratio_becomes_steps_as_the_trainer_counts_them(tmp_path):
    (tmp_path / "ratio.yaml").write_text("per_device_train_batch_size: 8\ngradient_accumulation_steps: 2\n"
                                         "num_train_epochs: 3\nwarmup_ratio: 0.1\n")
    (tmp_path / "tf5.yaml").write_text("batch_size: 8\ngrad_accum: 2\nepochs: 3\nwarmup_steps: 0.1\n")
    # 100 records: ceil(100 / 8) = 13 micro-batches, ceil(13 / 2) = 7 steps an epoch, 21 steps; ceil(2.1) = 3
    for name in ("ratio.yaml", "tf5.yaml"):
        recipe = read_recipe(tmp_path / name)
        assert recipe.warmup_ratio == 0.1 and recipe.train_config(records=100).warmup_steps == 3
        assert "warmup_steps" not in recipe.from_defaults
    assert read_recipe(tmp_path / "ratio.yaml").describe(100).startswith(
        "references trained with batch_size=8, grad_accum=2, epochs=3, warmup_steps=0.1 of the steps (3)")
    (tmp_path / "steps.yaml").write_text("max_steps: 50\nwarmup_ratio: 0.05\n")
    assert read_train_config(tmp_path / "steps.yaml", records=10).warmup_steps == 3  # ceil(2.5)
    with pytest.raises(ConfigError, match=r"ratio.yaml gives the warm-up as a fraction .*warmup_ratio: 0.1.* "
                                          "needs the number of training records"):
        read_train_config(tmp_path / "ratio.yaml")


def test_bad_recipes_name_the_file_and_the_setting(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("learning_rate: 0.01\noptim: sgd\n")
    with pytest.raises(ConfigError, match=r"audit.train_config: .*train.yaml: unknown setting\(s\) \['optim'\]; give "
                                          r"the Hugging Face Trainer's names \(.*'per_device_train_batch_size'"):
        read_recipe(path)
    path.write_text("batch_size: 4\nper_device_train_batch_size: 8\n")
    with pytest.raises(ConfigError,
                       match="sets batch_size twice, as 'batch_size' and as 'per_device_train_batch_size'"):
        read_recipe(path)
    path.write_text("lr_scheduler_type: cosine_with_restarts\n")
    with pytest.raises(ConfigError, match=r"invalid training settings\n  lr_scheduler_type: Input should be 'linear'"):
        read_recipe(path)
    path.write_text("warmup_ratio: 2\n")
    with pytest.raises(ConfigError, match=r"warmup_ratio: 2 is not a fraction of the steps in \[0, 1\]"):
        read_recipe(path)
    with pytest.raises(ConfigError, match="does not exist"):
        read_recipe(tmp_path / "none.yaml")


def test_the_callbacks_recipe_file_reads_back_and_is_found_next_to_the_adapter(tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=4,
                             gradient_accumulation_steps=3, learning_rate=0.01, warmup_steps=5,
                             lr_scheduler_type="cosine", weight_decay=0.1, use_cpu=True)
    lora = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"], "bias": "none"}
    document = recipe_document(args, lora=lora, max_length=256, train_records=300, total_steps=50)
    (tmp_path / "memlens-recipe.json").write_text(json.dumps(document))
    (tmp_path / "adapter").mkdir()
    assert find_recipe(tmp_path / "adapter") == tmp_path / "memlens-recipe.json" == find_recipe(tmp_path)
    assert find_recipe(tmp_path / "adapter" / "elsewhere") is None
    recipe = read_recipe(find_recipe(tmp_path / "adapter"))
    assert recipe.train_config() == TrainConfig(epochs=2, batch_size=4, grad_accum=3, learning_rate=0.01,
                                                warmup_steps=5, lr_scheduler="cosine", weight_decay=0.1,
                                                max_steps=None)
    assert recipe.from_defaults == {} and recipe.lora == lora
    assert (recipe.max_length, recipe.train_records, recipe.total_steps) == (256, 300, 50)
    # total_steps is checked against the settings: 300 records, batch 4, accumulation 3, 2 epochs = 2 * 25 steps
    assert "max_length=256 tokens" in recipe.describe(150) and "total_steps=50 on train_records=300" in \
        recipe.describe(150)
    (tmp_path / "memlens-recipe.json").write_text(json.dumps({**document, "total_steps": 25}))  # on 2 devices
    with pytest.raises(ConfigError, match=r"took total_steps=25 optimizer steps, but its settings \(batch_size=4, "
                                          r"grad_accum=3, epochs=2, max_steps=None\) give 50 for its "
                                          r"train_records=300 records on one device"):
        read_recipe(tmp_path / "memlens-recipe.json")
    (tmp_path / "memlens-recipe.json").write_text(json.dumps({**document, "train_records": None}))
    assert read_recipe(tmp_path / "memlens-recipe.json").total_steps == 50  # nothing to check it against


def test_every_yaml_file_is_read_by_the_one_reader():
    """recipe.py and store/layout.py read their files through config.loading.read_yaml_file, as every module does:
    no `yaml.safe_load(<a file's text>)` elsewhere."""
    import ast

    from tests.conftest import REPO

    readers = []
    for path in (REPO / "src" / "memlens").rglob("*.py"):
        if path.name == "loading.py" and path.parent.name == "config":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "safe_load"
                    and any(isinstance(n, ast.Attribute) and n.attr in ("read_text", "read") or
                            isinstance(n, ast.Name) and n.id == "open" for a in node.args for n in ast.walk(a))):
                readers.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert readers == []


def test_a_bad_recipe_or_study_file_names_the_file_and_what_to_do(tmp_path):
    from memlens.store import StudyLayout

    with pytest.raises(ConfigError, match=r"is a folder, not a file; give the recipe file"):
        read_recipe(tmp_path)
    (tmp_path / "study.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"study.yaml: not valid YAML: .*; memlens writes this file itself"):
        StudyLayout(tmp_path).read_study()


def test_a_recipe_written_for_another_adapter_is_told_apart(tmp_path):
    """The LoRA settings MemlensCallback copies into its recipe are checked against the audited adapter's."""
    lora = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"], "bias": "none"}
    document = {"format": "memlens-recipe", "version": 1, "training_arguments": {"num_train_epochs": 1}, "lora": lora,
                "max_length": None, "train_records": None, "total_steps": None}
    (tmp_path / "memlens-recipe.json").write_text(json.dumps(document))
    recipe = read_recipe(tmp_path / "memlens-recipe.json")
    adapter = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.05,
               "target_modules": ["v_proj", "q_proj"], "bias": "none"}
    assert recipe.lora_mismatch(adapter) is None  # the same modules in another order
    assert recipe.lora_mismatch({**adapter, "r": 4}) == "r: 8 in the recipe, 4 in the adapter"
    assert read_recipe(tmp_path / "memlens-recipe.json").lora_mismatch({}) is None  # nothing to compare
