"""Prompted-prefix extraction and canary exposure on a study's finished runs.

For each run: the canary, up to `extraction.members` other training records and `extraction.non_members`
non-member controls are cut into prefix and suffix; each decoding continues every prefix with the
run's adapter active and, as the control, with adapters disabled (the base model). Outputs:

- `runs/<run_id>/extraction.parquet`: one row per (model, sequence, decoding). `model` is `finetuned`
  or `base` (the same prompts under the base model: what is "reproduced" without fine-tuning).
  `ppl_base` / `ppl_ft` are perplexities of the whole record under the base / fine-tuned model;
  `ppl_generated` is the perplexity of the generated tokens given the prefix under the model that
  generated them (the fine-tuned model on `finetuned` rows).
- `runs/<run_id>/extraction_results.parquet`: per (model, decoding, group) extraction rates under each
  discriminative function; groups are `canary`, `members` (training records other than the canary) and
  `non_members`. Also upserted into `<out>/results.parquet` as stage `extraction`, attack
  `extract:<decoding>:<group>` (`...:base` for the base-model control).
- `runs/<run_id>/exposure.parquet` when the canary has a secret (insert mode): exposure under the
  fine-tuned and the base model; upserted as stage `exposure`, attacks `exposure` and `exposure:base`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from memlens.attacks.exposure import draw_candidates, measure_exposure
from memlens.attacks.generate import Decoding, PromptSplit, generate_continuations, resolve_decoding, split_tokens
from memlens.attacks.subject import Subject, study_subject
from memlens.config import CellConfig, ConfigError, ExtractionConfig, StudyConfig, stable_hash
from memlens.context import StudyContext
from memlens.data import Canary
from memlens.metrics.text import extraction_rates, pair_metrics, tfidf_cosines
from memlens.models import AdapterBank, load_base_model, resolve_device
from memlens.models.fingerprint import weights_fingerprint
from memlens.score import token_stats
from memlens.store import (
    RunFile,
    StudyFile,
    StudyLayout,
    atomic_write_parquet,
    read_cache,
    run_metadata,
    upsert_results,
)
from memlens.store.lock import write_lock
from memlens.store.records import TrainRecord

log = logging.getLogger(__name__)

GROUPS = ("canary", "members", "non_members")


# ------------------------------------------------------------------------------------------- targets
def select_targets(members: pd.DataFrame, non_members: pd.DataFrame, cfg: ExtractionConfig) -> pd.DataFrame:
    """The records attacked in one run: the canary, a seeded sample of `cfg.members` other training records
    and of `cfg.non_members` non-members. Columns sample_id, text, is_canary, is_member, group."""
    def sample(frame: pd.DataFrame, n: int | None, stream: int) -> pd.DataFrame:
        if n is None or n >= len(frame):
            return frame
        rng = np.random.default_rng([cfg.seed, stream])
        return frame.iloc[np.sort(rng.choice(len(frame), size=n, replace=False))]

    canary = members[members.is_canary]
    others = sample(members[~members.is_canary], cfg.members, 1)
    controls = sample(non_members, cfg.non_members, 2)
    parts = [
        canary.assign(is_member=True, group="canary"),
        others.assign(is_member=True, group="members"),
        controls.assign(is_canary=False, is_member=False, group="non_members"),
    ]
    cols = ["sample_id", "text", "is_canary", "is_member", "group"]
    return pd.concat([p[cols] for p in parts], ignore_index=True)


@dataclass
class Prompt:
    key: str            # text of the record: identifies it across runs
    ids: list[int]
    split: PromptSplit


def build_prompts(texts: list[str], tokenizer, cfg: ExtractionConfig) -> dict[str, Prompt | None]:
    """text -> Prompt, or None when the record is too short to leave a suffix after the prefix."""
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    return {t: (Prompt(t, i, s) if (s := split_tokens(i, cfg.split, cfg.prefix_len, tokenizer.bos_token_id))
                else None) for t, i in zip(texts, ids)}


# ------------------------------------------------------------------------------------------- generation
def _loglik_of_continuations(model, pad_token_id: int, batch_size: int):
    """rank_fn for generate_continuations: log-likelihood of the last n tokens of each sequence."""
    def rank(sequences: list[list[int]], n_last: list[int]) -> np.ndarray:
        stats = token_stats(model, sequences, batch_size=batch_size, pad_token_id=pad_token_id, moments=False)
        return np.array([stats.sequence(i)[-n:].astype(np.float64).sum() for i, n in enumerate(n_last)])
    return rank


def _generated_ppl(model, prompts: list[Prompt], generations: list[list[int]], pad_token_id: int,
                   batch_size: int) -> np.ndarray:
    seqs = [p.split.prefix + g for p, g in zip(prompts, generations)]
    stats = token_stats(model, seqs, batch_size=batch_size, pad_token_id=pad_token_id, moments=False)
    return np.array([np.exp(-stats.sequence(i)[-len(g):].astype(np.float64).mean()) if g else np.nan
                     for i, g in enumerate(generations)])


def generate_all(model, prompts: list[Prompt], decodings: list[Decoding], cfg: ExtractionConfig, tokenizer,
                 progress: Progress | None, label: str) -> dict[str, pd.DataFrame]:
    """decoding name -> frame (key, generated_ids, generated_text, ppl_generated) for every prompt."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    out: dict[str, pd.DataFrame] = {}
    for dec in decodings:
        n_new = [cfg.max_new_tokens or len(p.split.suffix) for p in prompts]
        task = progress.add_task(f"{label} {dec.name}", total=len(prompts)) if progress else None
        gens = generate_continuations(
            model, [p.split.prefix for p in prompts], n_new, dec, pad_token_id=pad, eos_token_id=eos,
            batch_size=cfg.batch_size, seed=cfg.seed, rank_fn=_loglik_of_continuations(model, pad, cfg.batch_size),
            on_batch=(lambda n, t=task: progress.advance(t, n)) if progress else None)
        if progress:
            progress.remove_task(task)
        out[dec.name] = pd.DataFrame({
            "key": [p.key for p in prompts],
            "generated_ids": gens,
            "generated_text": tokenizer.batch_decode(gens, skip_special_tokens=False),
            "ppl_generated": _generated_ppl(model, prompts, gens, pad, cfg.batch_size),
        })
    return out


