"""Training the learned attack (:mod:`memlens.attacks.learned`) on study folders whose members are known.

Every finished run of a study folder is one fine-tune with known members (its `members.parquet`, the canary left
out) and non-members (its design's): one scoring pass under its adapter and one of the base model per record draw
give each record's (tokens, F) feature sequence and its label. :func:`collect` gathers them, :func:`fit` trains
the classifier, :func:`train_weights` does both and writes the weights with their card (the records' text hashes
included), which is what `memlens learned-attack train` calls.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from memlens.attacks.learned import (
    FEATURES,
    SequenceClassifier,
    classify,
    pad_features,
    record_summary,
    save_weights,
    text_hash,
    token_features,
)
from memlens.attacks.mia import Scorer
from memlens.attacks.subject import study_subject
from memlens.config import ConfigError
from memlens.context import StudyContext
from memlens.score import SequenceStats

log = logging.getLogger(__name__)


@dataclass
class RunFeatures:
    """One fine-tune's records: labels (n,) (1 = member), their feature sequences flat (tokens, F) with (n + 1,)
    offsets, the texts' sha256, and `extra`: what the caller's `extra` function computed from the statistics (e.g.
    other attacks' (n,) scores)."""

    study: str
    run_id: str
    model: str
    cell: dict
    sample_ids: list[str]
    text_sha256: list[str]
    labels: np.ndarray
    flat: np.ndarray
    offsets: np.ndarray
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, keep: np.ndarray) -> RunFeatures:
        """The run's records where `keep` (n,) is True."""
        idx = np.flatnonzero(keep)
        starts, ends = self.offsets[idx], self.offsets[idx + 1]
        rows = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)]) if len(idx) else np.zeros(0, int)
        offsets = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)
        return RunFeatures(self.study, self.run_id, self.model, self.cell, [self.sample_ids[i] for i in idx],
                           [self.text_sha256[i] for i in idx], self.labels[idx], self.flat[rows], offsets,
                           {k: v[idx] for k, v in self.extra.items()})


def validation_split(parts: Sequence[RunFeatures], share: float, seed: int = 0
                     ) -> tuple[list[RunFeatures], list[RunFeatures]]:
    """(train, valid): `share` of the runs held out, on `share` of the texts (by hash, seeded); training keeps the
    other runs on the other texts. Both are held out because a record's text is recognisable from its base-model
    statistics and keeps its label in every run of its record draw: validating on the training texts would pick the
    epoch that memorised them. No validation (all runs kept whole) with fewer than 5 runs."""
    if len(parts) < 5 or share <= 0:
        return list(parts), []
    rng = np.random.default_rng(seed)
    held = set(rng.choice(len(parts), max(1, int(round(share * len(parts)))), replace=False).tolist())
    salt = str(seed).encode()

    def valid_text(h: str) -> bool:
        return int(hashlib.sha256(salt + h.encode()).hexdigest()[:8], 16) / 16 ** 8 < share

    train, valid = [], []
    for i, p in enumerate(parts):
        in_valid = np.array([valid_text(h) for h in p.text_sha256])
        (valid if i in held else train).append(p.subset(in_valid if i in held else ~in_valid))
    return train, valid


def collect(folders: Sequence[str | Path], *, runs: Callable[[str, dict], bool] | None = None,
            extra: Callable[[SequenceStats, SequenceStats, list[str]], dict[str, np.ndarray]] | None = None,
            on_run: Callable[[RunFeatures], None] | None = None) -> list[RunFeatures]:
    """The feature sequences of every finished run of the study `folders` (those `runs(run_id, cell)` keeps), its
    members (the canary left out) and its non-members. Reads the folders; writes nothing into them."""
    out = []
    for folder in folders:
        folder = Path(folder)
        ctx = StudyContext.of_folder(folder)
        pairs = [(r, c) for r, c in ctx.runs() if runs is None or runs(r, _cell_fields(c))]
        pairs = [(r, c) for r, c in pairs if (ctx.layout.run_dir(r) / "adapter").is_dir()]
        if not pairs:
            log.warning("%s: no finished run to learn from", folder)
            continue
        scorer = Scorer(ctx.study.model, ctx.study.mia, None)
        base: dict[tuple[str, ...], SequenceStats] = {}
        for run_id, cell in pairs:
            subject = study_subject(ctx, run_id, cell)
            members = subject.members[~subject.members.is_canary.astype(bool)] if "is_canary" in subject.members \
                else subject.members
            texts = members.text.tolist() + subject.non_members.text.tolist()
            ids = scorer.tokenize(texts)
            key = tuple(texts)
            if key not in base:
                with scorer.bank.use(None) as model:
                    base[key] = scorer.score(model, ids, "base")
            scorer.bank.add(run_id, ctx.layout.run_dir(run_id))
            with scorer.bank.use(run_id) as model:
                ft = scorer.score(model, ids, run_id)
            flat, offsets = token_features(ft, base[key])
            features = RunFeatures(
                study=str(folder), run_id=run_id, model=ctx.study.model.name_or_path, cell=_cell_fields(cell),
                sample_ids=members.sample_id.astype(str).tolist() + subject.non_members.sample_id.astype(str).tolist(),
                text_sha256=[text_hash(t) for t in texts],
                labels=np.r_[np.ones(len(members)), np.zeros(len(subject.non_members))].astype(np.int8),
                flat=flat, offsets=offsets, extra=extra(ft, base[key], texts) if extra else {})
            out.append(features)
            if on_run is not None:
                on_run(features)
    return out


def _cell_fields(cell) -> dict:
    return {"target_modules": list(cell.target_modules), "rank": cell.rank, "learning_rate": cell.learning_rate,
            "draw": cell.draw, "seed": cell.seed, "method": cell.method}


