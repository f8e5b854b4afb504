"""Each text metric against an independent reference computation on hand-made pairs."""

from __future__ import annotations

import math
import re
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import sacrebleu

from memlens.metrics.text import (
    common_prefix_len,
    edit_distance,
    extraction_rates,
    lcs_ratio,
    longest_common_ngram,
    pair_metrics,
    rouge_l,
    sentence_bleu,
    tfidf_cosine,
    tfidf_cosines,
)

PAIRS = [
    ("the patient developed a severe rash after the first dose of the drug",
     "the patient developed a severe rash after the second dose of the drug"),
    ("acute renal failure was observed in a woman treated with high dose methotrexate",
     "acute renal failure was observed in a woman treated with methotrexate for psoriasis"),
    ("a man developed hepatitis during therapy with isoniazid and rifampicin for latent tuberculosis",
     "hepatitis developed in a man during therapy with isoniazid for latent tuberculosis infection"),
    ("identical text is identical text", "identical text is identical text"),
]


def brute_force_ngram(a: list[int], b: list[int]) -> int:
    best = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a) + 1):
            sub = a[i:j]
            if any(b[k:k + len(sub)] == sub for k in range(len(b) - len(sub) + 1)):
                best = max(best, len(sub))
    return best


def test_longest_common_ngram_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(300):
        a = rng.integers(0, 4, size=rng.integers(0, 14)).tolist()
        b = rng.integers(0, 4, size=rng.integers(0, 14)).tolist()
        assert longest_common_ngram(a, b) == brute_force_ngram(a, b)
    # long sequences with a frequent token: difflib's autojunk would drop it and miss the match
    a = [7] * 250 + [1, 2, 3]
    b = [5] * 10 + [7] * 240 + [9]
    assert longest_common_ngram(a, b) == 240 == brute_force_ngram(a[:241], b)


def test_common_prefix_and_exact_match():
    assert common_prefix_len([1, 2, 3, 4], [1, 2, 9, 4]) == 2
    assert common_prefix_len([], [1]) == 0
    m = pair_metrics([1, 2, 3], [1, 2, 3], "a b c", "a b c", verbatim_threshold=0.5)
    assert m.exact_match and m.ngram_share == 1.0 and m.common_prefix_len == 3 and m.relaxed_match
    m = pair_metrics([1, 2, 4], [1, 2, 3], "a b d", "a b c", verbatim_threshold=0.9)
    assert not m.exact_match and m.ngram_share == pytest.approx(2 / 3) and not m.relaxed_match


def test_lcs_ratio_is_longest_common_substring_share():
    for gen, ref in PAIRS:
        best = max((j - i for i in range(len(ref)) for j in range(i + 1, len(ref) + 1) if ref[i:j] in gen), default=0)
        assert lcs_ratio(gen, ref) == pytest.approx(best / len(ref))


def test_bleu_equals_sacrebleu_corpus_computation():
    for gen, ref in PAIRS:
        corpus = sacrebleu.corpus_bleu([gen], [[ref]]).score  # every n-gram order matches in these pairs
        assert sentence_bleu(gen, ref) == pytest.approx(corpus, abs=1e-9)
    assert sentence_bleu("identical text", "identical text") == pytest.approx(100.0)
    assert sentence_bleu("nothing shared", "completely different words") == pytest.approx(0.0)


