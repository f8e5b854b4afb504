"""The registry of membership-inference attacks: small functions over shared, precomputed token statistics,
each with its own settings model.

Every attack maps an :class:`AttackInputs` (statistics of the same records under the fine-tuned model, the
reference model and, where needed, further passes) and its settings to one score per record, with one
convention for all: **a higher score means "more likely a member"**. Scoring happens once (see
:mod:`memlens.score` and :mod:`memlens.attacks.mia`); adding an attack is a settings model (if it has any),
a function and a decorator, in one module of this package:

    class MyAttackSettings(AttackSettings):
        k: float = Field(0.2, gt=0, description="...")

    @register("my_attack", needs={"ref"}, settings=MyAttackSettings, description="...")
    def my_attack(x: AttackInputs, s: MyAttackSettings) -> np.ndarray: ...

`mia.attacks` names an attack with its default settings (`min_k`), with its one setting (`min_k@0.1`), or
with any settings (`{type: min_k, params: {fraction: 0.1}, name: ...}`), so one attack runs at several
settings under several result names (:func:`configure_attacks`). The attacks live in
:mod:`~memlens.attacks.likelihood`, :mod:`~memlens.attacks.finetuned`, :mod:`~memlens.attacks.recall`,
:mod:`~memlens.attacks.lira_rmia` and :mod:`~memlens.attacks.learned`, which this package's ``__init__`` imports
so that they are registered whenever the registry is used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from memlens.config import AttackSpec, ConfigError, StudyConfig, stable_hash
from memlens.score import SequenceStats


@dataclass
class AttackInputs:
    """What the attacks read: data only (an attack's settings are its own, :class:`AttackSettings`).
    `ft`/`ref`/`ft_lower` hold the same records in the same order: n records."""

    texts: list[str]
    ft: SequenceStats                          # fine-tuned model (adapter active)
    ref: SequenceStats | None = None           # reference: the base model (adapters disabled)
    ft_lower: SequenceStats | None = None      # fine-tuned model on the lowercased texts
    token_log_freq: np.ndarray | None = None   # (vocabulary,) log reference-corpus frequency per token id (DC-PDD)
    # reference adapters (LiRA, RMIA; memlens.attacks.references): K adapters of the target's recipe
    ref_models: np.ndarray | None = None       # (n, K) mean token log-likelihood of each record under each
    ref_in: np.ndarray | None = None           # (n, K) whether the record was in that reference's training half
    population: np.ndarray | None = None       # (n,) records RMIA compares against (the run's non-members)
    # ReCaLL / Con-ReCall (memlens.attacks.recall): mean token log-likelihood of each record after a prefix of
    # `shots` records, by shots
    ll_nonmember_prefix: dict[int, np.ndarray] = field(default_factory=dict)  # shots -> (n,), known non-members
    ll_member_prefix: dict[int, np.ndarray] = field(default_factory=dict)     # shots -> (n,), the run's members
    in_member_prefix: dict[int, np.ndarray] = field(default_factory=dict)     # shots -> (n,) in that member prefix
    cache: dict = field(default_factory=dict)


class AttackSettings(BaseModel):
    """An attack's own settings (none here). An attack with settings subclasses this with described fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# What each need names, for messages.
# Needs that keep an attack off the designed canaries of the one-run audit (memlens.attacks.canary_metrics), and why.
CANARY_UNSUPPORTED = {"references": "reference adapters, which are trained without the designed canaries",
                      "member_prefix": "a prefix of the run's members, which the canaries are not"}
NEEDS = {"ref": "the base model's scores", "lower": "the lowercased texts' scores",
         "moments": "the mean and variance of log p under each predicted distribution (an extra vocabulary-sized "
                    "pass; skipped when no attack needs it)",
         "ref_moments": "the base model's mean and variance of log p under each predicted distribution (its scores "
                        "with the moments)",
         "token_freq": "mia.reference_corpus", "references": "reference adapters (mia.references)",
         "nonmember_prefix": "a non-member prefix (data.utility_split)",
         "member_prefix": "a member prefix (the run's members)"}


@dataclass(frozen=True)
class Attack:
    name: str
    fn: Callable[[AttackInputs, AttackSettings], np.ndarray]
    needs: frozenset[str]  # subset of NEEDS
    settings: type[AttackSettings]
    description: str
    partial: bool = False  # leaves some records unscored (NaN) by design; metrics use the others
    # a learned attack: (n,) whether its weights were trained on each record; and the columns naming its weights
    trained_on: Callable[[AttackInputs, AttackSettings], np.ndarray] | None = None
    provenance: Callable[[AttackSettings], dict] | None = None


ATTACKS: dict[str, Attack] = {}

# The headline attack, declared before any result is seen: the first of these that ran. The study's report, the
# audit's first screen and MemlensCallback's `memlens/auc` all read it through :func:`headline_attack`.
# `ref_ratio` (the 2024 study's attack: P_ref / P_ft) needs the base model; `loss` needs nothing else.
PRIMARY_ATTACK = "ref_ratio"
HEADLINE_ORDER = (PRIMARY_ATTACK, "ref_llr", "min_k_pp", "min_k", "zlib", "lowercase", "loss")


def register(name: str, *, needs: set[str] | frozenset[str] = frozenset(),
             settings: type[AttackSettings] = AttackSettings, description: str = "", partial: bool = False,
             trained_on: Callable | None = None, provenance: Callable | None = None):
    """Decorator adding an attack to :data:`ATTACKS` under `name`, with its settings model. A learned attack gives
    `trained_on(inputs, settings)`, (n,) whether its weights saw each record, and `provenance(settings)`, the
    columns its result rows carry to say which weights scored them."""
    unknown = set(needs) - set(NEEDS)
    if unknown:
        raise ValueError(f"attack {name!r}: unknown needs {sorted(unknown)}; known: {sorted(NEEDS)}")

    def wrap(fn: Callable[[AttackInputs, AttackSettings], np.ndarray]) -> Callable:
        if name in ATTACKS:
            raise ValueError(f"attack {name!r} is registered twice")
        ATTACKS[name] = Attack(name, fn, frozenset(needs), settings, description or (fn.__doc__ or "").strip(),
                               partial, trained_on, provenance)
        return fn
    return wrap


def get_attack(name: str) -> Attack:
    try:
        return ATTACKS[name]
    except KeyError:
        raise ConfigError(f"mia.attacks: unknown attack {name!r}; valid choices: {sorted(ATTACKS)}") from None


# ------------------------------------------------------------------------------------- configured attacks
@dataclass(frozen=True)
class ConfiguredAttack:
    """One entry of `mia.attacks`: an attack, its settings, and the name its scores and result rows carry."""

    name: str
    attack: Attack
    settings: AttackSettings

    @property
    def needs(self) -> frozenset[str]:
        return self.attack.needs

    @property
    def partial(self) -> bool:
        return self.attack.partial

    def score(self, inputs: AttackInputs) -> np.ndarray:
        return self.attack.fn(inputs, self.settings)

    def trained_on(self, inputs: AttackInputs) -> np.ndarray | None:
        """(n,) whether the attack's weights were trained on each record; None for an attack without weights."""
        return None if self.attack.trained_on is None else self.attack.trained_on(inputs, self.settings)

    def provenance(self) -> dict:
        """The columns saying what scored the attack's rows (its weights), empty for most attacks."""
        return {} if self.attack.provenance is None else self.attack.provenance(self.settings)


def _result_name(kind: str, params: dict[str, Any]) -> str:
    """`min_k` without settings, `min_k@0.1` with one, `rmia@gamma=2,a=0.3` with several."""
    if not params:
        return kind
    if len(params) == 1:
        return f"{kind}@{next(iter(params.values()))}"
    return f"{kind}@" + ",".join(f"{k}={v}" for k, v in params.items())


def configure(entry: str | AttackSpec | dict, where: str = "mia.attacks") -> ConfiguredAttack:
    """One `mia.attacks` entry: `name`, `name@value` (an attack with one setting) or `{type, params, name}`,
    with its settings validated by the attack's own model (errors name the entry, the setting and the valid
    ones)."""
    if isinstance(entry, dict):
        entry = AttackSpec.model_validate(entry)
    if isinstance(entry, str):
        kind, at, value = entry.partition("@")
        attack = get_attack(kind.strip())
        params: dict[str, Any] = {}
        if at:
            fields = list(attack.settings.model_fields)
            if len(fields) != 1:
                raise ConfigError(f"{where}: {entry!r}: `name@value` sets an attack's only setting, and {kind!r} has "
                                  f"{len(fields)} ({fields}); write {{type: {kind}, params: {{...}}}}")
            params = {fields[0]: yaml.safe_load(value)}
        name = entry
    else:
        attack, params = get_attack(entry.type), dict(entry.params)
        name = entry.name or _result_name(entry.type, params)
    try:
        settings = attack.settings.model_validate(params)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'params'}: {e['msg']}" for e in err.errors())
        valid = {k: f.description for k, f in attack.settings.model_fields.items()} or "none"
        raise ConfigError(f"{where}: {name!r}: {problems}; the settings of {attack.name!r}: {valid}") from None
    return ConfiguredAttack(name, attack, settings)


