"""Membership inference: score once, attack many.

One base model is loaded; every fine-tuned run is attached to it as a PEFT adapter (:class:`AdapterBank`).
Per run, ONE batched pass of the fine-tuned model scores members, non-members, the utility split and
(for the lowercase attack) their lowercased texts; the reference scores come from the same weights with
adapters disabled, computed once per dataset and cached on disk (`<out>/cache/`), so a sweep of N
adapters costs N + 1 passes and a rerun none for the base. Every registered attack
(:mod:`memlens.attacks.registry`) then reads the shared statistics.

With `mia.references`, each run's reference adapters (:mod:`memlens.attacks.references`, trained by the
`references` stage) are attached to the same base model and score the run's records too, once per
reference (cached in its folder), for LiRA and RMIA. ReCaLL and Con-ReCall (:mod:`memlens.attacks.recall`)
add the records after their prefixes to the run's one pass.

Outputs per run (`runs/<run_id>/`): `mia_scores.parquet` (one row per record: run_id, sample_id, split,
is_member, is_canary, one column per attack score, n_tokens, nll_ft, nll_ref) and `mia_results.parquet`
(stage `mia`: one row per attack, plus the `bag_of_words` baseline; stage `utility`: perplexities). A run
trained with designed canaries (`dp.audit_canaries`, its `audit_canaries.parquet`) also has them scored by
the same pass under its adapter: `canary_scores.parquet` (one row per canary: canary_id, family, is_member,
one column per attack that can score them, n_tokens, nll_ft, nll_ref) and their metrics per family on the
attacks' rows (:mod:`memlens.attacks.canary_metrics`).
Study level: `<out>/mia_scores.parquet` and rows in `<out>/results.parquet`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from memlens.attacks.bow import BOW_ATTACK, bag_of_words_baseline, baseline_folds
from memlens.attacks.canary_metrics import canary_attacks, canary_columns
from memlens.attacks.dataset_inference import (
    DatasetInference,
    UsageShare,
    dataset_inference,
    dataset_rows,
    reference_guess_scores,
    usage_share,
)
from memlens.attacks.likelihood import token_log_frequencies, zlib_lengths
from memlens.attacks.recall import draw_prefix, prefix_text, tail_mean_logprob, with_prefix
from memlens.attacks.references import Reference, ReferenceStatistics, in_matrix
from memlens.attacks.registry import (
    AttackInputs,
    ConfiguredAttack,
    check_attack_inputs,
    check_attacks,
    configure_attacks,
    needs_of,
    run_attacks,
)
from memlens.attacks.subject import Subject, study_subject
from memlens.config import (
    SPLITS,
    CellConfig,
    ConfigError,
    Design,
    MIAConfig,
    ModelConfig,
    format_validation_error,
    stable_hash,
)
from memlens.context import StudyContext
from memlens.data import StudyData
from memlens.metrics.roc import membership_metrics
from memlens.models import AdapterBank, load_base_model, load_tokenizer, resolve_device, resolve_dtype
from memlens.models.adapters import PEFT_CONFIG
from memlens.score import SequenceStats, cached_token_stats, model_fingerprint, perplexity, token_stats, tokens_hash
from memlens.store import (
    RunFile,
    StudyFile,
    StudyLayout,
    atomic_write_json,
    atomic_write_parquet,
    read_cache,
    upsert_results,
)
from memlens.store.lock import write_lock
from memlens.store.results import UNCHANGED_NLL_TOL

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- scoring
class Scorer:
    """A base model with adapters, its tokenizer, the base-score cache and a progress display."""

    def __init__(self, model_cfg: ModelConfig, mia: MIAConfig, cache_dir: Path | None,
                 progress: Progress | None = None):
        self.model_cfg, self.mia, self.cache_dir, self.progress = model_cfg, mia, cache_dir, progress
        self.device = resolve_device(model_cfg.device)
        self.tokenizer = load_tokenizer(model_cfg)
        self.base = load_base_model(model_cfg, self.device)
        self.bank = AdapterBank(self.base)
        self.fingerprint = model_fingerprint(model_cfg, str(resolve_dtype(model_cfg.dtype, self.device)))
        self.base_passes = 0  # base-model passes actually computed (not read from the cache)
        self._ids: dict[str, list[int]] = {}  # text -> token ids
        self._batch_task = progress.add_task("", total=0, visible=False) if progress else None
        self._ref_stats: ReferenceStatistics | None = None
        self._bow: dict[str, dict] = {}  # bag-of-words rows by their records

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of `texts`, each text tokenized once per Scorer (every run scores the same non-members and
        utility records). No truncation: longer records are scored with a sliding window."""
        new = [t for t in dict.fromkeys(texts) if t not in self._ids]
        if new:
            self._ids.update(zip(new, self.tokenizer(new, add_special_tokens=True)["input_ids"]))
        return [self._ids[t] for t in texts]

    def score(self, model: torch.nn.Module, ids: list[list[int]], label: str, moments: bool = True) -> SequenceStats:
        def on_batch(n: int) -> None:
            if self.progress is not None:
                self.progress.advance(self._batch_task, n)

        if self.progress is not None:
            self.progress.reset(self._batch_task, total=len(ids), visible=True, description=f"  {label}")
        return token_stats(model, ids, batch_size=self.mia.batch_size, pad_token_id=self.tokenizer.pad_token_id,
                           stride=self.mia.stride, max_batch_tokens=self.mia.batch_token_budget(self.device),
                           on_batch=on_batch, moments=moments)

    def base_stats(self, texts: Sequence[str], label: str, moments: bool = False) -> SequenceStats:
        """Base-model (adapters disabled) stats of `texts`, from the cache when present; with `moments` (an attack
        needs `ref_moments`: Min-K%++ calibrated by the base model), the distribution's moments too."""
        ids = self.tokenize(texts)
        key = {"kind": "token_stats", "model": self.fingerprint, "adapter": None, "tokens": tokens_hash(ids),
               "texts": stable_hash(list(texts)), "tokenizer": type(self.tokenizer).__name__,
               "stride": self.mia.stride, "moments": moments, "version": 1}

        def compute() -> SequenceStats:
            self.base_passes += 1
            with self.bank.use(None) as model:
                return self.score(model, ids, f"base {label}", moments=moments)

        return cached_token_stats(self.cache_dir, key, compute)[0]

    def bag_of_words(self, members: pd.DataFrame, non_members: pd.DataFrame) -> dict:
        """The bag-of-words check of these records (:func:`bow_row`), computed once per scorer and records."""
        key = stable_hash([members.text.tolist(), non_members.text.tolist(),
                           members.group.tolist() if "group" in members else None,
                           non_members.group.tolist() if "group" in non_members else None])
        if key not in self._bow:
            self._bow[key] = bow_row(members, non_members, self.mia, self.cache_dir)
        return self._bow[key]

    def reference_statistics(self) -> ReferenceStatistics:

        """Mean token log-likelihoods under reference adapters, each attached to this base model when first
        needed and cached in the reference's folder (one table per scorer: a reference's scores are read once)."""
        if self._ref_stats is None:
            self._ref_stats = self._new_reference_statistics()
        return self._ref_stats

    def _new_reference_statistics(self) -> ReferenceStatistics:
        def score(ref: Reference, texts: list[str]) -> np.ndarray:
            name = f"ref{ref.index}-{stable_hash(ref.run_id)[:12]}"
            if name not in self.bank.names:
                self.bank.add(name, ref.run_dir)
            with self.bank.use(name) as model:
                return -self.score(model, self.tokenize(texts), f"reference {ref.index}", moments=False).mean_nll()

        settings = {"model": self.fingerprint, "tokenizer": type(self.tokenizer).__name__, "stride": self.mia.stride}
        return ReferenceStatistics(score, settings)


