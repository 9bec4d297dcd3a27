"""Scoring an answer the way the benchmarks do (docs/eval.md), and how close two answers are in words.

- yes/no as POPE's own evaluation (LLaVA's `eval_pope.py`): the first sentence, commas removed, split on
  spaces; "no", "No" or "not" among the words -> no, else yes.
- multiple choice by letter: a leading letter ("B", "B.", "(B)", "B) a cat"; not "A cat"), else "answer is B", else the
  one choice whose text the answer is (VQA-normalised); else no letter (wrong).
- short answers as VQA's evaluation (VQA-Challenge `vqaEval.py`): punctuation, digits and articles
  normalised; with three or more reference answers VQA's accuracy (min(1, matching others / 3), averaged over
  leaving each reference out), with fewer an exact match with any of them.
- token F1 as SQuAD's: lower case, punctuation and articles removed, words counted.
"""

import re
import string
from collections import Counter

PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = {"a", "an", "the"}
CONTRACTIONS = {"aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't",
                "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't",
                "hes": "he's", "im": "i'm", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "lets": "let's",
                "shes": "she's", "shouldnt": "shouldn't", "thats": "that's", "theres": "there's", "theyre":
                "they're", "wasnt": "wasn't", "werent": "weren't", "whats": "what's", "wheres": "where's", "whos":
                "who's", "wont": "won't", "wouldnt": "wouldn't", "youre": "you're", "youve": "you've"}


def vqa_normalize(text: str) -> str:
    """VQA's answer normalisation: punctuation, then number words to digits, articles out, contractions."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = PERIOD_STRIP.sub("", out)
    words = [NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vqa_accuracy(prediction: str, answers) -> float:
    """VQA's accuracy of `prediction` against the reference `answers` (a string or a list)."""
    refs = [vqa_normalize(a) for a in ([answers] if isinstance(answers, str) else list(answers))]
    pred = vqa_normalize(prediction)
    if len(refs) < 3:
        return float(pred in refs)
    scores = [min(1.0, sum(r == pred for j, r in enumerate(refs) if j != i) / 3) for i in range(len(refs))]
    return sum(scores) / len(scores)


def yes_no(text: str) -> str:
    """POPE's reading of an answer: "yes" or "no"."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


LEADING_LETTER = re.compile(r"^\s*\(?([A-Z])(?:[.):,]|$)")
ANSWER_IS = re.compile(r"answer is:?\s*\(?([A-Z])\b")


def choice_letter(text: str, choices=()) -> str | None:
    """The option letter an answer names (A, B, ...), or None. `choices`: the options' texts, in order."""
    m = LEADING_LETTER.match(text) or ANSWER_IS.search(text)
    letters = [chr(ord("A") + i) for i in range(len(choices))]
    if m and (not choices or m.group(1) in letters):
        return m.group(1)
    said = vqa_normalize(text)
    named = [letter for letter, c in zip(letters, choices) if vqa_normalize(str(c)) == said]
    return named[0] if len(named) == 1 else None


def squad_words(text: str) -> list:
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return [w for w in text.split() if w not in ARTICLES]


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token F1 of two texts (1.0 when both are empty)."""
    a, b = squad_words(prediction), squad_words(reference)
    if not a or not b:
        return float(a == b)
    common = sum((Counter(a) & Counter(b)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(b)
    return 2 * precision * recall / (precision + recall)