def full_ppl(model, prompts: list[Prompt], pad_token_id: int, batch_size: int) -> dict[str, float]:
    stats = token_stats(model, [p.ids for p in prompts], batch_size=batch_size, pad_token_id=pad_token_id,
                        moments=False)
    return dict(zip([p.key for p in prompts], np.exp(stats.mean_nll())))


def _text_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def base_control_key(study: StudyConfig, decodings: list[Decoding], tokenizer) -> str:
    """The identity of the base model's extraction control: the model, its weights' content fingerprint
    (:func:`~memlens.models.fingerprint.weights_fingerprint`: weights changed under the same path give another key)
    and every setting that shapes a generation."""
    cfg = study.extraction
    return stable_hash({"model": study.model.model_dump(exclude={"device"}),
                        "weights": weights_fingerprint(study.model.name_or_path), "split": cfg.split,
                        "prefix_len": cfg.prefix_len, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed,
                        "decodings": [asdict(d) for d in decodings], "vocab": len(tokenizer)})[:16]


def base_control(layout: StudyLayout, study: StudyConfig, bank: AdapterBank, prompts: list[Prompt],
                 decodings: list[Decoding], tokenizer, progress: Progress | None
                 ) -> tuple[dict[str, float], dict[str, pd.DataFrame]]:
    """Base-model perplexities and generations of `prompts`, read from / added to
    `<out>/cache/extraction-base-<key>.parquet` (:func:`base_control_key`). Valid across runs because a continuation
    depends only on (model, prompt, decoding, seed), never on the batch it was generated in (greedy; sampling via
    SeededGumbelSampler)."""
    cfg = study.extraction
    key = base_control_key(study, decodings, tokenizer)
    path = layout.cache / f"extraction-base-{key}.parquet"
    cached = read_cache(path, pd.read_parquet)
    cached = cached if cached is not None else pd.DataFrame(columns=["text_key", "decoding"])
    have = set(cached.text_key[cached.decoding == decodings[-1].name]) if len(cached) else set()
    missing = [p for p in prompts if _text_key(p.key) not in have]
    if missing:
        with torch.inference_mode(), bank.use(None) as model:
            ppl = full_ppl(model, missing, tokenizer.pad_token_id, cfg.batch_size)
            fresh = generate_all(model, missing, decodings, cfg, tokenizer, progress, "base")
        new_rows = pd.concat([frame.assign(decoding=name, text_key=[_text_key(k) for k in frame.key],
                                           ppl_base=[ppl[k] for k in frame.key]).drop(columns="key")
                              for name, frame in fresh.items()], ignore_index=True)
        new_rows["generated_ids"] = new_rows.generated_ids.map(lambda ids: [int(i) for i in ids])
        with write_lock(layout.root):  # other processes may have added entries meanwhile: merge, not replace
            current = read_cache(path, pd.read_parquet)
            keep = current[~current.text_key.isin(new_rows.text_key)] if current is not None else None
            merged = pd.concat([f for f in (keep, new_rows) if f is not None and len(f)], ignore_index=True)
            atomic_write_parquet(path, merged)
        cached = pd.concat([f for f in (cached, new_rows) if len(f)], ignore_index=True)
    by_key = {_text_key(p.key): p.key for p in prompts}
    rows = cached[cached.text_key.isin(by_key)].assign(key=lambda f: f.text_key.map(by_key))
    ppl_base = dict(zip(rows.key, rows.ppl_base))
    generations = {d.name: rows[rows.decoding == d.name][["key", "generated_ids", "generated_text", "ppl_generated"]]
                   .assign(generated_ids=lambda f: f.generated_ids.map(lambda a: [int(i) for i in a]))
                   .reset_index(drop=True)
                   for d in decodings}
    return ppl_base, generations