class BaseScores:
    """Base-model stats of a fixed set of datasets, looked up by text (records shared by runs)."""

    def __init__(self, scorer: Scorer, datasets: dict[str, Sequence[str]], moments: bool = False):
        """`moments`: with the moments of the base model's distributions (an attack needs `ref_moments`)."""
        self.scorer, self.moments = scorer, moments
        parts = [scorer.base_stats(texts, name, moments) for name, texts in datasets.items() if len(texts)]
        self.stats = SequenceStats.concat(parts) if parts else None
        self.index: dict[str, int] = {}  # text -> row of self.stats (first occurrence)
        for position, text in enumerate(t for texts in datasets.values() for t in texts):
            self.index.setdefault(text, position)

    def lookup(self, texts: Sequence[str]) -> SequenceStats:
        missing = list(dict.fromkeys(t for t in texts if t not in self.index))
        if missing:  # e.g. an inserted canary: scored (and cached) on its own
            extra = self.scorer.base_stats(missing, "extra", self.moments)
            start = len(self.stats) if self.stats is not None else 0
            self.stats = SequenceStats.concat([self.stats, extra]) if self.stats is not None else extra
            for i, text in enumerate(missing):
                self.index[text] = start + i
        return self.stats.select([self.index[t] for t in texts])


def token_log_freq(scorer: Scorer) -> np.ndarray | None:
    """(vocabulary,) log token frequencies of `mia.reference_corpus` under the scorer's tokenizer (DC-PDD), or
    None when no corpus is set."""
    path = scorer.mia.reference_corpus
    if path is None:
        return None
    try:
        lines = [ln for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    except FileNotFoundError:
        raise ConfigError(f"mia.reference_corpus: file {path} does not exist") from None
    if not lines:
        raise ConfigError(f"mia.reference_corpus: {path} holds no text")
    vocab = max(len(scorer.tokenizer), scorer.base.get_output_embeddings().weight.shape[0])
    return token_log_frequencies(scorer.tokenize(lines), vocab)


def score_run(scorer: Scorer, subject: Subject, base: BaseScores, attacks: list[ConfiguredAttack],
              token_log_freq: np.ndarray | None, references: tuple[np.ndarray, np.ndarray] | None = None
              ) -> tuple[pd.DataFrame, dict]:
    """Score the model attached to `scorer`'s bank as `subject.name` on its records: per-record scores (a frame of
    the `mia_scores.parquet` schema: run_id, sample_id, split, is_member, is_canary, one column per attack,
    n_tokens, nll_ft, nll_ref) and utility perplexities (dict); `base` gives the base model's statistics of the
    texts, `token_log_freq` (vocabulary,) is DC-PDD's; `references`: the (records, references) statistics and IN
    flags of the subject's reference models (:func:`reference_matrices`), for LiRA and RMIA."""
    members, non_members = subject.members, subject.non_members
    texts = subject.texts
    n, n_members = len(texts), len(members)
    inputs, ft_utility = _passes(scorer, subject.name, members, non_members, subject.utility, attacks)
    inputs.ref, inputs.token_log_freq = base.lookup(texts), token_log_freq
    if references is not None:
        inputs.ref_models, inputs.ref_in = references
    inputs.population = np.r_[np.zeros(n_members, bool), np.ones(n - n_members, bool)]
    scores = run_attacks(attacks, inputs)
    seen = {trained_on_column(a.name): flags for a in attacks if (flags := a.trained_on(inputs)) is not None}
    ft, ref = inputs.ft, inputs.ref
    is_canary = members.is_canary.astype(bool).tolist() if "is_canary" in members else [False] * n_members
    frame = pd.DataFrame({
        "run_id": subject.name,
        "sample_id": members.sample_id.astype(str).tolist() + non_members.sample_id.astype(str).tolist(),
        "split": [subject.split_names[0]] * n_members + [subject.split_names[1]] * len(non_members),
        "is_member": np.r_[np.ones(n_members, bool), np.zeros(len(non_members), bool)],
        "is_canary": np.r_[np.asarray(is_canary, bool), np.zeros(len(non_members), bool)],
        **scores,
        **seen,
        "n_tokens": ft.n_tokens,
        "nll_ft": ft.mean_nll(),
        "nll_ref": ref.mean_nll(),
    })
    member_idx, non_idx = np.arange(n_members), np.arange(n_members, n)
    u = len(ft_utility) if ft_utility is not None else 0
    utility = {
        "test_ppl": perplexity(ft.select(non_idx)),
        "base_test_ppl": perplexity(ref.select(non_idx)),
        "utility_ppl": perplexity(ft_utility) if u else np.nan,
        "base_utility_ppl": perplexity(base.lookup(subject.utility.text.tolist())) if u else np.nan,
        "member_ppl": perplexity(ft.select(member_idx)),
        "base_member_ppl": perplexity(ref.select(member_idx)),
        "n_utility": u,
        "utility_note": None if u else "no utility split: no held-out records besides the scored ones",
    }
    return frame, utility


def _passes(scorer: Scorer, name: str, members: pd.DataFrame, non_members: pd.DataFrame,
            utility: pd.DataFrame | None, attacks: list[ConfiguredAttack], utility_pass: bool = True
            ) -> tuple[AttackInputs, SequenceStats | None]:
    """The run's passes under its adapter: ONE batched pass over its records, their lowercased texts and the
    records after each prefix the attacks need; then, with `utility_pass`, the utility split's (a perplexity only:
    without the moments, a fifth of the vocabulary work; log p is bit-identical either way). Returns the attack
    inputs they give and the utility split's statistics (None without)."""
    texts = members.text.tolist() + non_members.text.tolist()
    n = len(texts)
    needs = needs_of(attacks)
    want_lower = "lower" in needs
    ids = scorer.tokenize(texts + ([t.lower() for t in texts] if want_lower else []))
    prefixed, in_member_prefix = _prefixed(scorer, members, non_members, utility, ids[:n], attacks)
    utility_texts = utility.text.tolist() if utility is not None and utility_pass else []
    with scorer.bank.use(name) as model:
        every = scorer.score(model, ids + [seq for part in prefixed.values() for seq in part], name,
                             moments="moments" in needs)
        ft_utility = scorer.score(model, scorer.tokenize(utility_texts), f"{name} utility", moments=False) \
            if utility_texts else None
    ft = every.select(np.arange(n))
    inputs = AttackInputs(texts=texts, ft=ft, ft_lower=every.select(np.arange(n, 2 * n)) if want_lower else None,
                          in_member_prefix=in_member_prefix)
    start = len(ids)
    for (kind, shots) in prefixed:  # each record's mean log-likelihood after the prefix, over its own tokens only
        conditional = tail_mean_logprob(every.select(np.arange(start, start + n)), ft.n_tokens)
        getattr(inputs, f"ll_{kind}")[shots] = conditional
        start += n
    return inputs, ft_utility


def _score_canaries(scorer: Scorer, name: str, canaries: pd.DataFrame, utility: pd.DataFrame | None,
                    base: BaseScores, attacks: list[ConfiguredAttack], token_log_freq: np.ndarray | None
                    ) -> pd.DataFrame:
    """The designed canaries (`audit_canaries.parquet`: canary_id, family, text, is_member) scored under the attached
    run `name` by the attacks that can score them (:func:`canary_attacks`), through the same passes as the records
    (their base-model statistics cached like an inserted canary's; no utility pass): one row per canary.
    `token_log_freq`: (vocabulary,) for DC-PDD, as for the records."""
    attacks = canary_attacks(attacks)
    frame = canaries.assign(sample_id=canaries.canary_id).reset_index(drop=True)
    inputs, _ = _passes(scorer, name, frame, frame.iloc[0:0], utility, attacks, utility_pass=False)
    texts = frame.text.tolist()
    inputs.ref, inputs.token_log_freq = base.lookup(texts), token_log_freq
    scores = run_attacks(attacks, inputs)
    return pd.DataFrame({"run_id": name, "canary_id": frame.canary_id.astype(str), "family": frame.family.astype(str),
                         "is_member": frame.is_member.astype(bool), **scores, "n_tokens": inputs.ft.n_tokens,
                         "nll_ft": inputs.ft.mean_nll(), "nll_ref": inputs.ref.mean_nll()})


def _prefixed(scorer: Scorer, members: pd.DataFrame, non_members: pd.DataFrame, utility: pd.DataFrame | None,
              record_ids: list[list[int]], attacks: list[ConfiguredAttack]
              ) -> tuple[dict[tuple[str, int], list[list[int]]], dict[int, np.ndarray]]:
    """The records' token ids after each prefix the attacks need, by (need, shots): ReCaLL's non-member prefix
    and Con-ReCall's member prefix of `shots` records; and, by shots, which records are in the member prefix."""
    out: dict[tuple[str, int], list[list[int]]] = {}
    in_member_prefix: dict[int, np.ndarray] = {}
    bos = scorer.tokenizer.bos_token_id
    wanted = sorted({(need, a.settings.shots) for a in attacks for need in ("nonmember_prefix", "member_prefix")
                     if need in a.needs}, key=lambda w: (w[0] != "nonmember_prefix", w[1]))
    for need, shots in wanted:
        if need == "nonmember_prefix":
            if utility is None or not len(utility):
                raise ConfigError("mia.attacks: ReCaLL's non-member prefix is drawn from the utility split, which is "
                                  "empty or absent (data.utility_split)")
            prefix = draw_prefix(utility, shots, salt=0)
        else:
            prefix = draw_prefix(members, shots, salt=1)
            in_member_prefix[shots] = np.r_[members.sample_id.isin(prefix.sample_id).to_numpy(),
                                            np.zeros(len(non_members), bool)]
        out[(need, shots)] = with_prefix(scorer.tokenize([prefix_text(prefix)])[0], record_ids, bos)
    return out, in_member_prefix


def check_membership_records(ctx: StudyContext) -> None:
    """Refuse, before any fine-tune, a membership design whose records the bag-of-words check cannot fold
    (`mia.bag_of_words_baseline`: 2 members and 2 non-members at least, 2 documents a side with groups)."""
    if not ctx.study.mia.bag_of_words_baseline:
        return
    for (design, draw), data in ctx.designs().items():
        grouped = "group" in data.members and "group" in data.non_members
        try:
            baseline_folds(len(data.members), len(data.non_members), data.members.group if grouped else None,
                           data.non_members.group if grouped else None)
        except ValueError as exc:
            raise ConfigError(f"mia.bag_of_words_baseline: {exc} in the `{design}` membership design, record draw "
                              f"{draw} (data.subset: "
                              f"{ctx.study.data.subset}); use more records (data.subset, data.pool) or set "
                              "mia.bag_of_words_baseline: false") from None


def bow_row(members: pd.DataFrame, non_members: pd.DataFrame, mia: MIAConfig, cache_dir: Path | None) -> dict:
    """Bag-of-words baseline on these records (folds grouped by document when they have a `group`), cached on
    disk: it depends on the texts and groups only, so cells with the same members share it."""
    groups = ("group" in members and "group" in non_members) or None
    m_groups = members.group.tolist() if groups else None
    n_groups = non_members.group.tolist() if groups else None
    key = stable_hash({"kind": "bow", "m": members.text.tolist(), "n": non_members.text.tolist(), "mg": m_groups,
                       "ng": n_groups, "level": mia.ci_level, "version": 2})[:24]
    path = cache_dir / f"bow-{key}.json" if cache_dir else None
    cached = read_cache(path, lambda p: json.loads(p.read_text())) if path is not None else None
    if cached is not None:
        return cached
    row = bag_of_words_baseline(members.text.tolist(), non_members.text.tolist(), member_groups=m_groups,
                                non_member_groups=n_groups, level=mia.ci_level)
    if path is not None:
        atomic_write_json(path, row)
    return row


def result_rows(scores: pd.DataFrame, utility: dict, attacks: list[ConfiguredAttack], mia: MIAConfig, meta: dict,
                bow: dict | None) -> pd.DataFrame:
    """The `results.parquet` rows of one scored run (:func:`score_run`'s frame and utility): stage `mia`, one row
    per attack (AUC, TPRs with intervals, the operating point, where its canary ranks) and the bag-of-words
    baseline `bow` (:func:`bow_row`) when given; stage `utility`, the perplexities. `meta`: the run's
    identifying columns."""
    labels = scores.is_member.to_numpy()
    canary = scores.is_canary.to_numpy()
    unchanged = unchanged_model_note(scores)
    if unchanged:
        log.warning("run %s: %s", meta.get("run_id"), unchanged)
    rows = []
    for attack in attacks:
        values = scores[attack.name].to_numpy()
        # a partial attack (Con-ReCall) leaves some records unscored by design: its metrics are the others'
        scored = np.isfinite(values) if attack.partial else np.ones(len(values), bool)
        row = {**meta, "stage": "mia", "attack": attack.name,
               **membership_metrics(labels[scored], values[scored], n_bootstrap=mia.bootstrap, level=mia.ci_level,
                                    max_fpr=mia.max_fpr_operating_point)}
        notes = [unchanged] if unchanged else []
        row.update(attack.provenance())
        if trained_on_column(attack.name) in scores:  # a learned attack: how many records its weights saw, 0 too
            row["trained_on_records"] = int(scores[trained_on_column(attack.name)].sum())
        seen_note = trained_on_note(scores, attack.name)
        if seen_note:
            notes.append(seen_note)
        if not scored.all():
            notes.append(f"{int((~scored).sum())} member(s) left unscored: the run's own members in the attack's "
                         "member prefix")
        row["model_unchanged"] = bool(unchanged)
        if notes:
            row["note"] = "; ".join(notes)
        if canary.any():  # where the canary ranks among non-members (it is one member among the others)
            c = float(values[canary][0])
            row["canary_score"] = c
            row["canary_nonmember_quantile"] = float((values[~labels] < c).mean())
        rows.append(row)
    if bow is not None:
        rows.append({**meta, "stage": "mia", "attack": BOW_ATTACK,
                     **{k: bow[k] for k in ("auc", "auc_ci_low", "auc_ci_high", "auc_random_folds", "auc_grouped_folds",
                                            "grouped", "n_groups", "n_members", "n_non_members")},
                     "biased_split": bow["biased_split"], "note": bow["note"]})
    rows.append({**meta, "stage": "utility", "attack": "perplexity", **utility})
    return pd.DataFrame(rows)


def trained_on_column(attack: str) -> str:
    """The mia_scores.parquet column of a learned attack saying which records its weights were trained on."""
    return f"{attack}__trained_on"


def trained_on_note(scores: pd.DataFrame, attack: str) -> str | None:
    """Why a learned attack's figures on these records are not held-out, when its weights saw some of them."""
    column = trained_on_column(attack)
    if column not in scores or not scores[column].any():
        return None
    k = int(scores[column].sum())
    return (f"{k} of {len(scores)} records were in the training set of the weights of {attack!r} (their card lists "
            f"their texts' hashes): its scores of them are not a held-out measurement")


def unchanged_model_note(scores: pd.DataFrame) -> str | None:
    """Why a run's membership scores measure the base model, when the fine-tuned model's mean NLL equals the
    base model's on every record (training changed no prediction, e.g. a learning rate still 0 in warm-up):
    the likelihood attacks then score the base model, and the reference ratio scores float noise."""
    gap = np.abs(scores.nll_ft.to_numpy(float) - scores.nll_ref.to_numpy(float))
    gap = gap[np.isfinite(gap)]
    if not len(gap) or gap.max() > UNCHANGED_NLL_TOL:
        return None
    return (f"the fine-tuned model predicts what the base model does (mean NLL within {gap.max():.1e} nats on "
            f"every record): these scores measure the base model, not what fine-tuning memorized")


@contextlib.contextmanager
def scoring_progress(show: bool) -> Iterator[Progress]:
    """The membership stage's progress display on stderr (disabled unless `show`)."""
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  disable=not show, transient=False, console=Console(stderr=True)) as progress:
        yield progress


