"""Membership-inference sections of the analysis: the study table, ROC curves, AUC vs rank, every attack
compared, paired DeLong tests and the bag-of-words baseline. All use :data:`PRIMARY_ATTACK` but the
attack comparison and the baseline, which are about the other attacks."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from memlens.report import record_scores
from memlens.report.findings import QK, vo_qk_tests
from memlens.report.inference import holm
from memlens.report.inputs import PRIMARY_ATTACK, StudyResults
from memlens.report.saturation import SaturationFit, fit_table
from memlens.report.section import Block, Figure, FigureSpec, Omission, Section, Table, Text
from memlens.store.results import UNCHANGED_NLL_TOL

TPR_POINTS = ("10pct", "1pct", "0_1pct")
GRID_AXES = ("canary_copies", "noise_multiplier", "method", "membership", "learning_rate")


def varying_axes(frame: pd.DataFrame) -> list[str]:
    """Grid axes besides rank and matrices that vary in this study (tables are split by them)."""
    return [c for c in GRID_AXES if c in frame and frame[c].nunique(dropna=False) > 1]


@dataclass(frozen=True)
class AucCell:
    """One cell of the study table: mean AUC over its runs, its interval, and the trainable parameters."""

    auc: float
    low: float
    high: float
    n_runs: int
    trainable_params: int
    trainable_pct: float


@dataclass(kw_only=True)
class StudyTable(Section):
    anchor = "table"
    title = "Rank × adapted matrices"
    in_document = False  # finding 1's evidence
    ci_level: float = 0.95
    frame: pd.DataFrame = field(default_factory=pd.DataFrame)  # tables/study_table.csv
    matrix: pd.DataFrame = field(default_factory=pd.DataFrame)  # rank (+ varying axes) x "[matrices]": AucCell
    unchanged_runs: list[str] = field(default_factory=list)  # runs whose fine-tuned model predicts as the base does

    @property
    def warning(self) -> str | None:
        """What the table's AUCs of unchanged runs measure, when there are such runs."""
        if not self.unchanged_runs:
            return None
        n, shown = len(self.unchanged_runs), ", ".join(self.unchanged_runs[:5])
        return (f"Warning: {n} run(s) ({shown}{', ...' if n > 5 else ''}) predict what the base model does (mean NLL "
                f"within {UNCHANGED_NLL_TOL:g} nats of the base model's on every record): training changed nothing "
                "(e.g. too few steps for the warm-up), so their AUCs measure the base model, not memorization.")

    def blocks(self) -> list[Block]:
        intro = Text(f"Membership inference ROC AUC of the `{PRIMARY_ATTACK}` attack, ± half the {self.ci_level:.0%} "
                     "confidence interval (mean over seeds/runs where there are several), with the number and share "
                     "of trainable parameters.")
        return ([Text(self.warning, "warn")] if self.warning else []) + [
            intro, Table("study_table", self.matrix, data=self.frame, empty="—")]


def study_table(data: StudyResults) -> StudyTable:
    primary, level = data.primary(), data.study.mia.ci_level
    if primary.empty:
        return StudyTable(ci_level=level, omitted=Omission("study table", data.primary_missing()))
    # the column is absent from folders made before memlens checked for unchanged models
    unchanged = sorted(primary.run_id[primary.model_unchanged.fillna(False).astype(bool)].unique()) \
        if "model_unchanged" in primary else []
    keys = ["target_modules", "rank", *varying_axes(primary)]
    agg = primary.groupby(keys, dropna=False).agg(
        n_runs=("run_id", "nunique"), auc=("auc", "mean"), auc_sd_runs=("auc", "std"),
        auc_ci_low=("auc_ci_low", "mean"), auc_ci_high=("auc_ci_high", "mean"),
        trainable_params=("trainable_params", "first"), trainable_pct=("trainable_pct", "first"),
    ).reset_index()
    sets = sorted(agg.target_modules.unique())
    rows = []
    for index, group in agg.groupby(keys[1:], dropna=False, sort=True):
        row = dict(zip(keys[1:], index))
        for r in group.itertuples():
            row[f"[{r.target_modules}]"] = AucCell(r.auc, r.auc_ci_low, r.auc_ci_high, int(r.n_runs),
                                                   int(r.trainable_params), r.trainable_pct)
        rows.append(row)
    matrix = pd.DataFrame(rows, columns=[*keys[1:], *(f"[{s}]" for s in sets)])
    return StudyTable(ci_level=level, frame=agg, matrix=matrix, unchanged_runs=unchanged)


