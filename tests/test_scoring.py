"""The benchmarks' scoring rules (pipeline/scoring.py) on hand-worked cases: POPE's yes/no reading, option
letters, VQA's normalisation and accuracy, SQuAD's token F1."""

import pytest

from pipeline.scoring import choice_letter, token_f1, vqa_accuracy, vqa_normalize, yes_no


@pytest.mark.parametrize("text, want", [
    ("Yes", "yes"), ("yes.", "yes"), ("Yes, there is a dog in the image.", "yes"),
    ("No", "no"), ("No.", "no"), ("no, there is not.", "no"), ("There is not a cat.", "no"),
    ("There is a cat. No other animal.", "yes"),  # only the first sentence counts
    ("Nope", "yes"),  # POPE's rule reads only "no"/"No"/"not" as no
    ("I do not see one", "no"), ("", "yes"),
])
def test_pope_yes_no(text, want):
    assert yes_no(text) == want


@pytest.mark.parametrize("text, choices, want", [
    ("B", (), "B"), ("B.", (), "B"), ("(C)", (), "C"), ("D) a red car", (), "D"), ("  A: cat", (), "A"),
    ("The answer is C.", (), "C"), ("answer is: (B)", (), "B"),
    ("A cat", (), None),  # a word, not a letter
    ("E", ("cat", "dog"), None),  # no option E
    ("a dog", ("cat", "dog", "bird"), "B"),  # the option's text
    ("The Dog!", ("cat", "dog"), "B"),
    ("something else", ("cat", "dog"), None),
])
def test_choice_letter(text, choices, want):
    assert choice_letter(text, choices) == want


@pytest.mark.parametrize("text, want", [
    ("Two", "2"), ("the cat", "cat"), ("An apple.", "apple"), ("dont", "don't"), ("yes!", "yes"),
    ("3.5", "3.5"), ("1,000", "1000"), ("red, white", "red white"), ("t-shirt", "t shirt"),
    ("Ten dogs", "10 dogs"), ("  A\tBall\n", "ball"),
])
def test_vqa_normalize(text, want):
    assert vqa_normalize(text) == want


def test_vqa_accuracy():
    assert vqa_accuracy("Two", "2") == 1.0
    assert vqa_accuracy("two cats", ["2", "two"]) == 0.0
    assert vqa_accuracy("The dog", ["cat", "Dog"]) == 1.0
    # ten answers: 2 of them "red": leaving one "red" out, 1 match -> 1/3; leaving another out, 2 -> 2/3
    ten = ["red"] * 2 + ["blue"] * 8
    assert vqa_accuracy("Red", ten) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert vqa_accuracy("blue", ten) == 1.0  # at least 3 others say it, whichever is left out


@pytest.mark.parametrize("a, b, want", [
    ("a black cat", "the black cat", 1.0),
    ("black cat sitting", "black cat", 2 * (2 / 3 * 1.0) / (2 / 3 + 1.0)),
    ("dog", "cat", 0.0), ("", "", 1.0), ("", "cat", 0.0),
    ("cat cat dog", "cat dog dog", 2 * (2 / 3) * (2 / 3) / (4 / 3)),
])
def test_token_f1(a, b, want):
    assert token_f1(a, b) == pytest.approx(want)
