"""A question as it will be asked: valid text, not too long, not empty (invisible characters count as empty)."""

import os
import unicodedata

from .errors import InputError

MAX_QUESTION_CHARS = int(os.environ.get("ZIPCHAT_MAX_QUESTION_CHARS", 8000))


INVISIBLE = {"\u034f", "\u115f", "\u1160", "\u2800", "\u3164", "\uffa0"}  # fillers and blanks outside Cf


def checked_question(question, allow_empty: bool = False) -> str:
    """A question as it will be asked (stripped), or an InputError a person can act on: text that is not
    valid Unicode (a lone surrogate), too long, or empty. A question made only of invisible characters
    (spaces, zero-width spaces, word joiners, a BOM: format characters) is empty. `allow_empty`: '' then."""
    if question is None and allow_empty:
        return ""
    if not isinstance(question, str):
        raise InputError("Please type a question.")
    try:
        question.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"The question contains a character that is not valid text (U+{ord(question[e.start]):04X}, "
                         "half of a surrogate pair). Please type it again.") from None
    if len(question) > MAX_QUESTION_CHARS:
        raise InputError(f"The question is {len(question):,} characters long; the limit is "
                         f"{MAX_QUESTION_CHARS:,}. Please shorten it.")
    if all(ch.isspace() or ch in INVISIBLE or unicodedata.category(ch) in ("Cf", "Cc", "Zs", "Zl", "Zp", "Co")
           for ch in question):
        if allow_empty:
            return ""
        raise InputError("Please type a question.")
    return question.strip()
