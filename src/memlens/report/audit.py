"""The report of an audit folder (`memlens audit`): one analysis, rendered three ways.

:func:`analyse_audit` reads the folder (its results in the study schema, `audit.yaml`, `audit.json`) into an
:class:`AuditAnalysis`: a first screen that answers "does this model leak" (:class:`LeakSummary`), the canaries
(:class:`CanaryResults`), and the study report's sections that apply to one run (attacks compared, ROC, the
bag-of-words check, extraction rates, n-gram share vs perplexity, utility). :func:`write_audit_report` renders it
as `report/index.html` (the study report's HTML), `report/index.md` (Markdown, figures linked) and
`model-card.md`, a "Privacy evaluation" section in the style of a Hugging Face model card.

The verdict reads three measures: the membership AUC of the headline attack (the first of the declared
:data:`~memlens.attacks.registry.HEADLINE_ORDER` that ran, :func:`~memlens.attacks.registry.headline_attack`; its
interval above 0.5), the canaries' exposure (a secret ranked above all but a share `EXPOSED_P / canaries` of random
secrets of its format: under a model that did not learn it, its rank is uniform, so that share is a p-value, Bonferroni
over the canaries) and, when words alone separate the two files, the bag-of-words check, which then heads it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import pandas as pd
from pydantic import ValidationError

from memlens.attacks.canary_metrics import ALL, canary_detection, held_out_needed
from memlens.attacks.exposure import exposure_bits
from memlens.attacks.registry import headline_attack
from memlens.config import AuditConfig, ConfigError, StudyConfig, load_audit
from memlens.report import membership as mb
from memlens.report import memorization as mz
from memlens.report.frontier import Utility, utility
from memlens.report.html import CSS, inline_html, section_html, write_index, write_sections
from memlens.report.inputs import Environment, StudyResults, inputs_fingerprint
from memlens.report.mdsections import Document
from memlens.report.mdsections import section as section_markdown
from memlens.report.mdtable import md_table
from memlens.report.section import Block, Omission, Section, Table, Text
from memlens.report.suspect import SuspectEvidence, suspect_evidence
from memlens.store import StudyFile, StudyLayout, atomic_write_text, read_results
from memlens.store.records import AuditRecord

EXPOSED_P = 0.01  # a canary is exposed when its secret's rank p-value is below this over the number of canaries
SHOWN_FPR = 0.01  # the canaries' detection rate shown: TPR at 1% FPR (with 10% FPR too below 100 held-out canaries)
NOT_A_RATE = ("No held-out canary was scored, so the canaries' scores below are not a detection rate: a canary seen "
              "k times can rank above every non-member by its format alone (the model learns what all canaries share, "
              "a prefix or a template), memorized or not. To measure how many inserted canaries an attacker detects, "
              "give canaries drawn like them that were never inserted: an `inserted` column (false for those), or "
              "memaudit's manifest.")


# ------------------------------------------------------------------------------------- sections
@dataclass(kw_only=True)
class LeakSummary(Section):
    """The first screen: does this model leak, with the few numbers that say so."""

    anchor = "leak"
    title = "Does this model leak?"
    verdict: str = "inconclusive"  # leaks | no measurable leak | inconclusive
    sentences: list[str] = field(default_factory=list)
    warning: str | None = None  # the bag-of-words check, when words alone separate the files
    measures: pd.DataFrame = field(default_factory=pd.DataFrame)  # tables/leak.csv: measure, value, note
    caveats: list[str] = field(default_factory=list)
    examples: pd.DataFrame = field(default_factory=pd.DataFrame)  # tables/extraction_examples.csv: verbatim ones

    def blocks(self) -> list[Block]:
        said = Text(f"Verdict: {self.verdict}. " + " ".join(self.sentences),
                    "ok" if self.verdict == "no measurable leak" else "warn")
        examples = [Text("Records the model continued verbatim (exact continuation), to quote:"),
                    Table("extraction_examples", self.examples)] if len(self.examples) else []
        return [*([Text(self.warning, "warn")] if self.warning else []), said,
                Table("leak", self.measures, empty="n/a"), *examples, *(Text(c, "src") for c in self.caveats)]

    def value(self, measure: str) -> object:
        rows = self.measures[self.measures.measure == measure]
        return rows.value.iloc[0] if len(rows) else None


@dataclass(kw_only=True)
class CanaryResults(Section):
    """The canaries: how many of the inserted ones an attacker detects against the held-out ones, by copies
    (:func:`memlens.attacks.canary_metrics.canary_detection`), then each inserted canary: its copies, exposure under
    the model and the base model, whether exposed, where its membership score ranks among the non-members', and how
    much of it the model completes from its first half."""

    anchor = "canaries"
    title = "Canaries"
    table: pd.DataFrame = field(default_factory=pd.DataFrame)  # tables/canaries.csv
    threshold_bits: float = math.nan
    detection: pd.DataFrame = field(default_factory=pd.DataFrame)  # tables/canary_detection.csv: every attack, FPR
    by_copies: pd.DataFrame = field(default_factory=pd.DataFrame)  # shown: the headline and the best attack
    headline: str | None = None  # the headline attack among those that scored the canaries
    best: str | None = None      # the attack with the highest TPR at 1% FPR over every inserted canary
    level: float = 0.95

    def detection_blocks(self) -> list[Block]:
        if self.detection.empty:
            return [Text(NOT_A_RATE, "warn")]
        n_held_out = int(self.detection.n_held_out.iloc[0])
        attacks = self.detection.attack.nunique()
        said = (f"Detection rate: of the inserted canaries with each number of copies, how many score above a "
                f"threshold set by the {n_held_out} held-out canaries (drawn like them, never trained on), with its "
                f"exact {self.level:.0%} interval (Clopper-Pearson, over the inserted canaries at that threshold). "
                f"`{self.headline}` is the headline attack")
        said += (f"; `{self.best}` scored best of the {attacks} attacks that scored the canaries, chosen on these "
                 "canaries (an optimistic pick)." if self.best and self.best != self.headline else ".")
        blocks: list[Block] = [Text(said)]
        shown = self.detection[(self.detection.fpr == SHOWN_FPR) & self.detection.threshold_rank.notna()]
        if len(shown):
            row = shown.iloc[0]
            blocks.append(Text(
                f"The threshold rule: the {_ordinal(int(row.threshold_rank))} highest held-out score (j = "
                f"floor(FPR x (held out + 1))). A canary never trained on scores above it with probability "
                f"{row.fpr_expected:.2%} on average, and at most {row.fpr_upper:.2%} ({self.level:.0%} one-sided "
                f"upper bound): that realised FPR is Beta(j, held out - j + 1) over the draw of the held-out canaries "
                f"(order statistics), so `1% FPR` is the rule's target, not a measured rate."))
        if n_held_out < held_out_needed(SHOWN_FPR):
            blocks.append(Text(f"TPR at 1% FPR needs at least {held_out_needed(SHOWN_FPR)} held-out canaries; this "
                               f"audit has {n_held_out}: TPR at 10% FPR is shown beside it (every point and attack in "
                               "tables/canary_detection.csv).", "warn"))
        return [*blocks, Table("canary_detection", self.by_copies, data=self.detection)]

    def blocks(self) -> list[Block]:
        quantile = Text("`<attack>_quantile`: the share of non-members whose membership score (the headline attack's) "
                        "is below the canary's (the canaries are not counted in the membership AUC).")
        exposure = Text(f"Exposure (Carlini et al. 2019): log2 of the number of random secrets of the canary's format "
                        f"over the secret's rank among them (1 = most likely), exact when every secret was ranked, "
                        f"else estimated from a sample. Exposed: at least {self.threshold_bits:.1f} bits, a rank a "
                        f"secret the model never saw reaches with probability below {EXPOSED_P:g} over the "
                        "canaries.") if "exposure" in self.table else Text(
            "No exposure: no canary has a `secret` column (or `extraction.exposure` is false).")
        return [*self.detection_blocks(), exposure, quantile,
                Table("canaries", self.table, formats={c: ".2f" for c in ("exposure", "exposure_base")})]


# ------------------------------------------------------------------------------------- analysis
@dataclass
class AuditAnalysis:
    """Everything an audit's report says, computed once from its folder; no file is written."""

    root: Path
    config: AuditConfig
    record: AuditRecord
    data: StudyResults
    environment: Environment
    inputs: dict
    leak: LeakSummary
    evidence: SuspectEvidence | None
    canaries: CanaryResults
    attacks: mb.AttackComparison
    roc: mb.RocCurves
    bag_of_words: mb.BagOfWords
    extraction: mz.ExtractionRates
    perplexity: mz.NgramPerplexity
    utility: Utility
    seconds: float = 0.0

    @property
    def sections(self) -> list[Section]:
        """Every section in the report's order (the declared order of the fields), the first screen first."""
        return [s for s in (getattr(self, f.name) for f in fields(self)) if isinstance(s, Section)]

    def tables(self) -> dict[str, pd.DataFrame]:
        tables: dict[str, pd.DataFrame] = {}
        for section in self.sections:
            tables.update(section.tables())
        return tables


