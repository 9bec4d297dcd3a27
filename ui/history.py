"""The conversation as the page holds it: the chatbot's messages, which arrive with every event.

The server keeps each tab's conversation in its state; when that state is gone (the server restarted,
or the tab was idle past its time to live) the page still shows the messages. `past_turns` reads them
back (the images as the files they were uploaded as, each question with its answer) so the conversation
can be rebuilt instead of answered as if nothing had been said. The app's own notices (warnings, "Got
it", a restart) are not answers; a notice that the server lost the conversation starts it anew.
"""

import re
from dataclasses import dataclass, field

RESTART_MARK = "🔄"  # the notice that starts a conversation anew: nothing before it is rebuilt
NOTICE_MARKS = ("⚠️", "ℹ️", "⏹ Stopped before", "Got it: ", RESTART_MARK)  # the app's own messages


LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class ConversationLost(Exception):
    """The page shows a conversation whose images the server no longer has."""


@dataclass
class PastTurn:
    images: list = field(default_factory=list)  # file paths, in order
    question: str = ""
    answer: str = ""


MAX_REBUILT_TURNS = 100  # a conversation rebuilt from its page keeps at most its latest turns, and images
MAX_REBUILT_IMAGES = 16  # (the context window would leave older turns out anyway)
EMPTY_ANSWER = "(empty answer)"
STOPPED_MARK = " ⏹ *stopped*"  # after an answer that Stop ended


def text_message(role: str, text: str) -> dict:
    """A chat message whose text the page keeps exactly (Gradio dedents and strips a plain string)."""
    return {"role": role, "content": [{"type": "text", "text": text}]}


def shown_answer(turn) -> str:
    """A turn's answer as the chat shows it: its text, marked when Stop ended it (`answer_text` reads it back)."""
    return (turn.answer or EMPTY_ANSWER) + (STOPPED_MARK if turn.stopped else "")


def answer_text(shown: str) -> str:
    """The answer a shown message stands for (`shown_answer` undone)."""
    shown = shown.removesuffix(STOPPED_MARK)
    return "" if shown == EMPTY_ANSWER else shown


def parts(message: dict) -> list:
    """[("text", str) | ("file", path)] of one message, in the shape Gradio hands a handler (a list of
    {"type": "text" | "file"} parts) or the shape a handler appends (a string, or {"path": ...})."""
    content = message.get("content") if isinstance(message, dict) else None
    items = content if isinstance(content, list) else [content]
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(("text", item))
        elif isinstance(item, dict) and item.get("type", "text") == "text" and isinstance(item.get("text"), str):
            out.append(("text", item["text"]))
        elif isinstance(item, dict):
            file = item.get("file", item)
            path = file.get("path") if isinstance(file, dict) else file
            if isinstance(path, str):
                out.append(("file", path))
    return out


def is_notice(text: str) -> bool:
    return text.startswith(NOTICE_MARKS)


def past_turns(history: list) -> tuple:
    """-> (turns answered, image paths sent after the last answered question) since the last restart
    notice. A question counts when an answer (not a notice) follows it."""
    start = max((i + 1 for i, m in enumerate(history) if m.get("role") == "assistant"
                 and any(k == "text" and t.startswith(RESTART_MARK) for k, t in parts(m))), default=0)
    turns, images, question = [], [], None
    for message in history[start:]:
        for kind, value in parts(message):
            if message.get("role") == "user":
                if kind == "file":
                    images.append(value)
                else:
                    question = value
            elif kind == "text" and question is not None and not is_notice(value):
                turns.append(PastTurn(images, question, answer_text(value)))
                images, question = [], None
    return turns, images


def bounded(turns: list, waiting: list) -> list:
    """The latest turns of a rebuilt conversation that stay within MAX_REBUILT_TURNS and, with the images still
    waiting for a question, MAX_REBUILT_IMAGES image references: what a page (or a forged API call) sends
    never costs more than that to rebuild."""
    kept, images = [], len(waiting)
    for t in reversed(turns[-MAX_REBUILT_TURNS:]):
        images += len(t.images)
        if images > MAX_REBUILT_IMAGES:
            break
        kept.append(t)
    return kept[::-1]


def repaired(history: list) -> list:
    """The history with every text made sendable as UTF-8 (a lone surrogate, which Gradio's JSON encoder
    cannot write back, becomes U+FFFD), so that no message can make the event fail after it ran."""
    def fix(text):
        return text if text.isascii() else LONE_SURROGATE.sub("\ufffd", text)
    out = []
    for m in history:
        if not isinstance(m, dict):
            continue
        content = m.get("content")
        if isinstance(content, str):
            m = dict(m, content=fix(content))
        elif isinstance(content, list):
            m = dict(m, content=[dict(c, text=fix(c["text"])) if isinstance(c, dict) and isinstance(c.get("text"), str)
                                 else c for c in content])
        out.append(m)
    return out
