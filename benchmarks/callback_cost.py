"""What MemlensCallback costs a training run: its evaluations' wall time against the epoch's own, in one run.

Workload: LoRA r=8 on q, v of llama-tiny, transformers' Trainer (padded batches of 16, learning rate 1e-3), one
epoch over the PHEE training split (2,898 records; `--records` fewer), with MemlensCallback(every="epoch")
scoring 200 of the training records and 200 test records (`--held-out`). The callback times each of its
evaluations and the base model's scores (the adapter disabled, once, when training begins); the epoch's own time
is the training wall time minus them (measured in the same run). A few more evaluations of the trained model
(median) show the cost of a later epoch's.

    python benchmarks/callback_cost.py             # the whole PHEE train split, 200 + 200 held out
    python benchmarks/callback_cost.py --quick     # 600 training records (the ratio is then 5x the full one's)
    python benchmarks/callback_cost.py --smoke     # seconds: 16 training records, 8 + 8 held out (the test suite's)

Target (issue #25): the callback at most 10% of an epoch's time with 200 held-out records a side.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SHARED / "models" / "llama-tiny"))
    parser.add_argument("--records", type=int, default=None, help="training records (default: all of train)")
    parser.add_argument("--held-out", type=int, default=200, help="members and non-members scored, each")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="600 training records")
    parser.add_argument("--repeats", type=int, default=3, help="later evaluations timed (median)")
    parser.add_argument("--smoke", action="store_true", help="smallest sizes, seconds (the test suite runs it): "
                        "16 training records (1 step), 8 + 8 held out, 1 later evaluation; figures meaningless")
    args = parser.parse_args(argv)
    if args.smoke:
        args.records, args.held_out, args.repeats = 16, 8, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    records = 600 if args.quick and args.records is None else args.records
    train = pd.read_json(PHEE / "train.jsonl", lines=True).context.drop_duplicates().tolist()[:records]
    test = pd.read_json(PHEE / "test.jsonl", lines=True).context.drop_duplicates().tolist()
    members, non_members = train[:args.held_out], test[:args.held_out]

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                                      task_type="CAUSAL_LM"))
    callback = MemlensCallback(members=members, non_members=non_members, every="epoch")
    with tempfile.TemporaryDirectory() as tmp:
        training = TrainingArguments(output_dir=tmp, num_train_epochs=1, learning_rate=1e-3,
                                     per_device_train_batch_size=args.batch_size, save_strategy="no", report_to=[],
                                     logging_steps=50, use_cpu=True, disable_tqdm=True, seed=0)
        trainer = Trainer(model=model, args=training, train_dataset=Dataset.from_dict(tokenizer(train)),
                          data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
                          processing_class=tokenizer, callbacks=[callback])
        start = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - start
    first, reference = callback.seconds[0], callback.reference_seconds
    epoch = total - sum(callback.seconds) - reference
    later = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        metrics = callback.evaluate(model, tokenizer, trainer.state.global_step)
        later.append(time.perf_counter() - start)
    steady = statistics.median(later)
    load = os.getloadavg()[0]
    print(f"training records {len(train)}, steps {trainer.state.global_step}, held out {len(members)} + "
          f"{len(non_members)}, torch threads {torch.get_num_threads()}, load {load:.1f}")
    print(f"epoch (training alone)          {epoch:8.1f} s")
    print(f"callback, base model's scores   {reference:8.1f} s  = {reference / epoch:6.1%} of the epoch (once, before "
          "the first step)")
    print(f"callback, end of the epoch      {first:8.1f} s  = {first / epoch:6.1%} of the epoch")
    print(f"callback, a later evaluation    {steady:8.1f} s  = {steady / epoch:6.1%} of the epoch (median of "
          f"{len(later)}: {', '.join(f'{t:.1f}' for t in later)} s)")
    print(f"memlens/auc {metrics['memlens/auc']:.3f} after one epoch; target: <= 10% of the epoch")


if __name__ == "__main__":
    main()