def _count(n: int, noun: str) -> str:
    """`1 canary`, `2 canaries`, `0 members`."""
    plural = noun[:-1] + "ies" if noun.endswith("y") else noun + "s"
    return f"{n} {noun if n == 1 else plural}"


def _metric_row(mia: pd.DataFrame, attack: str) -> pd.Series | None:
    rows = mia[mia.attack == attack]
    return rows.iloc[0] if len(rows) else None


def _auc(row: pd.Series, level: float, code: str = "`") -> str:
    """`0.912 (95% CI 0.85-0.97, `ref_ratio`)`; `code=""` for a table cell (no code spans there)."""
    return f"{row.auc:.3f} ({level:.0%} CI {row.auc_ci_low:.3f}-{row.auc_ci_high:.3f}, {code}{row.attack}{code})"


def _tpr(row: pd.Series | None, point: str) -> tuple[object, str | None]:
    if row is None:
        return None, "no membership results"
    value = row.get(f"tpr_at_{point}_fpr")
    if value is None or pd.isna(value):
        return None, str(row.get(f"tpr_at_{point}_fpr_note") or "not computed")
    low, high = row.get(f"tpr_at_{point}_fpr_low"), row.get(f"tpr_at_{point}_fpr_high")
    interval = f" [{low:.3f}, {high:.3f}]" if low is not None and not pd.isna(low) else ""
    return f"{value:.3f}{interval}", None


def exposure_threshold(n_canaries: int) -> float:
    """Bits of exposure a secret must reach to count as exposed: log2(canaries / EXPOSED_P)."""
    return math.log2(max(n_canaries, 1) / EXPOSED_P)


def canary_table(data: StudyResults, record: AuditRecord) -> pd.DataFrame:
    """One row per canary with a secret (exposure, under the model and the base model) and per canary without
    (membership and extraction only)."""
    scores = data.mia_scores
    canaries = scores[scores.is_canary.astype(bool)] if len(scores) else scores
    if canaries.empty:
        return pd.DataFrame()
    primary = headline_attack([a for a in record.attacks if a in scores])
    non_members = scores.loc[~scores.is_member.astype(bool), primary].to_numpy()
    table = pd.DataFrame({"canary": canaries.sample_id.to_numpy(),
                          f"{primary}_quantile": [(non_members < v).mean() for v in canaries[primary]]})
    exposure = data.stage("exposure")
    if len(exposure):
        ids = exposure.canary_id if "canary_id" in exposure else pd.Series(table.canary.iloc[0], index=exposure.index)
        base = exposure.attack.str.endswith(":base")
        bits = exposure_bits(exposure)  # the study's definition: exact when enumerated, else extrapolated
        finetuned = exposure[~base].assign(canary=ids[~base], exposure=bits[~base])
        based = exposure[base].assign(canary=ids[base], exposure_base=bits[base])[["canary", "exposure_base"]]
        frame = finetuned[["canary", "copies", "secret_format", "n_candidates", "enumerated", "secret_rank",
                           "exposure_rank", "exposure"]].merge(based, on="canary", how="left")
        table = table.merge(frame, on="canary", how="left")
        table["exposed"] = table.exposure >= exposure_threshold(int(table.exposure.notna().sum()))
    ext = mz.finetuned_rows(data.extraction)
    if len(ext):
        greedy = ext[ext.is_canary.astype(bool) & (ext.decoding == mz.decoding_choice(ext))]
        table = table.merge(greedy[["sample_id", "ngram_share", "exact_match"]].rename(
            columns={"sample_id": "canary", "ngram_share": "suffix_ngram_share"}), on="canary", how="left")
    return table


