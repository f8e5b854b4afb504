"""Everything the report reads from a study folder, loaded once (plain parquet/JSON: no memlens objects)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from memlens.config import ConfigError, StudyConfig

# The study's attack (P_ref / P_ft); the report's headline numbers use it when it was run.
PRIMARY_ATTACK = "ref_ratio"
BOW_ATTACKS = ("bag_of_words", "bow")
REPORT_INPUTS = ("results.parquet", "mia_scores.parquet", "extraction.parquet", "exposure.parquet", "study.yaml")


def _read(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path) if path.exists() else pd.DataFrame()


@dataclass
class StudyResults:
    root: Path
    study: StudyConfig
    results: pd.DataFrame
    mia_scores: pd.DataFrame
    extraction: pd.DataFrame
    exposure: pd.DataFrame
    environment: dict
    failures: list[dict] = field(default_factory=list)

    @classmethod
    def load(cls, root: Path) -> "StudyResults":
        root = Path(root)
        if not (root / "study.yaml").exists():
            raise ConfigError(f"{root}: not a memlens study folder (no study.yaml)")
        study = StudyConfig.model_validate(yaml.safe_load((root / "study.yaml").read_text()))
        env_path = root / "environment.json"
        failures = []
        for path in sorted((root / "status").glob("*.json")):
            record = json.loads(path.read_text())
            if record.get("state") == "failed":
                failures.append(record)
        return cls(root=root, study=study, results=_read(root / "results.parquet"),
                   mia_scores=_read(root / "mia_scores.parquet"), extraction=_read(root / "extraction.parquet"),
                   exposure=_read(root / "exposure.parquet"),
                   environment=json.loads(env_path.read_text()) if env_path.exists() else {},
                   failures=failures)

    def stage(self, name: str) -> pd.DataFrame:
        if self.results.empty or "stage" not in self.results:
            return pd.DataFrame()
        return self.results[self.results.stage == name].reset_index(drop=True)

    @property
    def mia(self) -> pd.DataFrame:
        """MIA rows of model-based attacks (the bag-of-words baseline is separate)."""
        rows = self.stage("mia")
        return rows[~rows.attack.isin(BOW_ATTACKS)].reset_index(drop=True) if len(rows) else rows

    @property
    def bag_of_words(self) -> pd.DataFrame:
        rows = self.stage("mia")
        return rows[rows.attack.isin(BOW_ATTACKS)].reset_index(drop=True) if len(rows) else rows

    @property
    def primary_attack(self) -> str | None:
        """The study's attack when present, else the first attack in the results."""
        attacks = list(self.mia.attack.unique()) if len(self.mia) else []
        if not attacks:
            return None
        return PRIMARY_ATTACK if PRIMARY_ATTACK in attacks else sorted(attacks)[0]

    def primary(self) -> pd.DataFrame:
        attack = self.primary_attack
        return self.mia[self.mia.attack == attack].reset_index(drop=True) if attack else pd.DataFrame()