# ------------------------------------------------------------------------------------- study API
def record_datasets(members: pd.DataFrame, non_members: pd.DataFrame, utility: pd.DataFrame | None,
                    prefix: str = "") -> dict[str, list[str]]:
    """The texts the base model scores for one set of records (each scored once and cached by content), by dataset:
    `<prefix>members`, `<prefix>non_members` and, with a utility split, `<prefix>utility`. The one builder of the
    base model's datasets (a study's designs, an audit's subject, `attack_models`' records)."""
    datasets = {f"{prefix}members": members.text.tolist(), f"{prefix}non_members": non_members.text.tolist()}
    if utility is not None:
        datasets[f"{prefix}utility"] = utility.text.tolist()
    return datasets


def _base_datasets(designs: dict[tuple[Design, int], StudyData]) -> dict[str, list[str]]:
    """Every text any run of the study is scored on, by dataset (the base model scores each once); `designs`: the
    records by (design, record draw). The `splits` design's draw 0 keeps the dataset names of studies made before
    designs and draws existed (same cache keys)."""
    datasets: dict[str, list[str]] = {}
    for (design, draw), data in designs.items():
        prefix = ("" if design == SPLITS else f"{design}:") + (f"d{draw}:" if draw else "")
        datasets.update(record_datasets(data.members, data.non_members, data.utility, prefix))
    return datasets


