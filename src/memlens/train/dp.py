"""DP-SGD fine-tuning with Opacus: per-sample clipping, Gaussian noise, Poisson sampling, accounting.

The HF Trainer cannot clip per-sample gradients, so this is a short hand-written loop built from Opacus'
pieces: ``GradSampleModule`` (per-sample gradients), ``DPOptimizer`` (clip, sum, noise), the Poisson
``UniformWithReplacementSampler`` and an accountant. We do not use ``PrivacyEngine.make_private``
because its data loader cannot collate our variable-length, dict-shaped records into an empty Poisson
batch, and because we want the physical-batch split (``train.batch_size``) under our control.

Choices (the numbers are recorded in the returned dict):
- one training *record* is the privacy unit; a canary repeated k times is protected only at group
  level k (epsilon grows roughly k-fold);
- expected (logical) batch size = ``train.batch_size * train.grad_accum`` records, sample rate
  q = expected / n; a logical batch is processed in physical chunks of ``train.batch_size``;
- steps = ``train.max_steps`` or round(epochs / q) (one epoch = 1/q Poisson batches);
- each record's loss is its mean token NLL, so its gradient does not depend on the other records
  of the batch (the HF loss averages over all tokens of the batch, which would couple them);
- one record per row (padded batches whatever `train.packing` says): Opacus' per-sample gradients are
  per row, so packing several records in a row would clip them together;
- the loss curve is logged for diagnostics; it is not privatized.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn

from memlens.config import CellConfig, ConfigError, StudyConfig
from memlens.metrics.privacy import default_delta
from memlens.models.loading import quiet_bitsandbytes_import
from memlens.train.collate import CausalLMCollator

with quiet_bitsandbytes_import():  # transformers' trainer modules import PEFT, which imports bitsandbytes
    from transformers import get_scheduler

log = logging.getLogger(__name__)


class DPUnsupportedError(ConfigError):
    """The model (or the part of it being trained) cannot be trained with Opacus DP-SGD."""


def dp_schedule(study: StudyConfig, n_records: int) -> tuple[int, float, int]:
    """(expected batch size, Poisson sample rate, steps) of a DP run on `n_records` records."""
    tcfg = study.train
    expected = min(n_records, tcfg.batch_size * tcfg.grad_accum)
    rate = expected / n_records
    steps = tcfg.max_steps or max(1, round(tcfg.epochs / rate))
    return expected, rate, steps


def per_record_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token NLL of each record (padding masked): shape (batch,). Position ids are passed with
    a batch dimension: by default models build them with batch size 1, and a trained position embedding
    (GPT-2 `wpe`) would then get per-sample gradients of the whole batch summed into one."""
    ids = batch["input_ids"]
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"], position_ids=positions,
                   use_cache=False).logits
    targets = batch["labels"][:, 1:]
    mask = (targets != -100).to(logits.dtype)
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets.clamp(min=0), reduction="none")
    return (nll * mask).sum(1) / mask.sum(1).clamp(min=1)


def _functorch_types(model: nn.Module) -> list[str]:
    """Types of trained modules that Opacus has no per-sample-gradient rule for (handled by its generic
    functorch fallback, which only works for modules whose forward is a pure function of one input)."""
    samplers = GradSampleModule.GRAD_SAMPLERS
    types = set()
    for module in model.modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)) and type(module) not in samplers:
            types.add(type(module).__name__)
    return sorted(types)


def _wrap(model: nn.Module) -> GradSampleModule:
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise DPUnsupportedError("DP-SGD: the model has no trainable parameters")
    try:
        return GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    except NotImplementedError as exc:  # e.g. trained modules with buffers (BatchNorm statistics are not private)
        raise DPUnsupportedError(
            f"DP-SGD: Opacus cannot train {type(model).__name__}: {exc}. Use LoRA (grid.method: [lora]) on "
            "linear projections, or a model without such layers") from exc


