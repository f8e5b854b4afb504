"""Dataset inference and the usage share (DUCI) on llama-tiny LoRA fine-tunes of PHEE with a known share used.

PHEE train (records named `<abstract>_<n>`; an abstract is a document) is shuffled by document and its first
6 x `block` records form the *population* P, cut into 6 blocks of `block` records; the rest is the outside pool.
Target t (of `--targets`) rotates the blocks' roles: block (t + j) mod 6 is a suspect set with a known share
p_j in {0, 0.1, 0.25, 0.5, 1} used in training, block (t + 5) mod 6 the known non-members N. Its training set is
the used records of the 5 suspect sets (0 + 15 + 38 + 75 + 150 at block 150) plus outside records up to 3 x
`block` (450). K reference adapters (`--references`) train with the targets' recipe on seeded random halves of P
(450 records each, as a target): valid for every target, since P's membership in them is known.

Scoring is memlens' own (`Scorer`, `score_run`: loss, ref_ratio, ref_llr, zlib, min_k, min_k_pp per record; the
references' mean token log-likelihoods); fine-tuning is plain transformers + PEFT (LoRA q, v).

Prints, against the issue's targets:
- detection rate per p: the share of targets whose dataset inference (suspect block vs N) gives p < 0.05
  (target >= 0.9 at p >= 0.25);
- false-positive rate over null trials: per target, `--null-draws` pairs of disjoint sets of `block` records drawn
  from outside records it never trained on (target <= 0.05 at level 0.05);
- mean |estimate - p| of DUCI's share with the K references (target <= 0.1), and how often its interval holds p.

    python benchmarks/dataset_inference.py --out /tmp/dibench          # 6 targets, blocks of 150 (~2.5 min idle)
    python benchmarks/dataset_inference.py --quick --out /tmp/dibench  # blocks of 40, 2 targets (~30 s idle)
    python benchmarks/dataset_inference.py --smoke --out /tmp/dibench  # the test's run: blocks of 16, 1 target
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

from memlens.attacks.dataset_inference import dataset_inference, reference_guess_scores, usage_share  # noqa: E402
from memlens.attacks.mia import BaseScores, Scorer, score_run  # noqa: E402
from memlens.attacks.registry import check_attack_inputs  # noqa: E402
from memlens.attacks.subject import Subject  # noqa: E402
from memlens.config import MIAConfig, ModelConfig  # noqa: E402

SHARED = Path(os.environ.get("MEMLENS_SHARED", Path(__file__).resolve().parents[2] / "shared"))
SHARES = (0.0, 0.1, 0.25, 0.5, 1.0)
ATTACKS = ["loss", "ref_ratio", "ref_llr", "zlib", "min_k", "min_k_pp"]
REFERENCE_ATTACKS = ["lira", "lira_offline"]
# dataset inference's features: without reference adapters (any audit), and with LiRA from the K references added
FEATURE_SETS = {"no references": ATTACKS, "with LiRA": ATTACKS + REFERENCE_ATTACKS}
LEVEL = 0.05
TARGETS = {"fpr": 0.05, "detection": 0.9, "share_error": 0.1}
# mode -> (records per block, targets, references, null draws per target, null pool per target, epochs)
MODES = {"full": (150, 6, 4, 10, 1000, 3), "quick": (40, 2, 4, 10, 200, 2), "smoke": (16, 1, 3, 2, 64, 1)}


def load_records() -> pd.DataFrame:
    frame = pd.read_json(SHARED / "data" / "phee" / "train.jsonl", lines=True, dtype={"id": str})
    frame = frame.drop_duplicates("context").rename(columns={"id": "sample_id", "context": "text"})
    frame["group"] = frame.sample_id.str.extract(r"^(\d+)_", expand=False)
    return frame[["sample_id", "text", "group"]].reset_index(drop=True)


def draw(records: pd.DataFrame, block: int, rng: np.random.Generator) -> tuple[list[pd.DataFrame], pd.DataFrame]:
    """(6 blocks of `block` records, the outside records), documents shuffled and taken in turn."""
    docs = records.group.unique()
    order = {g: i for i, g in enumerate(docs[rng.permutation(len(docs))])}
    shuffled = records.assign(_o=records.group.map(order)).sort_values(["_o", "sample_id"]).drop(columns="_o")
    shuffled = shuffled.reset_index(drop=True)
    blocks = [shuffled.iloc[i * block:(i + 1) * block].reset_index(drop=True) for i in range(6)]
    return blocks, shuffled.iloc[6 * block:].reset_index(drop=True)


def train_adapter(texts: list[str], folder: Path, seed: int, epochs: int, lr: float) -> float:
    """LoRA r=8 on q and v with transformers' Trainer and PEFT alone; returns the wall seconds."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    start = time.perf_counter()
    model_dir = SHARED / "models" / "llama-tiny"
    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(folder.parent / f"{folder.name}-trainer"), num_train_epochs=epochs,
                             learning_rate=lr, per_device_train_batch_size=8, save_strategy="no", report_to=[],
                             use_cpu=True, disable_tqdm=True, logging_strategy="no", seed=seed, warmup_steps=0)
    with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints its final metrics
        Trainer(model=model, args=args, train_dataset=Dataset.from_dict(tokenizer(texts)),
                data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False)).train()
    model.save_pretrained(str(folder))
    return time.perf_counter() - start