# ------------------------------------------------------------------------------------------- rows
def score_rows(run_id: str, model_label: str, targets: pd.DataFrame, prompts: dict[str, Prompt | None],
               generations: dict[str, pd.DataFrame], ppl_base: dict[str, float], ppl_ft: dict[str, float],
               tokenizer, cfg: ExtractionConfig) -> pd.DataFrame:
    """One row per (sequence, decoding) with every similarity measure."""
    pairs = []  # (decoding, target, prompt, generation, suffix text)
    for dec_name, frame in generations.items():
        by_key = frame.set_index("key")
        for target in targets.itertuples(index=False):
            prompt = prompts[target.text]
            if prompt is not None:
                pairs.append((dec_name, target, prompt, by_key.loc[target.text],
                               tokenizer.decode(prompt.split.suffix, skip_special_tokens=False)))
    tfidf = tfidf_cosines([gen.generated_text for *_, gen, _ in pairs], [suffix for *_, suffix in pairs])
    rows = []
    for (dec_name, target, prompt, gen, suffix_text), cosine in zip(pairs, tfidf):
        metrics = pair_metrics(gen.generated_ids, prompt.split.suffix, gen.generated_text, suffix_text,
                               cfg.verbatim_threshold, tfidf=float(cosine))
        rows.append({
            "run_id": run_id, "model": model_label, "sample_id": target.sample_id,
            "group": target.group, "is_canary": bool(target.is_canary), "is_member": bool(target.is_member),
            "decoding": dec_name, "prefix_len": len(prompt.split.prefix),
            "suffix_len": len(prompt.split.suffix), "generated_len": len(gen.generated_ids),
            **metrics.to_dict(),
            "ppl_base": ppl_base[target.text], "ppl_ft": ppl_ft[target.text],
            "ppl_generated": float(gen.ppl_generated),
            "generated_text": gen.generated_text, "suffix_text": suffix_text,
        })
    return pd.DataFrame(rows)


