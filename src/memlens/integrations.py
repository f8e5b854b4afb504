"""memlens inside someone else's training loop: :class:`MemlensCallback`, a `transformers.TrainerCallback` that
measures membership leakage of the model being trained, as it trains.

    trainer = Trainer(model=model, args=args, train_dataset=train,
                      callbacks=[MemlensCallback(members=held_in, non_members=held_out, every="epoch",
                                                 stop_above=0.75)])

At each evaluation (every epoch, or every N optimizer steps) it scores a seeded sample of the members and
non-members (`max_records` a side, the same sample every time) with the model being trained (put in eval mode, no
copy, training mode restored; no gradient), and, when an attack needs it, the base model's scores as the
reference of the ratio attacks: a PEFT model's base through `disable_adapter` (frozen during LoRA training, so
scored once, when training begins), else the model itself as it was when training began. It runs the study's
attacks on these statistics (:mod:`memlens.attacks.registry`) and adds to the Trainer's logs, so `report_to`
carries them to TensorBoard or W&B: `memlens/auc` and `memlens/tpr_at_<fpr>_fpr` (the headline attack's, by the
study's and the audit's one rule, :func:`~memlens.attacks.registry.headline_attack`: `ref_ratio` with the default
attacks, `loss` without a reference; its name is :attr:`MemlensCallback.headline`), `memlens/auc/<attack>` for
each attack, and `memlens/canary_exposure` (mean over the inserted canaries with a secret;
`memlens/canary_exposure/<id>` each when there are several). A TPR at an FPR is logged only where the scored
non-members can estimate it (1 / FPR of them: `tpr_at_10pct_fpr` with the default 50, `tpr_at_1pct_fpr` from
100); what is not logged is said once, when the callback is made. Canaries are read as `memlens audit --canaries`
reads them (:mod:`memlens.data.user_canaries`: a file, memaudit's manifest, or records in memory): inserted ones and
their held-out twins (`inserted: false`) kept apart; exposure is over the inserted ones only, and with held-out
twins the headline attack's `memlens/canary_auc` and `memlens/canary_tpr_at_<fpr>_fpr` (the audit's detection
rule, :func:`~memlens.attacks.canary_metrics.detection_rate`) compare the two. Scoring is the study's (its stride
and batch budget), each text cut to `max_length` tokens when given, as the training records were (exposure ranks
the canary's whole text). With `stop_above`, training stops once the headline
AUC is above it. When training begins it writes the Trainer's recipe as `memlens-recipe.json` in `output_dir`
(:func:`memlens.config.recipe.recipe_document`), which `memlens audit` reads for its reference models.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from memlens.attacks.canary_metrics import detection_rate, held_out_needed
from memlens.attacks.exposure import draw_candidates, measure_exposure
from memlens.attacks.registry import AttackInputs, ConfiguredAttack, check_available, headline_attack, run_attacks
from memlens.config import RECIPE_FILE, AttackSpec, ConfigError, MIAConfig
from memlens.config.recipe import LORA_FIELDS, recipe_document
from memlens.data import Canary, canary_from_record, read_records, refuse_shared_texts
from memlens.data.user_canaries import COLUMNS as CANARY_COLUMNS
from memlens.data.user_canaries import CanaryFile, canaries_of_records, read_canaries
from memlens.metrics.roc import FPR_POINTS, auc, membership_metrics
from memlens.models.loading import quiet_bitsandbytes_import
from memlens.score import SequenceStats, token_stats
from memlens.store import atomic_write_json

with quiet_bitsandbytes_import():  # transformers' trainer modules import PEFT, which imports bitsandbytes
    from transformers import TrainerCallback
    from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback

log = logging.getLogger(__name__)

DEFAULT_ATTACKS = ("loss", "ref_ratio", "ref_llr", "zlib", "min_k")  # one pass each way; no extra vocabulary work
# The attack inputs the callback computes: the base model's scores and, for the attacks that read them, the moments
# of log p under the model's and the base's predicted distributions (an extra vocabulary-sized pass each).
CALLBACK_NEEDS = frozenset({"ref", "moments", "ref_moments"})
BASE_NEEDS = frozenset({"ref", "ref_moments"})  # what needs the base model
# Members and non-members scored at each evaluation, each: 100 records cost ~7% of an epoch of 300 training records
# (benchmarks/callback_cost.py: a scored record costs ~0.18 of a training record's time)
DEFAULT_MAX_RECORDS = 50
PREFIX = "memlens"
WHERE = "MemlensCallback(attacks=...)"
CANARIES = "MemlensCallback(canaries=...)"


def _names(what: str) -> dict[str, str]:
    """The study fields data loading names, as this callback's arguments."""
    return {"data.source": f"MemlensCallback({what}s=...)", "data.text_field": "MemlensCallback(text_field=...)",
            "data.id_field": "the file's `id` column", "data.group": "groups"}