def read_canary_scores(root: Path, run_id: str | None = None) -> pd.DataFrame:
    """The canaries' scores of an audit folder (`canary_scores.parquet`: run_id, canary_id, family, is_member, one
    column per attack, as a study's), those of `run_id` when given; empty when the folder has none."""
    path = StudyLayout(Path(root)).study_level(StudyFile.CANARY_SCORES)
    scores = pd.read_parquet(path) if path.exists() else pd.DataFrame()
    if run_id is not None and "run_id" in scores:
        scores = scores[scores.run_id == run_id].reset_index(drop=True)
    return scores


def _fpr_label(fpr: float) -> str:
    return f"{fpr * 100:g}%"


def _ordinal(n: int) -> str:
    return {1: "1st", 2: "2nd", 3: "3rd"}.get(n, f"{n}th")


def _realised(row: pd.Series) -> str | None:
    """`0.99% (<= 2.95%)`: the threshold rule's expected realised FPR and its upper bound; None when null."""
    if pd.isna(row.fpr_expected):
        return None
    return f"{row.fpr_expected:.2%} (<= {row.fpr_upper:.2%})"


def _rate(row: pd.Series) -> str | None:
    """`0.750 (9/12) [0.428, 0.945]`; None when the rate is null (its note is said above the table)."""
    if pd.isna(row.tpr):
        return None
    return f"{row.tpr:.3f} ({int(row.k)}/{int(row.n_inserted)}) [{row.tpr_low:.3f}, {row.tpr_high:.3f}]"


def best_canary_attack(detection: pd.DataFrame, fpr: float = SHOWN_FPR) -> str | None:
    """The attack with the highest TPR at `fpr` over every inserted canary (then the highest AUC; the AUC alone
    where no attack has that TPR)."""
    overall = detection[(detection.family == ALL) & (detection.fpr == fpr)]
    if overall.empty:
        return None
    ranked = overall.assign(rank_tpr=overall.tpr.fillna(-1.0), rank_auc=overall.auc.fillna(-1.0))
    return str(ranked.sort_values(["rank_tpr", "rank_auc"], ascending=False, kind="stable").attack.iloc[0])


def detection_table(detection: pd.DataFrame, attacks: list[str]) -> pd.DataFrame:
    """The detection rates shown: one row per family of inserted canaries (by copies) and `all`, with copies, the
    inserted and held-out counts, the threshold rule's realised FPR with its bound (:func:`_realised`), and per attack
    of `attacks` its TPR at 1% FPR (and at 10% below 99 held-out canaries) as :func:`_rate` writes it."""
    if detection.empty:
        return pd.DataFrame()
    n_held_out = int(detection.n_held_out.iloc[0])
    fprs = [SHOWN_FPR, *([0.1] if n_held_out < held_out_needed(SHOWN_FPR) else [])]
    attack_first = detection.attack.iloc[0]
    first = detection[(detection.attack == attack_first) & (detection.fpr == SHOWN_FPR)]
    table = pd.DataFrame({"copies": [ALL if f == ALL else int(c) if pd.notna(c) else f
                                     for f, c in zip(first.family, first.copies)],
                          "inserted": first.n_inserted.astype(int).to_numpy(),
                          "held out": first.n_held_out.astype(int).to_numpy()})
    for fpr in fprs:  # the rule's realised FPR: a function of the held-out canaries only, the same for every attack
        table[f"realised FPR at {_fpr_label(fpr)} (bound)"] = [
            _realised(r) for _, r in detection[(detection.attack == attack_first) & (detection.fpr == fpr)].iterrows()]
    for attack in attacks:
        for fpr in fprs:
            rows = detection[(detection.attack == attack) & (detection.fpr == fpr)]
            table[f"TPR at {_fpr_label(fpr)} FPR ({attack})"] = [_rate(r) for _, r in rows.iterrows()]
    return table


def canaries_section(data: StudyResults, record: AuditRecord) -> CanaryResults:
    """The canary section of an audit folder: the detection rates of its canary scores (when held-out canaries were
    scored) and each inserted canary (:func:`canary_table`)."""
    scores = read_canary_scores(data.root, record.run_id)
    if not record.n_canaries and scores.empty:
        return CanaryResults(omitted=Omission("canaries", "no canaries were given (--canaries: records inserted in "
                                              "the training set, and held-out twins never inserted)"))
    table = canary_table(data, record)
    n = int(table.exposure.notna().sum()) if "exposure" in table else 0
    attacks = [a for a in record.attacks if a in scores]
    level = data.study.mia.ci_level
    detection = canary_detection(scores, attacks, level=level) if len(scores) and attacks else pd.DataFrame()
    if detection.empty:
        return CanaryResults(table=table, threshold_bits=exposure_threshold(n), level=level)
    headline = headline_attack(attacks)
    best = best_canary_attack(detection)
    shown = list(dict.fromkeys(a for a in (headline, best) if a))
    return CanaryResults(table=table, threshold_bits=exposure_threshold(n), detection=detection,
                         by_copies=detection_table(detection, shown), headline=headline, best=best, level=level)


