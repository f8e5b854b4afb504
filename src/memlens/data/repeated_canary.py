"""Canary planting: the study's repetition scheme and secret insertion (for exposure)."""

from __future__ import annotations

import string
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from memlens.config import CanaryConfig, ConfigError

_ALPHABETS = {"digits": string.digits, "hex": "0123456789abcdef"}


@dataclass(frozen=True)
class Canary:
    """The record whose number of copies a cell controls (recorded with every run)."""

    sample_id: str
    text: str
    copies: int
    mode: str
    secret: str | None = None  # insert mode: the random part of the record, ranked for exposure
    secret_format: str | None = None
    prefix: str | None = None  # insert mode: the text before the secret

    def to_dict(self) -> dict:
        return asdict(self)


def secret_alphabet(secret_format: str) -> tuple[str, int]:
    """(`alphabet`, `length`) of a `digits:N` / `hex:N` secret format."""
    kind, _, length = secret_format.partition(":")
    return _ALPHABETS[kind], int(length)


def random_secret(secret_format: str, rng: np.random.Generator) -> str:
    alphabet, length = secret_alphabet(secret_format)
    return "".join(alphabet[i] for i in rng.integers(0, len(alphabet), size=length))


@dataclass
class TrainingSet:
    """What one cell trains on.

    `texts` is the training sequence (with the canary repeated); `members` holds the distinct member
    records actually trained on (the canary once, flagged `is_canary`), which is what the membership
    attack must use: records displaced by canary copies were never seen and are not members.
    """

    texts: list[str]
    members: pd.DataFrame
    canary: Canary


def build_training_set(members: pd.DataFrame, cfg: CanaryConfig, copies: int, seed: int) -> TrainingSet:
    """Plant a canary with `copies` occurrences in the member split, seeded by `seed`."""
    rng = np.random.default_rng([seed, 0xCA4A])
    frame = members.reset_index(drop=True)
    if cfg.mode == "repeat":
        if copies > len(frame):
            raise ValueError(f"grid.canary_copies: {copies} copies exceed the {len(frame)} training records")
        order = rng.permutation(len(frame))
        canary_idx, displaced = int(order[0]), order[1:copies]
        row = frame.iloc[canary_idx]
        canary = Canary(sample_id=str(row.sample_id), text=str(row.text), copies=copies, mode="repeat")
        kept = frame.drop(index=displaced)
        texts = kept.text.tolist()
        position = kept.index.get_loc(canary_idx)
        texts[position + 1:position + 1] = [canary.text] * (copies - 1)  # adjacent copies; the trainer shuffles
        member_frame = kept.reset_index(drop=True)
        member_frame["is_canary"] = member_frame.sample_id == canary.sample_id
    else:
        secret = random_secret(cfg.secret_format, rng)
        if cfg.text is not None:
            text, prefix, secret_used = cfg.text, None, None
        else:
            text = cfg.template.format(secret=secret)
            prefix, secret_used = cfg.template.split("{secret}")[0], secret
        canary = Canary(sample_id="canary", text=text, copies=copies, mode="insert", secret=secret_used,
                        secret_format=cfg.secret_format if secret_used else None, prefix=prefix)
        texts = frame.text.tolist() + [text] * copies
        member_frame = pd.concat([frame.assign(is_canary=False),
                                  pd.DataFrame({"sample_id": ["canary"], "text": [text], "is_canary": [True]})],
                                 ignore_index=True)
    return TrainingSet(texts=texts, members=member_frame, canary=canary)


# ------------------------------------------------------------------------------------- inserted by a user
def _secret_format(secret: str, given: object, where: str, field: str) -> str:
    if isinstance(given, str) and given.strip():
        kind, _, length = given.partition(":")
        if kind not in ("digits", "hex") or not length.isdigit() or int(length) != len(secret):
            raise ConfigError(f"{field}: {where}: secret_format {given!r} must be digits:N or hex:N with N the "
                              f"secret's length ({len(secret)})")
        return given
    if secret.isdigit():
        return f"digits:{len(secret)}"
    if all(c in string.hexdigits.lower() for c in secret):
        return f"hex:{len(secret)}"
    raise ConfigError(f"{field}: {where}: the secret {secret!r} is neither digits nor lowercase hex; exposure "
                      "ranks it among random secrets of its alphabet: give a secret_format (digits:N, hex:N) it fits")


def canary_from_record(row: pd.Series, where: str, field: str = "audit.canaries") -> Canary:
    """A canary the user inserted in a training set, from its record (sample_id, text; optional copies, secret,
    secret_format: a `digits:N` / `hex:N` format, inferred from the secret when absent); errors name `field` and
    `where` (the record)."""
    copies = row.get("copies", 1)
    try:
        copies = int(copies) if not pd.isna(copies) else 1
    except (TypeError, ValueError):
        raise ConfigError(f"{field}: {where}: copies {copies!r} is not a whole number") from None
    if copies < 1:
        raise ConfigError(f"{field}: {where}: copies is {copies}; a canary is in the training set 1 or more "
                          "times")
    secret = row.get("secret")
    if secret is None or pd.isna(secret) or not str(secret):
        return Canary(sample_id=str(row.sample_id), text=row.text, copies=copies, mode="insert")
    secret = str(secret)
    if secret not in row.text:
        raise ConfigError(f"{field}: {where}: the secret {secret!r} does not occur in its text")
    return Canary(sample_id=str(row.sample_id), text=row.text, copies=copies, mode="insert", secret=secret,
                  secret_format=_secret_format(secret, row.get("secret_format"), where, field),
                  prefix=row.text[:row.text.index(secret)])