def _texts(records, what: str, text_field: str) -> list[str]:
    """Texts from a list of strings, a frame with a text column, or a file / hub split (memlens' readers)."""
    if isinstance(records, (str, Path)):
        return read_records(str(records), what=what, text_field=text_field, names=_names(what)).text.tolist()
    if isinstance(records, pd.DataFrame):
        column = text_field if text_field in records else "text"
        if column not in records:
            raise ConfigError(f"{what}s: the frame has no {text_field!r} column; it has {list(records.columns)}")
        return records[column].astype(str).tolist()
    texts = [str(t) for t in records]
    if not texts:
        raise ConfigError(f"{what}s: no records")
    return texts


def _canaries(records, text_field: str) -> CanaryFile | None:
    """The canaries as `memlens audit --canaries` reads them (:mod:`memlens.data.user_canaries`): a file of records
    or memaudit's manifest (its folder or the file), or records in memory (a frame or a list of dicts with the
    file's columns: text, optional id, inserted, copies, secret, secret_format); inserted and held-out twins."""
    if records is None:
        return None
    if isinstance(records, (str, Path)):
        return read_canaries(str(records), text_field=text_field, field_name=CANARIES, names=_names("canarie"))
    return canaries_of_records(records, text_field=text_field, field_name=CANARIES)


def callback_attacks(attacks: Sequence[str | AttackSpec | dict]) -> list[ConfiguredAttack]:
    """`attacks` configured, refused before training when one is unknown, needs an input a callback cannot give
    (reference adapters, a reference corpus, a prefix of known non-members...) or has bad settings: the registry's
    check (:func:`~memlens.attacks.registry.check_available`) with the inputs a callback has."""
    return check_available(attacks, CALLBACK_NEEDS, WHERE, "a callback inside training",
                           "memlens audit runs the others on the saved model")


def _sample(texts: list[str], at_most: int | None, seed: int, side: int) -> list[str]:
    """At most `at_most` of `texts`, a seeded sample kept in the given order (all of them when fewer)."""
    if at_most is None or len(texts) <= at_most:
        return texts
    keep = np.sort(np.random.default_rng([seed, side]).choice(len(texts), at_most, replace=False))
    return [texts[i] for i in keep]


def _pad_id(tokenizer) -> int:
    """An id to pad batches with, without setting one on the caller's tokenizer: padded positions are masked out
    and never scored, so any id gives the same statistics."""
    for pad in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if pad is not None:
            return int(pad)
    return 0