def _lcs(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_rouge_l_equals_lcs_f_measure():
    for gen, ref in PAIRS:
        g, r = gen.split(), ref.split()
        lcs = _lcs(g, r)
        p, rec = lcs / len(g), lcs / len(r)
        assert rouge_l(gen, ref) == pytest.approx(2 * p * rec / (p + rec))


def _levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def test_edit_distance_is_normalised_levenshtein():
    for gen, ref in PAIRS + [("kitten", "sitting"), ("", "abc")]:
        assert edit_distance(gen, ref) == pytest.approx(_levenshtein(gen, ref) / max(len(gen), len(ref)))


def test_tfidf_cosine_equals_hand_computation():
    def vec(doc: Counter, idf: dict) -> dict:
        v = {w: c * idf[w] for w, c in doc.items()}
        norm = math.sqrt(sum(x * x for x in v.values()))
        return {w: x / norm for w, x in v.items()}

    for gen, ref in PAIRS:
        docs = [Counter(re.findall(r"\b\w\w+\b", t.lower())) for t in (gen, ref)]
        vocab = set(docs[0]) | set(docs[1])
        idf = {w: math.log(3 / (1 + sum(w in d for d in docs))) + 1 for w in vocab}  # smooth idf, n = 2
        a, b = vec(docs[0], idf), vec(docs[1], idf)
        assert tfidf_cosine(gen, ref) == pytest.approx(sum(a[w] * b.get(w, 0.0) for w in a))
    assert tfidf_cosine("a", "b") == 0.0  # no word of 2+ characters: no vocabulary


def test_tfidf_cosines_match_a_tfidf_vectorizer_fitted_per_pair():
    """The batched form (one CountVectorizer for all pairs) equals sklearn's TfidfVectorizer fitted on each
    pair, including pairs where one or both texts have no word, repeated words and case."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics.pairwise import cosine_similarity

    rng = np.random.default_rng(0)
    words = ["Drug", "drug", "rash", "dose", "the", "of", "liver", "a", "x", "hepatitis", "renal", "2mg"]
    pairs = [*PAIRS, ("", "a b"), ("a", "the drug"), ("The Drug!", "the drug"), ("", "")]
    pairs += [(" ".join(rng.choice(words, rng.integers(0, 15))), " ".join(rng.choice(words, rng.integers(0, 15))))
              for _ in range(300)]

    def per_pair(gen: str, ref: str) -> float:
        try:
            vectors = TfidfVectorizer().fit_transform([gen, ref])
        except ValueError:  # empty vocabulary
            return 0.0
        return float(cosine_similarity(vectors[0], vectors[1])[0, 0])

    batched = tfidf_cosines([g for g, _ in pairs], [r for _, r in pairs])
    np.testing.assert_allclose(batched, [per_pair(g, r) for g, r in pairs], rtol=0, atol=1e-12)
    assert 0 < (batched == 0).sum() < len(pairs) and (np.abs(batched - 1) < 1e-12).any()
    assert tfidf_cosines(["a"], ["b"]).tolist() == [0.0] and len(tfidf_cosines([], [])) == 0
    with pytest.raises(ValueError, match="1 generated texts but 2 references"):
        tfidf_cosines(["a"], ["b", "c"])


def test_extraction_rates_count_each_discriminative_function():
    rows = pd.DataFrame([pair_metrics(g, s, gt, st, 0.5).to_dict() for g, s, gt, st in [
        ([1, 2, 3], [1, 2, 3], PAIRS[3][0], PAIRS[3][1]),
        ([1, 2, 9], [1, 2, 3], PAIRS[0][0], PAIRS[0][1]),
        ([7, 8, 9], [1, 2, 3], "nothing shared", "completely different words"),
    ]])
    rates = extraction_rates(rows, verbatim_threshold=0.5, bleu_threshold=50)
    assert rates["n"] == 3
    assert rates["exact_rate"] == pytest.approx(1 / 3)
    assert rates["ngram_full_rate"] == pytest.approx(1 / 3)
    assert rates["mean_ngram_share"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert rates["bleu_rate"] == pytest.approx(((rows.bleu >= 50).sum()) / 3)
    assert rates["relaxed_rate"] == pytest.approx(((rows.lcs_ratio >= 0.5).sum()) / 3)
    assert "verbatim_rate" not in rates  # verbatim is the exact continuation: exact_rate


def test_a_half_overlap_is_a_relaxed_match_not_verbatim():
    """Issue 38's case: "Disulfiram-induced hepatitis." prompted with "Disulfiram", continued "-induced hyperp":
    the longest common run "-induced h" is 10 of the suffix's 19 characters (ratio 10/19 >= 0.5), a relaxed
    match; the tokens differ, so it is not an exact continuation, and verbatim counts only those."""
    m = pair_metrics([5, 6, 7], [5, 6, 8], "-induced hyperp", "-induced hepatitis.", verbatim_threshold=0.5)
    assert m.lcs_ratio == pytest.approx(10 / 19) and m.relaxed_match and not m.exact_match
    rows = pd.DataFrame([m.to_dict()])
    rates = extraction_rates(rows, verbatim_threshold=0.5, bleu_threshold=50)
    assert rates["exact_rate"] == 0.0 and rates["relaxed_rate"] == 1.0