def target_plan(t: int, blocks: list[pd.DataFrame], outside: pd.DataFrame, block: int, null_pool: int,
                rng: np.random.Generator) -> dict:
    """Target t's roles: suspect blocks with their shares, N, the used records, the filler and the null pool."""
    suspects = [((t + j) % 6, p) for j, p in enumerate(SHARES)]
    used = []
    for b, p in suspects:
        k = int(round(p * block))
        used.append(blocks[b].iloc[rng.permutation(block)[:k]])
    used = pd.concat(used, ignore_index=True)
    order = rng.permutation(len(outside))
    n_fill = 3 * block - len(used)
    filler = outside.iloc[order[:n_fill]]
    null = outside.iloc[order[n_fill:n_fill + null_pool]].reset_index(drop=True)
    train = pd.concat([used, filler], ignore_index=True).sample(frac=1, random_state=int(rng.integers(2**31)))
    return {"suspects": suspects, "non_members": (t + 5) % 6, "used": set(used.text), "train": train.text.tolist(),
            "null": null}


def score_target(scorer: Scorer, name: str, adapter: Path, population: pd.DataFrame, null: pd.DataFrame,
                 base: BaseScores, attacks, references: tuple[np.ndarray, np.ndarray]) -> pd.DataFrame:
    """Per-record scores (memlens' score_run) of the population then the null pool under the target adapter;
    `references`: (records, K) statistics and IN flags of the same records under the references (LiRA's)."""
    scorer.bank.add_adapter(name, adapter)
    subject = Subject(name, population.assign(is_canary=False), null, {"run_id": name},
                      split_names=("population", "null"))
    frame, _ = score_run(scorer, subject, base, attacks, None, references)
    return frame.assign(text=population.text.tolist() + null.text.tolist(),
                        group=population.group.tolist() + null.group.tolist())


def reference_statistic(scorer: Scorer, name: str, adapter: Path, texts: list[str]) -> np.ndarray:
    scorer.bank.add_adapter(name, adapter)
    with scorer.bank.use(name) as model:
        return -scorer.score(model, scorer.tokenize(texts), name, moments=False).mean_nll()


def di_frame(scores: pd.DataFrame, suspect: pd.Series, non_members: pd.Series) -> pd.DataFrame:
    """The dataset-inference frame of the records in `suspect` (True side) and `non_members` (by text)."""
    by_text = scores.drop_duplicates("text").set_index("text")
    frame = by_text.loc[list(suspect) + list(non_members)].reset_index()
    return frame.assign(is_member=np.r_[np.ones(len(suspect), bool), np.zeros(len(non_members), bool)])