def _lora_settings(model) -> dict | None:
    """The active LoRA adapter's settings (:data:`~memlens.config.recipe.LORA_FIELDS`), JSON-able; None for a model
    without a LoRA adapter."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        return None
    active = getattr(model, "active_adapter", None)
    active = active[0] if isinstance(active, (list, tuple)) and active else active
    config = configs.get(active) or next(iter(configs.values()))
    if str(getattr(config, "peft_type", "")).upper().rpartition(".")[2] != "LORA":
        return None
    values = {name: getattr(config, name, None) for name in LORA_FIELDS}
    modules = values["target_modules"]
    values["target_modules"] = sorted(modules) if isinstance(modules, (set, list, tuple)) else modules
    return values


class MemlensCallback(TrainerCallback):
    """Membership leakage of the model being trained, logged as it trains (see the module's docstring).

    `members` / `non_members`: training records and held-out records of the same distribution (lists of texts,
    frames with a text column, or files / `hub:NAME:SPLIT` as `memlens audit` reads them; a text in both is
    refused, as the audit refuses it); `canaries`: canaries as `memlens audit --canaries` reads them (a file, memaudit's
    manifest or its folder, a frame or a list of dicts: text, optional `id`, `inserted` (false: a held-out twin,
    never trained on), `copies`, `secret`, `secret_format`): exposure of the inserted ones with a secret, detection of
    the inserted ones against the held-out ones; `every`: `"epoch"` or a number of optimizer steps;
    `max_records`: members and non-members scored at each evaluation, each (a sample seeded by `seed`, the same at
    every evaluation; `None`: all); `stop_above`: stop training once the headline AUC is above it; `attacks`: those
    a callback can feed (checked here, before any training); `tokenizer`: the Trainer's `processing_class` by
    default (left as it is: no pad token is set on it); `max_length`: the length the training records were cut to,
    if they were: the scored texts are cut to it too (and it is written to the recipe); `write_recipe`: write
    `memlens-recipe.json` in `output_dir` when training begins. `seconds` holds the wall time of each evaluation,
    `reference_seconds` that of the base model's scores (once, when training begins), `history` each evaluation's
    metrics; all three start over with every training.
    """

    def __init__(self, members, non_members, canaries=None, *, every: str | int = "epoch",
                 max_records: int | None = DEFAULT_MAX_RECORDS, stop_above: float | None = None, tokenizer=None,
                 text_field: str = "text", attacks: Sequence[str | AttackSpec | dict] = DEFAULT_ATTACKS,
                 batch_size: int = 32, exposure_candidates: int = 1000, seed: int = 0, max_length: int | None = None,
                 write_recipe: bool = True):
        if every != "epoch" and not (isinstance(every, int) and every >= 1):
            raise ConfigError(f"every: {every!r}; give \"epoch\" or a number of optimizer steps >= 1")
        if max_records is not None and not (isinstance(max_records, int) and max_records >= 2):
            raise ConfigError(f"max_records: {max_records!r}; give a number of records a side >= 2, or None for all")
        self.attacks = callback_attacks(attacks)
        members = _texts(members, "member", text_field)
        non_members = _texts(non_members, "non_member", text_field)
        refuse_shared_texts(members, non_members, "members", "non-members", where="MemlensCallback")
        self.canary_file = _canaries(canaries, text_field)
        frame = self.canary_file.frame if self.canary_file is not None else pd.DataFrame(columns=CANARY_COLUMNS)
        inserted, held_out = frame[frame.inserted.astype(bool)], frame[~frame.inserted.astype(bool)]
        refuse_shared_texts(inserted.text.tolist(), non_members, "canaries", "non-members", where="MemlensCallback")
        refuse_shared_texts(held_out.text.tolist(), members, "held-out canaries", "members", where="MemlensCallback")
        # exposure: the inserted canaries with a secret, only (a held-out twin was never trained on)
        self.canaries: list[Canary] = [
            canary_from_record(row, f"canary {row.sample_id!r}", field=CANARIES)
            for _, row in inserted.rename(columns={"canary_id": "sample_id"}).iterrows() if row.secret is not None]
        without = inserted.canary_id[inserted.secret.isna()].tolist()
        if without and held_out.empty:  # they would have no effect
            raise ConfigError(f"canaries: {without} have no `secret` and no canary is held out: exposure ranks a "
                              "canary's secret among random ones of its format (give each a secret, a substring of "
                              "its text), and detection compares inserted canaries with held-out twins (`inserted: "
                              "false`); with neither, nothing can be measured of them")
        # detection: the inserted canaries against their held-out twins, scored beside the records
        self.canary_texts = frame.text.tolist() if len(held_out) else []
        self.canary_labels = frame.inserted.to_numpy(bool) if len(held_out) else np.zeros(0, bool)
        self.members = _sample(members, max_records, seed, 0)
        self.non_members = _sample(non_members, max_records, seed, 1)
        self.every, self.max_records, self.stop_above = every, max_records, stop_above
        self.batch_size, self.exposure_candidates, self.seed = batch_size, exposure_candidates, seed
        self.max_length, self.write_recipe = max_length, write_recipe
        self.fpr_points = {name: fpr for name, fpr in FPR_POINTS.items() if len(self.non_members) >= round(1 / fpr)}
        self.canary_fpr_points = {name: fpr for name, fpr in FPR_POINTS.items()
                                  if len(held_out) >= held_out_needed(fpr)}
        self._say_what_is_not_logged(len(held_out))
        self._given_tokenizer = self.tokenizer = tokenizer
        self.labels = np.r_[np.ones(len(self.members), bool), np.zeros(len(self.non_members), bool)]
        self._base_needed = any(a.needs & BASE_NEEDS for a in self.attacks)
        self._pools: dict[str, tuple[list[str], bool]] = {}  # exposure candidates: a function of the seed only
        self._handler = None  # the CallbackHandler this callback took its place in
        self._start_over()

    def _start_over(self) -> None:
        """Forget what a previous training measured (a callback reused for another training starts clean)."""
        self.seconds: list[float] = []  # wall time of each evaluation
        self.reference_seconds = 0.0  # wall time of the base model's scores, before the first step
        self.history: list[dict[str, float]] = []  # every evaluation's metrics, with its step
        self.headline: str | None = None  # the attack of memlens/auc (headline_attack of those that ran)
        self._ids: list[list[int]] | None = None
        self._reference: SequenceStats | None = None
        self._no_reference: str | None = None
        self._pending: dict[str, float] = {}

    def _say_what_is_not_logged(self, n_held_out: int) -> None:
        """Once, when the callback is made: the TPRs its records cannot estimate are not logged (a TPR at an FPR
        needs 1 / FPR non-members; at the canaries', 1 / FPR - 1 held-out twins)."""
        missing = [f"{PREFIX}/tpr_at_{name}_fpr (needs {round(1 / fpr)} non-members)"
                   for name, fpr in FPR_POINTS.items() if name not in self.fpr_points]
        if n_held_out:
            missing += [f"{PREFIX}/canary_tpr_at_{name}_fpr (needs {held_out_needed(fpr)} held-out canaries)"
                        for name, fpr in FPR_POINTS.items() if name not in self.canary_fpr_points]
        if missing:
            log.warning("MemlensCallback: %d non-members%s scored at each evaluation: not logged: %s (raise "
                        "max_records, or None for all)", len(self.non_members),
                        f" and {n_held_out} held-out canaries" if n_held_out else "", "; ".join(missing))

    # ------------------------------------------------------------------------------------- placement
    def _before_reporters(self) -> None:
        """Move this callback right after the Trainer's DefaultFlowCallback. transformers calls callbacks in order,
        those of `report_to` (TensorBoard, W&B...) before the ones given to `Trainer(callbacks=...)`, and gives a
        callback no handle on the others: so that the reporters' `on_log` sees the metrics this one adds to the
        logs, it takes its place before them from the handler that calls it (the caller's frame), once per
        handler (a callback reused in another Trainer moves again). Moving an item backwards in the list being
        iterated skips and repeats nothing."""
        handler = sys._getframe(2).f_locals.get("self")  # this method <- an event method <- CallbackHandler.call_event
        if handler is self._handler or (self._handler is not None and not isinstance(handler, CallbackHandler)):
            return  # placed in this handler, or called through a subclass's override after being placed
        if isinstance(handler, CallbackHandler) and self in handler.callbacks:
            callbacks = handler.callbacks
            callbacks.remove(self)
            flow = [i for i, c in enumerate(callbacks) if isinstance(c, DefaultFlowCallback)]
            callbacks.insert(flow[-1] + 1 if flow else 0, self)
            self._handler = handler
        else:
            log.warning("MemlensCallback: could not find the Trainer's callback handler; memlens metrics go to "
                        "trainer.state.log_history but may not reach the report_to integrations")

    def on_init_end(self, args, state, control, **kwargs):
        self._before_reporters()

    # ------------------------------------------------------------------------------------- scoring
    def _tokenize(self, tokenizer) -> list[list[int]]:
        """Token ids of the members, the non-members and the canaries scored for detection, cut to `max_length`
        tokens when given (as the training records were)."""
        if self._ids is None:
            cut = {"truncation": True, "max_length": self.max_length} if self.max_length else {}
            self._ids = tokenizer(self.members + self.non_members + self.canary_texts, add_special_tokens=True,
                                  **cut)["input_ids"]
        return self._ids

    def _score(self, model: torch.nn.Module, tokenizer, moments: bool) -> SequenceStats:
        """Statistics of every scored text, as the study scores them (its stride and batch budget)."""
        device = next(model.parameters()).device
        settings = MIAConfig()
        return token_stats(model, self._tokenize(tokenizer), batch_size=self.batch_size,
                           pad_token_id=_pad_id(tokenizer), moments=moments, stride=settings.stride,
                           max_batch_tokens=settings.batch_token_budget(device))

    def _needs(self, need: str) -> bool:
        return any(need in a.needs for a in self.attacks)

    def _reference_stats(self, model: torch.nn.Module, tokenizer, global_step: int) -> SequenceStats | None:
        """The base model's statistics, when an attack reads them: a PEFT model's with its adapters disabled (once:
        LoRA leaves the base frozen), else the model's own before its first step (None when training resumed past
        it)."""
        if not self._base_needed or self._reference is not None or self._no_reference is not None:
            return self._reference
        moments = self._needs("ref_moments")
        if hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                self._reference = self._score(model, tokenizer, moments)
        elif global_step == 0:
            self._reference = self._score(model, tokenizer, moments)
        else:
            self._no_reference = (f"training resumed at step {global_step}: the model as it was before "
                                  "fine-tuning is gone, so the attacks reading the base model have no reference")
            skipped = [a.name for a in self.attacks if a.needs & BASE_NEEDS]
            log.warning("MemlensCallback: %s; %s are not logged", self._no_reference, skipped)
        return self._reference

    def _exposure(self, model, tokenizer) -> dict[str, float]:
        values = {}
        for canary in self.canaries:
            if canary.text not in self._pools:
                self._pools[canary.text] = draw_candidates(canary.secret_format, canary.secret,
                                                           self.exposure_candidates, self.seed)
            result = measure_exposure(model, tokenizer, canary, n_candidates=self.exposure_candidates, seed=self.seed,
                                      batch_size=self.batch_size, pad_token_id=_pad_id(tokenizer),
                                      candidates=self._pools[canary.text])
            values[canary.sample_id] = result.bits  # the one definition of exposure (exposure_bits)
        return values

    def _metrics(self, scores: dict[str, np.ndarray]) -> dict[str, float]:
        """The logged metrics of the attacks' scores (attack -> (texts,): the members, the non-members, then the
        canaries scored for detection): each attack's AUC, the headline attack's AUC and the TPRs its non-members
        can estimate; with held-out canaries, the headline attack's canary AUC and detection rates."""
        metrics: dict[str, float] = {}
        headline = headline_attack(list(scores))
        if headline != self.headline and self.headline is not None:
            log.warning("MemlensCallback: memlens/auc is now %s's (it was %s's)", headline, self.headline)
        self.headline = headline
        n = len(self.labels)
        for name, values in scores.items():
            row = membership_metrics(self.labels, values[:n], n_bootstrap=0)
            metrics[f"{PREFIX}/auc/{name}"] = row["auc"]
            if name != headline:
                continue
            metrics[f"{PREFIX}/auc"] = row["auc"]
            metrics.update({f"{PREFIX}/tpr_at_{point}_fpr": row[f"tpr_at_{point}_fpr"] for point in self.fpr_points})
            if self.canary_texts:
                canary = values[n:]
                metrics[f"{PREFIX}/canary_auc"] = auc(self.canary_labels, canary)
                for point, fpr in self.canary_fpr_points.items():
                    rate = detection_rate(canary[self.canary_labels], canary[~self.canary_labels], fpr)
                    metrics[f"{PREFIX}/canary_tpr_at_{point}_fpr"] = rate["tpr"]
        return metrics

    def evaluate(self, model: torch.nn.Module, tokenizer, global_step: int = 0) -> dict[str, float]:
        """Score the held-out sets with `model` (eval mode, training mode restored) and return the metrics, keyed
        as logged."""
        start = time.perf_counter()
        training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                reference = self._reference_stats(model, tokenizer, global_step)
                stats = self._score(model, tokenizer, self._needs("moments"))
                exposure = self._exposure(model, tokenizer) if self.canaries else {}
        finally:
            model.train(training)
        attacks = [a for a in self.attacks if reference is not None or not a.needs & BASE_NEEDS]
        texts = self.members + self.non_members + self.canary_texts
        scores = run_attacks(attacks, AttackInputs(texts=texts, ft=stats, ref=reference))
        metrics = self._metrics(scores)
        if exposure:
            metrics[f"{PREFIX}/canary_exposure"] = float(np.mean(list(exposure.values())))
            if len(exposure) > 1:
                metrics.update({f"{PREFIX}/canary_exposure/{k}": v for k, v in exposure.items()})
        self.seconds.append(time.perf_counter() - start)
        self.history.append({"step": global_step, **metrics})
        return metrics

    # ------------------------------------------------------------------------------------- the recipe
    def _write_recipe(self, args, state, model, train_dataloader) -> None:
        """`memlens-recipe.json` in the Trainer's output_dir: its training settings, the LoRA settings, the max
        length and the number of training records (JSON only), for `memlens audit --train-config`."""
        if not self.write_recipe or not getattr(args, "output_dir", None) or not state.is_world_process_zero:
            return
        try:
            records = len(train_dataloader.dataset) if train_dataloader is not None else None
        except TypeError:  # an iterable dataset
            records = None
        document = recipe_document(args, lora=_lora_settings(model), max_length=self.max_length,
                                   train_records=records, total_steps=state.max_steps or None)
        path = Path(args.output_dir) / RECIPE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, document)

    # ------------------------------------------------------------------------------------- events
    def _due(self, state) -> bool:
        if self.every == "epoch":  # the last step of an epoch sets state.epoch to a whole number
            return state.epoch is not None and state.epoch > 0 and abs(state.epoch - round(state.epoch)) < 1e-9
        return state.global_step > 0 and state.global_step % self.every == 0

    def on_train_begin(self, args, state, control, model=None, processing_class=None, train_dataloader=None,
                       **kwargs):
        start = time.perf_counter()
        self._before_reporters()
        self._start_over()
        self.tokenizer = self._given_tokenizer or processing_class
        if self.tokenizer is None:
            raise ConfigError("MemlensCallback needs a tokenizer: give Trainer(processing_class=tokenizer) or "
                              "MemlensCallback(tokenizer=...)")
        self._write_recipe(args, state, model, train_dataloader)
        # the reference, before the first step: a one-off cost, outside every epoch
        was = model.training
        model.eval()
        try:
            with torch.inference_mode():
                self._reference_stats(model, self.tokenizer, state.global_step)
        finally:
            model.train(was)
        self.reference_seconds = time.perf_counter() - start

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not self._due(state):
            return control
        metrics = self.evaluate(model, self.tokenizer, state.global_step)
        self._pending.update(metrics)
        control.should_log = True  # logged right after this step, in the Trainer's logs
        auc = metrics.get(f"{PREFIX}/auc", math.nan)
        if self.stop_above is not None and auc > self.stop_above:
            log.warning("MemlensCallback: membership AUC %.3f (%s) is above stop_above %.3f at step %d: stopping "
                        "training", auc, self.headline, self.stop_above, state.global_step)
            control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending and logs is not None:
            logs.update(self._pending)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(self._pending)  # Trainer.log appended its copy before this event
            self._pending = {}


__all__ = ["DEFAULT_ATTACKS", "DEFAULT_MAX_RECORDS", "MemlensCallback", "callback_attacks"]