def aggregate(rows: pd.DataFrame, targets: pd.DataFrame, prompts: dict[str, Prompt | None],
              cfg: ExtractionConfig) -> pd.DataFrame:
    """Per (model, decoding, group): extraction rates and mean similarities; `n_too_short` counts records
    with no suffix left after the prefix (not attacked)."""
    too_short = targets.assign(short=[prompts[t] is None for t in targets.text]).groupby("group").short.sum()
    out = []
    for (model, dec), frame in rows.groupby(["model", "decoding"], sort=False):
        for group in GROUPS:
            sel = frame[frame.group == group]
            n_short = int(too_short.get(group, 0))
            if len(sel) == 0 and n_short == 0:
                continue
            out.append({"run_id": frame.run_id.iloc[0], "model": model, "decoding": dec, "group": group,
                        **extraction_rates(sel, cfg.verbatim_threshold, cfg.bleu_threshold),
                        "n_too_short": n_short})
    return pd.DataFrame(out)


# ------------------------------------------------------------------------------------------- one model
def resolve_decodings(cfg: ExtractionConfig) -> list[Decoding]:
    """`extraction.decodings` resolved (temperature floor applied); names must be unique."""
    decodings = [resolve_decoding(d, cfg.min_temperature, f"extraction.decodings[{i}]")
                 for i, d in enumerate(cfg.decodings)]
    names = [d.name for d in decodings]
    if len(set(names)) != len(names):
        raise ConfigError(f"extraction.decodings: names must be unique, got {names}")
    return decodings


def attackable(prompts: dict[str, Prompt | None], cfg: ExtractionConfig) -> list[Prompt]:
    """The prompts that leave a suffix to generate, in order; none is an error naming the setting."""
    attacked = [p for p in prompts.values() if p is not None]
    if not attacked:
        raise ConfigError(f"extraction.prefix_len: every record has at most {cfg.prefix_len} tokens, leaving "
                          "nothing to generate; lower prefix_len or use split: midpoint")
    return attacked


def exposed_canaries(canaries: list[Canary], cfg: ExtractionConfig) -> list[Canary]:
    """The canaries whose exposure is measured, in order: those with a secret, when `extraction.exposure`."""
    return [c for c in canaries if cfg.exposure and c.secret is not None]


def extract_model(name: str, bank: AdapterBank, targets: pd.DataFrame, prompts: dict[str, Prompt | None],
                  decodings: list[Decoding], cfg: ExtractionConfig, tokenizer, ppl_base: dict[str, float],
                  base_generations: dict[str, pd.DataFrame], progress: Progress | None,
                  canaries: list[Canary] = (), base_exposure: dict[str, dict] | None = None,
                  name_canaries: bool = False) -> tuple[pd.DataFrame, list[dict]]:
    """Prompted-prefix extraction by the model attached to `bank` as `name` on `targets` (select_targets'
    frame), with the base model's control (`ppl_base`, `base_generations`: base_control's) and the exposure of
    each canary that has a secret (with `extraction.exposure`) under both models; `base_exposure` caches the
    base model's by canary across models. Returns (one row per model, record and decoding; exposure rows: under
    the model then the base, for each of :func:`exposed_canaries` in order, with its `canary_id` when
    `name_canaries`)."""
    pad = tokenizer.pad_token_id
    attacked = [prompts[t] for t in dict.fromkeys(targets.text) if prompts[t] is not None]
    secret = exposed_canaries(canaries, cfg)
    pools = {c.text: draw_candidates(c.secret_format, c.secret, cfg.exposure_candidates, cfg.seed) for c in secret}
    kwargs = dict(n_candidates=cfg.exposure_candidates, seed=cfg.seed, batch_size=cfg.batch_size, pad_token_id=pad)
    with torch.inference_mode(), bank.use(name) as model:
        ppl_ft = full_ppl(model, attacked, pad, cfg.batch_size)
        ft_generations = generate_all(model, attacked, decodings, cfg, tokenizer, progress, name)
        exposed = [measure_exposure(model, tokenizer, c, candidates=pools[c.text], **kwargs).to_dict() for c in secret]
    base_exposure = {} if base_exposure is None else base_exposure
    exposure_rows = []
    for canary, finetuned in zip(secret, exposed):
        key = f"{canary.text}\x00{canary.copies}"
        if key not in base_exposure:
            with torch.inference_mode(), bank.use(None) as model:
                base_exposure[key] = measure_exposure(model, tokenizer, canary, candidates=pools[canary.text],
                                                      **kwargs).to_dict()
        named = {"canary_id": canary.sample_id} if name_canaries else {}
        exposure_rows += [{"run_id": name, "model": "finetuned", **finetuned, **named},
                          {"run_id": name, "model": "base", **base_exposure[key], **named}]
    rows = pd.concat([
        score_rows(name, "finetuned", targets, prompts, ft_generations, ppl_base, ppl_ft, tokenizer, cfg),
        score_rows(name, "base", targets, prompts, base_generations, ppl_base, ppl_ft, tokenizer, cfg),
    ], ignore_index=True)
    return rows, exposure_rows


