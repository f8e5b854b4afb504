"""What MemlensCallback costs a training run: its evaluations' wall time against the epoch's own, in one run, and
its cost per scored record.

Workload: LoRA r=8 on q, v of llama-tiny, transformers' Trainer (padded batches of 16, learning rate 1e-3), one
epoch over 300 PHEE training records (`--records`; the issue's training set), with MemlensCallback(every="epoch")
at its defaults (`max_records` members and non-members a side, drawn from the first `--held-out` training and test
records). The callback times each of its evaluations and the base model's scores (the adapter disabled, once, when
training begins); the epoch's own time is the training wall time minus them (measured in the same run). Then the
trained model is evaluated again with `--sizes` records a side (the base model's scores already made, median of
`--repeats`): the least-squares slope of those times over the records scored is the cost per scored record.

    python benchmarks/callback_cost.py              # 300 training records, sizes 25 50 100 200
    python benchmarks/callback_cost.py --records 0  # the whole PHEE train split (2,897 records)
    python benchmarks/callback_cost.py --smoke      # 48 training records, sizes 8 16: checks the script

Target (issue #33): the default evaluation at most 10% of an epoch of a 300-record training set.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)

from memlens.integrations import MemlensCallback  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEMLENS_SHARED", REPO.parent / "shared"))
PHEE = SHARED / "data" / "phee"


def _clock() -> float:
    """The process's CPU time (`--cpu-time`: robust to other jobs on a shared machine with `--threads 1`), else the
    wall time."""
    return time.process_time() if CPU_TIME else time.perf_counter()


CPU_TIME = False


def _timed(callback: MemlensCallback, model, tokenizer, step: int, repeats: int) -> float:
    """Median time of `repeats` evaluations (the base model's scores made by a first, untimed one)."""
    callback.evaluate(model, tokenizer, step)
    times = []
    for _ in range(repeats):
        start = _clock()
        callback.evaluate(model, tokenizer, step)
        times.append(_clock() - start)
    return statistics.median(times)


class _Clocked(MemlensCallback):
    """The callback, its evaluations and its work before the first step also timed by :func:`_clock`."""

    def evaluate(self, model, tokenizer, global_step: int = 0):
        start = _clock()
        metrics = super().evaluate(model, tokenizer, global_step)
        self.clocked.append(_clock() - start)
        return metrics

    def on_train_begin(self, *args, **kwargs):
        start = _clock()
        super().on_train_begin(*args, **kwargs)
        self.clocked_reference = _clock() - start
        self.clocked = []


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SHARED / "models" / "llama-tiny"))
    parser.add_argument("--records", type=int, default=300, help="training records (0: all of train)")
    parser.add_argument("--held-out", type=int, default=200, help="members and non-members to sample from, each")
    parser.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100, 200], help="records scored a side")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="evaluations timed per size (median)")
    parser.add_argument("--smoke", action="store_true", help="48 training records, sizes 8 and 16, 1 repeat")
    parser.add_argument("--cpu-time", action="store_true", help="time by the process's CPU time, not the wall time "
                        "(with --threads 1 on a machine other jobs share)")
    args = parser.parse_args(argv)
    global CPU_TIME
    CPU_TIME = args.cpu_time
    if args.smoke:
        args.records, args.held_out, args.sizes, args.repeats = 48, 16, [8, 16], 1
    if args.threads:
        torch.set_num_threads(args.threads)
    train = pd.read_json(PHEE / "train.jsonl", lines=True).context.drop_duplicates().tolist()[:args.records or None]
    test = pd.read_json(PHEE / "test.jsonl", lines=True).context.drop_duplicates().tolist()
    members, non_members = train[:args.held_out], test[:args.held_out]

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                                      task_type="CAUSAL_LM"))
    callback = _Clocked(members=members, non_members=non_members, every="epoch")
    with tempfile.TemporaryDirectory() as tmp:
        training = TrainingArguments(output_dir=tmp, num_train_epochs=1, learning_rate=1e-3,
                                     per_device_train_batch_size=args.batch_size, save_strategy="no", report_to=[],
                                     logging_steps=50, use_cpu=True, disable_tqdm=True, seed=0)
        trainer = Trainer(model=model, args=training, train_dataset=Dataset.from_dict(tokenizer(train)),
                          data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                          processing_class=tokenizer, callbacks=[callback])
        start = _clock()
        trainer.train()
        total = _clock() - start
    first, reference = callback.clocked[0], callback.clocked_reference
    epoch = total - sum(callback.clocked) - reference
    step = trainer.state.global_step
    sizes = [n for n in args.sizes if n <= min(len(members), len(non_members))]
    by_size = {n: _timed(MemlensCallback(members=members, non_members=non_members, max_records=n), model, tokenizer,
                         step, args.repeats) for n in sizes}
    scored = np.array([2 * n for n in sizes], dtype=float)
    seconds = np.array([by_size[n] for n in sizes])
    per_record, fixed = np.polyfit(scored, seconds, 1) if len(sizes) > 1 else (seconds[0] / scored[0], 0.0)
    per_training_record = epoch / len(train)
    scored_now = len(callback.members) + len(callback.non_members)
    print(f"training records {len(train)}, steps {step}, torch threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()[0]:.1f}, timed by {'CPU' if CPU_TIME else 'wall'} time")
    print(f"epoch (training alone)              {epoch:8.2f} s  "
          f"({1000 * per_training_record:.1f} ms a training record)")
    print(f"base model's scores (once)          {reference:8.2f} s  = {reference / epoch:6.1%} of the epoch, "
          f"before the first step ({scored_now} records)")
    print(f"default evaluation, in training     {first:8.2f} s  = {first / epoch:6.1%} of the epoch "
          f"(max_records {callback.max_records}: {scored_now} records scored; "
          f"auc {callback.history[0]['memlens/auc']:.3f})")
    for n in sizes:
        print(f"evaluation of {n:4d} + {n:<4d} records   {by_size[n]:8.2f} s  = {by_size[n] / epoch:6.1%} of the epoch")
    print(f"per scored record                   {1000 * per_record:8.2f} ms = {per_record / per_training_record:.2f} "
          f"training records' time (fixed part {fixed:.2f} s); {epoch / per_record:.0f} records "
          "scored = 100% of this epoch")
    budget = 0.10 * epoch
    print(f"records a side within 10% of this epoch: {max(0.0, (budget - fixed) / per_record / 2):.0f}")


if __name__ == "__main__":
    main()