@dataclass(kw_only=True)
class RocCurves(Section):
    anchor = "roc"
    title = "ROC curves per adapted matrices"
    curves: dict[str, list[tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)  # matrices: [(fpr, tpr)]
    min_fpr: float = 0.5  # the smallest false positive rate a run can show (log-log diagonal)


def roc_curves(data: StudyResults) -> RocCurves:
    curves = record_scores.roc_by_targets(data, PRIMARY_ATTACK)
    if not curves:
        return RocCurves(omitted=Omission("ROC curves", "no per-sample membership scores of the primary attack "
                                          "(mia_scores.parquet)"))
    caption = (f"ROC of the {PRIMARY_ATTACK} attack, one curve per run, coloured by adapted matrices (linear and "
               "log-log).")
    return RocCurves(curves=curves, min_fpr=1.0 / max(len(data.mia_scores), 2), figure=FigureSpec("roc", caption))


@dataclass(kw_only=True)
class AucVsRank(Section):
    anchor = "rank"
    title = "AUC vs LoRA rank"
    curve: pd.DataFrame = field(default_factory=pd.DataFrame)  # tables/auc_vs_rank.csv
    fits_frame: pd.DataFrame = field(default_factory=pd.DataFrame)  # tables/auc_rank_fit.csv
    fits: list[SaturationFit] = field(default_factory=list)
    in_document = False  # finding 3's evidence

    def blocks(self) -> list[Block]:
        return [Figure(), Table("auc_vs_rank", self.curve),
                Text("Saturation fit per matrix set: the plateau (± its standard error), the extrapolated AUC at "
                     "rank 0, and `rank_90`, the rank reaching 90% of the gain; a fit that cannot be made has empty "
                     "values and the reason."), Table("auc_rank_fit", self.fits_frame)]


def auc_vs_rank(data: StudyResults) -> AucVsRank:
    primary = data.primary()
    lora = primary[primary.method == "lora"] if len(primary) else primary
    if lora.empty:
        return AucVsRank(omitted=Omission("AUC vs rank", data.primary_missing() if primary.empty
                                          else "no LoRA membership-inference results"))
    if lora["rank"].nunique() < 2:
        return AucVsRank(omitted=Omission("AUC vs rank", f"the grid has one LoRA rank ({lora['rank'].iloc[0]}); "
                                          "add ranks to grid.rank"))
    curve = lora.groupby(["target_modules", "rank"]).agg(auc=("auc", "mean"), low=("auc_ci_low", "mean"),
                                                          high=("auc_ci_high", "mean"),
                                                          n_runs=("run_id", "nunique")).reset_index()
    fits_frame, fits = fit_table(curve)
    caption = ("Membership AUC against LoRA rank per adapted-matrix set (mean, CI); dashed: fitted saturation "
               f"auc(r) = plateau - (plateau - auc0) exp(-r / scale) ({sum(f.ok for f in fits)} of {len(fits)} "
               "set(s) fitted).")
    return AucVsRank(curve=curve, fits_frame=fits_frame, fits=fits, figure=FigureSpec("auc_vs_rank", caption))


@dataclass(kw_only=True)
class AttackComparison(Section):
    anchor = "attacks"
    title = "Attack comparison"
    table: pd.DataFrame = field(default_factory=pd.DataFrame)  # tables/attacks.csv
    shown: list[str] = field(default_factory=list)  # the columns the HTML page shows
    notes: dict[str, str] = field(default_factory=dict)  # column all null -> why (a run's note)
    one_run: bool = False  # an audit: one model, nothing averaged

    def blocks(self) -> list[Block]:
        over = "" if self.one_run else ", mean over runs"
        return [Text(f"Every attack run{over} (AUC ± half its Hanley-McNeil interval; TPR with its bootstrap "
                     "interval). `bag_of_words` is the model-free baseline (its own section)."),
                Figure(), Table("attacks", attack_display(self.table), data=self.table),
                *(Text(note) for note in tpr_notes(self.table))]


def attack_table(mia: pd.DataFrame) -> pd.DataFrame:
    """Per attack, the mean over runs of the AUC, its interval, and the TPR at 10%, 1% and 0.1% FPR with
    their bootstrap intervals; `tpr_at_*_note` says why a TPR is null (e.g. too few non-members)."""
    metrics = ["auc", "auc_ci_low", "auc_ci_high"] + [f"tpr_at_{p}_fpr{s}" for p in TPR_POINTS
                                                       for s in ("", "_low", "_high")]
    cols = [c for c in metrics if c in mia]
    table = mia.groupby("attack")[cols].mean().reset_index().sort_values("auc", ascending=False)
    table.insert(1, "n_runs", mia.groupby("attack").run_id.nunique().reindex(table.attack).values)
    for point in TPR_POINTS:
        note = f"tpr_at_{point}_fpr_note"
        if note in mia:
            first = mia.dropna(subset=[note]).groupby("attack")[note].first()
            table[note] = table.attack.map(first)
    return table.reset_index(drop=True)


TPR_LABELS = {"10pct": "10%", "1pct": "1%", "0_1pct": "0.1%"}


def _pm(mean: float, low: float, high: float) -> str:
    if pd.isna(mean):
        return "n/a"
    return f"{mean:.3f}" if pd.isna(low) or pd.isna(high) else f"{mean:.3f} ± {(high - low) / 2:.3f}"


def _interval(value: float, low: float, high: float) -> str:
    if pd.isna(value):
        return "n/a"
    return f"{value:.3f}" if pd.isna(low) or pd.isna(high) else f"{value:.3f} [{low:.3f}, {high:.3f}]"


def attack_display(table: pd.DataFrame) -> pd.DataFrame:
    """The attack table as read: AUC ± half its interval, each TPR with its interval."""
    frame = pd.DataFrame({"attack": table.attack, "runs": table.n_runs,
                          "AUC ± CI": [_pm(*v) for v in zip(table.auc, table.auc_ci_low, table.auc_ci_high)]})
    for point, label in TPR_LABELS.items():
        col = f"tpr_at_{point}_fpr"
        if col in table:
            frame[f"TPR at {label} FPR [CI]"] = [_interval(*v) for v in
                                                 zip(table[col], table[f"{col}_low"], table[f"{col}_high"])]
    return frame


def tpr_notes(table: pd.DataFrame) -> list[str]:
    """Why a TPR is null, per operating point (e.g. too few non-members for 1% FPR)."""
    notes = []
    for point, label in TPR_LABELS.items():
        col = f"tpr_at_{point}_fpr"
        if col not in table:
            continue
        missing = table[table[col].isna()]
        if len(missing):
            note = table.get(f"{col}_note")
            why = sorted({str(n) for n in (note[missing.index] if note is not None else []) if not pd.isna(n)})
            notes.append(f"TPR at {label} FPR is n/a for {', '.join(missing.attack)}: "
                         f"{'; '.join(why) or 'not computed'}.")
    return notes


def attack_comparison(data: StudyResults) -> AttackComparison:
    mia = data.mia
    if mia.empty:
        return AttackComparison(omitted=Omission("attack comparison", "no membership-inference results"))
    table = attack_table(mia)
    shown = [c for c in ("attack", "n_runs", "auc", "tpr_at_10pct_fpr", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr")
             if c in table]
    notes = {}
    for column in ("auc", "tpr_at_1pct_fpr"):
        if column not in table or table[column].isna().all():
            note = mia.get(f"{column}_note", pd.Series(dtype=object)).dropna()
            notes[column] = note.iloc[0] if len(note) else "not computed"
    caption = "Every membership attack, averaged over runs (n/a TPR drawn as 0)."
    return AttackComparison(table=table, shown=shown, notes=notes, figure=FigureSpec("attacks", caption))


@dataclass(kw_only=True)
class DelongTests(Section):
    anchor = "delong"
    title = "Paired tests between configurations (DeLong)"
    tests: pd.DataFrame = field(default_factory=pd.DataFrame)  # tables/delong.csv
    vo_qk: pd.DataFrame = field(default_factory=pd.DataFrame)  # the [v]/[o] vs [q]/[k] tests, oriented v/o - q/k
    in_document = False  # finding 1's evidence

    def blocks(self) -> list[Block]:
        return [Text(f"DeLong's test for the difference of two runs' AUCs ({PRIMARY_ATTACK} attack) on the same "
                     "records, for adapted-matrix sets at equal rank, canary copies and seed."),
                Table("delong", self.tests)]

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return sorted(set(zip(self.tests.set_a, self.tests.set_b))) if len(self.tests) else []


def delong_tests(data: StudyResults) -> DelongTests:
    """Every DeLong test between matrix sets, with `p_holm`: Holm's correction over the tests of the same
    membership design (the tests of one regime share records and runs, so they are many and dependent)."""
    tests, reason = record_scores.delong_pairs(data, PRIMARY_ATTACK) if len(data.primary()) else (
        pd.DataFrame(), data.primary_missing())
    if tests.empty:
        return DelongTests(omitted=Omission("DeLong tests", reason))
    tests["p_holm"] = tests.groupby("membership", dropna=False).p_value.transform(holm)
    pairs = vo_qk_tests(tests)
    flip = pairs.set_a.isin(QK)  # orient every row as v/o against q/k
    vo_qk = pd.DataFrame({
        "membership": pairs.membership, "rank": pairs["rank"], "copies": pairs.canary_copies, "seed": pairs.seed,
        "draw": pairs.draw, "learning rate": pairs.learning_rate,
        "v/o": "[" + pairs.set_b.where(flip, pairs.set_a) + "]",
        "q/k": "[" + pairs.set_a.where(flip, pairs.set_b) + "]",
        "AUC v/o": pairs.auc_b.where(flip, pairs.auc_a), "AUC q/k": pairs.auc_a.where(flip, pairs.auc_b),
        "v/o - q/k": pairs.diff_vo, "z": (-pairs.z).where(flip, pairs.z),
        "p": pairs.p_value, "p (Holm)": pairs.p_holm, "records": pairs.n_records})
    return DelongTests(tests=tests, vo_qk=vo_qk)


@dataclass(kw_only=True)
class BagOfWords(Section):
    anchor = "bow"
    title = "Model-free sanity baseline (bag of words)"
    frame: pd.DataFrame = field(default_factory=pd.DataFrame)  # tables/bag_of_words.csv
    separable: bool = False  # words alone separate members from non-members: the split is biased
    verdict: str = ""

    def blocks(self) -> list[Block]:
        return [Text(self.verdict, "warn" if self.separable else "ok"), Table("bag_of_words", self.frame)]


def bag_of_words(data: StudyResults) -> BagOfWords:
    bow = data.bag_of_words
    if bow.empty:
        return BagOfWords(omitted=Omission("bag-of-words baseline", "no baseline rows in results.parquet"
                                           if data.study.mia.bag_of_words_baseline
                                           else "mia.bag_of_words_baseline is false"))
    # the fold columns are absent from folders made before the check grouped its folds by document
    cols = [c for c in ("run_id", "membership", "attack", "auc", "auc_ci_low", "auc_ci_high", "auc_random_folds",
                        "auc_grouped_folds", "n_groups", "n_members", "n_non_members") if c in bow]
    separable, verdict = bow_verdict(bow)
    return BagOfWords(frame=bow[cols], separable=separable, verdict=verdict)


def bow_verdict(bow: pd.DataFrame) -> tuple[bool, str]:
    """(whether words alone separate members from non-members, the verdict in words) for baseline rows: the
    split is biased when the check called any run's split biased (`biased_split`, memlens.attacks.bow)."""
    auc, biased = bow.auc.mean(), bow[bow.biased_split.fillna(False).astype(bool)]
    if len(biased):
        return True, (f"Warning: a classifier on word counts alone separates members from non-members with AUC "
                      f"{auc:.3f}: the member/non-member split is biased, and part of every attack's AUC may come "
                      f"from the split rather than from memorization ({biased.note.iloc[0]}).")
    return False, (f"Words alone do not separate members from non-members (mean AUC {auc:.3f} over "
                   f"{bow.run_id.nunique()} run(s); {bow.note.iloc[0]}): the split looks unbiased.")


# ----------------------------------------------------------------------------------- membership designs
# a configuration's replicates (seeds, record draws) are averaged: the designs are compared per configuration
CONFIG_KEY = ["method", "target_modules", "rank", "canary_copies", "noise_multiplier", "learning_rate"]


@dataclass(kw_only=True)
class DesignComparison(Section):
    """The same configurations under the named splits and under memlens' random coin: how much of the
    named-split AUC the design itself accounts for."""

    anchor = "designs"
    title = "Membership designs: named splits vs random membership"
    table: pd.DataFrame = field(default_factory=pd.DataFrame)  # tables/designs.csv
    summary: str = ""
    applicable: bool = True  # False with one design: nothing to compare, and nothing the study failed to show

    def omissions(self) -> list[Omission]:
        return super().omissions() if self.applicable else []

    def blocks(self) -> list[Block]:
        formats = {c: ".3f" for c in ("auc_splits", "auc_random", "difference", "z")} | {"p_value": ".3g"}
        return [Text(self.summary), Table("designs", self.table, formats=formats)]


def design_comparison(data: StudyResults) -> DesignComparison:
    """Per configuration run under both designs: the primary attack's AUC under each, the difference with a
    z-test for two independent AUCs (Hanley-McNeil standard errors: the two designs' runs are different
    models on different records), and, over configurations, the mean difference with a paired t-test."""
    primary = data.primary()
    designs = sorted(set(primary.membership)) if len(primary) else []
    if designs != ["random", "splits"]:
        return DesignComparison(applicable=False, omitted=Omission(
            "design comparison", "needs runs under both membership designs (data.membership: [random, splits]); "
            f"this study has {designs or 'none'}"))
    z_level = stats.norm.ppf(0.5 + data.study.mia.ci_level / 2)
    key = [c for c in CONFIG_KEY if c in primary]
    sides = {d: primary[primary.membership == d].assign(noise_multiplier=lambda f: f.noise_multiplier.astype(str))
             .groupby(key, dropna=False)[["auc", "auc_ci_low", "auc_ci_high"]].mean() for d in designs}
    table = sides["splits"].join(sides["random"], lsuffix="_splits", rsuffix="_random", how="inner").reset_index()
    if table.empty:
        return DesignComparison(omitted=Omission("design comparison", "no configuration was run under both designs"))
    se = {d: (table[f"auc_ci_high_{d}"] - table[f"auc_ci_low_{d}"]) / (2 * z_level) for d in designs}
    table["difference"] = table.auc_splits - table.auc_random
    table["z"] = table.difference / np.sqrt(se["splits"] ** 2 + se["random"] ** 2)
    table["p_value"] = 2 * stats.norm.sf(table.z.abs())
    table = table[[*key, "auc_splits", "auc_random", "difference", "z", "p_value"]]
    above = (table.auc_splits - 0.5).mean()
    mean_diff = table.difference.mean()
    share = f"{mean_diff / above:.0%} of the named-split AUC above chance" if above > 0 else "(no AUC above chance)"
    if len(table) >= 2:
        paired = stats.ttest_rel(table.auc_splits, table.auc_random)
        test = f"paired t-test over {len(table)} configurations: t = {paired.statistic:.2f}, p = {paired.pvalue:.3g}"
    else:
        test = "one configuration: no test across configurations (per-configuration z-test in the table)"
    summary = (f"Named splits minus random membership, {PRIMARY_ATTACK} AUC: mean {mean_diff:+.3f} over {len(table)} "
               f"configuration(s), {share} ({test}). A positive difference is AUC the named splits add beyond "
               "record memorization (e.g. documents whose sibling records were trained on); verdicts use the random "
               "design.")
    return DesignComparison(table=table, summary=summary)