def stack(parts: Sequence[RunFeatures]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The records of `parts` together: flat (tokens, F), offsets (records + 1,), labels (records,)."""
    if not parts:
        raise ConfigError("no records to learn from: no finished run with an adapter in the study folders")
    flat = np.concatenate([p.flat for p in parts])
    shifts = np.cumsum([0] + [p.offsets[-1] for p in parts[:-1]])
    offsets = np.concatenate([[0]] + [p.offsets[1:] + s for p, s in zip(parts, shifts)]).astype(np.int64)
    return flat, offsets, np.concatenate([p.labels for p in parts]).astype(np.float32)


def fit(train: Sequence[RunFeatures], valid: Sequence[RunFeatures] = (), *, epochs: int = 12, hidden: int = 32,
        kernel: int = 5, lr: float = 3e-3, batch: int = 64, seed: int = 0, max_tokens: int = 512
        ) -> tuple[SequenceClassifier, dict]:
    """Train the classifier on the records of `train` (binary cross-entropy on the logit, Adam), keeping the epoch
    with the best AUC on `valid` (the last without). Records are cut to their first `max_tokens` tokens. Returns the
    model and a log {"epochs": [...], "best_epoch", "valid_auc"}."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    flat, offsets, labels = stack(train)
    model = SequenceClassifier(len(FEATURES), hidden, kernel)
    model.feature_mean.copy_(torch.from_numpy(flat.mean(0)))
    model.feature_std.copy_(torch.from_numpy(flat.std(0) + 1e-6))
    summary = record_summary(*pad_features(flat, offsets))
    model.summary_mean.copy_(summary.mean(0))
    model.summary_std.copy_(summary.std(0) + 1e-6)
    lengths = np.minimum(np.diff(offsets), max_tokens)
    cut = np.concatenate([[0], np.cumsum(lengths)])
    rows = np.concatenate([np.arange(offsets[i], offsets[i] + n) for i, n in enumerate(lengths)])
    flat, offsets = flat[rows], cut
    order = np.argsort(lengths + rng.random(len(lengths)), kind="stable")  # buckets of similar length
    batches = [order[i:i + batch] for i in range(0, len(order), batch)]
    padded = [(*pad_features(flat, offsets, b), torch.from_numpy(labels[b])) for b in batches]
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    valid_data = stack(valid) if valid else None
    history, best, best_state = [], -np.inf, None
    for epoch in range(epochs):
        model.train()
        total = 0.0
        for i in rng.permutation(len(padded)):
            x, mask, y = padded[i]
            optimizer.zero_grad()
            loss = loss_fn(model(x, mask), y)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(y)
        entry = {"epoch": epoch + 1, "train_loss": total / len(labels)}
        if valid_data is not None:
            scores = classify(model, valid_data[0], valid_data[1])
            ok = np.isfinite(scores)
            entry["valid_auc"] = float(roc_auc_score(valid_data[2][ok], scores[ok]))
            if entry["valid_auc"] > best:
                best, best_state = entry["valid_auc"], {k: v.clone() for k, v in model.state_dict().items()}
        history.append(entry)
        log.info("learned attack: %s", entry)
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    best_epoch = max(history, key=lambda e: e.get("valid_auc", -1))["epoch"] if valid_data is not None else epochs
    return model, {"epochs": history, "best_epoch": best_epoch, "valid_auc": None if valid_data is None else best}


def describe(parts: Sequence[RunFeatures]) -> dict:
    """What a set of runs is, for a card: studies, base models, configurations, records."""
    return {"studies": sorted({p.study for p in parts}), "models": sorted({p.model for p in parts}),
            "runs": len(parts), "records_scored": int(sum(len(p) for p in parts)),
            "members": int(sum(p.labels.sum() for p in parts)),
            "target_modules": sorted({"+".join(p.cell["target_modules"]) for p in parts}),
            "ranks": sorted({p.cell["rank"] for p in parts}),
            "learning_rates": sorted({p.cell["learning_rate"] for p in parts}),
            "draws": sorted({p.cell["draw"] for p in parts})}


def train_weights(folders: Sequence[str | Path], out: str | Path, *, epochs: int = 12, seed: int = 0,
                  valid_share: float = 0.1, card: dict | None = None, parts: Sequence[RunFeatures] | None = None
                  ) -> Path:
    """Train the learned attack on every finished run of the study `folders` and write its weights to `out` with
    their card: what it was trained on, the sha256 of every text it saw (members and non-members), the validation
    AUC on `valid_share` of the runs and of the texts (:func:`validation_split`), and `card`'s fields. `parts`:
    features already collected (:func:`collect`) instead of scoring the folders."""
    parts = list(parts) if parts is not None else collect(folders)
    if not parts:
        raise ConfigError(f"no finished run with an adapter in {[str(f) for f in folders]}: nothing to learn from")
    train, valid = validation_split(parts, valid_share, seed)
    model, history = fit(train, valid, epochs=epochs, seed=seed)
    seen = sorted({h for p in parts for h in p.text_sha256})
    info = {"attack": "learned", "paper": "Ilić et al. 2026, arXiv:2604.03199 (LT-MIA)",
            "trained_on": describe(train), "validation": {**describe(valid), "auc": history["valid_auc"]} if valid
            else None, "training": {"epochs": epochs, "best_epoch": history["best_epoch"], "seed": seed,
                                    "history": history["epochs"]},
            **(card or {}), "record_sha256": seen}
    return save_weights(model, out, info)


__all__ = ["RunFeatures", "collect", "describe", "fit", "stack", "train_weights", "validation_split"]