def _check_per_sample_gradients(gsm: GradSampleModule, collate, records: list[list[int]],
                                device: torch.device, functorch_types: list[str]) -> None:
    """Verify on two real records that Opacus' per-sample gradients are right for this model: each record's
    gradient computed inside a batch must equal its gradient computed alone. A failure (an exception in the
    functorch fallback, a missing or wrong per-sample gradient) is an error, never a silent fallback."""
    params = [(n, p) for n, p in gsm._module.named_parameters() if p.requires_grad]
    fallback = f" (modules without an Opacus grad sampler, handled by its functorch fallback: {functorch_types})" \
        if functorch_types else ""
    # Opacus only records activations in training mode, so switch dropout off by hand instead of eval():
    # the two computations must be comparable.
    saved = _disable_dropout(gsm)
    try:
        per_batch = _grad_samples(gsm, collate([{"input_ids": r} for r in records]), device, params)
        alone = _grad_samples(gsm, collate([{"input_ids": records[0]}]), device, params)
    except Exception as exc:  # noqa: BLE001 - re-raised with the module types named
        raise DPUnsupportedError(
            f"DP-SGD: Opacus cannot compute per-sample gradients for {type(gsm._module).__name__}{fallback}: "
            f"{type(exc).__name__}: {exc}. Use LoRA (grid.method: [lora]) on linear projections") from exc
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)
    missing = [n for n, g in per_batch.items() if g is None]
    if missing:
        raise DPUnsupportedError(f"DP-SGD: Opacus computed no per-sample gradient for {missing[:3]}{fallback}")
    # padding changes the arithmetic slightly: float32 agrees to ~1e-5, half precision only to ~1e-2
    half = any(p.dtype in (torch.bfloat16, torch.float16) for p in gsm._module.parameters())
    tol = 5e-2 if half else 1e-3
    wrong = [n for n, g in per_batch.items()
             if not torch.allclose(g[0].float(), alone[n][0].float(), rtol=tol,
                                   atol=1e-6 + tol * alone[n][0].abs().max().item())]
    if wrong:
        modules = dict(gsm._module.named_modules())
        named = [f"{n} ({type(modules.get(n.rpartition('.')[0])).__name__})" for n in wrong[:3]]
        raise DPUnsupportedError(
            f"DP-SGD: Opacus' per-sample gradients of {type(gsm._module).__name__} are wrong for {named}: a "
            "record's gradient inside a batch differs from its gradient alone, typically because the layer's "
            "input is shared by the whole batch (e.g. GPT-2 position embeddings get position ids of batch "
            f"size 1){fallback}. Freeze those parameters or use LoRA (grid.method: [lora])")


def _disable_dropout(model: nn.Module) -> list[tuple[nn.Module, str, float]]:
    """Set every dropout probability to 0 (nn.Dropout modules and attention-dropout floats); returns what to
    restore."""
    saved = []
    for module in model.modules():
        for attr in ("p", "attention_dropout", "attn_dropout"):
            value = getattr(module, attr, None)
            if isinstance(value, float) and (attr != "p" or isinstance(module, nn.modules.dropout._DropoutNd)):
                saved.append((module, attr, value))
                setattr(module, attr, 0.0)
    return saved


def _grad_samples(gsm, batch, device, params) -> dict[str, torch.Tensor | None]:
    batch = {k: v.to(device) for k, v in batch.items()}
    gsm.zero_grad(set_to_none=True)
    per_record_loss(gsm, batch).mean().backward()
    out = {}
    for name, p in params:
        sample = getattr(p, "grad_sample", None)
        out[name] = None if sample is None else (sample if torch.is_tensor(sample) else sum(sample)).detach().clone()
        p.grad_sample = None
        p.grad = None
    return out


def train_with_dp(model: nn.Module, input_ids: list[list[int]], study: StudyConfig, cell: CellConfig, *,
                  pad_token_id: int, device: torch.device | str) -> dict:
    """Train `model` (PEFT LoRA or full) in place with DP-SGD on `input_ids` (one list of token ids per
    record) and return the privacy record: epsilon (the accountant's, at the end), delta, noise_multiplier,
    max_grad_norm, loss_curve [{step, loss}], steps, accountant, sample_rate, expected_batch_size.

    The noise multiplier is `cell.noise_multiplier`, or, when it is ``"auto"``, calibrated so that the run
    ends at `study.dp.target_epsilon`. Raises DPUnsupportedError naming the module types when Opacus cannot
    compute correct per-sample gradients for what is trained."""
    if cell.noise_multiplier is None:
        raise ValueError("train_with_dp needs a cell with a noise_multiplier (null means no DP)")
    device = torch.device(device)
    dcfg = study.dp
    n = len(input_ids)
    if n < 2:
        raise ConfigError("DP-SGD needs at least 2 training records")
    delta = dcfg.delta if dcfg.delta is not None else default_delta(n)
    expected, rate, steps = dp_schedule(study, n)
    if cell.noise_multiplier == "auto":
        sigma = get_noise_multiplier(target_epsilon=dcfg.target_epsilon, target_delta=delta, sample_rate=rate,
                                     steps=steps, accountant=dcfg.accountant)
    else:
        sigma = float(cell.noise_multiplier)

    functorch_types = _functorch_types(model)
    gsm = _wrap(model)
    gsm.train()  # Opacus records activations only in training mode
    with warnings.catch_warnings():
        # Opacus' full backward hooks on embeddings (whose inputs never need gradients): expected, harmless.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        return _train(gsm, model, input_ids, study, cell, sigma, delta, expected, rate, steps,
                      pad_token_id, device, functorch_types)


