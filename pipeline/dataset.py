"""An evaluation's items (`python -m pipeline.eval`): a local JSONL or CSV file, or a Hugging Face dataset id.

JSONL, one item per line:
  {"id": "1", "image": "cat.png", "question": "Is there a cat?", "answer": "yes"}
  {"id": "2", "image": "cat.png", "question": "Which animal?", "choices": ["dog", "cat"], "answer": "B"}
  {"id": "3", "image": "cat.png", "questions": ["What animal is it?", "What colour is it?"], "answers": ["cat", "black"]}
  ("answer" may be a list of reference answers: VQA's ten.)
CSV: columns id, image, question, answer, choices (options separated by "|"); one turn per row.
Image paths are relative to the file. The kind of scoring: "choice" with choices, "yes_no" when every reference
answer is yes or no, else "short" (VQA's normalisation); an item may name its "type".
A Hugging Face dataset (`datasets.load_dataset`, on a user's machine only) is read with the field names given.
"""

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError


@dataclass
class Item:
    id: str
    image: object  # a path or a PIL image
    questions: list  # one per turn
    answers: list  # one per turn: a string or a list of reference answers
    choices: list  # the options (multiple choice), or []
    kind: str  # "choice", "yes_no" or "short"


def kind_of(answers: list, choices: list, named: str | None = None) -> str:
    if named in ("choice", "yes_no", "short"):
        return named
    if choices:
        return "choice"
    refs = [a for ans in answers for a in ([ans] if isinstance(ans, str) else ans)]
    return "yes_no" if refs and all(str(a).strip().lower() in ("yes", "no") for a in refs) else "short"


def item_from(row: dict, number: int, base: Path | None) -> Item:
    questions = row.get("questions") or ([row["question"]] if row.get("question") else [])
    answers = row.get("answers") or ([row["answer"]] if "answer" in row else [])
    if not questions or len(answers) != len(questions) or not row.get("image"):
        raise InputError(f"Item {number}: it needs an image, a question (or questions) and one answer per question.")
    choices = row.get("choices") or []
    if isinstance(choices, str):
        choices = [c.strip() for c in choices.split("|") if c.strip()]
    image = row["image"]
    if isinstance(image, str) and base is not None and not Path(image).is_absolute():
        image = str(base / image)
    return Item(str(row.get("id", number)), image, [str(q) for q in questions], answers, list(choices),
                kind_of(answers, choices, row.get("type")))


def load_items(source: str, split: str = "test", fields: dict | None = None, limit: int | None = None) -> list:
    """Items from a .jsonl/.csv file, or a Hugging Face dataset id (`fields`: our name -> the dataset's)."""
    path = Path(source)
    if path.suffix in (".jsonl", ".csv"):
        if not path.is_file():
            raise InputError(f"No dataset file at {source}.")
        with path.open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()] if path.suffix == ".jsonl" \
                else list(csv.DictReader(f))
        items = [item_from(r, i, path.parent) for i, r in enumerate(rows)]
    else:
        items = hub_items(source, split, fields or {})
    ids = [i.id for i in items]
    if len(set(ids)) != len(ids):
        raise InputError("Item ids must be unique (results are kept per item id).")
    return items[:limit] if limit else items


def hub_items(name: str, split: str, fields: dict) -> list:  # pragma: no cover (a download: never in tests)
    try:
        import datasets
    except ImportError:
        raise InputError("A Hugging Face dataset needs `pip install datasets` (or give a local .jsonl/.csv file).")
    f = {"id": "question_id", "image": "image", "question": "question", "answer": "answer", "choices": "choices",
         **fields}
    data = datasets.load_dataset(name, split=split)
    return [item_from({ours: row[theirs] for ours, theirs in f.items() if theirs in row}, i, None)
            for i, row in enumerate(data)]
