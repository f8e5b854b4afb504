"""The learned attack: membership as sequence classification over per-token statistics (LT-MIA).

Ilić, Cvejoski, Stanojević & Grigorenko 2026, "Learning the Signature of Memorization in Autoregressive Language
Models" (arXiv:2604.03199): fine-tunes whose members are known by construction give labelled data without shadow
models; a small sequence classifier over per-token distributional statistics of the fine-tuned model and its base
learns the membership statistic instead of a hand-designed one, and transfers to models it never saw.

Per record of T scored tokens, the feature sequence is (T, F) with F = len(:data:`FEATURES`): for the fine-tuned
model (ft) and the base (base), at token t with log p_t = log p(x_t | x_<t), mu_t = E_p[log p] (= -entropy) and
s2_t = Var_p[log p] of the position's predicted distribution (the scoring pass's statistics, :mod:`memlens.score`):

    logprob      log p_t                                      (ft, base, ft - base)
    z            (log p_t - mu_t) / sqrt(s2_t + 1e-6)         (ft, base, ft - base): the token's standardized value
    entropy      -mu_t                                        (ft, base, ft - base)
    sd           sqrt(s2_t)                                   (ft, base)
    top1         1 if the true token is the ft model's most likely one, else 0 (its rank, where cheap: rank 1)

The classifier (:class:`SequenceClassifier`) standardizes each feature by the training set's mean and standard
deviation, applies two 1-D convolutions over positions (kernel 5, ReLU), pools the (T, hidden) sequence by its mean
and max over the record's tokens and maps the (2 hidden,) pooled vector, with three record-level summaries (the log
of each model's mean token NLL and their difference, :data:`SUMMARY`: a mean pool of per-token features cannot form
that ratio), to one logit: the record's score, higher = member. Why a convolution and not gradient boosting on
pooled features: benchmarks/learned_attack.py prints both on the same held-out adapters (README, *The learned
attack*).

The weights are a safetensors file with a card beside it (`<name>.card.json`): what they were trained on, their
hold-out figures, the commit, and the sha256 of every text they were trained on, so that a study or an audit that
scores one of those records says so (:func:`trained_on`). memlens ships default weights (`weights/learned-default`),
trained on its own fine-tunes; :mod:`memlens.attacks.learned_training` trains others from study folders.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from pydantic import Field
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from memlens.attacks.registry import AttackInputs, AttackSettings, register
from memlens.config import ConfigError
from memlens.score import SequenceStats

FEATURES = ("logprob_ft", "logprob_base", "logprob_diff", "z_ft", "z_base", "z_diff", "entropy_ft", "entropy_base",
            "entropy_diff", "sd_ft", "sd_base", "top1_ft")
# record-level inputs of the classifier's head, beside the pooled sequence (:func:`record_summary`)
SUMMARY = ("log_nll_ft", "log_nll_base", "log_nll_ratio")
FORMAT = "memlens-learned-attack/1"
DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "learned-default.safetensors"
_EPS = 1e-6
_CLIP = 10.0  # standardized features are clipped to [-10, 10]: one extreme token cannot dominate a record


# ------------------------------------------------------------------------------------- features
def token_features(ft: SequenceStats, ref: SequenceStats) -> tuple[np.ndarray, np.ndarray]:
    """The records' feature sequences, flat: (scored tokens, F) float32 in the order of :data:`FEATURES`, and the
    (records + 1,) offsets (record i owns rows offsets[i]:offsets[i+1]). `ft` and `ref` must hold the moments
    (mu, sigma2) and cover the same tokens."""
    if not np.array_equal(ft.offsets, ref.offsets):
        raise RuntimeError("the fine-tuned and the base model's statistics do not cover the same tokens")
    for name, stats in (("fine-tuned", ft), ("base", ref)):
        if len(stats.mu) and np.isnan(stats.mu).all():
            raise RuntimeError(f"the {name} model's statistics lack the moments (scored with moments=False)")
    if ft.is_top1 is None:
        raise RuntimeError("the fine-tuned model's statistics lack is_top1")

    def side(stats: SequenceStats) -> tuple[np.ndarray, ...]:
        lp, mu, s2 = (getattr(stats, f).astype(np.float64) for f in ("logprob", "mu", "sigma2"))
        return lp, (lp - mu) / np.sqrt(s2 + _EPS), -mu, np.sqrt(s2)

    lp_f, z_f, h_f, sd_f = side(ft)
    lp_b, z_b, h_b, sd_b = side(ref)
    columns = (lp_f, lp_b, lp_f - lp_b, z_f, z_b, z_f - z_b, h_f, h_b, h_f - h_b, sd_f, sd_b,
               ft.is_top1.astype(np.float64))
    return np.stack(columns, axis=1).astype(np.float32), ft.offsets.astype(np.int64)


def pad_features(flat: np.ndarray, offsets: np.ndarray, rows: np.ndarray | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The records `rows` (default: all) of flat features (tokens, F) with their offsets, padded: (records, T_max,
    F) float32 and the (records, T_max) bool mask of real tokens (T_max at least 1)."""
    rows = np.arange(len(offsets) - 1) if rows is None else np.asarray(rows)
    lengths = offsets[rows + 1] - offsets[rows]
    width = max(1, int(lengths.max()) if len(rows) else 1)
    x = np.zeros((len(rows), width, flat.shape[1]), np.float32)
    mask = np.zeros((len(rows), width), bool)
    for i, (r, n) in enumerate(zip(rows, lengths)):
        x[i, :n] = flat[offsets[r]:offsets[r] + n]
        mask[i, :n] = True
    return torch.from_numpy(x), torch.from_numpy(mask)