def prepare_base_cache(ctx: StudyContext) -> None:
    """Compute and cache the base-model scores of the study's datasets (run by a distributed driver
    before fanning out, so workers only read them)."""
    with scoring_progress(ctx.show_progress) as progress:
        scorer = Scorer(ctx.study.model, ctx.study.mia, ctx.layout.cache, progress)
        BaseScores(scorer, _base_datasets(ctx.designs()), "ref_moments" in needs_of(check_attacks(ctx.study)))


def run_mia(ctx: StudyContext, cells: Sequence[CellConfig] | None = None, *, force: bool = False,
            merge: bool = True) -> pd.DataFrame:
    """Membership inference on the finished runs of `cells` (default: every run of the study) that lack MIA
    outputs (all of them with `force`): each run a :class:`Subject` (:func:`study_subject`) measured by
    :func:`measure_membership`. Writes per-run files and, with `merge`, merges the study-level files and upserts
    `results.parquet` (the study stage leaves that to its merge, which runs once after every cell). Returns the
    upserted rows (stages `mia` and `utility`)."""
    study, layout = ctx.study, ctx.layout
    attacks = check_attacks(study)
    todo = ctx.pending(RunFile.MIA_RESULTS, cells, force)
    if not todo:
        return pd.DataFrame()
    references = "references" in needs_of(attacks)
    with scoring_progress(ctx.show_progress) as progress:
        scorer = Scorer(study.model, study.mia, layout.cache, progress)
        base = BaseScores(scorer, _base_datasets(ctx.designs()), "ref_moments" in needs_of(attacks))
        freq = token_log_freq(scorer)
        runs_task = progress.add_task("membership inference", total=len(todo))
        all_rows = []
        for run_id, cell in todo:
            run_dir = layout.run_dir(run_id)
            scorer.bank.add(run_id, run_dir)
            measured = measure_membership(scorer, study_subject(ctx, run_id, cell, references=references), base,
                                          attacks, token_log_freq=freq)
            if measured.canary_scores is not None:
                atomic_write_parquet(run_dir / RunFile.CANARY_SCORES, measured.canary_scores)
            atomic_write_parquet(run_dir / RunFile.MIA_SCORES, measured.scores)
            atomic_write_parquet(run_dir / RunFile.MIA_RESULTS, measured.rows)  # written last: marks the stage done
            all_rows.append(measured.rows)
            progress.advance(runs_task)
    upserted = pd.concat(all_rows, ignore_index=True)
    if merge:
        merge_study_outputs(layout, upserted)
    return upserted


