"""Flags of one session that cross process boundaries: Stop, and "an answer is on its way".

On ZeroGPU the answer is generated in another process than the one that handles the Stop button
and the next message, so a threading.Event cannot carry them. A flag is a file named after the
session in a directory only this user can write; the decode loop checks Stop once per token (one
stat call).
"""

import os
import tempfile
import time
from pathlib import Path

ANSWERING_AT_MOST_S = 900  # an answering flag older than this is stale (its process died): not busy


def _root() -> Path:
    return Path(os.environ.get("ZIPCHAT_STOP_DIR") or Path(tempfile.gettempdir()) / f"zipchat-stop-{os.getuid()}")


class StopFlag:
    """Set: the session's running (or accepted, still waiting) answer should stop."""
    suffix = ""

    def __init__(self, session_id: str):
        if not session_id.isalnum():
            raise ValueError("a session id is alphanumeric")
        self.path = _root() / (session_id + self.suffix)

    def set(self):
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path.touch()

    def clear(self):
        self.path.unlink(missing_ok=True)

    def is_set(self) -> bool:
        return self.path.exists()


class AnsweringFlag(StopFlag):
    """Set from the moment a question is accepted until its answer ends, wherever it runs."""
    suffix = ".answering"

    def is_set(self) -> bool:
        try:
            return time.time() - self.path.stat().st_mtime < ANSWERING_AT_MOST_S
        except FileNotFoundError:
            return False


def answering_now() -> bool:
    """Whether any session (in any process of this user) is answering."""
    try:
        return any(time.time() - p.stat().st_mtime < ANSWERING_AT_MOST_S for p in _root().glob("*.answering"))
    except OSError:
        return False


class ClearedFlag(StopFlag):
    """Set when Clear is pressed while an answer runs: the answer's last state must not come back."""
    suffix = ".cleared"
