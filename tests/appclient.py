"""Driving the app the way a browser or an API user does: gradio_client calls, and `python app.py`
started as a separate process (with the environment a Space gives it)."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from gradio_client import handle_file

from tests.conftest import ROOT

CAT = str(ROOT / "assets" / "chelsea.png")
VISIONZIP = ("VisionZip", 54, 10, 0.35, 0.4, True, 0.8, False)  # method, dominant, contextual, SGL knobs


def tiny_llava_app(max_new_tokens: int):
    """The app on the tiny LLaVA twin (float32), served in this process -> its local URL."""
    import app
    vlm, _, banner = app.load_models("tiny-llava", None, dtype="float32")
    return served_app(vlm, banner, max_new_tokens)


@contextlib.contextmanager
def served_app(vlm, banner: str, max_new_tokens: int):
    """The app on `vlm`, served in this process -> its local URL."""
    import app
    demo = app.build_demo(vlm, banner=banner, max_new_tokens=max_new_tokens)
    demo.queue(default_concurrency_limit=1)
    _, local_url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", **app.launch_options())
    try:
        yield local_url
    finally:
        demo.close()


def knob_defaults() -> list:
    """The methods' own knob sliders' defaults, in their API order: what a raw HTTP call (which must send
    every input) appends after the generation settings."""
    from ui.text import drawn_knobs
    return [k.default for k in drawn_knobs()]


def resend(history):
    """The client hands back file parts as local paths; sending them again needs handle_file."""
    for message in history:
        for part in message["content"]:
            if part.get("type") == "file" and isinstance(part["file"], str):
                part["file"] = handle_file(part["file"])
    return history


def texts(history):
    """[(role, text)] of the text parts of a chat history."""
    return [(m["role"], part["text"]) for m in history for part in m["content"] if part.get("type") == "text"]


def send(client, history, text, files=(), settings=VISIONZIP, view="kept"):
    """One user message through both events -> (history, stats, map, caption)."""
    history = client.predict(resend(history), {"text": text, "files": [handle_file(f) for f in files]}, *settings,
                             api_name="/add_message")[0]
    history, stats, shown, caption, _ = client.predict(resend(history), view, api_name="/respond")
    return history, stats, shown, caption


def compare_rows(table: str) -> dict:
    """Compare's table -> {method label: [its cells]} in table order."""
    rows = [line.strip("| ").split(" | ") for line in table.splitlines() if line.startswith("| ")]
    return {r[0]: r[1:] for r in rows[1:] if r[0] != "method"}


def stat(stats: str, row: str) -> str:
    """The value of one row of the stats table."""
    return stats.split(f"| {row} | ")[1].split(" |")[0]


def post(url: str, api: str, body: str) -> list:
    """A raw "Use via API" call through Gradio's HTTP queue: JSON the Python client would refuse to send
    (NaN, half a surrogate pair) or would rewrite (a file part the client would upload). -> its outputs."""
    req = urllib.request.Request(url + f"gradio_api/call/{api}", data=body.encode(),
                                 headers={"Content-Type": "application/json"})
    event = json.loads(urllib.request.urlopen(req).read())["event_id"]
    lines = urllib.request.urlopen(url + f"gradio_api/call/{api}/{event}").read().decode().splitlines()
    return json.loads(lines[lines.index("event: complete") + 1][len("data: "):])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppProcess:
    """`python app.py ...` in its own process; `.url` once it answers on loopback."""

    def __init__(self, *args, env=None, unset=(), zerogpu=False, timeout=180, log=None):
        self.port = free_port()
        env = {k: v for k, v in dict(os.environ, **(env or {})).items() if k not in unset}
        env.setdefault("GRADIO_SERVER_PORT", str(self.port))
        env.setdefault("ZIPCHAT_WARM_EXAMPLES", "0")  # tests count encodes; test_examples turns it on
        if zerogpu:  # the stand-in `spaces` package (tests/zerogpu): "strict", or "reuse" for the real one's workers
            env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests" / "zerogpu"), env.get("PYTHONPATH", "")])
            env["ZEROGPU_STUB_MODE"] = "strict" if zerogpu is True else zerogpu
        if log is not None:  # a file that gets the app's whole console output
            self.log = open(log, "w")
        else:
            self.log = open(os.devnull, "w") if not os.environ.get("ZIPCHAT_TEST_LOG") else sys.stderr
        self.process = subprocess.Popen([sys.executable, "app.py", *args], cwd=ROOT, env=env, stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)  # (its workers: one group)
        self.url = f"http://127.0.0.1:{self.port}/"
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"app.py exited with {self.process.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.3)
        self.close()
        raise RuntimeError("app.py did not start listening")

    def close(self):
        """Stop the app and every process it started (ZeroGPU's workers are forked from it)."""
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # workers left behind
        except (ProcessLookupError, PermissionError):
            pass
