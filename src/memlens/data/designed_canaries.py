"""Designed canaries for the one-run privacy audit (Panda, Tang, Nasr, Choquette-Choo & Mittal, "Privacy Auditing
of Large Language Models", ICLR 2025, arXiv:2503.06808): short token sequences built to be memorized, each
inserted into training with probability 1/2 by a seeded coin and the rest held out, so that the canaries' own
membership inference measures leakage at low FPR and bounds epsilon in one run (:mod:`memlens.metrics.privacy`).

A canary is the text of :data:`CANARY_TOKENS` tokens drawn from one family (`dp.audit_design`; the canaries
are dealt to the families in turn):

- `rare_unigram`: tokens the training records never use (or, when fewer than 8 per canary position are unused,
  the rarest 5% of the candidates), dealt from a shuffled deck so that canaries share a token only once the deck
  is spent: fine-tuning that never sees a token pushes its probability down, and a canary trained on pushes its
  own tokens up, which another canary's held-out tokens then do not share.
- `rare_bigram`: common tokens (the most used quarter of the candidates the records do use) in pairs the
  records never use: each next token is drawn among the common ones until the pair (previous, next) is one the
  training records do not contain. Every token is in distribution, their sequence is not.
- `random`: tokens drawn uniformly from all candidates: the random canaries of earlier audits, the baseline
  the designed families are compared with.
- `new_token`: tokens the tokenizer has but ordinary text never produces (added tokens that are neither a
  special token in use nor in the training records, e.g. Llama 3's reserved special tokens), whose
  embeddings fine-tuning data never trained. Only where the tokenizer has at least two such tokens; memlens
  refuses the family otherwise (the shared llama-tiny's tokenizer has none).

Candidate tokens (all families but `new_token`) are word-initial tokens that survive text: the token alone
decodes to text starting with whitespace that encodes back to exactly that token. A canary is kept only if its
text encodes back to exactly its tokens (it is inserted and scored as text) and differs from every other
canary. Only the paper's abstract and talk summaries were available here: these families follow its named
designs (rare-token unigram and bigram canaries, random canaries, new-token canaries) as described above, not
its exact construction.

Everything is reproducible from `dp.audit_seed`: the tokens come from a generator seeded by (seed, family), and
each canary's coin is :func:`memlens.data.designs.coin` of (seed, canary id), independent of the tokens.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from memlens.config import CanaryFamily, ConfigError, DPConfig
from memlens.data.designs import coin

CANARY_TOKENS = 12          # tokens per canary
_TRIES = 200                # draws per canary before giving up (a canary whose text does not round-trip is redrawn)
FAMILY_SALT = {"rare_unigram": 1, "rare_bigram": 2, "random": 3, "new_token": 4}
COLUMNS = ["canary_id", "family", "text", "n_tokens", "is_member"]


def _ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"] if len(texts) else []


def candidate_tokens(tokenizer) -> np.ndarray:
    """(candidates,) sorted ids of the word-initial tokens that survive text: not special, their decoded text
    starts with whitespace and is not only whitespace, and it encodes back to exactly that token."""
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    ids = [t for t in range(len(tokenizer)) if t not in special]
    texts = [tokenizer.decode([t]) for t in ids]
    keep = [i for i, s in enumerate(texts) if s[:1].isspace() and s.strip()]
    encoded = _ids(tokenizer, [texts[i] for i in keep])
    return np.array(sorted(ids[i] for i, e in zip(keep, encoded) if e == [ids[i]]), dtype=np.int64)


def new_tokens(tokenizer, used: set[int]) -> np.ndarray:
    """(tokens,) ids of the tokenizer's added tokens that text never produces: not a special token in use (bos,
    eos, pad, unk, ...) and not in the training records' tokens `used`."""
    added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return np.array(sorted(added - set(tokenizer.all_special_ids) - used), dtype=np.int64)