def configure_attacks(entries: Sequence[str | AttackSpec | dict]) -> list[ConfiguredAttack]:
    """Every entry of `mia.attacks` configured (:func:`configure`); result names must be distinct."""
    configured = [configure(e, f"mia.attacks[{i}]") for i, e in enumerate(entries)]
    names = [c.name for c in configured]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"mia.attacks: the result name(s) {repeated} occur twice; give each entry its own `name`")
    return configured


_CHECKED: dict[str, list[ConfiguredAttack]] = {}  # check_attacks' result by the settings it reads


def check_attacks(study: StudyConfig) -> list[ConfiguredAttack]:
    """The one check of a study's attacks before it runs (and the list its membership stage runs): every entry
    of `mia.attacks` known and valid, with the inputs it needs configured, and `dp.audit_attack` among them. Done
    once per process for the settings it reads (the stage's pre-flight; its base-score preparation and its run read
    the same result)."""
    key = stable_hash({"mia": study.mia.model_dump(mode="json", include={"attacks", "reference_corpus", "references"}),
                       "dp": study.dp.model_dump(mode="json", include={"audit_attack", "audit_canaries"}),
                       "utility": study.data.utility_split is not None})
    if key not in _CHECKED:
        _CHECKED[key] = _check_study_attacks(study)
    return list(_CHECKED[key])


