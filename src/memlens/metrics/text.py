"""Similarity between a generated continuation and the true suffix of a record.

The study's measure is the longest common token n-gram and its share of the suffix length; the relaxed
"discriminative functions" it lists (substring ratio, BLEU, TF-IDF cosine) and a few standard
ones (ROUGE-L, edit distance, exact match, common prefix) come from well-kept libraries: sacrebleu,
rouge-score, rapidfuzz, scikit-learn and the standard library's difflib.

*Verbatim* means an exact continuation: the generation reproduces the whole suffix, token for token
(`exact_match`, `exact_rate`). A character longest-common-substring ratio at or above the threshold is a
*relaxed* match (`relaxed_match`, `relaxed_rate`), reported as such: "Disulfiram-induced hepatitis." continued
with "-induced hyperp" has ratio 0.5, and is not verbatim.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from rapidfuzz.distance import Levenshtein
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU
from sklearn.feature_extraction.text import CountVectorizer

# effective_order: sentence-level BLEU of short texts is otherwise 0 whenever no 4-gram matches.
_BLEU = BLEU(effective_order=True)
_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def longest_common_ngram(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest contiguous run of tokens shared by `a` and `b` (longest common substring
    over token ids). difflib's matcher works on any hashable sequence; autojunk must be off, otherwise
    tokens frequent in sequences over 200 items are ignored and matches are missed."""
    if not a or not b:
        return 0
    return difflib.SequenceMatcher(None, list(a), list(b), autojunk=False).find_longest_match(
        0, len(a), 0, len(b)).size


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def lcs_ratio(generated: str, reference: str) -> float:
    """Character-level longest common substring divided by the reference length (difflib, autojunk off)."""
    if not reference:
        return float("nan")
    match = difflib.SequenceMatcher(None, generated, reference, autojunk=False).find_longest_match(
        0, len(generated), 0, len(reference))
    return match.size / len(reference)


def sentence_bleu(generated: str, reference: str) -> float:
    """sacrebleu sentence BLEU (0-100) of `generated` against the one `reference`."""
    return float(_BLEU.sentence_score(generated, [reference]).score)


def rouge_l(generated: str, reference: str) -> float:
    """ROUGE-L F-measure (rouge-score)."""
    return float(_ROUGE.score(reference, generated)["rougeL"].fmeasure)


def edit_distance(generated: str, reference: str) -> float:
    """Character Levenshtein distance normalised to [0, 1] by the longer string (rapidfuzz)."""
    return float(Levenshtein.normalized_distance(generated, reference))


def tfidf_cosine(generated: str, reference: str) -> float:
    """Cosine similarity of the two texts' TF-IDF vectors, the vocabulary and idf fitted on the pair itself
    (so the value depends on nothing but the pair). 0.0 when either text has no word token."""
    return float(tfidf_cosines([generated], [reference])[0])


# Smooth idf over the two documents of a pair, ln((1 + 2) / (1 + df)) + 1: 1 for a word both texts use,
# 1 + ln(3/2) for a word only one of them uses.
_IDF_ONE_TEXT = 1.0 + np.log(1.5)


