"""A request to stop generating that crosses process boundaries.

On ZeroGPU the answer is generated in another process than the one that handles the Stop button,
so a threading.Event cannot carry it. The flag is a file named after the session in a directory
only this user can write; the decode loop checks it once per token (one stat call).
"""

import os
import tempfile
from pathlib import Path


def _root() -> Path:
    return Path(os.environ.get("ZIPCHAT_STOP_DIR") or Path(tempfile.gettempdir()) / f"zipchat-stop-{os.getuid()}")


class StopFlag:
    def __init__(self, session_id: str):
        if not session_id.isalnum():
            raise ValueError("a session id is alphanumeric")
        self.path = _root() / session_id

    def set(self):
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path.touch()

    def clear(self):
        self.path.unlink(missing_ok=True)

    def is_set(self) -> bool:
        return self.path.exists()