def _extraction_measures(data: StudyResults) -> tuple[dict[str, float], str]:
    """Members' (or suspects') verbatim extraction rate (an exact continuation: `exact_rate`) under the model,
    under the base model on the same prompts, and the non-members' under the model (greedy decoding when it ran),
    with the relaxed rate (LCS ratio at or above the threshold: `<label>_relaxed`) and the records too short to
    prompt (`<label>_too_short`, left out of `<label>_n`); and the decoding."""
    rows = data.stage("extraction")
    if rows.empty:
        return {}, ""
    decodings = rows.attack.str.split(":").str[1]
    decoding = "greedy" if (decodings == "greedy").any() else sorted(decodings)[0]
    rates = {}
    for label, attack in (("members", f"extract:{decoding}:members"), ("base", f"extract:{decoding}:members:base"),
                          ("non_members", f"extract:{decoding}:non_members")):
        found = rows[rows.attack == attack]
        if len(found) and int(found.n.iloc[0]):
            row = found.iloc[0]
            rates[label] = float(row.exact_rate)
            rates[f"{label}_relaxed"] = float(row.get("relaxed_rate", math.nan))
            rates[f"{label}_n"] = int(row.n)
            too_short = row.get("n_too_short")
            rates[f"{label}_too_short"] = 0 if too_short is None or pd.isna(too_short) else int(too_short)
    return rates, decoding


def extraction_examples(root: Path, decoding: str, limit: int = 5) -> pd.DataFrame:
    """Up to `limit` member (suspect) records the model continued verbatim (exact continuation), with the
    continuation's text: what a letter can quote. Empty without extraction rows."""
    path = root / StudyFile.EXTRACTION
    if not decoding or not path.is_file():
        return pd.DataFrame()
    rows = pd.read_parquet(path)
    keep = (rows.model == "finetuned") & (rows.decoding == decoding) & rows.is_member & ~rows.is_canary \
        & rows.exact_match
    return rows.loc[keep, ["sample_id", "suffix_text", "generated_text"]].head(limit).rename(
        columns={"suffix_text": "record's continuation", "generated_text": "model's continuation"}
    ).reset_index(drop=True)


def extraction_sentence(rates: dict, decoding: str, named: str) -> str | None:
    """The extraction result in one sentence: verbatim (exact) first, the relaxed rate said as such, records too
    short to prompt counted."""
    if named not in rates:
        return None
    short = rates.get(f"{named}_too_short", 0)
    return (f"Prompted with the first half of a {'suspect' if named == 'suspects' else 'member'} record, it "
            f"continues {rates[named]:.1%} of {rates[f'{named}_n']} verbatim (the exact continuation; {decoding} "
            f"decoding; the base model {rates.get('base', math.nan):.1%} on the same prompts, non-members "
            f"{rates.get('non_members', math.nan):.1%}); a relaxed match (half the continuation's characters in "
            f"one common run, not verbatim) {rates.get(f'{named}_relaxed', math.nan):.1%}"
            + (f"; {short} record(s) too short to prompt were left out" if short else "") + ".")


def _membership(primary: pd.Series | None) -> bool | None:
    """Whether the verdict's attack tells members from non-members better than chance (its interval above 0.5)."""
    return None if primary is None else bool(primary.auc_ci_low > 0.5)


def _verdict(member: bool | None, exposed: int, separable: bool) -> str:
    """`leaks` (a canary exposed, or membership above chance between files words do not separate), `inconclusive`
    (membership above chance between files words separate, or no membership result) or `no measurable leak`."""
    if exposed or (member and not separable):
        return "leaks"
    return "inconclusive" if member or member is None else "no measurable leak"


def _first_sentence(verdict: str, member: bool | None, primary: pd.Series | None, level: float) -> str:
    if primary is None:
        return "No membership attack ran."
    auc = _auc(primary, level)
    if member and verdict == "leaks":
        return (f"Yes: an attacker tells its training records from others better than chance, membership AUC {auc}, "
                "its interval above 0.5.")
    if member:
        return (f"Membership AUC {auc} is above chance, but words alone separate the two files, so it may measure "
                "how they differ rather than what the model memorized.")
    lead = "Yes, through its canaries. " if verdict == "leaks" else ""
    return (f"{lead}Membership inference does not tell its training records from others better than chance at this "
            f"sample size: AUC {auc}.")


SET_VERDICTS = {"used": "used", "not_shown": "not shown to be used", "underpowered": "underpowered",
                "confounded": "confounded"}


def _pct(value: float) -> str:
    return f"{100 * value:.0f}%"


DOCUMENT_LEANS_LOW = ("which leans low: a used document whose records the guess rule misses counts as unused, so "
                      "only the interval's lower end is a claim")


def share_answer(share: dict | None, references: int) -> tuple[str | None, str | None]:
    """(the share in words, why there is none): the share of records with its interval and "at most", the share of
    documents, and the placebo's share."""
    if not share:
        why = (f"needs 3 or more reference models (--references); {references} given" if references < 3 else
               f"not computed with {references} reference models")
        return None, why
    if share.get("fraction") is None:
        return None, share.get("note")
    said = (f"estimated share used {share['fraction']:.2f} [{share['fraction_ci_low']:.2f}, "
            f"{share['fraction_ci_high']:.2f}] of the records ({share['ci_level']:.0%} interval, "
            f"{share['n_references']} reference models): at most {_pct(share['at_most'])} of the set was used")
    if share.get("document_ci_low") is not None:  # the estimate leans low: only its lower end is said
        said += (f"; at least {_pct(share['document_ci_low'])} of the documents had a record used (estimate "
                 f"{share['document_fraction']:.2f}, {DOCUMENT_LEANS_LOW})")
    placebo = share.get("placebo")
    if placebo and placebo.get("fraction_raw") is not None:
        ci = placebo.get("fraction_ci_raw") or [math.nan, math.nan]
        said += (f"; the placebo (known non-members split in two, truth 0) gives {placebo['fraction_raw']:.2f} "
                 f"[{ci[0]:.2f}, {ci[1]:.2f}]" + (", so the interval above was widened" if share.get("widened")
                                                   else ""))
    return said, None