# ------------------------------------------------------------------------------------- classifier
class SequenceClassifier(torch.nn.Module):
    """Standardize, two 1-D convolutions over positions, masked mean and max pooling, a linear logit.

    forward(x: (records, T, F), mask: (records, T) bool) -> (records,) logits; padded positions (mask False) do
    not change any record's logit. A record without a token gets NaN."""

    def __init__(self, n_features: int = len(FEATURES), hidden: int = 32, kernel: int = 5):
        super().__init__()
        self.hidden, self.kernel = hidden, kernel
        self.register_buffer("feature_mean", torch.zeros(n_features))
        self.register_buffer("feature_std", torch.ones(n_features))
        self.register_buffer("summary_mean", torch.zeros(len(SUMMARY)))
        self.register_buffer("summary_std", torch.ones(len(SUMMARY)))
        self.conv1 = torch.nn.Conv1d(n_features, hidden, kernel, padding=kernel // 2)
        self.conv2 = torch.nn.Conv1d(hidden, hidden, kernel, padding=kernel // 2)
        self.head = torch.nn.Linear(2 * hidden + len(SUMMARY), 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        keep = mask[:, None, :].to(x.dtype)                                    # (records, 1, T)
        z = ((x - self.feature_mean) / self.feature_std).clamp(-_CLIP, _CLIP)  # (records, T, F)
        # padding is 0 after standardizing, as the convolution's own padding past a record's end
        z = z.transpose(1, 2) * keep                                           # (records, F, T)
        h = torch.relu(self.conv1(z)) * keep                                   # (records, hidden, T)
        h = torch.relu(self.conv2(h)) * keep
        count = keep.sum(-1)                                                   # (records, 1)
        mean = h.sum(-1) / count.clamp(min=1)
        peak = h.amax(-1)                      # ReLU outputs >= 0 and padding is 0: the max of the real positions
        summary = (record_summary(x, mask) - self.summary_mean) / self.summary_std  # (records, 3)
        logit = self.head(torch.cat([mean, peak, summary], dim=1)).squeeze(-1)     # (records,)
        return torch.where(count.squeeze(-1) > 0, logit, torch.full_like(logit, float("nan")))


def record_summary(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(records, 3) of :data:`SUMMARY` from unstandardized features x (records, T, F) and mask (records, T): the log
    of each model's mean token NLL over the record and their difference (minus the log of the reference ratio)."""
    keep = mask.to(x.dtype)
    count = keep.sum(-1).clamp(min=1)
    nll_ft = -(x[..., FEATURES.index("logprob_ft")] * keep).sum(-1) / count
    nll_base = -(x[..., FEATURES.index("logprob_base")] * keep).sum(-1) / count
    log_ft, log_base = torch.log(nll_ft.clamp(min=0) + _EPS), torch.log(nll_base.clamp(min=0) + _EPS)
    return torch.stack([log_ft, log_base, log_ft - log_base], dim=1)


def classify(model: SequenceClassifier, flat: np.ndarray, offsets: np.ndarray, batch: int = 256) -> np.ndarray:
    """(records,) float64 logits of the records of flat features (tokens, F) with their (records + 1,) offsets."""
    n = len(offsets) - 1
    out = np.empty(n, np.float64)
    order = np.argsort(np.diff(offsets), kind="stable")  # similar lengths together: less padding
    model.eval()
    with torch.inference_mode():
        for start in range(0, n, batch):
            rows = order[start:start + batch]
            out[rows] = model(*pad_features(flat, offsets, rows)).double().numpy()
    return out


# ------------------------------------------------------------------------------------- weights and their card
def text_hash(text: str) -> str:
    """The sha256 (hex) of a record's text, as a card lists the records its weights were trained on."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def card_path(weights: str | Path) -> Path:
    """The card beside a weights file: `x.safetensors` -> `x.card.json`."""
    weights = Path(weights)
    return weights.with_name(weights.name.removesuffix(".safetensors") + ".card.json")


def save_weights(model: SequenceClassifier, path: str | Path, card: dict) -> Path:
    """Write the classifier (safetensors) and its card (`card_path`, JSON: the caller's fields, the file's sha256 and
    the architecture). Returns the weights' path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "features": json.dumps(FEATURES), "hidden": str(model.hidden),
            "kernel": str(model.kernel)}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=meta)
    tmp.replace(path)
    card = {**card, "format": FORMAT, "features": list(FEATURES), "architecture":
            {"kind": "conv1d", "hidden": model.hidden, "kernel": model.kernel}, "weights_sha256": _file_sha256(path)}
    card_tmp = path.with_name(f".{card_path(path).name}.tmp")
    card_tmp.write_text(json.dumps(card, indent=1) + "\n", encoding="utf-8")
    card_tmp.replace(card_path(path))
    return path


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class LearnedWeights:
    """A loaded classifier and its card; `trained_on` the set of text hashes it was trained on."""

    def __init__(self, path: Path):
        self.path = path
        if not path.is_file():
            raise ConfigError(f"mia.attacks: learned: weights file {path} does not exist (train one with `memlens "
                              "learned-attack train`, or leave `weights` unset for the shipped default)")
        cpath = card_path(path)
        if not cpath.is_file():
            raise ConfigError(f"mia.attacks: learned: {path} has no card {cpath.name} beside it; the card lists the "
                              "records the weights were trained on, without which no study can say whether they "
                              "scored records they saw")
        self.card = json.loads(cpath.read_text(encoding="utf-8"))
        self.sha256 = _file_sha256(path)
        if self.card.get("weights_sha256") != self.sha256:
            raise ConfigError(f"mia.attacks: learned: {path} does not match its card {cpath.name} (sha256 differs): "
                              "the card describes other weights")
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT or json.loads(meta.get("features", "[]")) != list(FEATURES):
            raise ConfigError(f"mia.attacks: learned: {path} is not a {FORMAT} classifier over the features "
                              f"{list(FEATURES)} (its metadata: {meta})")
        self.model = SequenceClassifier(len(FEATURES), int(meta["hidden"]), int(meta["kernel"]))
        self.model.load_state_dict(tensors)
        self.model.eval()
        self.trained_on = frozenset(self.card.get("record_sha256", []))

    @property
    def label(self) -> str:
        """How result rows name these weights: `default` or the file's path, with the first 12 hex of its sha256."""
        name = "default" if self.path.resolve() == DEFAULT_WEIGHTS.resolve() else str(self.path)
        return f"{name} (sha256 {self.sha256[:12]})"


@functools.lru_cache(maxsize=4)
def _load(path: str, version: tuple) -> LearnedWeights:
    return LearnedWeights(Path(path))


def load_weights(path: str | Path | None = None) -> LearnedWeights:
    """The classifier at `path` (None: the shipped default), loaded once per version of the file and its card; no
    network."""
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    files = (path, card_path(path))
    if not all(f.is_file() for f in files):
        return LearnedWeights(path)  # raises the error naming the missing file
    version = tuple((f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    return _load(str(path.resolve()), version)


# ------------------------------------------------------------------------------------- the attack
class LearnedSettings(AttackSettings):
    weights: str | None = Field(
        None, description="A classifier (safetensors, with its `.card.json` beside it) trained by `memlens "
        "learned-attack train`; `null`: the weights memlens ships, trained on its own llama-tiny and gpt2-small "
        "fine-tunes of PHEE (their card lists the records they saw; rows that score them say so).")


def _trained_on(x: AttackInputs, s: LearnedSettings) -> np.ndarray:
    """(n,) whether the weights were trained on each record's text."""
    seen = load_weights(s.weights).trained_on
    return np.array([text_hash(t) in seen for t in x.texts], bool)


def _provenance(s: LearnedSettings) -> dict:
    return {"attack_weights": load_weights(s.weights).label}


@register("learned", needs={"ref", "moments", "ref_moments"}, settings=LearnedSettings,
          trained_on=_trained_on, provenance=_provenance,
          description="LT-MIA (Ilić et al. 2026): a 1-D convolutional classifier over each record's per-token "
          "statistics of the fine-tuned and the base model (log p, its standardized value, entropy, spread, top-1; "
          "target minus base), pooled; the score is its logit. Weights: memlens' own (trained on llama-tiny and "
          "gpt2-small fine-tunes of PHEE) or `weights`. Rows say which weights scored them, and note records they were "
          "trained on.")
def learned(x: AttackInputs, s: LearnedSettings) -> np.ndarray:
    """(n,) logits of the classifier over the records' (tokens, F) feature sequences (:func:`token_features`)."""
    weights = load_weights(s.weights)
    flat, offsets = token_features(x.ft, x.ref)
    return classify(weights.model, flat, offsets)


__all__ = ["DEFAULT_WEIGHTS", "FEATURES", "LearnedSettings", "LearnedWeights", "SequenceClassifier", "card_path",
           "classify", "load_weights", "pad_features", "save_weights", "text_hash", "token_features"]