def _check_study_attacks(study: StudyConfig) -> list[ConfiguredAttack]:
    attacks = check_attack_inputs(study.mia.attacks, study.mia.reference_corpus, study.dp.audit_attack,
                                  references=study.mia.references, utility=study.data.utility_split is not None)
    audited = next(a for a in attacks if a.name == study.dp.audit_attack)
    unsupported = sorted(audited.needs & set(CANARY_UNSUPPORTED))
    if study.dp.audit_canaries and unsupported:
        raise ConfigError(f"dp.audit_attack: {audited.name!r} cannot score the designed canaries (dp.audit_canaries: "
                          f"{study.dp.audit_canaries}): it needs {CANARY_UNSUPPORTED[unsupported[0]]}; choose another "
                          "attack of mia.attacks for the audit")
    return attacks


def check_attack_inputs(entries: Sequence[str | AttackSpec | dict], reference_corpus: str | None,
                        audit_attack: str | None = None, *, references: int = 0,
                        utility: bool = True) -> list[ConfiguredAttack]:
    """Attacks (`mia.attacks`, and `dp.audit_attack`, whose result name must be among them) configured
    (:func:`configure_attacks`), not empty, and with the inputs they need: `references` is `mia.references`
    (reference adapters trained, 0 where none can be: `attack_models`), `utility` whether there is a utility
    split (ReCaLL's non-member prefix)."""
    if not entries:
        raise ConfigError(f"mia.attacks: empty; choose from {sorted(ATTACKS)}")
    attacks = configure_attacks(entries)
    needs = needs_of(attacks)

    def wanting(need: str) -> list[str]:
        return [a.name for a in attacks if need in a.needs]

    if "token_freq" in needs and reference_corpus is None:
        raise ConfigError(f"mia.attacks: {wanting('token_freq')} need mia.reference_corpus (a text file, one document "
                          "per line, for token frequencies); set it or remove them from mia.attacks")
    if "references" in needs and references < 2:
        raise ConfigError(f"mia.attacks: {wanting('references')} need reference adapters and mia.references is "
                          f"{references}; set mia.references to 2 or more (each is one more fine-tune per recipe; "
                          "Carlini et al. use 64+) or remove them from mia.attacks")
    if references and "references" not in needs:
        with_refs = [name for name, a in ATTACKS.items() if "references" in a.needs]
        raise ConfigError(f"mia.references: {references} reference adapters would be trained for every recipe but no "
                          f"attack of mia.attacks uses them; add some of {with_refs} to mia.attacks or set "
                          "mia.references: 0")
    if "nonmember_prefix" in needs and not utility:
        raise ConfigError(f"mia.attacks: {wanting('nonmember_prefix')} need known non-members for their prefix, drawn "
                          "from data.utility_split, which is null; set data.utility_split to a held-out split that is "
                          "neither member nor non-member, or remove them from mia.attacks")
    if audit_attack is not None:
        audited = next((a for a in attacks if a.name == audit_attack), None)
        if audited is None:
            raise ConfigError(f"dp.audit_attack: {audit_attack!r} is not among mia.attacks "
                              f"{[a.name for a in attacks]}; "
                              "the audit reads that attack's scores: choose one of them or add it to mia.attacks")
        if audited.partial:
            raise ConfigError(f"dp.audit_attack: {audit_attack!r} leaves some records unscored (those of its member "
                              "prefix) and the audit needs a score for every record; choose another attack")
    return attacks