def dataset_answer(record: AuditRecord) -> str | None:
    """Was the suspect (or member) set used, and how much of it, in one sentence: dataset inference's verdict with
    its p-value (the controls' when confounded) and, with reference models, the estimated share with its interval
    and "at most X% of the set was used"; None when neither was computed."""
    di, share = record.dataset_inference, record.usage_share
    named = "suspect set" if "suspect" in record.sources else "member set"
    share_said, _ = share_answer(share, record.references)
    if di is None:
        return None if share_said is None else (f"The {named} could not be tested (too few records or documents); "
                                                f"{share_said}.")
    unit = f"{di.get('unit', 'record')}s"
    p = f"p = {di['p_value']:.2g}"
    if di["verdict"] == "confounded":
        controls = "; ".join(f"{c['name']} p = {c['p_value']:.2g}" for c in di.get("controls", []) if c["separates"])
        if di.get("bag_of_words_auc") is not None and not controls:
            controls = f"bag-of-words AUC {di['bag_of_words_auc']:.3f}"
        said = (f"Confounded: what the model never learned already separates the {named} from the non-members "
                f"({controls}; the test's {p}), so the test measures how the files differ, not use")
        if di.get("calibrated_p_value") is not None:
            said += (f"; the model's own evidence, in calibrated features (target minus base model), gives "
                     f"p = {di['calibrated_p_value']:.2g}")
    elif di["used"]:
        said = f"The {named} was used in training ({p} < {di['level']:g}, counting {unit})"
    else:
        said = f"The {named} was not shown to be used ({p} at level {di['level']:g}, counting {unit})"
        if di["verdict"] == "underpowered":
            needed = di.get("min_units_per_side", di.get("min_records_per_side"))
            said += (f"; the test is underpowered with these {unit}: it needs {needed} {unit} a side, so this is "
                     "not evidence of non-use")
    if share_said is not None:
        said += f"; {share_said}"
    elif share is not None:
        said += f"; no share estimate: {share.get('note')}"
    return said + "."


@dataclass(kw_only=True)
class SetAnswer(LeakSummary):
    """The first screen of a suspect-set audit: was the set used (the records' membership is what is asked)."""

    anchor = "used"
    title = "Was the suspect set used?"


def _suspect_measures(record: AuditRecord, best: pd.Series | None, level: float) -> pd.DataFrame:
    di, share = record.dataset_inference or {}, record.usage_share or {}
    share_said, why = share_answer(record.usage_share, record.references)
    controls = {c["name"]: c for c in di.get("controls", [])}
    placebo = di.get("placebo") or {}
    rows = [
        ("verdict", SET_VERDICTS.get(di.get("verdict"), "not tested"), di.get("decision")),
        ("dataset inference p-value", f"{di['p_value']:.2g}" if di else None,
         f"{di.get('n_splits', 1)} random splits, min(1, 2 x median); counting {di.get('unit', 'record')}s"
         if di else "not computed: too few records or documents for the test"),
        ("shift control: base model p", f"{controls['base model']['p_value']:.2g}" if "base model" in controls
         else None, "the same test on the base model's loss"),
        ("shift control: bag of words p", f"{controls['bag of words']['p_value']:.2g}" if "bag of words" in controls
         else None, "the same test on the texts' words"),
        ("calibrated features p", None if di.get("calibrated_p_value") is None else
         f"{di['calibrated_p_value']:.2g}", ", ".join(di.get("calibrated_features", [])) or None),
        ("placebo p (non-members split in two)", None if placebo.get("p_value") is None else
         f"{placebo['p_value']:.2g}", placebo.get("note") or "should not be small: nothing in it was used"),
        ("share of the set used (records)", None if share.get("fraction") is None else
         f"{share['fraction']:.3f} [{share['fraction_ci_low']:.3f}, {share['fraction_ci_high']:.3f}]",
         why if share_said is None else share.get("note")),
        ("at most used", None if share.get("at_most") is None else _pct(share["at_most"]),
         "the interval's upper end"),
        ("documents with a record used, at least", None if share.get("document_ci_low") is None else
         f"{share['document_ci_low']:.3f}", f"estimate {share['document_fraction']:.3f}, {DOCUMENT_LEANS_LOW}"
         if share.get("document_ci_low") is not None else "no lower bound could be estimated" if share.get("documents")
         else "needs --group"),
        ("placebo share", None if not share.get("placebo") or share["placebo"].get("fraction_raw") is None else
         f"{share['placebo']['fraction_raw']:.3f}", "truth 0" + ("; the interval above was widened"
                                                                 if share.get("widened") else "")),
        ("guess rule FPR: target's non-members / references'", None if share.get("fpr_target") is None else
         f"{share['fpr_target']:.3f} / {share['fpr_references']:.3f}",
         "they disagree: the references do not reproduce the target's recipe" if share.get("fpr_disagree") else None),
        (f"suspects against non-members: AUC ({best.attack})" if best is not None else "suspects against non-members",
         _auc(best, level, code="") if best is not None else None,
         "how well an attack tells the suspect records from the non-members; not a membership rate, since which "
         "suspects were trained on is unknown"),
        ("records", f"{_count(record.n_members, 'suspect')}, {_count(record.n_non_members, 'non-member')}", None),
    ]
    return pd.DataFrame(rows, columns=["measure", "value", "note"])


