"""The study configuration's schema: one pydantic model per section of a study file.

A study file (YAML) is parsed into :class:`StudyConfig` (:mod:`memlens.config.loading`). Every field's
description is the documentation: ``memlens config-reference`` renders them into the README's reference table.
Impossible values are rejected by the validators here; :mod:`memlens.config.errors` words the messages.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The membership designs (memlens.data.designs): who is a member and who is not. `splits`: the named splits (the
# 2024 study's design); `random`: memlens' seeded fair coin over a pool of records.
Design = Literal["splits", "random"]
SPLITS: Design = "splits"
RANDOM: Design = "random"
DESIGNS: tuple[Design, ...] = (SPLITS, RANDOM)


class _Strict(BaseModel):
    # validate_default: an int default of a float field (alpha 16) becomes 16.0 as it does after a
    # dump and reload, so run_ids hash the same either way.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, validate_default=True)


# --------------------------------------------------------------------------------------- data
class DataConfig(_Strict):
    """Where the member / non-member records come from."""

    source: str = Field(
        ...,
        description="A hub dataset id (e.g. `sarus-tech/phee`), a folder of `<split>.jsonl|.csv|.parquet` "
        "files, or a single file with a split column. Relative paths resolve against the working directory.",
    )
    format: Literal["auto", "hub", "folder", "file"] = Field(
        "auto", description="How to read `source`; `auto` picks folder/file when the path exists, else hub."
    )
    text_field: str = Field("context", description="Column holding the text of a record.")
    id_field: str | None = Field(
        "id", description="Column holding a unique record id; `null` numbers records `<split>-<row>`."
    )
    split_field: str = Field("split", description="Column naming the split when `source` is a single file.")
    member_split: str = Field("train", description="Split fine-tuned on: the members of the membership experiment.")
    non_member_split: str = Field("test", description="Held-out split: the non-members.")
    utility_split: str | None = Field(
        "dev", description="Third split, neither member nor non-member, for utility (perplexity); `null` for none."
    )
    subset: int | None = Field(
        None, ge=1, description="Keep a seeded random subset of this many records per split (`null`: all)."
    )
    subset_seed: int = Field(0, ge=0, description="Seed of the subset draw.")
    allow_shared_texts: bool = Field(
        False,
        description="Texts present in both member and non-member splits invalidate a membership experiment; "
        "memlens refuses them unless this is true (they are then dropped from the non-members).",
    )
    max_length: int = Field(512, ge=8, description="Maximum tokens per record; longer records are refused "
                            "at training and scored with a sliding window.")
    revision: str | None = Field(None, description="Hub dataset revision (hub sources only).")
    membership: list[Design] = Field(
        default_factory=lambda: [SPLITS],
        description="How members and non-members are chosen. `splits`: the named splits (the study's design: "
        "member_split vs non_member_split). `random`: a seeded fair coin assigns each record (or each group, see "
        "`membership_unit`) of `pool` to members or non-members, so the AUC measures record memorization, not "
        "how the splits were drawn. A list (`[random, splits]`) runs both designs side by side: every grid cell "
        "once per design.",
    )
    pool: list[str] | None = Field(
        None, description="Random design: the splits whose records the coin assigns (`null`: the member split). "
        "Must not include the utility split.",
    )
    group: str | None = Field(
        None, description="Document groups (records of one document share words and should not be split apart "
        "by a fold): a column name, or a regular expression over the record id whose first group is the document, "
        "e.g. `^(\\d+)_` for PHEE's `<PubMed id>_<sentence>` ids. Used by the random design's group-level coin and "
        "by the bag-of-words check's grouped folds.",
    )
    membership_unit: Literal["record", "group"] | None = Field(
        None, description="Random design: flip one coin per `record` or per `group` (all records of a document "
        "on one side); `null`: per group when `group` is set, else per record.",
    )
    membership_seed: int = Field(0, ge=0, description="Seed of the random design's coin flips (identical in every "
                                 "cell of the study, so paired tests stay paired).")

    @field_validator("membership", mode="before")
    @classmethod
    def _one_or_more_designs(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("membership")
    @classmethod
    def _distinct_designs(cls, value: list[str]) -> list[str]:
        if not value or len(set(value)) != len(value):
            raise ValueError(f"give each design once, e.g. [random] or [random, splits]; got {value}")
        return value

    @model_validator(mode="after")
    def _coherent_membership(self) -> "DataConfig":
        if self.membership_unit == "group" and self.group is None:
            raise ValueError("membership_unit: group needs data.group (a column or a regex over the id)")
        if self.utility_split is not None and self.utility_split in self.pool_splits:
            raise ValueError(f"pool: the utility split {self.utility_split!r} cannot also be in the pool; remove it "
                             "or set data.utility_split: null")
        return self

    @property
    def pool_splits(self) -> list[str]:
        """The random design's pool (the member split unless `pool` names others)."""
        return list(self.pool) if self.pool else [self.member_split]

    @property
    def coin_unit(self) -> Literal["record", "group"]:
        """What one coin flip assigns in the random design."""
        return self.membership_unit or ("group" if self.group else "record")

    def for_draw(self, draw: int) -> "DataConfig":
        """The data settings of record draw `draw` (grid.draw): draw 0 is this config; draw d adds
        DRAW_SEED_STEP x d to `subset_seed` and `membership_seed`, so it draws other records and other coins."""
        if draw == 0:
            return self
        step = DRAW_SEED_STEP * draw
        return self.model_copy(update={"subset_seed": self.subset_seed + step,
                                       "membership_seed": self.membership_seed + step})

    def design_determinants(self, design: Design) -> dict[str, Any]:
        """What determines a design's member / non-member sets beyond the named splits (run ids hash it).
        Empty for `splits`, so the run ids of studies made before designs existed do not change."""
        if design == SPLITS:
            return {}
        return {"design": design, "pool": self.pool_splits, "unit": self.coin_unit, "seed": self.membership_seed,
                "group": self.group if self.coin_unit == "group" else None}