def check_available(entries: Sequence[str | AttackSpec | dict], have: frozenset[str], where: str, place: str,
                    elsewhere: str = "") -> list[ConfiguredAttack]:
    """The attacks of `entries` configured (:func:`configure`, errors naming `where`), where only the inputs `have`
    exist (`place`: "a callback inside training"): an unknown attack, one needing another input, bad settings or a
    result name given twice is refused, naming the attacks that can run there (and `elsewhere`: what runs the
    others). The one check of attacks outside a study (`MemlensCallback`)."""
    runnable = sorted(name for name, attack in ATTACKS.items() if attack.needs <= have)
    if not entries:
        raise ConfigError(f"{where}: empty; choose from {runnable}")
    configured = []
    for entry in entries:
        kind = (entry.partition("@")[0].strip() if isinstance(entry, str) else
                str(entry.get("type")) if isinstance(entry, dict) else entry.type)
        if kind not in ATTACKS:
            raise ConfigError(f"{where}: unknown attack {kind!r}; valid choices: {runnable}")
        missing = sorted(ATTACKS[kind].needs - have)
        if missing:
            raise ConfigError(f"{where}: {kind!r} needs {', '.join(NEEDS[n] for n in missing)}, which {place} cannot "
                              f"give; valid choices: {runnable}{f' ({elsewhere})' if elsewhere else ''}")
        configured.append(configure(entry, where))
    names = [a.name for a in configured]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"{where}: {repeated} given twice")
    return configured


def needs_of(attacks: Sequence[ConfiguredAttack]) -> set[str]:
    """Union of the inputs the attacks need."""
    return set().union(*(a.needs for a in attacks)) if attacks else set()


def _given(inputs: AttackInputs) -> dict[str, object]:
    """Which of the inputs were computed, by need (None: not computed)."""
    return {"ref": inputs.ref, "lower": inputs.ft_lower, "token_freq": inputs.token_log_freq,
            "references": inputs.ref_models, "nonmember_prefix": inputs.ll_nonmember_prefix or None,
            "member_prefix": inputs.ll_member_prefix or None,
            # token_stats(moments=False) leaves them NaN
            "moments": _moments(inputs.ft), "ref_moments": _moments(inputs.ref)}


def _moments(stats: SequenceStats | None) -> np.ndarray | None:
    """The (tokens,) means of log p of `stats`, or None when they were not computed (no stats, or all NaN)."""
    if stats is None or (len(stats.mu) and np.isnan(stats.mu).all()):
        return None
    return stats.mu


def run_attacks(attacks: Sequence[ConfiguredAttack | str | AttackSpec | dict], inputs: AttackInputs
                ) -> dict[str, np.ndarray]:
    """Score every record with each attack (configured, or `mia.attacks` entries): result name -> (n,) float64
    scores, higher = member."""
    configured = [a if isinstance(a, ConfiguredAttack) else configure(a) for a in attacks]
    given = _given(inputs)
    out = {}
    for attack in configured:
        missing = [NEEDS[n] for n in sorted(attack.needs) if given[n] is None]
        if missing:
            raise ConfigError(f"mia.attacks: {attack.name!r} needs {missing} which were not computed")
        scores = np.asarray(attack.score(inputs), dtype=np.float64)
        if scores.shape != (len(inputs.texts),):
            raise RuntimeError(f"attack {attack.name!r} returned shape {scores.shape}, expected ({len(inputs.texts)},)")
        out[attack.name] = scores
    return out


def headline_attack(names: Sequence[str]) -> str | None:
    """The headline attack among the result names that ran (`names`): the first of :data:`HEADLINE_ORDER` among
    them, else the first of `names` (an attack outside the declared order, e.g. `mia.attacks: [dc_pdd]`); None when
    none ran."""
    ran = list(dict.fromkeys(names))
    return next((name for name in HEADLINE_ORDER if name in ran), ran[0] if ran else None)


def mean_nll(x: AttackInputs, which: str = "ft") -> np.ndarray:
    """(n,) mean token NLL of each record under `ft`, `ref` or `ft_lower`, computed once per inputs."""
    key = f"mean_nll_{which}"
    if key not in x.cache:
        x.cache[key] = getattr(x, which).mean_nll()
    return x.cache[key]


__all__ = ["ATTACKS", "CANARY_UNSUPPORTED", "HEADLINE_ORDER", "NEEDS", "PRIMARY_ATTACK", "Attack", "AttackInputs",
           "AttackSettings", "ConfiguredAttack", "check_attack_inputs", "check_attacks", "check_available", "configure",
           "configure_attacks", "get_attack", "headline_attack", "mean_nll", "needs_of", "register", "run_attacks"]