def evaluate_target(t: int, plan: dict, scores: pd.DataFrame, blocks: list[pd.DataFrame], population: pd.DataFrame,
                    ref_values: np.ndarray, ref_in: np.ndarray, null_draws: int, rng: np.random.Generator) -> dict:
    """Dataset inference of each suspect block (with each feature set) and of the null draws; the share of each
    suspect block by DUCI (`ref_values`, `ref_in`: (population, K))."""
    n_texts = blocks[plan["non_members"]].text
    pop_scores = scores.iloc[:len(population)]
    guess_target, guess_refs = reference_guess_scores(-pop_scores.nll_ft.to_numpy(float), ref_values, ref_in)
    rows = []
    for b, p in plan["suspects"]:
        s_texts = blocks[b].text
        frame = di_frame(scores, s_texts, n_texts)
        rows_b = population.index[population.block == b].to_numpy()
        share = usage_share(guess_target[rows_b], guess_refs, ref_in, seed=t)
        row = {"target": t, "p": p, "true_share": float(s_texts.isin(plan["used"]).mean()),
               "estimate": share.fraction, "ci_low": share.fraction_ci_low, "ci_high": share.fraction_ci_high,
               "tpr": share.tpr, "fpr": share.fpr}
        for label, features in FEATURE_SETS.items():
            di = dataset_inference(frame, features, level=LEVEL, seed=1000 * t + b)
            row[f"p_value {label}"] = di.p_value
            row[f"weights {label}"] = di.weights
        rows.append(row)
    null = plan["null"]
    block = len(n_texts)
    nulls: dict[str, list[float]] = {label: [] for label in FEATURE_SETS}
    for d in range(null_draws):
        order = rng.permutation(len(null))
        frame = di_frame(scores, null.text.iloc[order[:block]], null.text.iloc[order[block:2 * block]])
        for label, features in FEATURE_SETS.items():
            nulls[label].append(dataset_inference(frame, features, level=LEVEL, seed=5000 + 100 * t + d).p_value)
    return {"rows": rows, "null_p": nulls}


