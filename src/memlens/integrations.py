"""memlens inside someone else's training loop: :class:`MemlensCallback`, a `transformers.TrainerCallback` that
measures membership leakage of the model being trained, as it trains.

    trainer = Trainer(model=model, args=args, train_dataset=train,
                      callbacks=[MemlensCallback(members=held_in, non_members=held_out, every="epoch",
                                                 stop_above=0.75)])

At each evaluation (every epoch, or every N optimizer steps) it scores the members and non-members with the model
being trained (put in eval mode, no copy, training mode restored; no gradient), and the base model's scores as
the reference of the ratio attacks: a PEFT model's base through `disable_adapter` (frozen during LoRA training,
so scored once, when training begins), else the model itself as it was when training began. It runs the study's attacks on these
statistics (:mod:`memlens.attacks.registry`) and adds to the Trainer's logs, so `report_to` carries them to
TensorBoard or W&B: `memlens/auc` and `memlens/tpr_at_1pct_fpr` (the primary attack, `ref_ratio`; `loss` without
a reference), `memlens/auc/<attack>` for each attack, and `memlens/canary_exposure` (mean over the canaries with a
secret; `memlens/canary_exposure/<id>` each when there are several). With `stop_above`, training stops once the
primary AUC is above it.
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

from memlens.attacks.exposure import draw_candidates, measure_exposure
from memlens.attacks.registry import AttackInputs, run_attacks
from memlens.config import ConfigError, MIAConfig
from memlens.data import Canary, canary_from_record, read_records
from memlens.metrics.roc import membership_metrics
from memlens.models.loading import quiet_bitsandbytes_import
from memlens.score import SequenceStats, token_stats

with quiet_bitsandbytes_import():  # transformers' trainer modules import PEFT, which imports bitsandbytes
    from transformers import TrainerCallback
    from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback

log = logging.getLogger(__name__)

PRIMARY = "ref_ratio"
WITHOUT_REFERENCE = "loss"
ATTACKS = ("loss", "ref_ratio", "ref_llr", "zlib", "min_k")  # one pass each way; no extra vocabulary work
PREFIX = "memlens"


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


def _canaries(records, text_field: str) -> list[Canary]:
    """Canaries from a file, a frame or a list of dicts (text, optional copies, secret, secret_format, id)."""
    if records is None:
        return []
    if isinstance(records, (str, Path)):
        frame = read_records(str(records), what="canary", text_field=text_field,
                             keep=("copies", "secret", "secret_format"), names=_names("canarie"))
    else:
        frame = pd.DataFrame(list(records) if not isinstance(records, pd.DataFrame) else records)
        frame = frame.rename(columns={text_field: "text", "id": "sample_id"})
        if "sample_id" not in frame:
            frame["sample_id"] = [f"canary-{i}" for i in range(len(frame))]
    return [canary_from_record(row, f"canary {row.sample_id!r}", field="MemlensCallback(canaries=...)")
            for _, row in frame.iterrows()]


class MemlensCallback(TrainerCallback):
    """Membership leakage of the model being trained, logged as it trains (see the module's docstring).

    `members` / `non_members`: training records and held-out records of the same distribution (lists of texts,
    frames with a text column, or files / `hub:NAME:SPLIT` as `memlens audit` reads them); `canaries`: records
    inserted in the training set with a `secret` (and optionally `secret_format`, `copies`, `id`) for exposure;
    `every`: `"epoch"` or a number of optimizer steps; `stop_above`: stop training once the primary AUC is above
    it. `tokenizer`: the Trainer's `processing_class` by default. `seconds` holds the wall time of each evaluation,
    `reference_seconds` that of the base model's scores (once, when training begins).
    """

    def __init__(self, members, non_members, canaries=None, *, every: str | int = "epoch",
                 stop_above: float | None = None, tokenizer=None, text_field: str = "text",
                 attacks: Sequence[str] = ATTACKS, batch_size: int = 32, exposure_candidates: int = 1000,
                 seed: int = 0):
        if every != "epoch" and not (isinstance(every, int) and every >= 1):
            raise ConfigError(f"every: {every!r}; give \"epoch\" or a number of optimizer steps >= 1")
        self.members = _texts(members, "member", text_field)
        self.non_members = _texts(non_members, "non_member", text_field)
        self.canaries = _canaries(canaries, text_field)
        without = [c.sample_id for c in self.canaries if c.secret is None]
        if without:
            raise ConfigError(f"canaries: {without} have no `secret`; exposure ranks a canary's secret among random "
                              "ones of its format: give each a secret (a substring of its text)")
        self.every, self.stop_above, self.tokenizer = every, stop_above, tokenizer
        self.attacks, self.batch_size = list(attacks), batch_size
        self.exposure_candidates, self.seed = exposure_candidates, seed
        self.labels = np.r_[np.ones(len(self.members), bool), np.zeros(len(self.non_members), bool)]
        self.seconds: list[float] = []  # wall time of each evaluation
        self.reference_seconds = 0.0  # wall time of the base model's scores, before the first step
        self.history: list[dict[str, float]] = []  # every evaluation's metrics, with its step
        self._ids: list[list[int]] | None = None
        self._reference: SequenceStats | None = None
        self._no_reference: str | None = None
        self._pools: dict[str, tuple[list[str], bool]] = {}
        self._pending: dict[str, float] = {}
        self._placed = False

    # ------------------------------------------------------------------------------------- placement
    def _before_reporters(self) -> None:
        """Move this callback right after the Trainer's DefaultFlowCallback. transformers calls callbacks in order,
        those of `report_to` (TensorBoard, W&B...) before the ones given to `Trainer(callbacks=...)`, and gives a
        callback no handle on the others: so that the reporters' `on_log` sees the metrics this one adds to the
        logs, it takes its place before them from the handler that calls it (the caller's frame). Moving an item
        backwards in the list being iterated skips and repeats nothing."""
        if self._placed:
            return
        handler = sys._getframe(2).f_locals.get("self")  # this method <- an event method <- CallbackHandler.call_event
        if isinstance(handler, CallbackHandler) and self in handler.callbacks:
            callbacks = handler.callbacks
            callbacks.remove(self)
            flow = [i for i, c in enumerate(callbacks) if isinstance(c, DefaultFlowCallback)]
            callbacks.insert(flow[-1] + 1 if flow else 0, self)
            self._placed = True
        else:
            log.warning("MemlensCallback: could not find the Trainer's callback handler; memlens metrics go to "
                        "trainer.state.log_history but may not reach the report_to integrations")

    def on_init_end(self, args, state, control, **kwargs):
        self._before_reporters()

    # ------------------------------------------------------------------------------------- scoring
    def _tokenize(self, tokenizer) -> list[list[int]]:
        if self._ids is None:
            self._ids = tokenizer(self.members + self.non_members, add_special_tokens=True)["input_ids"]
        return self._ids

    def _score(self, model: torch.nn.Module, tokenizer) -> SequenceStats:
        device = next(model.parameters()).device
        return token_stats(model, self._tokenize(tokenizer), batch_size=self.batch_size,
                           pad_token_id=tokenizer.pad_token_id, moments=False,
                           max_batch_tokens=MIAConfig().batch_token_budget(device))

    def _reference_stats(self, model: torch.nn.Module, tokenizer, global_step: int) -> SequenceStats | None:
        """The base model's statistics: a PEFT model's with its adapters disabled (once: LoRA leaves the base
        frozen), else the model's own before its first step (None when training resumed past it)."""
        if self._reference is None and self._no_reference is None:
            if hasattr(model, "disable_adapter"):
                with model.disable_adapter():
                    self._reference = self._score(model, tokenizer)
            elif global_step == 0:
                self._reference = self._score(model, tokenizer)
            else:
                self._no_reference = (f"training resumed at step {global_step}: the model as it was before "
                                      "fine-tuning is gone, so the ratio attacks have no reference")
                log.warning("MemlensCallback: %s; logging %s instead of %s", self._no_reference, WITHOUT_REFERENCE,
                            PRIMARY)
        return self._reference

    def _exposure(self, model, tokenizer) -> dict[str, float]:
        values = {}
        for canary in self.canaries:
            if canary.text not in self._pools:
                self._pools[canary.text] = draw_candidates(canary.secret_format, canary.secret,
                                                           self.exposure_candidates, self.seed)
            result = measure_exposure(model, tokenizer, canary, n_candidates=self.exposure_candidates, seed=self.seed,
                                      batch_size=self.batch_size, pad_token_id=tokenizer.pad_token_id,
                                      candidates=self._pools[canary.text])
            values[canary.sample_id] = result.exposure_rank
        return values

    def evaluate(self, model: torch.nn.Module, tokenizer, global_step: int = 0) -> dict[str, float]:
        """Score the held-out sets with `model` (eval mode, training mode restored) and return the metrics, keyed
        as logged."""
        start = time.perf_counter()
        training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                reference = self._reference_stats(model, tokenizer, global_step)
                stats = self._score(model, tokenizer)
                exposure = self._exposure(model, tokenizer) if self.canaries else {}
        finally:
            model.train(training)
        attacks = [a for a in self.attacks if reference is not None or a not in ("ref_ratio", "ref_llr")]
        texts = self.members + self.non_members
        scores = run_attacks(attacks, AttackInputs(texts=texts, ft=stats, ref=reference))
        metrics: dict[str, float] = {}
        primary = PRIMARY if PRIMARY in scores else WITHOUT_REFERENCE
        for name, values in scores.items():
            row = membership_metrics(self.labels, values, n_bootstrap=0)
            metrics[f"{PREFIX}/auc/{name}"] = row["auc"]
            if name == primary:
                metrics[f"{PREFIX}/auc"] = row["auc"]
                metrics[f"{PREFIX}/tpr_at_1pct_fpr"] = row["tpr_at_1pct_fpr"]
                if row["tpr_at_1pct_fpr_note"] and not self.seconds:
                    log.warning("MemlensCallback: TPR at 1%% FPR is NaN: it %s", row["tpr_at_1pct_fpr_note"])
        if exposure:
            metrics[f"{PREFIX}/canary_exposure"] = float(np.mean(list(exposure.values())))
            if len(exposure) > 1:
                metrics.update({f"{PREFIX}/canary_exposure/{k}": v for k, v in exposure.items()})
        self.seconds.append(time.perf_counter() - start)
        self.history.append({"step": global_step, **metrics})
        return metrics

    # ------------------------------------------------------------------------------------- events
    def _due(self, state) -> bool:
        if self.every == "epoch":  # the last step of an epoch sets state.epoch to a whole number
            return state.epoch is not None and state.epoch > 0 and abs(state.epoch - round(state.epoch)) < 1e-9
        return state.global_step > 0 and state.global_step % self.every == 0

    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        start = time.perf_counter()
        self._before_reporters()
        self.tokenizer = self.tokenizer or processing_class
        if self.tokenizer is None:
            raise ConfigError("MemlensCallback needs a tokenizer: give Trainer(processing_class=tokenizer) or "
                              "MemlensCallback(tokenizer=...)")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
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
            log.warning("MemlensCallback: membership AUC %.3f is above stop_above %.3f at step %d: stopping training",
                        auc, self.stop_above, state.global_step)
            control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending and logs is not None:
            logs.update(self._pending)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(self._pending)  # Trainer.log appended its copy before this event
            self._pending = {}


__all__ = ["MemlensCallback"]