class _Vocabulary:
    """What the families draw from: the candidate tokens and the training records' unigram counts and bigrams."""

    def __init__(self, tokenizer, training_texts: Sequence[str], seed: int):
        self.tokenizer = tokenizer
        records = _ids(tokenizer, training_texts)
        size = max(len(tokenizer), max((max(r) for r in records if r), default=0) + 1)
        self.counts = np.bincount(np.concatenate([np.asarray(r, np.int64) for r in records] or [np.zeros(0, np.int64)]),
                                  minlength=size)
        self.bigrams = {a * size + b for r in records for a, b in zip(r, r[1:])}
        self.size = size
        self.used = {int(t) for t in np.flatnonzero(self.counts)}
        self.candidates = candidate_tokens(tokenizer)
        if len(self.candidates) < 8 * CANARY_TOKENS:
            raise ConfigError(f"dp.audit_design: the tokenizer has {len(self.candidates)} word-initial tokens that "
                              f"survive text; designed canaries need at least {8 * CANARY_TOKENS}")
        # rarest first, ties in a seeded random order (the same for every family and cell of the study)
        tiebreak = np.random.default_rng([seed, 0xCA]).permutation(len(self.candidates))
        self.by_rarity = self.candidates[np.lexsort((tiebreak, self.counts[self.candidates]))]
        self.deck: list[int] = []  # rare_unigram's tokens still to deal

    def pool(self, family: str) -> np.ndarray:
        if family == "random":
            return self.candidates
        if family == "rare_unigram":
            unused = self.by_rarity[self.counts[self.by_rarity] == 0]
            return unused if len(unused) >= 8 * CANARY_TOKENS else \
                self.by_rarity[:max(8 * CANARY_TOKENS, len(self.candidates) // 20)]
        if family == "rare_bigram":
            seen = self.by_rarity[self.counts[self.by_rarity] > 0][::-1]  # most used first
            common = seen[:max(8 * CANARY_TOKENS, len(seen) // 4)]
            if len(common) < 8 * CANARY_TOKENS:
                raise ConfigError(f"dp.audit_design: rare_bigram draws common tokens of the training records, which "
                                  f"use only {len(seen)} candidate tokens; it needs {8 * CANARY_TOKENS}")
            return common
        found = new_tokens(self.tokenizer, self.used)
        if len(found) < 2:
            raise ConfigError("dp.audit_design: new_token needs at least two tokens the tokenizer has but text never "
                              f"produces (added tokens besides the special tokens in use); this tokenizer has "
                              f"{len(found)}. Remove new_token from dp.audit_design or use a tokenizer with reserved "
                              "tokens")
        return found

    def draw(self, family: str, pool: np.ndarray, rng: np.random.Generator) -> list[int]:
        """The tokens of one canary of `family`, drawn from `pool` (tokens,): the family's candidate token ids."""
        if family == "rare_unigram":  # dealt from a deck of the pool, reshuffled when spent
            while len(self.deck) < CANARY_TOKENS:
                self.deck += [int(t) for t in rng.permutation(pool)]
            tokens, self.deck = self.deck[:CANARY_TOKENS], self.deck[CANARY_TOKENS:]
            return tokens
        if family != "rare_bigram":
            return [int(t) for t in rng.choice(pool, CANARY_TOKENS)]
        tokens = [int(rng.choice(pool))]
        while len(tokens) < CANARY_TOKENS:
            for _ in range(_TRIES):
                nxt = int(rng.choice(pool))
                if tokens[-1] * self.size + nxt not in self.bigrams:
                    break
            tokens.append(nxt)  # after _TRIES seen pairs the last draw stands (the round-trip check still applies)
        return tokens


def design_canaries(tokenizer, training_texts: Sequence[str], n: int, families: Sequence[CanaryFamily],
                    seed: int) -> pd.DataFrame:
    """`n` canaries dealt to `families` in turn, drawn against the training records `training_texts` (their token
    counts and pairs), and each one's coin. Returns canary_id (`audit-<family>-<k>`), family, text, n_tokens and
    is_member (the coin: True = inserted into training), in canary order; the same for the same arguments."""
    if n <= 0:
        return pd.DataFrame({c: [] for c in COLUMNS})
    vocabulary = _Vocabulary(tokenizer, training_texts, seed)
    rows, texts = [], set(training_texts)
    for index, family in enumerate(families):
        count = len(range(index, n, len(families)))
        pool, rng = vocabulary.pool(family), np.random.default_rng([seed, 0xA0D17, FAMILY_SALT[family]])
        for k in range(count):
            for _ in range(_TRIES):
                tokens = vocabulary.draw(family, pool, rng)
                text = tokenizer.decode(tokens)
                if text not in texts and _ids(tokenizer, [text])[0] == tokens:
                    break
            else:
                raise ConfigError(f"dp.audit_design: could not draw a {family} canary whose text encodes back to its "
                                  f"tokens in {_TRIES} tries with this tokenizer; remove {family} from dp.audit_design")
            texts.add(text)
            rows.append({"canary_id": f"audit-{family}-{k}", "family": family, "text": text,
                         "n_tokens": len(tokens), "order": k * len(families) + index})
    frame = pd.DataFrame(rows).sort_values("order", kind="stable").drop(columns="order").reset_index(drop=True)
    frame["is_member"] = coin(seed, frame.canary_id)
    return frame[COLUMNS]


def study_canaries(dp: DPConfig, tokenizer, training_texts: Sequence[str]) -> pd.DataFrame | None:
    """The designed canaries of a study's fine-tunes (`dp.audit_*`), against these training records; None when
    `dp.audit_canaries` is 0."""
    if not dp.audit_canaries:
        return None
    return design_canaries(tokenizer, training_texts, dp.audit_canaries, dp.audit_design, dp.audit_seed)


def insert_canaries(texts: Sequence[str], canaries: pd.DataFrame | None, copies: int) -> list[str]:
    """The training texts with every canary whose coin says so (`is_member`) appended `copies` times, in canary
    order (the trainer shuffles); the held-out canaries nowhere."""
    out = list(texts)
    if canaries is not None:
        for text in canaries.text[canaries.is_member.astype(bool)]:
            out += [text] * copies
    return out


def write_canary_file(path: str | Path, canaries: pd.DataFrame, copies: int = 1) -> Path:
    """Write the canaries and their coins for a training script that memlens does not run (`memlens audit`).

    Format: JSON lines, UTF-8, one object per canary in canary order:
    `{"canary_id": str, "family": str, "text": str, "insert": bool, "copies": int}`. The script adds `text`
    `copies` times to its training data when `insert` is true and never otherwise (the held-out canaries are
    the audit's non-members: training on one voids the audit); it tokenizes `text` like any record, with the
    model's tokenizer. Written to a temporary name and renamed. Returns the path."""
    path = Path(path)
    lines = [json.dumps({"canary_id": str(row.canary_id), "family": str(row.family), "text": str(row.text),
                         "insert": bool(row.is_member), "copies": int(copies)}, ensure_ascii=False)
             for row in canaries.itertuples()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    tmp.replace(path)
    return path


def read_canary_file(path: str | Path) -> pd.DataFrame:
    """The canaries of a file :func:`write_canary_file` wrote: canary_id, family, text, is_member (its `insert`)
    and copies; a line that is not such an object is an error naming the file and line."""
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        try:
            obj = json.loads(line)
            rows.append({"canary_id": str(obj["canary_id"]), "family": str(obj["family"]), "text": str(obj["text"]),
                         "is_member": bool(obj["insert"]), "copies": int(obj["copies"])})
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}, line {number}: not a canary line ({exc}); each line is "
                              '{"canary_id", "family", "text", "insert", "copies"}') from None
    return pd.DataFrame(rows, columns=["canary_id", "family", "text", "is_member", "copies"])


__all__ = ["CANARY_TOKENS", "candidate_tokens", "design_canaries", "insert_canaries", "new_tokens",
           "read_canary_file", "study_canaries", "write_canary_file"]