@dataclass
class Membership:
    """What membership inference measured of one subject: `scores` (the mia_scores.parquet rows), `rows` (the
    results rows: stage `mia`, one per attack and the bag-of-words check; stage `utility`) and `canary_scores`
    (canary_scores.parquet rows of the subject's canaries, None without); the dataset-level answers (stage
    `dataset` rows too): dataset inference, and the usage share with reference adapters."""

    scores: pd.DataFrame
    rows: pd.DataFrame
    canary_scores: pd.DataFrame | None = None
    dataset_inference: DatasetInference | None = None  # the member (suspect) set against the non-members
    usage_share: UsageShare | None = None


def measure_membership(scorer: Scorer, subject: Subject, base: BaseScores, attacks: list[ConfiguredAttack], *,
                       token_log_freq: np.ndarray | None = None) -> Membership:
    """Membership inference on one subject, the model attached to `scorer`'s bank as `subject.name`: one scoring
    pass (:func:`score_run`), its canaries scored by the same attacks, the bag-of-words check between its counted
    members and its non-members, and the metrics of the counted records (every record is scored and returned).
    `token_log_freq`: (vocabulary,) for DC-PDD, or None. The one membership unit of the study, `attack_models`
    and `memlens audit`."""
    start = time.perf_counter()
    mia = scorer.mia
    references = reference_matrices(scorer, subject)
    scores, utility = score_run(scorer, subject, base, attacks, token_log_freq, references)
    canaries = None
    if subject.canaries is not None:
        canaries = _score_canaries(scorer, subject.name, subject.canaries, subject.utility, base, attacks,
                                   token_log_freq)
    kept = np.ones(len(scores), bool) if subject.counted is None else np.asarray(subject.counted, bool)
    members, counted = subject.members[kept[:len(subject.members)]], scores[kept].reset_index(drop=True)
    bow = scorer.bag_of_words(members, subject.non_members) if mia.bag_of_words_baseline else None
    counted_refs = None if references is None else (references[0][kept], references[1][kept])
    dataset = _dataset_level(subject, counted, members, attacks, bow, counted_refs)
    utility["mia_wall_time_s"] = time.perf_counter() - start
    rows = result_rows(counted, utility, attacks, mia, subject.meta, bow)
    if canaries is not None:
        rows = _with_canary_columns(rows, canary_columns(canaries, attacks, mia))
    rows = pd.concat([rows, dataset_rows(subject.meta, *dataset)], ignore_index=True)
    return Membership(scores, rows, canaries, *dataset)