# ------------------------------------------------------------------------------------------- stage
def _merge_study_files(layout: StudyLayout) -> None:
    for run_name, study_name in ((RunFile.EXTRACTION, StudyFile.EXTRACTION), (RunFile.EXPOSURE, StudyFile.EXPOSURE)):
        parts = [pd.read_parquet(layout.run_file(r, run_name)) for r in layout.runs_with(run_name)]
        if parts:
            atomic_write_parquet(layout.study_level(study_name), pd.concat(parts, ignore_index=True))


def merge_study(ctx: StudyContext) -> None:
    """Rebuild the study-level extraction/exposure files and upsert every finished run's rows into
    results.parquet from the per-run files (idempotent; closes the gap left by a process killed between
    writing its per-run files and merging them)."""
    layout = ctx.layout
    with write_lock(layout.root):
        _merge_study_files(layout)
        parts = []
        for run_id in layout.runs_with(RunFile.EXTRACTION_RESULTS):
            if run_id not in ctx.cells or TrainRecord.read(layout.run_file(run_id, RunFile.TRAIN)) is None:
                continue  # not a run of this study, or a damaged one (its cell fails, naming the file)
            exposure = layout.run_file(run_id, RunFile.EXPOSURE)
            meta = run_metadata(layout, run_id, ctx.cells[run_id], ctx.study)
            parts.append(extraction_result_rows(meta,
                                                pd.read_parquet(layout.run_file(run_id, RunFile.EXTRACTION_RESULTS)),
                                                pd.read_parquet(exposure) if exposure.exists() else None))
        if parts:
            upsert_results(layout, pd.concat(parts, ignore_index=True))


def extraction_result_rows(meta: dict, results: pd.DataFrame, exposure: pd.DataFrame | None) -> pd.DataFrame:
    """The results.parquet rows of one run's extraction (and exposure) results; `meta` its identifying columns.
    An exposure row with a `canary_id` (a model audited with several canaries) is named `exposure@<canary_id>`."""
    rows = []
    for rec in results.to_dict("records"):
        suffix = "" if rec["model"] == "finetuned" else ":base"
        rec = {k: v for k, v in rec.items() if k not in ("run_id", "model")}
        rows.append({**meta, "stage": "extraction",
                     "attack": f"extract:{rec['decoding']}:{rec['group']}{suffix}", **rec})
    if exposure is not None:
        for rec in exposure.to_dict("records"):
            suffix = "" if rec["model"] == "finetuned" else ":base"
            rec = {k: v for k, v in rec.items() if k not in ("run_id", "model")}
            canary = f"@{rec['canary_id']}" if rec.get("canary_id") else ""
            rows.append({**meta, "stage": "exposure", "attack": f"exposure{canary}{suffix}", **rec})
    return pd.DataFrame(rows)


@dataclass
class Extraction:
    """What extraction measured of one subject: `rows` (extraction.parquet: one per model, record and decoding),
    `results` (extraction_results.parquet: rates per model, decoding and group), `exposure` (exposure.parquet: its
    canaries' exposure under the model and the base model; None when none has a secret) and `result_rows` (their
    results.parquet rows)."""

    rows: pd.DataFrame
    results: pd.DataFrame
    exposure: pd.DataFrame | None
    result_rows: pd.DataFrame


