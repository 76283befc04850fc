"""Character-level answer metrics for Chinese: character F1 and ROUGE-L.

Chinese has no spaces between words, and a word segmenter would make the score depend on the
segmenter's version and dictionary, so both metrics count **characters**, after one normalisation
(:func:`units`):

1. Unicode NFKC, so full-width letters and digits (``３天``, ``ＣＴ``) equal their ASCII forms;
2. lower case, so ``CT`` and ``ct`` match;
3. whitespace removed (it carries no meaning in Chinese text and models vary in how they space);
4. punctuation removed (Unicode categories ``P*``: ``，。！？、；：“”（）`` and their ASCII forms),
   because two answers would otherwise share credit for nothing more than their commas and full
   stops. Symbols (categories ``S*``: ``%``, ``+``, ``°``, ``×``) are kept: ``38°`` is content.

Every remaining character is one unit, including each letter and digit of an English word or a
number: ``"CT"`` is two units, ``"120"`` three. This keeps the metrics free of any tokenizer, and an
English word that is half right gets half the credit.

Both metrics are F-measures in ``[0, 1]``. When both texts are empty after normalisation they are
identical and score 1.0; when exactly one is empty the score is 0.0.
"""

from __future__ import annotations

import unicodedata
from collections import Counter


def units(text: str) -> list[str]:
    """The characters the metrics compare: NFKC, lower case, no whitespace, no punctuation.

    Args:
        text: Any text.

    Returns:
        One string per character unit, in order.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    return [ch for ch in text if not ch.isspace() and not unicodedata.category(ch).startswith("P")]


def _f_measure(matched: int, n_prediction: int, n_reference: int) -> float:
    if n_prediction == 0 and n_reference == 0:
        return 1.0
    # 2PR/(P+R) with P = matched/n_prediction and R = matched/n_reference simplifies to one division,
    # so hand-computed fractions (10/13) compare exactly.
    return 2 * matched / (n_prediction + n_reference)


def char_f1(prediction: str, reference: str) -> float:
    """Bag-of-characters F1 (SQuAD-style token F1 with characters as tokens).

    Each character counts as often as it occurs in both texts (multiset intersection), ignoring order.

    Args:
        prediction: The model's answer.
        reference: The reference answer.

    Returns:
        ``2 * common / (len(prediction) + len(reference))`` over :func:`units`, in ``[0, 1]``.
    """
    p, r = units(prediction), units(reference)
    common = sum((Counter(p) & Counter(r)).values())
    return _f_measure(common, len(p), len(r))


def lcs_length(a: list[str] | str, b: list[str] | str) -> int:
    """Length of the longest common subsequence of two sequences of characters.

    Bit-parallel (Allison-Dix / Hyyrö): one integer bit per position of ``a``, one pass over ``b``,
    so long answers cost ``len(b)`` big-integer operations instead of a ``len(a) * len(b)`` table.

    Args:
        a: First sequence.
        b: Second sequence.

    Returns:
        The LCS length.
    """
    if not a or not b:
        return 0
    masks: dict[str, int] = {}
    for i, ch in enumerate(a):
        masks[ch] = masks.get(ch, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full
    for ch in b:
        u = v & masks.get(ch, 0)
        v = ((v + u) | (v - u)) & full
    # each zero bit left in v marks one position of a matched in the LCS
    return len(a) - bin(v).count("1")


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure over characters (beta = 1: precision and recall weigh the same).

    ``P = LCS / len(prediction)``, ``R = LCS / len(reference)``, ``F = 2PR / (P + R)``, with the
    longest common subsequence taken over :func:`units`, so word order matters, unlike :func:`char_f1`.
    Equals the ``rouge-score`` package's ``rougeL`` F-measure on the same characters.

    Args:
        prediction: The model's answer.
        reference: The reference answer.

    Returns:
        The F-measure in ``[0, 1]``.
    """
    p, r = units(prediction), units(reference)
    return _f_measure(lcs_length(p, r), len(p), len(r))


def corpus_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean character F1 and ROUGE-L over paired answers.

    Args:
        predictions: One answer per question.
        references: The reference answer for each question, in the same order.

    Returns:
        ``{"char_f1": mean, "rouge_l": mean}``.

    Raises:
        ValueError: The lists differ in length or are empty.
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"expected as many predictions as references, got {len(predictions)} and {len(references)}"
        )
    if not predictions:
        raise ValueError("expected at least one prediction, got none")
    n = len(predictions)
    return {
        "char_f1": sum(map(char_f1, predictions, references)) / n,
        "rouge_l": sum(map(rouge_l, predictions, references)) / n,
    }