def reference_matrices(scorer: Scorer, subject: Subject) -> tuple[np.ndarray, np.ndarray] | None:
    """(records, references) mean token log-likelihoods of the subject's records (members, then non-members) under
    its reference adapters, and whether each record was in each one's training half; None without references.
    Computed once per subject: LiRA / RMIA and the usage share read them."""
    if subject.references is None:
        return None
    texts = subject.texts
    return (scorer.reference_statistics().matrix(subject.references, texts, also=subject.population),
            in_matrix(subject.references, texts))


def _dataset_level(subject: Subject, counted: pd.DataFrame, members: pd.DataFrame, attacks: list[ConfiguredAttack],
                   bow: dict | None, references: tuple[np.ndarray, np.ndarray] | None
                   ) -> tuple[DatasetInference | None, UsageShare | None]:
    """Was the member (suspect) set used, and what share of it? Dataset inference over the counted records' attack
    scores (every attack that scores every record, reference attacks included; the base model's loss and the words
    as shift controls; target-minus-base and reference attacks as the calibrated features) and, with 3 or more
    reference adapters (`references`: their (counted records, references) statistics and IN flags), the usage share
    from LiRA guesses, calibrated on the target's own non-members. A set too small for the test gives no test (said
    in the log), and keeps its share."""
    texts = members.text.tolist() + subject.non_members.text.tolist()
    frame = counted.assign(text=texts)
    base = []
    if "nll_ref" in frame and "nll_ft" in frame:  # the base model's view (loss, zlib ratio) and the target's change
        lengths = zlib_lengths(texts)
        frame = frame.assign(base_loss=-frame.nll_ref, base_zlib=-frame.nll_ref / lengths,
                             loss_minus_base=frame.nll_ref - frame.nll_ft)
        base = ["base_loss", "base_zlib"]
    grouped = "group" in members and "group" in subject.non_members
    if grouped:
        frame["group"] = members.group.tolist() + subject.non_members.group.tolist()
    features = [a.name for a in attacks if not a.partial]
    calibrated = [a.name for a in attacks if not a.partial and a.needs & {"ref", "references"}]
    calibrated += ["loss_minus_base"] if "loss_minus_base" in frame else []
    inference = None
    try:
        inference = dataset_inference(frame, features, bag_of_words=bow, calibrated_features=calibrated,
                                      base_features=base or None)
    except ConfigError as exc:
        log.info("run %s: no dataset inference: %s", subject.name, exc)
    share = None
    if references is not None and references[0].shape[1] >= 3:
        statistics, inside = references
        target, reference = reference_guess_scores(-counted.nll_ft.to_numpy(float), statistics, inside)
        n_s = len(members)
        groups = frame.group.astype(str).to_numpy() if grouped else None
        share = usage_share(target[:n_s], reference, inside, non_member_scores=target[n_s:],
                            suspect_groups=None if groups is None else groups[:n_s],
                            non_member_groups=None if groups is None else groups[n_s:], reference_groups=groups)
    return inference, share