def _train(gsm, model, input_ids, study, cell, sigma, delta, expected, rate, steps, pad_token_id, device,
           functorch_types) -> dict:
    dcfg, tcfg = study.dp, study.train
    n = len(input_ids)
    torch.manual_seed(cell.seed)  # dropout
    sampler_rng = torch.Generator().manual_seed(cell.seed)
    noise_rng = torch.Generator(device=device).manual_seed(cell.seed + 1)
    collate = CausalLMCollator(pad_token_id)
    try:
        # Probe two short records before spending any privacy budget.
        by_length = sorted(input_ids, key=len)
        probe = [by_length[0], by_length[len(by_length) // 4]]  # different lengths: padding is exercised
        _check_per_sample_gradients(gsm, collate, probe, device, functorch_types)

        params = [p for p in model.parameters() if p.requires_grad]
        base_opt = torch.optim.AdamW(params, lr=cell.effective_learning_rate(tcfg), weight_decay=tcfg.weight_decay)
        optimizer = DPOptimizer(base_opt, noise_multiplier=sigma, max_grad_norm=dcfg.max_grad_norm,
                                expected_batch_size=expected, loss_reduction="mean", generator=noise_rng,
                                secure_mode=False)
        accountant = create_accountant(dcfg.accountant)
        optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=rate))
        scheduler = get_scheduler(tcfg.lr_scheduler, optimizer=base_opt, num_warmup_steps=tcfg.warmup_steps,
                                  num_training_steps=steps)
        sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=rate, generator=sampler_rng,
                                                steps=steps)
        curve, batch_sizes = [], []
        for step, indices in enumerate(sampler, start=1):
            losses = _dp_step(gsm, optimizer, params, [input_ids[i] for i in indices], collate,
                              tcfg.batch_size, device)
            scheduler.step()
            batch_sizes.append(len(indices))
            if losses and (step % tcfg.logging_steps == 0 or step == steps):
                curve.append({"step": step, "loss": float(sum(losses) / len(losses))})
        epsilon = float(accountant.get_epsilon(delta=delta))
    finally:
        gsm.cleanup()  # removes hooks and Opacus' per-parameter attributes...
        for p in model.parameters():  # ...except the DPOptimizer's: `model` is a plain module again
            for attr in ("summed_grad", "grad_sample"):
                if hasattr(p, attr):
                    delattr(p, attr)
        model.eval()
    log.info("DP-SGD: %d steps, sigma %.3f, epsilon %.3f (delta %.2e, %s)", steps, sigma, epsilon, delta,
             dcfg.accountant)
    return {
        "epsilon": epsilon,
        "delta": delta,
        "noise_multiplier": sigma,
        "max_grad_norm": dcfg.max_grad_norm,
        "target_epsilon": dcfg.target_epsilon if cell.noise_multiplier == "auto" else None,
        "accountant": dcfg.accountant,
        "steps": steps,
        "sample_rate": rate,
        "expected_batch_size": expected,
        "mean_batch_size": float(sum(batch_sizes) / len(batch_sizes)),
        "n_records": n,
        "privacy_unit": "training record (a canary repeated k times is protected only at group level k)",
        "functorch_modules": functorch_types,
        "loss_curve": curve,
        "final_loss": curve[-1]["loss"] if curve else None,
    }


def _dp_step(gsm: GradSampleModule, optimizer: DPOptimizer, params: list[nn.Parameter],
             records: list[list[int]], collate, physical: int, device: torch.device) -> list[float]:
    """One logical (Poisson) batch: clip and sum per-sample gradients chunk by chunk, then one noisy step.
    Returns the per-record losses."""
    optimizer.zero_grad(set_to_none=True)
    if not records:  # an empty Poisson batch still takes a (pure-noise) step: the accountant assumes it
        for p in params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        optimizer.step()
        return []
    chunks = [records[i:i + physical] for i in range(0, len(records), physical)]
    losses: list[float] = []
    for j, chunk in enumerate(chunks):
        batch = {k: v.to(device) for k, v in collate([{"input_ids": r} for r in chunk]).items()}
        loss = per_record_loss(gsm, batch)
        loss.mean().backward()
        losses.extend(loss.detach().cpu().tolist())
        if j < len(chunks) - 1:
            optimizer.signal_skip_step(do_skip=True)  # accumulate clipped gradients, no noise yet
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    optimizer.step()
    return losses


__all__ = ["DPUnsupportedError", "default_delta", "dp_schedule", "per_record_loss", "train_with_dp"]
