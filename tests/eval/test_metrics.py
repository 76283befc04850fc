"""Character F1 and ROUGE-L: hand-computed values, normalisation, edge cases, and rouge-score parity."""

import random

import pytest

from chinese_vicuna.eval.metrics import char_f1, corpus_scores, lcs_length, rouge_l, units


def test_units_normalise_width_case_space_and_punctuation():
    assert units("  ＣＴ检查：３天后，复查！ ") == list("ct检查3天后复查")
    assert units("体温38°C, 心率 120/分。") == list("体温38°c心率120分")  # ° kept (symbol), "/" "," "。" dropped
    assert units("“你好”（测试）") == list("你好测试")
    assert units(" \t\n，。") == []


def test_char_f1_hand_computed():
    # prediction 5 chars, reference 8, all 5 shared: P = 1, R = 5/8, F1 = 2*5/(5+8)
    assert char_f1("北京是首都", "北京是中国的首都") == 10 / 13
    assert char_f1("首都是北京", "北京是首都") == 1.0  # order is ignored
    assert char_f1("感冒了", "多喝水") == 0.0
    # repeated characters count as often as both texts hold them: 多 x1 shared, 喝 x1, 水 x1 -> 3 of 4 and 5
    assert char_f1("多喝水水", "多喝热水吧") == 2 * 3 / (4 + 5)
    assert char_f1("北京，是首都。", "北京 是 首都") == 1.0  # punctuation and spaces do not count


def test_rouge_l_hand_computed():
    assert rouge_l("北京是首都", "北京是中国的首都") == 10 / 13  # LCS 北京是首都 = 5
    # LCS of 首都是北京 / 北京是首都 is 2 (首都 or 北京): P = R = 2/5
    assert rouge_l("首都是北京", "北京是首都") == 2 / 5
    assert rouge_l("多喝水，注意休息", "注意休息，多喝水") == 2 * 4 / (7 + 7)  # 注意休息
    assert rouge_l("Fever", "fever!") == 1.0


@pytest.mark.parametrize("metric", [char_f1, rouge_l])
def test_edge_cases(metric):
    assert metric("", "") == 1.0  # identical (empty) answers
    assert metric("。", " ") == 1.0  # both empty after normalisation
    assert metric("", "多喝水") == 0.0 and metric("多喝水", "") == 0.0
    assert metric("多喝水", "多喝水") == 1.0
    assert 0.0 <= metric("a" * 50 + "水", "水" + "b" * 3) <= 1.0


def _lcs_table(a, b) -> int:
    """Textbook O(len(a) * len(b)) dynamic programme, the reference for the bit-parallel version."""
    prev = [0] * (len(b) + 1)
    for x in a:
        row = [0]
        for j, y in enumerate(b):
            row.append(prev[j] + 1 if x == y else max(prev[j + 1], row[j]))
        prev = row
    return prev[-1]


def test_lcs_length_matches_the_dynamic_programme():
    rng = random.Random(0)
    alphabet = "多喝水注意休息头痛发热"
    for _ in range(300):
        a = "".join(rng.choices(alphabet, k=rng.randint(0, 80)))
        b = "".join(rng.choices(alphabet, k=rng.randint(0, 80)))
        assert lcs_length(a, b) == _lcs_table(a, b), (a, b)
    assert lcs_length("x" * 500, "x" * 300) == 300


def test_rouge_l_equals_rouge_score_package():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")

    class Chars:
        """rouge-score tokenizer: the same character units as ours (its default drops non-ASCII)."""

        def tokenize(self, text):
            return units(text)

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=Chars())
    rng = random.Random(1)
    pairs = [("北京是首都", "北京是中国的首都"), ("首都是北京", "北京是首都"), ("CT检查３天后", "ct 检查，3天")]
    alphabet = "多喝水注意休息头痛发热ab1"
    pairs += [
        ("".join(rng.choices(alphabet, k=rng.randint(1, 60))), "".join(rng.choices(alphabet, k=rng.randint(1, 60))))
        for _ in range(200)
    ]
    for prediction, reference in pairs:
        expected = scorer.score(reference, prediction)["rougeL"].fmeasure  # score(target, prediction)
        assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-12), (prediction, reference)


def test_corpus_scores_are_means():
    scores = corpus_scores(["北京是首都", "首都是北京"], ["北京是中国的首都", "北京是首都"])
    assert scores == {
        "char_f1": pytest.approx((10 / 13 + 1.0) / 2, abs=1e-15),
        "rouge_l": pytest.approx((10 / 13 + 2 / 5) / 2, abs=1e-15),
    }
    assert list(scores) == ["char_f1", "rouge_l"]
    with pytest.raises(ValueError, match="expected as many predictions as references, got 1 and 2"):
        corpus_scores(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="expected at least one prediction, got none"):
        corpus_scores([], [])