def _with_canary_columns(rows: pd.DataFrame, columns: dict[str, dict]) -> pd.DataFrame:
    """`rows` with each `mia` row's canary columns (result name -> columns) added."""
    extra = pd.DataFrame([columns.get(a, {}) if st == "mia" else {} for a, st in zip(rows.attack, rows.stage)],
                         index=rows.index)
    return pd.concat([rows, extra], axis=1)


def merge_study_outputs(layout: StudyLayout, rows: pd.DataFrame | None = None) -> None:
    """Rewrite `<out>/mia_scores.parquet` from every run's file and upsert `rows` into results.parquet,
    under the study's write lock (several workers may finish at once)."""
    with write_lock(layout.root):
        parts = [pd.read_parquet(layout.run_file(r, RunFile.MIA_SCORES)) for r in layout.runs_with(RunFile.MIA_SCORES)]
        if parts:
            atomic_write_parquet(layout.study_level(StudyFile.MIA_SCORES), pd.concat(parts, ignore_index=True))
        if rows is not None and len(rows):
            upsert_results(layout, rows)


def merge_study(layout: StudyLayout) -> None:
    """Rebuild `<out>/mia_scores.parquet` and upsert every finished run's rows (its mia_results.parquet
    holds exactly the rows run_mia upserted for it) into results.parquet. Idempotent."""
    parts = [pd.read_parquet(layout.run_file(r, RunFile.MIA_RESULTS)) for r in layout.runs_with(RunFile.MIA_RESULTS)]
    merge_study_outputs(layout, pd.concat(parts, ignore_index=True) if parts else None)


