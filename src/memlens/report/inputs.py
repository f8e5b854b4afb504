"""What the report reads from a study folder, loaded once through :class:`memlens.store.StudyLayout`, and the
report's two shared definitions, both of the attacks layer: the primary attack (:data:`PRIMARY_ATTACK`, the study's
attack P_ref / P_ft: every headline number of the report, i.e. study table, ROC, AUC vs rank, copies, DeLong tests,
findings, frontier, headline, uses it and only it) and the exposure of a secret (:func:`exposure_bits`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from memlens.attacks.bow import BOW_ATTACK
from memlens.attacks.exposure import exposure_bits
from memlens.attacks.registry import PRIMARY_ATTACK
from memlens.config import SPLITS, Design, StudyConfig
from memlens.store import RUN_COLUMNS, StudyFile, StudyLayout, with_current_names
from memlens.store.integrity import read_study_parquet
from memlens.store.records import StatusRecord

REPORT_INPUTS = (StudyFile.RESULTS, StudyFile.MIA_SCORES, StudyFile.EXTRACTION, StudyFile.EXPOSURE, StudyFile.STUDY)
DEFAULT_DESIGN: Design = SPLITS  # the membership design of runs made before results carried one


@dataclass
class Environment:
    """`environment.json`: where the study ran (empty when the file is missing)."""

    python: str | None = None
    device: str | None = None
    cuda_device: str | None = None
    git_commit: str | None = None
    packages: dict[str, str | None] = field(default_factory=dict)
    hardware: dict[str, Any] | None = None

    @classmethod
    def read(cls, path: Path) -> Environment:
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError):  # absent, or damaged (`memlens run` writes it again): not recorded
            raw = {}
        if not isinstance(raw, dict):
            raw = {}
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if raw.get(k) is not None})

    def versions(self, names=("memlens", "torch", "transformers", "peft"), file_order: bool = False) -> str:
        """`memlens 0.1.0, torch 2.5.1, ...` for the recorded versions of `names` (in the file's order)."""
        order = [k for k in self.packages if k in names] if file_order else names
        return ", ".join(f"{k} {self.packages[k]}" for k in order if self.packages.get(k))


def inputs_fingerprint(layout: StudyLayout) -> dict:
    """Size and modification time of every file the report reads, and of the cells' status files."""
    fingerprint = {}
    for name in REPORT_INPUTS:
        path = layout.study_level(name)
        fingerprint[name] = [path.stat().st_mtime_ns, path.stat().st_size] if path.exists() else None
    fingerprint["status"] = sorted((p.name, p.stat().st_mtime_ns) for p in layout.status_dir.glob("*.json")
                                   if not p.name.startswith("_"))
    return fingerprint


def with_run_defaults(results: pd.DataFrame, learning_rate: float = float("nan")) -> pd.DataFrame:
    """`results` with the identifying columns added after the first studies (membership design, learning rate,
    record draw) at the values runs made before them had: the named splits, `learning_rate` (the study's
    `train.learning_rate`; NaN: unknown) and draw 0; also on such rows beside newer runs' in an upserted file.
    Renamed columns read under today's names (:func:`memlens.store.results.with_current_names`)."""
    if results.empty:
        return results
    results = with_current_names(results).copy()
    for column, value in {"membership": DEFAULT_DESIGN, "learning_rate": learning_rate, "draw": 0}.items():
        results[column] = results[column].fillna(value) if column in results else value
    return results


def rate_suffixes(rates: pd.Series) -> pd.Series:
    """The label suffix of each configuration's learning rate (` lr0.003`) when they differ (a learning-rate
    ladder, grid.learning_rate); empty when every configuration has the same one."""
    if rates.nunique() > 1:
        return rates.map(lambda lr: f" lr{lr:g}")
    return pd.Series("", index=rates.index)


def _read(layout: StudyLayout, name: str) -> pd.DataFrame:
    """A study-level parquet file (empty when absent; unreadable: an error saying that `memlens run` rebuilds it)."""
    frame = read_study_parquet(layout, layout.study_level(name))
    return pd.DataFrame() if frame is None else frame


@dataclass
class StudyResults:
    """The study folder's files as frames and records (no memlens computation)."""

    root: Path
    study: StudyConfig
    results: pd.DataFrame
    mia_scores: pd.DataFrame
    extraction: pd.DataFrame
    environment: Environment
    failures: list[StatusRecord] = field(default_factory=list)

    @classmethod
    def load(cls, root: Path) -> StudyResults:
        layout = StudyLayout(Path(root))
        study = layout.read_study()
        statuses = [StatusRecord.read(p) for p in sorted(layout.status_dir.glob("*.json"))
                    if not p.name.startswith("_")]  # `_report.json` is the report's own status
        results = with_run_defaults(_read(layout, StudyFile.RESULTS), study.train.learning_rate)
        return cls(root=layout.root, study=study, results=results,
                   mia_scores=_read(layout, StudyFile.MIA_SCORES), extraction=_read(layout, StudyFile.EXTRACTION),
                   environment=Environment.read(layout.environment_file),
                   failures=[s for s in statuses if s is not None and s.state == "failed"])

    @property
    def designs(self) -> list[str]:
        """The membership designs of the runs with results (`random` first: it is the one verdicts use)."""
        found = set(self.results.membership) if len(self.results) else set()
        return sorted(found, key=lambda d: (d != "random", d))

    def only_design(self, design: str) -> StudyResults:
        """The same folder restricted to the runs of one membership design."""
        keep = set(self.results.run_id[self.results.membership == design]) if len(self.results) else set()

        def cut(frame: pd.DataFrame) -> pd.DataFrame:
            return frame[frame.run_id.isin(keep)].reset_index(drop=True) if "run_id" in frame else frame

        return StudyResults(root=self.root, study=self.study, results=cut(self.results),
                            mia_scores=cut(self.mia_scores), extraction=cut(self.extraction),
                            environment=self.environment, failures=self.failures)

    def stage(self, name: str, attack: str | None = None) -> pd.DataFrame:
        """Rows of results.parquet of one stage (and attack)."""
        if self.results.empty:
            return pd.DataFrame()
        rows = self.results[self.results.stage == name]
        return (rows if attack is None else rows[rows.attack == attack]).reset_index(drop=True)

    @property
    def runs(self) -> pd.DataFrame:
        """One row per run with results: its identifying columns."""
        return self.results.drop_duplicates("run_id")[RUN_COLUMNS] if len(self.results) else pd.DataFrame(
            columns=RUN_COLUMNS)

    @property
    def mia(self) -> pd.DataFrame:
        """MIA rows of model-based attacks (the bag-of-words baseline is separate)."""
        rows = self.stage("mia")
        return rows[rows.attack != BOW_ATTACK].reset_index(drop=True) if len(rows) else rows

    @property
    def bag_of_words(self) -> pd.DataFrame:
        return self.stage("mia", BOW_ATTACK)

    def primary(self) -> pd.DataFrame:
        """MIA rows of the primary attack."""
        return self.stage("mia", PRIMARY_ATTACK)

    def primary_missing(self) -> str:
        """Why the primary attack has no rows (for omitted sections)."""
        ran = sorted(self.mia.attack.unique()) if len(self.mia) else []
        if not ran:
            return "no membership-inference results"
        return f"the primary attack `{PRIMARY_ATTACK}` was not run (attacks with results: {', '.join(ran)})"

    def exposure(self) -> pd.DataFrame:
        """Exposure rows, one per (run, model): identifying columns, `model` (finetuned / base) and
        `exposure` (bits, :func:`exposure_bits`)."""
        rows = self.stage("exposure")
        if rows.empty:
            return pd.DataFrame(columns=[*RUN_COLUMNS, "exposure"])
        model = np.where(rows.attack.str.endswith(":base"), "base", "finetuned")
        return rows[RUN_COLUMNS].assign(model=model, exposure=exposure_bits(rows))