def tfidf_cosines(generated: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """`tfidf_cosine` of every (generated, reference) pair, as `TfidfVectorizer().fit_transform([generated,
    reference])` gives it per pair (smooth idf fitted on the pair, l2 norm, its tokenizer); 0.0 where either
    text has no word token.

    Written out because a TfidfVectorizer fitted per pair costs ~6 ms, a third of an extraction stage's
    time at 800 pairs per cell: over two documents the idf takes only the two values above, so the word
    counts of all texts from one CountVectorizer (TfidfVectorizer's own tokenizer) give every pair's
    vectors in a few sparse products. tests/test_text_metrics.py checks it against TfidfVectorizer."""
    if len(generated) != len(references):
        raise ValueError(f"{len(generated)} generated texts but {len(references)} references")
    n = len(generated)
    try:
        counts = CountVectorizer().fit_transform([*generated, *references]).astype(np.float64).tocsr()
    except ValueError:  # empty vocabulary: no text has a word of 2+ characters
        return np.zeros(n)
    a, b = counts[:n], counts[n:]
    dot = np.asarray(a.multiply(b).sum(1)).ravel()  # shared words only, whose idf is 1

    def squared_norm(x, other):
        squares = x.multiply(x)
        total = np.asarray(squares.sum(1)).ravel()
        shared = np.asarray(squares.multiply(other > 0).sum(1)).ravel()
        return shared + _IDF_ONE_TEXT ** 2 * (total - shared)

    denominator = np.sqrt(squared_norm(a, b) * squared_norm(b, a))
    return np.divide(dot, denominator, out=np.zeros(n), where=denominator > 0)


@dataclass
class PairMetrics:
    """All similarity measures of one (generation, suffix) pair."""

    longest_common_ngram: int
    ngram_share: float
    exact_match: bool
    common_prefix_len: int
    lcs_ratio: float
    relaxed_match: bool  # lcs_ratio >= the threshold: a relaxed match, never called verbatim (exact_match is)
    bleu: float
    rouge_l: float
    edit_distance: float
    tfidf_cosine: float

    def to_dict(self) -> dict:
        return asdict(self)


def pair_metrics(generated_ids: Sequence[int], suffix_ids: Sequence[int], generated_text: str,
                 suffix_text: str, verbatim_threshold: float, tfidf: float | None = None) -> PairMetrics:
    """Token-level measures on ids, text-level measures on decoded text; `tfidf`: the pair's
    `tfidf_cosine` when the caller computed it for many pairs at once (`tfidf_cosines`)."""
    ngram = longest_common_ngram(generated_ids, suffix_ids)
    ratio = lcs_ratio(generated_text, suffix_text)
    prefix = common_prefix_len(generated_ids, suffix_ids)
    return PairMetrics(
        longest_common_ngram=ngram,
        ngram_share=ngram / len(suffix_ids) if len(suffix_ids) else float("nan"),
        # the whole suffix reproduced first (equality when, as by default, the lengths match)
        exact_match=len(suffix_ids) > 0 and prefix == len(suffix_ids),
        common_prefix_len=prefix,
        lcs_ratio=ratio,
        relaxed_match=bool(ratio >= verbatim_threshold),
        bleu=sentence_bleu(generated_text, suffix_text),
        rouge_l=rouge_l(generated_text, suffix_text),
        edit_distance=edit_distance(generated_text, suffix_text),
        tfidf_cosine=tfidf_cosine(generated_text, suffix_text) if tfidf is None else tfidf,
    )


def extraction_rates(frame, verbatim_threshold: float, bleu_threshold: float) -> dict[str, float]:
    """Share of rows counted as extracted under each discriminative function, and mean similarities.
    `frame` holds pair_metrics columns (one row per sequence)."""
    if len(frame) == 0:
        return {"n": 0}
    return {
        "n": int(len(frame)),
        "exact_rate": float(frame.exact_match.mean()),
        "ngram_full_rate": float((frame.ngram_share >= 1.0).mean()),
        "relaxed_rate": float((frame.lcs_ratio >= verbatim_threshold).mean()),
        "bleu_rate": float((frame.bleu >= bleu_threshold).mean()),
        "mean_ngram_share": float(frame.ngram_share.mean()),
        "mean_longest_common_ngram": float(frame.longest_common_ngram.mean()),
        "mean_common_prefix_len": float(frame.common_prefix_len.mean()),
        "mean_lcs_ratio": float(frame.lcs_ratio.mean()),
        "mean_bleu": float(frame.bleu.mean()),
        "mean_rouge_l": float(frame.rouge_l.mean()),
        "mean_edit_distance": float(frame.edit_distance.mean()),
        "mean_tfidf_cosine": float(frame.tfidf_cosine.mean()),
        "median_ppl_ft": float(np.nanmedian(frame.ppl_ft)) if "ppl_ft" in frame else float("nan"),
        "median_ppl_generated": float(np.nanmedian(frame.ppl_generated)) if "ppl_generated" in frame
        else float("nan"),
    }