# ------------------------------------------------------------------------------------- direct API
def _as_frame(records, split: str, is_member: bool) -> pd.DataFrame:
    if isinstance(records, pd.DataFrame):
        frame = records.copy()
        if "text" not in frame:
            raise ValueError(f"{split} frame needs a `text` column; has {list(frame.columns)}")
    else:
        frame = pd.DataFrame({"text": list(records)})
    if "sample_id" not in frame:
        frame["sample_id"] = [f"{split}-{i}" for i in range(len(frame))]
    if is_member and "is_canary" not in frame:
        frame["is_canary"] = False
    return frame.reset_index(drop=True)


def attack_models(model: str | ModelConfig, adapters: dict[str, str | Path] | Sequence[str | Path],
                  members, non_members, utility=None, *, mia: MIAConfig | dict | None = None,
                  cache_dir: str | Path | None = None, device: str = "auto",
                  show_progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Membership inference without a study file.

    `model`: base model path/id (or a ModelConfig); `adapters`: {name: run folder or adapter folder (memlens' or
    plain PEFT's)}
    or a list of folders (named by folder name); `members` / `non_members` / `utility`: lists of texts
    or frames with `text` (and optionally `sample_id`, `is_canary`, and `group`, the document of each record,
    for the bag-of-words check's grouped folds). Returns (per-record scores, result rows of stages `mia` and
    `utility`), as `run_mia` writes them.
    """
    model_cfg = model if isinstance(model, ModelConfig) else ModelConfig(name_or_path=str(model), device=device)
    if not isinstance(mia, MIAConfig):
        try:
            mia = MIAConfig(**(mia or {}))
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, "mia")) from None
    attacks = configure_attacks(mia.attacks)
    wanting = [a.name for a in attacks if "references" in a.needs]
    if wanting:
        raise ConfigError(f"mia.attacks: {wanting} need reference adapters of the targets' recipe, which only a study "
                          "trains (mia.references); attack_models cannot: remove them, or run a study")
    attacks = check_attack_inputs(mia.attacks, mia.reference_corpus, utility=utility is not None)
    if not isinstance(adapters, dict):
        adapters = {Path(p).name: p for p in adapters}
    members, non_members = _as_frame(members, "member", True), _as_frame(non_members, "non_member", False)
    utility = _as_frame(utility, "utility", False) if utility is not None else None
    with scoring_progress(show_progress) as progress:
        scorer = Scorer(model_cfg, mia, Path(cache_dir) if cache_dir else None, progress)
        base = BaseScores(scorer, record_datasets(members, non_members, utility), "ref_moments" in needs_of(attacks))
        freq = token_log_freq(scorer)
        task = progress.add_task("membership inference", total=len(adapters))
        scores_parts, result_parts = [], []
        for name, path in adapters.items():
            path = Path(path)
            if (path / PEFT_CONFIG).is_file() and not (path.parent / RunFile.TRAIN).is_file():
                scorer.bank.add_adapter(name, path)  # an adapter saved by plain PEFT
            else:  # a run folder, or its adapter/ (its checksums are verified)
                scorer.bank.add(name, path.parent if path.name == "adapter" else path)
            subject = Subject(name, members, non_members, {"run_id": name, "model": model_cfg.name_or_path},
                              utility=utility)
            measured = measure_membership(scorer, subject, base, attacks, token_log_freq=freq)
            scores_parts.append(measured.scores)
            result_parts.append(measured.rows)
            progress.advance(task)
    return pd.concat(scores_parts, ignore_index=True), pd.concat(result_parts, ignore_index=True)