def suspect_summary(data: StudyResults, record: AuditRecord, canaries: CanaryResults) -> SetAnswer:
    """The first screen in suspect mode: the set's verdict (used / not shown / underpowered / confounded), its
    p-value, the share with its interval and "at most"; no membership verdict about records of unknown membership."""
    mia, level = data.mia, data.study.mia.ci_level
    best = None if mia.empty else mia.sort_values(["auc", "attack"], ascending=[False, True]).iloc[0]
    di = record.dataset_inference or {}
    verdict = SET_VERDICTS.get(di.get("verdict"), "not tested")
    sentences = [dataset_answer(record) or "The suspect set could not be tested: too few records or documents."]
    exposed = int(canaries.table.exposed.sum()) if "exposed" in canaries.table else 0
    with_secret = int(canaries.table.exposure.notna().sum()) if "exposure" in canaries.table else 0
    if with_secret:
        sentences.append(f"{exposed} of {_count(with_secret, 'canary')} with a secret "
                         f"{'is' if exposed == 1 else 'are'} exposed (at least {canaries.threshold_bits:.1f} bits).")
    rates, decoding = _extraction_measures(data)
    if "members" in rates:  # the suspects take the members' place
        rates = {k.replace("members", "suspects", 1) if k.startswith("members") else k: v for k, v in rates.items()}
    if (said := extraction_sentence(rates, decoding, "suspects")) is not None:
        sentences.append(said)
    caveats = [ASSUMPTION_SAID]
    if di.get("independence"):
        caveats.append(di["independence"][:1].upper() + di["independence"][1:] + ".")
    if di.get("note"):
        caveats.append(f"Dataset inference: {di['note']}.")
    if di.get("combine"):
        caveats.append(f"The p-value: {di['combine']}.")
    if di.get("decision"):
        caveats.append(f"Features that carried the decision: {di['decision']}.")
    if record.usage_share and record.usage_share.get("note"):
        caveats.append(f"Share: {record.usage_share['note']}.")
    if record.usage_share and record.usage_share.get("fpr_disagree"):
        recipe = [n for n in record.notes if n.startswith(("Reference models", "The target's train size"))]
        caveats.append(f"The guess rule calls {record.usage_share['fpr_target']:.1%} of the target's known "
                       f"non-members members and {record.usage_share['fpr_references']:.1%} of the references' OUT "
                       "records: the references do not reproduce the target's recipe. " + " ".join(recipe))
    warning = None
    if di.get("document_warning"):
        warning = f"Read this first: {di['document_warning']}."
    return SetAnswer(verdict=verdict, sentences=sentences, warning=warning,
                     measures=_suspect_measures(record, best, level), caveats=caveats,
                     examples=extraction_examples(data.root, decoding))


ASSUMPTION_SAID = ("What this answer rests on: the known non-members are assumed drawn like the suspect records "
                   "(same source, period and processing), which memlens cannot check. The shift controls test what "
                   "the base model and the words alone see, and the placebo runs the whole procedure on non-members "
                   "split in two.")


def leak_summary(data: StudyResults, record: AuditRecord, canaries: CanaryResults) -> LeakSummary:
    """The first screen (see the module's docstring for the verdict's rules); in suspect mode the set's answer
    (:func:`suspect_summary`)."""
    if "suspect" in record.sources:
        return suspect_summary(data, record, canaries)
    mia, level = data.mia, data.study.mia.ci_level
    if mia.empty:
        return LeakSummary(omitted=Omission("the first screen", "no membership-inference results"))
    primary = _metric_row(mia, headline_attack(mia.attack.tolist()))
    # the best AUC; among equal ones the verdict's attack, then by name
    best = mia.assign(_own=mia.attack != (primary.attack if primary is not None else None)).sort_values(
        ["auc", "_own", "attack"], ascending=[False, True, True]).iloc[0]
    member = _membership(primary)
    exposed = int(canaries.table.exposed.sum()) if "exposed" in canaries.table else 0
    with_secret = int(canaries.table.exposure.notna().sum()) if "exposure" in canaries.table else 0
    bow = data.bag_of_words
    separable, bow_text = mb.bow_verdict(bow) if len(bow) else (False, "")
    verdict = _verdict(member, exposed, separable)
    sentences, caveats = [_first_sentence(verdict, member, primary, level)], []
    if (answer := dataset_answer(record)) is not None:
        sentences.insert(0 if "suspect" in record.sources else 1, answer)
    if with_secret:
        sentences.append(f"{exposed} of {_count(with_secret, 'canary')} with a secret "
                         f"{'is' if exposed == 1 else 'are'} exposed (at least {canaries.threshold_bits:.1f} bits).")
    rates, decoding = _extraction_measures(data)
    if (said := extraction_sentence(rates, decoding, "members")) is not None:
        sentences.append(said)
    warning = None
    if separable:
        warning = (f"Read this first: {bow_text} The membership AUC then measures how the member and non-member "
                   "files differ as well as what the model memorized: draw the non-members from the same source as "
                   "the members.")
    if primary is not None and bool(primary.get("model_unchanged", False)):
        note = str(primary.get("note"))
        warning = " ".join(filter(None, [warning, f"{note[:1].upper()}{note[1:]}."]))
    if verdict == "no measurable leak":
        caveats.append("No measurable leak is not a guarantee: a stronger attack, more records or other data may "
                       "show one; only differential privacy bounds what any attack can learn.")
    if primary is not None and best.attack != primary.attack:
        caveats.append(f"Best AUC: the highest of {mia.attack.nunique()} attacks on the same records, so above what "
                       f"one attack chosen in advance would show; the verdict uses `{primary.attack}`.")
    if record.n_non_members < 1000:
        caveats.append(f"TPR at 1% FPR needs at least 100 non-members and at 0.1% FPR 1,000; this audit has "
                       f"{record.n_non_members}: a point it cannot estimate is null (with the reason), not zero.")
    tpr1, tpr1_note = _tpr(best, "1pct")
    tpr01, tpr01_note = _tpr(best, "0_1pct")
    measures = pd.DataFrame([
        ("verdict", verdict, None),
        (f"membership AUC ({primary.attack if primary is not None else 'none'})",
         _auc(primary, level, code="") if primary is not None else None, None),
        ("best membership AUC", _auc(best, level, code=""), f"{mia.attack.nunique()} attacks"),
        (f"TPR at 1% FPR ({best.attack})", tpr1, tpr1_note),
        (f"TPR at 0.1% FPR ({best.attack})", tpr01, tpr01_note),
        ("canaries exposed", f"{exposed} of {with_secret}" if with_secret else None,
         None if with_secret else "no canary with a secret" if record.n_canaries else "no canaries given"),
        (f"members extracted verbatim, exact continuation ({decoding or 'none'})",
         f"{rates['members']:.3f}" if "members" in rates else None,
         f"base model {rates['base']:.3f}; relaxed match {rates['members_relaxed']:.3f}" if "base" in rates
         else "extraction not run"),
        ("suspect set used (dataset inference)",
         None if record.dataset_inference is None else
         f"{record.dataset_inference['verdict']}, p = {record.dataset_inference['p_value']:.2g}",
         "not computed: too few records for the test" if record.dataset_inference is None else None),
        ("share of it used (DUCI)",
         None if not record.usage_share or record.usage_share.get("fraction") is None else
         f"{record.usage_share['fraction']:.3f} [{record.usage_share['fraction_ci_low']:.3f}, "
         f"{record.usage_share['fraction_ci_high']:.3f}]",
         share_answer(record.usage_share, record.references)[1] or record.usage_share.get("note")),
        ("records", f"{_count(record.n_members, 'member')}, {_count(record.n_non_members, 'non-member')}, "
                    f"{_count(record.n_canaries, 'canary')}", None),
    ], columns=["measure", "value", "note"])
    return LeakSummary(verdict=verdict, sentences=sentences, warning=warning, measures=measures, caveats=caveats,
                       examples=extraction_examples(data.root, decoding))