def report(results: list[dict], seconds: dict, args, mode: str) -> dict:
    rows = pd.DataFrame([r for res in results for r in res["rows"]])
    met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    print(f"\n== dataset inference and usage share, llama-tiny LoRA q,v r8 on PHEE "
          f"({mode}: suspect sets of {args.block}, "
          f"{args.targets} target(s), {args.references} references, {args.epochs} epoch(s) at lr {args.lr}) ==")
    labels = list(FEATURE_SETS)
    print(f"{'p':>5} " + " ".join(f"{'detection, ' + label:>26}" for label in labels)
          + f" {'mean estimate':>14} {'mean |estimate - p|':>20} {'interval holds p':>17}")
    figures: dict = {"per_p": {}, "features": FEATURE_SETS}
    for p, group in rows.groupby("p"):
        hits = {label: int((group[f"p_value {label}"] < LEVEL).sum()) for label in labels}
        err = (group.estimate - group.true_share).abs()
        holds = float(((group.ci_low <= group.true_share) & (group.true_share <= group.ci_high)).mean())
        figures["per_p"][p] = {**{f"detection {label}": hits[label] / len(group) for label in labels},
                               "mean_estimate": float(group.estimate.mean()), "share_error": float(err.mean()),
                               "ci_holds": holds, "n": len(group)}
        print(f"{p:>5.2f} " + " ".join(f"{hits[label] / len(group):>19.2f} ({hits[label]}/{len(group)})"
                                       for label in labels)
              + f" {group.estimate.mean():>14.3f} {err.mean():>20.3f} {holds:>17.2f}")
    high = rows[rows.p >= 0.25]
    for label in labels:
        null_p = np.array([p for res in results for p in res["null_p"][label]])
        fpr, detection = float((null_p < LEVEL).mean()), float((high[f"p_value {label}"] < LEVEL).mean())
        figures[label] = {"fpr": fpr, "null_trials": len(null_p), "detection_p_ge_0.25": detection}
        print(f"dataset inference, {label}: false-positive rate over {len(null_p)} null trials {fpr:.3f} (target <= "
              f"{TARGETS['fpr']}: {met(fpr <= TARGETS['fpr'])}); detection rate at p >= 0.25 {detection:.2f} "
              f"(target >= {TARGETS['detection']}: {met(detection >= TARGETS['detection'])})")
    share_error = float((rows.estimate - rows.true_share).abs().mean())
    figures.update({"share_error": share_error, "tpr_fpr": [float(rows.tpr.mean()), float(rows.fpr.mean())],
                    "seconds": seconds})
    print(f"usage share (DUCI, LiRA guesses from {args.references - 1} of the {args.references} references): mean "
          f"|estimate - p| {share_error:.3f} (target <= {TARGETS['share_error']}: "
          f"{met(share_error <= TARGETS['share_error'])}); guess rule on the references: TPR {rows.tpr.mean():.3f}, "
          f"FPR {rows.fpr.mean():.3f}")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    return figures


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="blocks of 40, 2 targets")
    parser.add_argument("--smoke", action="store_true", help="blocks of 16, 1 target, 3 references (the test's run)")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    for name in ("block", "targets", "references", "null_draws", "null_pool", "epochs"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    args = parser.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    for name, value in zip(("block", "targets", "references", "null_draws", "null_pool", "epochs"), MODES[mode]):
        if getattr(args, name) is None:
            setattr(args, name, value)
    threads, verbosity = torch.get_num_threads(), transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        return run(args, mode)
    finally:  # as they were (the test runs this in its own process)
        torch.set_num_threads(threads)
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()


def run(args, mode: str) -> dict:
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    blocks, outside = draw(load_records(), args.block, rng)
    population = pd.concat([b.assign(block=i) for i, b in enumerate(blocks)], ignore_index=True)
    plans = [target_plan(t, blocks, outside, args.block, args.null_pool, rng) for t in range(args.targets)]
    seconds = {"fine-tunes": 0.0, "scoring": 0.0, "statistics": 0.0}

    start = time.perf_counter()
    ref_in = np.zeros((len(population), args.references), bool)
    for k in range(args.references):
        ref_in[:, k] = np.random.default_rng(10_000 + k).random(len(population)) < 0.5
        if not (args.out / f"ref{k}").is_dir():
            train_adapter(population.text[ref_in[:, k]].tolist(), args.out / f"ref{k}", 10_000 + k, args.epochs,
                          args.lr)
    for t, plan in enumerate(plans):
        if not (args.out / f"target{t}").is_dir():
            train_adapter(plan["train"], args.out / f"target{t}", t, args.epochs, args.lr)
    seconds["fine-tunes"] = time.perf_counter() - start

    start = time.perf_counter()
    mia = MIAConfig(attacks=FEATURE_SETS["with LiRA"], bootstrap=0, bag_of_words_baseline=False,
                    references=args.references)
    attacks = check_attack_inputs(mia.attacks, None, references=args.references, utility=False)
    scorer = Scorer(ModelConfig(name_or_path=str(SHARED / "models" / "llama-tiny"), device="cpu"), mia,
                    args.out / "cache")
    nulls = pd.concat([p["null"] for p in plans]).drop_duplicates("text")
    base = BaseScores(scorer, {"population": population.text.tolist(), "null": nulls.text.tolist()})
    texts = population.text.tolist() + nulls.text.tolist()  # the references never trained on a null record
    values = np.column_stack([reference_statistic(scorer, f"ref{k}", args.out / f"ref{k}", texts)
                              for k in range(args.references)])
    row_of = {t: i for i, t in enumerate(texts)}
    every_in = np.r_[ref_in, np.zeros((len(nulls), args.references), bool)]
    target_scores = []
    for t, plan in enumerate(plans):
        rows = [row_of[x] for x in population.text.tolist() + plan["null"].text.tolist()]
        target_scores.append(score_target(scorer, f"target{t}", args.out / f"target{t}", population, plan["null"],
                                          base, attacks, (values[rows], every_in[rows])))
    ref_values = values[:len(population)]
    seconds["scoring"] = time.perf_counter() - start

    start = time.perf_counter()
    results = [evaluate_target(t, plan, target_scores[t], blocks, population, ref_values, ref_in, args.null_draws,
                               np.random.default_rng(args.seed + 100 + t)) for t, plan in enumerate(plans)]
    seconds["statistics"] = time.perf_counter() - start
    figures = report(results, seconds, args, mode)
    figures["rows"] = [r for res in results for r in res["rows"]]
    (args.out / "figures.json").write_text(json.dumps(figures, indent=1, default=float))
    return figures


if __name__ == "__main__":
    main()