def extract_subjects(layout: StudyLayout, study: StudyConfig, bank: AdapterBank, subjects: Iterable[Subject],
                     tokenizer, progress: Progress | None,
                     attach: Callable[[Subject], None] = lambda subject: None
                     ) -> Iterator[tuple[Subject, Extraction]]:
    """Prompted-prefix extraction and canary exposure of each subject, the model attached to `bank` as its name
    (`attach(subject)` attaches it first, when given): its targets (:func:`select_targets`), their prompts, the
    base model's control (cached in `layout`'s cache across subjects and processes), then each subject's
    generations, rates and exposure. The one extraction unit of the study and `memlens audit`."""
    cfg = study.extraction
    decodings = resolve_decodings(cfg)
    subjects = list(subjects)
    targets = {s.name: select_targets(s.members, s.non_members, cfg) for s in subjects}
    prompts = build_prompts(sorted({t for frame in targets.values() for t in frame.text}), tokenizer, cfg)
    ppl_base, base_generations = base_control(layout, study, bank, attackable(prompts, cfg), decodings, tokenizer,
                                              progress)
    base_exposure: dict[str, dict] = {}
    for subject in subjects:
        attach(subject)
        rows, exposure_rows = extract_model(subject.name, bank, targets[subject.name], prompts, decodings, cfg,
                                            tokenizer, ppl_base, base_generations, progress, subject.secrets,
                                            base_exposure, name_canaries=subject.name_canaries)
        results = aggregate(rows, targets[subject.name], prompts, cfg)
        exposure = pd.DataFrame(exposure_rows) if exposure_rows else None
        yield subject, Extraction(rows, results, exposure, extraction_result_rows(subject.meta, results, exposure))


def run_extraction(ctx: StudyContext, cells: list[CellConfig] | None = None, force: bool = False) -> pd.DataFrame:
    """Extraction (and exposure, for secrets) on the finished runs of `cells` (default: every run of the study)
    lacking their per-run outputs (all of them with `force`), each run a :class:`Subject`
    (:func:`~memlens.attacks.subject.study_subject`) measured by :func:`extract_subjects`, with one base model and the
    runs' adapters switched on it. Writes the per-run files, merges the study-level files and upserts
    `<out>/results.parquet`; returns the upserted rows."""
    study, layout = ctx.study, ctx.layout
    if not study.extraction.enabled:
        return pd.DataFrame()
    todo = ctx.pending(RunFile.EXTRACTION_RESULTS, cells, force)
    if not todo:
        with write_lock(layout.root):
            _merge_study_files(layout)
        return pd.DataFrame()
    resolve_decodings(study.extraction)  # bad decodings refused before the base model loads
    bank = AdapterBank(load_base_model(study.model, resolve_device(study.model.device)))
    subjects = [study_subject(ctx, run_id, cell) for run_id, cell in todo]
    upserted = []
    with Progress(TextColumn("[bold]extract"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}"), disable=not ctx.show_progress,
                  console=Console(stderr=True)) as progress:
        runs_task = progress.add_task("runs", total=len(todo))
        for subject, measured in extract_subjects(layout, study, bank, subjects, ctx.tokenizer(), progress,
                                                  attach=lambda s: bank.add(s.name, layout.run_dir(s.name))):
            run_dir = layout.run_dir(subject.name)
            atomic_write_parquet(run_dir / RunFile.EXTRACTION, measured.rows)
            if measured.exposure is not None:
                atomic_write_parquet(run_dir / RunFile.EXPOSURE, measured.exposure)
            else:
                (run_dir / RunFile.EXPOSURE).unlink(missing_ok=True)  # stale from an earlier configuration
            atomic_write_parquet(run_dir / RunFile.EXTRACTION_RESULTS, measured.results)  # last: marks the run done
            with write_lock(layout.root):  # several workers of one study may finish at once
                upsert_results(layout, measured.result_rows)
            upserted.append(measured.result_rows)
            progress.advance(runs_task)
    with write_lock(layout.root):
        _merge_study_files(layout)
    return pd.concat(upserted, ignore_index=True)