def load_audit_results(root: Path) -> tuple[AuditConfig, AuditRecord, StudyResults]:
    """The audit folder's configuration (`audit.yaml`), record (`audit.json`, with the one-run study the audit ran)
    and results."""
    layout = StudyLayout(Path(root))
    record = AuditRecord.load(layout.root / StudyFile.AUDIT_RECORD)
    config = load_audit(layout.audit_file)
    try:
        study = StudyConfig.model_validate(record.study)
    except ValidationError as err:
        raise ConfigError(f"{layout.root / StudyFile.AUDIT_RECORD}: its `study` does not read ({err.error_count()} "
                          "problem(s)); rerun `memlens audit` into this folder") from None
    results = read_results(layout)

    def read(name: str) -> pd.DataFrame:
        path = layout.study_level(name)
        return pd.read_parquet(path) if path.exists() else pd.DataFrame()

    data = StudyResults(root=layout.root, study=study, results=results, mia_scores=read(StudyFile.MIA_SCORES),
                        extraction=read(StudyFile.EXTRACTION), environment=Environment.read(layout.environment_file))
    return config, record, data


def _one_run(section: Section) -> Section:
    """A study section said of the audit's one model: no runs to average, no adapted matrices to compare."""
    if isinstance(section, (mb.AttackComparison, mz.ExtractionRates)):
        section.one_run = True
    if isinstance(section, mb.RocCurves):
        section.title = "ROC curve"
    return section


def analyse_audit(root: Path) -> AuditAnalysis:
    """The analysis of the audit folder `root` (reads its files; writes nothing)."""
    start = time.perf_counter()
    config, record, data = load_audit_results(root)
    canaries = canaries_section(data, record)
    suspect = "suspect" in record.sources
    attacks = _one_run(mb.attack_comparison(data))
    if suspect:  # which suspects were trained on is unknown: the AUCs compare suspects with non-members
        attacks.title = "Attack comparison: suspects against non-members"
    analysis = AuditAnalysis(
        root=data.root, config=config, record=record, data=data, environment=data.environment,
        inputs=inputs_fingerprint(StudyLayout(data.root)), leak=leak_summary(data, record, canaries),
        evidence=suspect_evidence(record.dataset_inference) if suspect else None,
        canaries=canaries, attacks=attacks, roc=_one_run(mb.roc_curves(data)),
        bag_of_words=mb.bag_of_words(data), extraction=_one_run(mz.extraction_rates(data)),
        perplexity=mz.ngram_perplexity(data),
        utility=utility(data))
    analysis.seconds = time.perf_counter() - start
    return analysis


# ------------------------------------------------------------------------------------- rendering
@dataclass
class AuditReport:
    """The files an audit's report is: HTML, Markdown (same analysis) and the model card."""

    index: Path
    markdown: Path
    model_card: Path
    analysis: AuditAnalysis


@dataclass(frozen=True)
class Overview:
    """What was measured, in Markdown sentences: the model, the records, the methods, what did not run."""

    model: str
    records: list[str]
    methods: list[str]
    notes: list[str]

    @property
    def lines(self) -> list[str]:
        return [self.model, *self.records, *self.methods, *self.notes]