# grid.draw: record draw d shifts the subset and coin seeds by this times d (far from the seeds users pick).
DRAW_SEED_STEP = 1000

# Fields of `data` that only choose between designs; each cell hashes its own design's determinants instead.
DESIGN_FIELDS = {"membership", "pool", "group", "membership_unit", "membership_seed"}


# --------------------------------------------------------------------------------------- model
class ModelConfig(_Strict):
    """The pretrained base model; also the reference model of the membership attack."""

    name_or_path: str = Field(
        ..., description="A hub model id (e.g. `gpt2`) or a local folder. Relative paths resolve against "
        "the working directory."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype; `auto` is float32 on CPU and bfloat16 on GPUs that have it."
    )
    device: str = Field("auto", description="`auto`, `cpu`, `cuda`, `cuda:1`, `mps`...")
    load_in_8bit: bool = Field(False, description="Load the base model in 8 bits (needs bitsandbytes).")
    trust_remote_code: bool = Field(False, description="Run model code shipped with the checkpoint. Off by default.")
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = Field(
        "auto", description="Attention kernel; `auto` lets transformers choose (SDPA where available)."
    )


# --------------------------------------------------------------------------------------- grid
MATRIX_NAMES = ("q", "k", "v", "o", "gate", "up", "down")


class GridConfig(_Strict):
    """The axes of the study: one fine-tune per combination (a *cell*)."""

    target_modules: list[list[str]] = Field(
        default_factory=lambda: [["q"], ["v"]],
        description="Sets of adapted matrices. Architecture-independent names `q, k, v, o, gate, up, down` "
        "(fused projections such as GPT-2 `c_attn` are sliced) or raw module names (`c_attn`).",
    )
    rank: list[int] = Field(default_factory=lambda: [4], description="LoRA ranks.")
    canary_copies: list[int] = Field(
        default_factory=lambda: [1],
        description="How many times the canary occurs in the training set (1 = once, like every record).",
    )
    seed: list[int] = Field(default_factory=lambda: [0], description="Random seeds (training, canary choice).")
    method: list[Literal["lora", "full"]] = Field(
        default_factory=lambda: ["lora"], description="`lora` or `full` fine-tuning (full ignores rank and targets)."
    )
    noise_multiplier: list[float | Literal["auto"] | None] = Field(
        default_factory=lambda: [None],
        description="DP-SGD noise multipliers (`null` = no DP; `auto` = calibrated to reach `dp.target_epsilon`). "
        "See `dp` for clipping, delta and the accountant.",
    )
    learning_rate: list[float] | None = Field(
        None, description="Learning rates, one fine-tune per rate (a ladder, e.g. to compare matrix sets at "
        "matched fit); `null`: `train.learning_rate` only.",
    )
    draw: list[int] = Field(
        default_factory=lambda: [0], description="Record draws, a replicate factor like `seed`: draw 0 uses "
        f"`data.subset_seed` and `data.membership_seed`, draw d adds {DRAW_SEED_STEP} x d to both, so the run trains "
        "and is attacked on other members and non-members (needs `data.subset` or the `random` design).",
    )

    @field_validator("target_modules")
    @classmethod
    def _non_empty_sets(cls, value: list[list[str]]) -> list[list[str]]:
        if not value:
            raise ValueError("needs at least one set of matrices, e.g. [[q], [v]]")
        for group in value:
            if not group:
                raise ValueError(f"an empty set of matrices; use names from {list(MATRIX_NAMES)} or raw module names")
            if len(set(group)) != len(group):
                raise ValueError(f"{group} names a matrix twice")
        return value

    @field_validator("rank", "canary_copies")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if not value or any(v < 1 for v in value):
            raise ValueError("needs one or more integers >= 1")
        return value

    @field_validator("seed", "method", "noise_multiplier")
    @classmethod
    def _not_empty(cls, value: list) -> list:
        if not value:
            raise ValueError("needs at least one value")
        return value

    @field_validator("learning_rate")
    @classmethod
    def _positive_rates(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (not value or any(v <= 0 for v in value) or len(set(value)) != len(value)):
            raise ValueError(f"needs one or more distinct learning rates > 0 (or null for train.learning_rate); "
                             f"got {value}")
        return value

    @field_validator("draw")
    @classmethod
    def _draws(cls, value: list[int]) -> list[int]:
        if not value or any(v < 0 for v in value) or len(set(value)) != len(value):
            raise ValueError(f"needs one or more distinct integers >= 0, e.g. [0, 1]; got {value}")
        return value

    @field_validator("seed")
    @classmethod
    def _non_negative_seeds(cls, value: list[int]) -> list[int]:
        negative = [v for v in value if v < 0]
        if negative:
            raise ValueError(f"seeds must be integers >= 0; got {negative}")
        return value

    @field_validator("noise_multiplier")
    @classmethod
    def _positive_noise(cls, value: list) -> list:
        if any(isinstance(v, float) and v <= 0 for v in value):
            raise ValueError("noise multipliers must be > 0 (or null for no DP, or auto)")
        return value


# --------------------------------------------------------------------------------------- lora
class LoraConfig(_Strict):
    """LoRA hyper-parameters shared by all LoRA cells (the rank is a grid axis)."""

    alpha: float = Field(16, gt=0, description="LoRA scaling numerator (update scaled by alpha / rank).")
    alpha_per_rank: float | None = Field(
        None, gt=0, description="When set, each cell's alpha is this times its rank (`2`: alpha = 2 x rank), so the "
        "update's scale alpha / rank is the same at every rank and `alpha` is not used; `null`: `alpha` at every rank.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases are trained.")

    def alpha_for(self, rank: int) -> float:
        """The LoRA alpha of an adapter of rank `rank`: `alpha_per_rank` x rank when set, else `alpha`."""
        return self.alpha_per_rank * rank if self.alpha_per_rank is not None else self.alpha

    def determinants(self) -> dict[str, Any]:
        """The settings that shape a trained adapter; `alpha_per_rank` only when set (run ids of older folders)."""
        return self.model_dump(exclude={"alpha_per_rank"} if self.alpha_per_rank is None else set())


# --------------------------------------------------------------------------------------- canary
class CanaryConfig(_Strict):
    """The canary record whose repetition the study varies."""

    mode: Literal["repeat", "insert"] = Field(
        "repeat",
        description="`repeat` (the study): one seeded random training record replaces n-1 others, so the "
        "training set keeps its size. `insert`: n copies of a secret record are added.",
    )
    text: str | None = Field(
        None, description="Insert mode: the secret record; `null` generates one from `template`."
    )
    template: str = Field(
        "Patient MRN {secret} was given 40 mg of the study drug and developed a rash.",
        description="Insert mode: the record, with `{secret}` replaced by a random secret of `secret_format`.",
    )
    secret_format: str = Field(
        "digits:10", description="Secret alphabet and length, `digits:N` or `hex:N`; used for exposure."
    )

    @field_validator("secret_format")
    @classmethod
    def _format(cls, value: str) -> str:
        kind, _, length = value.partition(":")
        if kind not in ("digits", "hex") or not length.isdigit() or int(length) < 1:
            raise ValueError("must be `digits:N` or `hex:N` with N >= 1, e.g. `digits:10`")
        return value

    @model_validator(mode="after")
    def _template_has_slot(self) -> "CanaryConfig":
        if self.mode == "insert" and self.text is None and "{secret}" not in self.template:
            raise ValueError("template must contain `{secret}` when no canary text is given")
        return self


# --------------------------------------------------------------------------------------- training
class TrainConfig(_Strict):
    """Optimisation settings shared by all cells (defaults: the study's recipe)."""

    epochs: float = Field(3, gt=0, description="Training epochs (ignored when `max_steps` is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: int = Field(16, ge=1, description="Records per micro-batch; an optimizer step sees "
                            "`batch_size x grad_accum` random records in every packing mode.")
    grad_accum: int = Field(4, ge=1, description="Gradient-accumulation steps.")
    warmup_steps: int = Field(100, ge=0, description="Linear warm-up steps.")
    learning_rate: float = Field(1e-3, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule after warm-up."
    )
    packing: Literal["packed", "length_grouped", "padded"] = Field(
        "packed",
        description="`packed`: each micro-batch's records (same random draw as `padded`) are packed "
        "into rows of at most `pack_tokens` tokens where each record attends only to itself (positions "
        "restart, per-record attention, no loss across a boundary): the same loss and gradient as "
        "`padded` without the padding. `length_grouped`: batches of similar "
        "lengths (changes which records share a step). `padded`: the study's random padded batches.",
    )
    pack_tokens: int = Field(1024, ge=16, description="Most tokens per packed row (a longer record gets a row "
                             "of its own); a micro-batch's rows are padded to the longest of them.")
    packed_attention: Literal["auto", "varlen", "block_mask"] = Field(
        "auto", description="How packed records are kept apart. `varlen`: each record's attention runs at its own "
        "length (memlens' variable-length path: no row x row work); `block_mask`: transformers' block-diagonal "
        "mask over the whole row (SDPA/eager); `auto`: varlen for the architectures it is tested on (Llama, "
        "Mistral and Qwen2 without sliding window, GPT-2), block_mask otherwise.",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Mixed precision; `auto` is fp32 on CPU and bf16 on GPUs that support it."
    )
    gradient_checkpointing: Literal["auto", "on", "off"] = Field(
        "auto", description="`auto` turns it on only on a GPU whose free memory the estimated weights + "
        "activations of one step would not fit (never on CPU); `on`/`off` force it."
    )
    deduplicate: bool = Field(
        False, description="Mitigation: drop exact duplicate training texts before training (removes repeated "
        "canary copies); recorded in train.json.",
    )
    logging_steps: int = Field(5, ge=1, description="Record the training loss every N steps.")
    together: int = Field(
        1, ge=1, description="Train up to N LoRA adapters in one pass over the base model: grid cells that share "
        "the adapted matrices (their ranks, seeds, copies and records may differ), and a recipe's reference "
        "adapters. Each keeps its own seed, data order, optimizer, schedule and files: the same run (run id, "
        "records) as alone, its tensors equal to float rounding when the base model has no dropout of its own. "
        "Full fine-tuning, DP-SGD, LoRA biases and models without variable-length attention train one at a time "
        "(said in the log). `1`: one at a time.",
    )


# The designed canary families (memlens.data.designed_canaries).
CanaryFamily = Literal["rare_unigram", "rare_bigram", "random", "new_token"]
# DP fields that do not change a DP cell's training (its run id): the audit's reading of the scores, and the designed
# canaries, which enter every cell's run id on their own (CellConfig.determinants), DP or not.
DP_AUDIT_FIELDS = {"audit_random_split", "audit_attack", "audit_confidence", "audit_canaries", "audit_design",
                   "audit_copies", "audit_seed"}


class DPConfig(_Strict):
    """DP-SGD (Opacus) settings for cells whose `noise_multiplier` is not null."""

    max_grad_norm: float = Field(1.0, gt=0, description="Per-sample gradient clipping norm.")
    target_epsilon: float | None = Field(
        None, gt=0, description="Epsilon that cells with `noise_multiplier: auto` are calibrated to reach at the "
        "end of training (required by `auto`, unused otherwise).",
    )
    delta: float | None = Field(
        None, gt=0, lt=1, description="Delta; `null` means 1 / n^1.1 with n the number of training records."
    )
    accountant: Literal["prv", "rdp", "gdp"] = Field(
        "prv", description="Opacus privacy accountant for the reported epsilon and for calibration: `prv` "
        "(privacy random variables, Opacus' default, tightest), `rdp` (Renyi DP) or `gdp` (Gaussian DP)."
    )
    audit_random_split: bool = Field(
        False, description="Declare that each member / non-member record of a user-made split was assigned by an "
        "independent fair coin flip before training. The one-run empirical epsilon lower bound (Steinke et al. "
        "2023) is only valid then, so it is reported only when this is true (PHEE's train/test splits are not "
        "such a split). Not needed for the `random` design with record-level coins: memlens flipped them.",
    )
    audit_attack: str = Field("ref_ratio", description="Membership score the empirical privacy audit uses (of the "
                              "records and of the designed canaries).")
    audit_confidence: float = Field(0.95, gt=0, lt=1, description="Confidence of the empirical epsilon lower bounds "
                                    "(Steinke et al. 2023 and the Gaussian-DP one of Mahloujifar et al. 2024).")
    audit_canaries: int = Field(
        0, ge=0, description="Designed canaries for a one-run audit of every run, DP or not (Panda et al. 2025; `0`: "
        "none). Each enters training with probability 1/2 by a coin seeded by `audit_seed` (the rest are held out); "
        "after training they are scored by every attack and audited with `audit_attack`. Changes the fine-tunes "
        "(new run ids). TPR at 1% FPR needs 100 held-out canaries of a family, so about 200 per family.",
    )
    audit_design: list[CanaryFamily] = Field(
        default_factory=lambda: ["rare_unigram", "rare_bigram", "random"],
        description="Canary families, the canaries dealt to them in turn (see *Designed canaries*): "
        "`rare_unigram` (tokens the training records never or most rarely use), `rare_bigram` (common tokens in "
        "pairs the records never use), `random` (uniform tokens), `new_token` (tokens the tokenizer has but text "
        "never produces, e.g. reserved special tokens; only where the tokenizer has such tokens).",
    )
    audit_copies: int = Field(1, ge=1, description="Times each inserted canary occurs in training (1 = once, like a "
                              "record; k copies audit k-record group privacy).")
    audit_seed: int = Field(0, ge=0, description="Seed of the canaries' tokens and of their coins.")

    @field_validator("audit_design")
    @classmethod
    def _distinct_families(cls, value: list[str]) -> list[str]:
        if not value or len(set(value)) != len(value):
            raise ValueError(f"give each canary family once, e.g. [rare_unigram, rare_bigram, random]; got {value}")
        return value

    @property
    def audit_determinants(self) -> dict[str, Any] | None:
        """What the designed canaries add to every fine-tune (None when there are none): the run ids hash it."""
        if not self.audit_canaries:
            return None
        return {"canaries": self.audit_canaries, "design": list(self.audit_design), "copies": self.audit_copies,
                "seed": self.audit_seed}


# --------------------------------------------------------------------------------------- attacks
# The attacks run by default. Which names exist, and each one's settings, are the attack registry's
# (memlens.attacks.registry), which checks `mia.attacks` and `dp.audit_attack` before a study runs. `lowercase` is
# opt-in: it scores every record a second time (lowercased), 40% of the membership stage's scoring for one attack.
DEFAULT_MIA_ATTACKS = ("loss", "ref_ratio", "ref_llr", "zlib", "min_k", "min_k_pp")

# Settings that were `mia` fields before each attack had its own: field -> (setting, attacks that read it, the
# default it had). Old study files keep working: a value other than the default becomes those attacks' setting
# (keeping their result names); the default is dropped.
LEGACY_ATTACK_SETTINGS: dict[str, tuple[str, tuple[str, ...], Any]] = {
    "min_k_fraction": ("fraction", ("min_k", "min_k_pp"), 0.2),
    "dc_pdd_clip": ("clip", ("dc_pdd",), 0.01),
    "rmia_offline_a": ("a", ("rmia_offline",), "auto"),
    "rmia_gamma": ("gamma", ("rmia", "rmia_offline"), 1.0),
    "recall_shots": ("shots", ("recall", "con_recall"), 5),
    "conrecall_gamma": ("gamma", ("con_recall",), 0.5),
}


class AttackSpec(_Strict):
    """One attack of `mia.attacks` with its own settings: `{type: min_k, params: {fraction: 0.1}}`."""

    type: str = Field(..., description="The attack's name in the registry (see *Membership attacks*).")
    params: dict[str, Any] = Field(default_factory=dict, description="Its settings (the attack's own, listed with it "
                                   "under *Membership attacks*); the defaults where absent.")
    name: str | None = Field(None, description="The name its scores and result rows carry; `null`: `type` without "
                             "params, else `type@<value>` (one setting) or `type@<k>=<v>,...`.")


def _migrate_legacy_settings(raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` (a `mia` section) with its legacy setting fields (:data:`LEGACY_ATTACK_SETTINGS`) folded into the
    attacks that read them."""
    legacy = {k: raw[k] for k in LEGACY_ATTACK_SETTINGS if k in raw}
    if not legacy:
        return raw
    raw = {k: v for k, v in raw.items() if k not in legacy}
    attacks = list(raw.get("attacks", DEFAULT_MIA_ATTACKS))
    for key, value in legacy.items():
        setting, readers, default = LEGACY_ATTACK_SETTINGS[key]
        if value == default:
            continue
        for i, entry in enumerate(attacks):
            if isinstance(entry, str) and entry in readers:
                attacks[i] = {"type": entry, "name": entry, "params": {setting: value}}
            elif isinstance(entry, dict) and entry.get("type") in readers and entry.get("name", entry["type"]) \
                    == entry["type"]:
                attacks[i] = {**entry, "params": {setting: value, **entry.get("params", {})}}
    raw["attacks"] = attacks
    return raw


class MIAConfig(_Strict):
    """Membership inference."""

    enabled: bool = Field(True, description="Run the membership stage.")
    attacks: list[str | AttackSpec] = Field(
        default_factory=lambda: list(DEFAULT_MIA_ATTACKS),
        description="Attacks to run, from the attack registry (listed with their settings under *Membership "
        "attacks* below): a name (`min_k`, default settings), a name with its one setting (`min_k@0.1`), or "
        "`{type, params, name}`; one attack may run at several settings under several names. `dc_pdd` needs "
        "`reference_corpus`; `lowercase` (not run by default) scores every record a second time.",
    )
    reference_corpus: str | None = Field(
        None, description="Text file (one document per line) for token frequencies of DC-PDD."
    )
    batch_size: int = Field(256, ge=1, description="Most sequences per scoring batch (see `batch_tokens`).")
    batch_tokens: int | Literal["auto"] = Field(
        "auto", description="Most padded tokens per scoring batch: records are sorted by length and batched "
        "up to this budget. `auto`: 2048 on CPU (measured fastest: activations stay in cache), 16384 on a GPU.",
    )
    bootstrap: int = Field(1000, ge=0, description="Bootstrap resamples for confidence intervals (0: none).")
    ci_level: float = Field(0.95, gt=0, lt=1, description="Confidence level of every interval.")
    max_fpr_operating_point: float = Field(
        0.1, gt=0, lt=1, description="The study's operating point: threshold keeping FPR on non-members <= this."
    )
    bag_of_words_baseline: bool = Field(True, description="Run the model-free bag-of-words separability check.")
    pairs: list[tuple[str, str]] = Field(
        default_factory=list,
        description="Pairs of matrix sets to compare with DeLong's test at equal rank, e.g. [[v, q]]; "
        "empty compares every pair.",
    )
    stride: int | None = Field(
        None, ge=1, description="Sliding-window step (tokens) for records longer than the model's context "
        "(the study's perplexity used 512); `null`: half the context.",
    )
    references: int = Field(
        0, ge=0, description="Reference adapters for LiRA and RMIA (`0`: none). Each is fine-tuned with the cell's own "
        "recipe (method, matrices, rank, training, DP) on a seeded random half of the membership experiment's records, "
        "once per distinct recipe, and shared by every cell with that recipe (`<out>/references/`). 2 or more; "
        "Carlini et al. use 64+.",
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy_settings(cls, value: Any) -> Any:
        return _migrate_legacy_settings(value) if isinstance(value, dict) else value

    @field_validator("references")
    @classmethod
    def _two_or_more_references(cls, value: int) -> int:
        if value == 1:
            raise ValueError("one reference gives every record only IN or only OUT statistics; use 0 (off) or >= 2")
        return value

    @field_validator("batch_tokens")
    @classmethod
    def _positive_budget(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 1:
            raise ValueError("must be >= 1 (tokens) or auto")
        return value

    def batch_token_budget(self, device: Any) -> int:
        """`batch_tokens` resolved for a device (a torch.device or its name)."""
        if self.batch_tokens != "auto":
            return self.batch_tokens
        return 2048 if str(getattr(device, "type", device)).split(":")[0] == "cpu" else 16384


class DecodingConfig(_Strict):
    """One decoding strategy for extraction."""

    name: str = Field(..., description="Label used in the outputs, e.g. `greedy` or `t0.5`.")
    temperature: float = Field(0.0, ge=0, description="0 means greedy.")
    top_k: int | None = Field(None, ge=1, description="Top-k sampling.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling.")
    decay_from: float | None = Field(
        None, gt=0, description="Decaying temperature: start at this temperature and decay to `temperature`..."
    )
    decay_tokens: int = Field(0, ge=0, description="...over this many first tokens.")
    num_samples: int = Field(1, ge=1, description="Samples per prefix; the one most likely under the fine-tuned model "
                             "is kept.")


def _default_decodings() -> list[DecodingConfig]:
    return [DecodingConfig(name="greedy")]


class ExtractionConfig(_Strict):
    """Prompted-prefix extraction and canary exposure."""

    enabled: bool = Field(True, description="Run the extraction stage.")
    split: Literal["midpoint", "prefix_len"] = Field(
        "midpoint", description="Split each record at its token midpoint (the study) or after `prefix_len` tokens."
    )
    prefix_len: int = Field(32, ge=1, description="Prefix length for `split: prefix_len` (k-extractability).")
    max_new_tokens: int | None = Field(None, ge=1, description="Tokens to generate; `null`: exactly the suffix length.")
    decodings: list[DecodingConfig] = Field(default_factory=_default_decodings, description="Decoding strategies.")
    members: int | None = Field(
        100, ge=0, description="Training records to attack besides the canary (`null`: all)."
    )
    non_members: int | None = Field(100, ge=0, description="Non-member control records (`null`: all).")
    batch_size: int = Field(32, ge=1, description="Prompts per generation batch.")
    verbatim_threshold: float = Field(0.5, gt=0, le=1,
                                      description="Longest-common-substring ratio counted as a relaxed match "
                                      "(`relaxed_rate`); verbatim is an exact continuation (`exact_rate`).")
    bleu_threshold: float = Field(50.0, gt=0, le=100, description="BLEU counted as extracted.")
    min_temperature: float | None = Field(
        None, ge=0, description="Mitigation: clamp every decoding's temperature to at least this."
    )
    exposure: bool = Field(True, description="Measure exposure of the inserted secret (insert-mode canaries).")
    exposure_candidates: int = Field(
        10_000, ge=10, description="Candidate secrets ranked exactly; larger spaces are extrapolated (skew-normal)."
    )
    seed: int = Field(0, description="Seed of sampling and candidate draws.")


class ExecutorConfig(_Strict):
    """Where the grid cells run."""

    kind: Literal["local", "ray"] = Field("local", description="`local` (this process) or `ray` (a Ray cluster).")
    address: str | None = Field(None, description="Ray address: `auto`, `ray://host:10001`, or null for a local Ray.")
    num_gpus: float = Field(0, ge=0, description="GPUs per cell (Ray).")
    num_cpus: float = Field(1, gt=0, description="CPUs per cell (Ray).")
    memory_gb: float | None = Field(None, gt=0, description="Memory per cell in GiB (Ray).")
    max_concurrent: int | None = Field(None, ge=1, description="Most cells running at once (Ray).")
    max_retries: int = Field(2, ge=0, description="Retries of a cell whose worker died (Ray).")


# --------------------------------------------------------------------------------------- study
class StudyConfig(_Strict):
    """A whole memorization study."""

    name: str = Field("study", description="Study name, used in reports.")
    out: str | None = Field(None, description="Output folder; `null`: `memlens-out/<name>`.")
    data: DataConfig = Field(..., description="Required section: where the records come from (`data.source`).")
    model: ModelConfig = Field(..., description="Required section: the base model (`model.name_or_path`).")
    grid: GridConfig = Field(default_factory=GridConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    canary: CanaryConfig = Field(default_factory=CanaryConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    dp: DPConfig = Field(default_factory=DPConfig)
    mia: MIAConfig = Field(default_factory=MIAConfig)
    extraction: ExtractionConfig = Field(default_factory=ExtractionConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)

    @model_validator(mode="after")
    def _dp_target(self) -> "StudyConfig":
        auto = "auto" in self.grid.noise_multiplier
        if auto and self.dp.target_epsilon is None:
            raise ValueError("grid.noise_multiplier: `auto` needs dp.target_epsilon (the epsilon to calibrate to)")
        if not auto and self.dp.target_epsilon is not None:
            raise ValueError("dp.target_epsilon is only used by cells with grid.noise_multiplier `auto`; "
                             "add `auto` to grid.noise_multiplier or remove dp.target_epsilon")
        return self

    @model_validator(mode="after")
    def _draws_change_records(self) -> "StudyConfig":
        if any(self.grid.draw) and SPLITS in self.data.membership and self.data.subset is None:
            raise ValueError(f"grid.draw {self.grid.draw}: the `{SPLITS}` design without data.subset has one draw "
                             "(every record of its splits); set data.subset, use data.membership: random, or "
                             "set grid.draw: [0]")
        return self

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("memlens-out") / self.name

    def cells(self) -> list["CellConfig"]:
        """All grid cells, in a stable order. Full fine-tuning ignores rank and targets, so it has one cell
        per (copies, seed, noise)."""
        cells: dict[str, CellConfig] = {}
        g = self.grid
        for design in self.data.membership:
            for method in g.method:
                targets = g.target_modules if method == "lora" else [["all"]]
                ranks = g.rank if method == "lora" else [0]
                for tm, rank, copies, seed, noise, lr, draw in itertools.product(
                        targets, ranks, g.canary_copies, g.seed, g.noise_multiplier, g.learning_rate or [None], g.draw):
                    cell = CellConfig(method=method, target_modules=list(tm), rank=rank, canary_copies=copies,
                                      seed=seed, noise_multiplier=noise, membership=design, learning_rate=lr,
                                      draw=draw)
                    cells.setdefault(cell.run_id(self), cell)
        return list(cells.values())


class CellConfig(_Strict):
    """One grid cell: what varies between fine-tunes of a study."""

    method: Literal["lora", "full"]
    target_modules: list[str]
    rank: int
    canary_copies: int
    seed: int
    noise_multiplier: float | Literal["auto"] | None = None
    membership: Design = SPLITS
    learning_rate: float | None = None  # None: the study's train.learning_rate
    draw: int = 0  # the record draw (grid.draw)

    def effective_learning_rate(self, train: TrainConfig) -> float:
        """The learning rate this cell trains with: its own (grid.learning_rate), else `train.learning_rate`."""
        return self.learning_rate if self.learning_rate is not None else train.learning_rate

    def data_config(self, study: StudyConfig) -> DataConfig:
        """The data settings of this cell's record draw (:meth:`DataConfig.for_draw`)."""
        return study.data.for_draw(self.draw)

    def determinants(self, study: StudyConfig) -> dict[str, Any]:
        """Everything that determines this cell's fine-tuned model (the run_id hashes it)."""
        determinants = {
            # a `splits` cell hashes as cells did before designs existed, a cell without its own learning rate or
            # with draw 0 as cells did before those axes existed (same run ids for old folders)
            "cell": self.model_dump(exclude=self._default_axes()),
            "model": study.model.model_dump(exclude={"device"}),
            "data": study.data.model_dump(exclude={"utility_split", *DESIGN_FIELDS}),
            "canary": study.canary.model_dump(),
            # packed_attention, together: the same computation either way (to float rounding), only faster
            "train": study.train.model_dump(exclude={"logging_steps", "packed_attention", "together"}),
        }
        if self.method == "lora":
            determinants["lora"] = study.lora.determinants()
        if self.membership != SPLITS:
            determinants["membership"] = study.data.design_determinants(self.membership)
        if self.noise_multiplier is not None:
            # the audit settings only affect the privacy stage, not the trained model or train.json
            determinants["dp"] = study.dp.model_dump(exclude=DP_AUDIT_FIELDS)
        if study.dp.audit_determinants is not None:  # the designed canaries are trained on: absent when off (old ids)
            determinants["audit_canaries"] = study.dp.audit_determinants
        return determinants

    def _default_axes(self) -> set[str]:
        """The fields left out of the hash at their defaults (the axes added after the first studies)."""
        return {name for name, default in (("membership", SPLITS), ("learning_rate", None), ("draw", 0))
                if getattr(self, name) == default}

    def run_id(self, study: StudyConfig) -> str:
        """Stable, readable id: `<targets>-r<rank>-c<copies>-s<seed>[-dp<noise>][-rand][-lr<rate>][-d<draw>]-<hash>`."""
        digest = stable_hash(self.determinants(study))[:10]
        targets = "+".join(self.target_modules) if self.method == "lora" else "full"
        label = f"{targets}-r{self.rank}-c{self.canary_copies}-s{self.seed}"
        if self.noise_multiplier == "auto":  # calibrated: name it by its target epsilon
            label += f"-dpeps{study.dp.target_epsilon:g}"
        elif self.noise_multiplier is not None:
            label += f"-dp{self.noise_multiplier:g}"
        if self.membership == RANDOM:
            label += "-rand"
        if self.learning_rate is not None:
            label += f"-lr{self.learning_rate:g}"
        if self.draw:
            label += f"-d{self.draw}"
        return f"{label}-{digest}".replace("/", "_")


def stable_hash(obj: Any) -> str:
    """SHA-256 of a JSON-able object with sorted keys: the same content always gives the same hash."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