def overview(a: AuditAnalysis) -> Overview:
    """The audit's overview (the HTML page's, the Markdown's and the model card's)."""
    r = a.record
    model = (f"LoRA adapter `{r.target}` (rank {r.rank}, on {', '.join(r.target_modules)})" if r.method == "lora"
             else f"full fine-tuned model `{r.target}`")
    eight = " in 8 bits" if r.base.get("load_in_8bit") else ""
    suspect = "suspect" in r.sources
    first = (f"Suspect set: {r.n_members} records whose use in training is in question "
             f"(`{r.sources.get('suspect')}`), scored against the non-members; which of them were trained on is "
             "what is asked." if suspect else
             f"Members: {r.n_members} records known to be in the training set (`{r.sources.get('members')}`).")
    records = [first,
               f"Non-members: {r.n_non_members} records known not to be in the training set "
               f"(`{r.sources.get('non_members')}`), assumed drawn like the "
               f"{'suspect records' if suspect else 'members'}."]
    if r.n_canaries:
        records.append(f"Canaries: {_count(r.n_canaries, 'record')} inserted in the training set "
                       f"(`{r.sources.get('canaries', 'the run folder')}`), scored apart from the members.")
    refs = f", with {r.references} reference models trained on random halves of the records" if r.references else ""
    methods = [f"Membership inference: {', '.join(f'`{x}`' for x in r.attacks)}{refs}; the bag-of-words check "
               "between the two files."]
    extraction = a.data.study.extraction
    if extraction.enabled:
        methods.append(f"Prompted-prefix extraction: the first half of up to {extraction.members} members, "
                       f"{extraction.non_members} non-members and every canary, continued by the model and by "
                       "the base model; canary exposure (Carlini et al. 2019).")
    return Overview(model=f"The model: {model}, base model `{r.base['name_or_path']}`{eight}, also the reference model "
                          "of the ratio attacks" + (" (the adapter disabled)." if r.method == "lora" else "."),
                    records=records, methods=methods, notes=list(r.notes))


def audit_page(a: AuditAnalysis, paths: dict[str, Path]) -> str:
    """The audit's HTML page (the study report's style and section renderer)."""
    import html

    name = html.escape(a.record.name)
    nav = "".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in a.sections)
    said = "".join(f"<p>{inline_html(line)}</p>" for line in overview(a).lines)
    env = a.environment
    source = (f'<p class="src">Device {html.escape(str(env.device))}; {html.escape(env.versions(file_order=True))}; '
              f"memlens git {html.escape(str(env.git_commit))}; audit wall time {a.record.wall_time_s or 0:.0f} s.</p>")
    body = "".join(section_html(s, paths) for s in a.sections[1:])
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>memlens audit: {name}</title>'
            f"<style>{CSS}</style></head><body><h1>memlens audit: {name}</h1>"
            f"<p class=\"src\">generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')}</p>{section_html(a.leak, paths)}"
            f"{said}{source}<nav>{nav}</nav>{body}</body></html>")


def audit_markdown(a: AuditAnalysis, figures: dict[str, Path]) -> str:
    """The same analysis as Markdown, figures linked from `figures/` (next to it in report/)."""
    doc = Document(a, "figures", figures)
    doc.add(f"# memlens audit: {a.record.name}", "\n".join(f"- {line}" for line in overview(a).lines))
    for part in a.sections:
        section_markdown(doc, part)
    return "\n".join(doc.lines).rstrip() + "\n"


def model_card(a: AuditAnalysis) -> str:
    """A "Privacy evaluation" section for the model's README, laid out as a Hugging Face model card's evaluation
    (testing data, metrics, results, summary) with its limitations: what was measured, on which records, with
    which attacks, the figures and the caveats."""
    leak, said = a.leak, overview(a)
    lines = ["## Privacy evaluation", "",
             f"*Measured with memlens (`memlens audit`) on {time.strftime('%Y-%m-%d')}: whether the model memorized "
             "its fine-tuning data. Every number below is computed from the audit's files; rerun the audit to update "
             "them.*", "", said.model, "",
             "### Testing data", "", *(f"- {line}" for line in said.records), "",
             "### Metrics", "",
             "- Was the suspect set used? Dataset inference (Maini et al. 2024) with shift controls and a placebo; "
             "the share of the set used (DUCI, Tong et al. 2025) with its interval, read as \"at most X% of the set "
             "was used\"." if isinstance(leak, SetAnswer) else
             "- Can an attacker tell records used in fine-tuning from records that were not? The ROC AUC of each "
             "membership attack (0.5 is chance) with its interval, and the true positive rate at 1% and 0.1% false "
             "positive rate (an attacker who must rarely be wrong).",
             *(f"- {line}" for line in said.methods), *(f"- {note}" for note in said.notes), "",
             "### Results", ""]
    if leak.omitted:
        lines += [f"Not measured: {leak.omitted.reason}.", ""]
    else:
        lines += [md_table(leak.measures[leak.measures.measure != "verdict"]), ""]
        if len(a.canaries.table):
            lines += [md_table(a.canaries.table, {"exposure": ".2f", "exposure_base": ".2f"}), ""]
        lines += ["#### Summary", "", f"**Verdict: {leak.verdict}.** " + " ".join(leak.sentences), ""]
    caveats = ([leak.warning] if leak.warning else []) + list(leak.caveats) + ([] if isinstance(leak, SetAnswer) else [
        "Members and non-members were declared by whoever ran the audit; whatever else differs between the two sets "
        "(source, date, topic) adds to the AUC: the bag-of-words check tests their words.",
        "An AUC near 0.5 on average can hide a few records that are memorized: see TPR at low FPR and the canaries."])
    lines += ["### Limitations", "", *(f"- {c}" for c in caveats), ""]
    return "\n".join(lines)


def write_audit_report(root: Path) -> AuditReport:
    """Write `report/index.html`, `report/index.md` (with report/figures/ and report/tables/) and `model-card.md`
    from the audit folder's files."""
    a = analyse_audit(root)
    layout = StudyLayout(a.root)
    out = layout.report
    paths = write_sections(out, a.sections, a.tables())
    index = write_index(out, audit_page(a, paths), a.inputs)
    markdown = out / "index.md"
    atomic_write_text(markdown, audit_markdown(a, paths))
    card = layout.root / StudyFile.MODEL_CARD
    atomic_write_text(card, model_card(a))
    return AuditReport(index=index, markdown=markdown, model_card=card, analysis=a)


__all__ = ["AuditAnalysis", "AuditReport", "CanaryResults", "LeakSummary", "Overview", "analyse_audit",
           "audit_markdown", "audit_page", "best_canary_attack", "canary_table", "detection_table",
           "exposure_threshold", "leak_summary", "load_audit_results", "model_card", "overview",
           "read_canary_scores", "write_audit_report"]
