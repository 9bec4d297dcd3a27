"""A model cache that cannot be written (full, read-only, a file in its place): `python app.py` says which
directory and why, builds the tiny model in a temporary directory instead and starts, and never leaves a
half-written model behind. When nothing can be written, it exits with that message, not a traceback."""

import contextlib
import os
import resource
import signal
import subprocess
import sys

import pytest

from pipeline.tiny import TINY_VERSION
from tests.appclient import AppProcess
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def mounted(path, options: str):
    """A tmpfs (or a read-only bind) mounted at `path` for the test; skipped where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    if "bind" in options:
        commands = [["mount", "--bind", str(path), str(path)], ["mount", "-o", "remount,bind,ro", str(path)]]
    else:
        commands = [["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]]
    for command in commands:
        if subprocess.run(command, capture_output=True).returncode != 0:
            subprocess.run(["umount", str(path)], capture_output=True)
            pytest.skip(f"cannot mount here ({' '.join(command)}); the file-in-the-way test covers the fallback")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def start(cache, tmp_path, log):
    env = {"ZIPCHAT_CACHE": str(cache), "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return AppProcess("--model", "tiny-llava", env=env, log=log)


def leftovers(*roots) -> list:
    return [p for root in roots for p in root.rglob("*.tmp*")]


@pytest.mark.parametrize("kind", ["full", "read-only", "a file in the way"])
def test_an_unwritable_cache_falls_back_to_a_temporary_directory(kind, tmp_path):
    log = tmp_path / "app.log"
    if kind == "a file in the way":
        cache = tmp_path / "cache"
        cache.write_text("not a directory")
        context = contextlib.nullcontext()
    else:
        cache = tmp_path / "cache"
        context = mounted(cache, "size=300k" if kind == "full" else "bind")
    with context:
        server = start(cache, tmp_path, log)
        server.close()
        text = log.read_text()
        assert "Traceback" not in text
        assert f"Cannot write the tiny model 'tiny-llava' to {cache / ('tiny-v%d' % TINY_VERSION)}" in text, text
        reason = {"full": "No space left on device", "read-only": "Read-only file system",
                  "a file in the way": "Not a directory"}[kind]
        assert reason in text, text
        assert f"building it in {tmp_path / 'tmp'}" in text
        assert not leftovers(tmp_path) and (tmp_path / "tmp" / f"zipchat-{os.getuid()}").is_dir()


def test_nothing_writable_exits_with_the_reason(tmp_path):
    """Every file write fails (a 300 KB file-size limit on the process): a clear message and exit code 1."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))
    (tmp_path / "tmp").mkdir()
    env = dict(os.environ, ZIPCHAT_CACHE=str(tmp_path / "cache"), TMPDIR=str(tmp_path / "tmp"),
               PYTHONDONTWRITEBYTECODE="1")
    done = subprocess.run([sys.executable, "app.py", "--model", "tiny-llava"], cwd=ROOT, env=env, preexec_fn=limit,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "[zipchat] Cannot build the tiny model 'tiny-llava': neither" in done.stderr
    assert "File too large" in done.stderr and "set ZIPCHAT_CACHE to a writable directory" in done.stderr
    assert not leftovers(tmp_path)


def test_a_cache_the_app_may_not_enter_falls_back_too(tmp_path):
    """ZIPCHAT_CACHE inside a directory the app's user cannot enter (mode 000; root without the capabilities
    that override file permissions, as an ordinary user is): the same fallback and message, no traceback."""
    import shutil
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    locked = tmp_path / "locked"
    locked.mkdir()
    (tmp_path / "tmp").mkdir()
    locked.chmod(0)
    try:
        env = dict(os.environ, ZIPCHAT_CACHE=str(locked / "cache"), TMPDIR=str(tmp_path / "tmp"),
                   PYTHONDONTWRITEBYTECODE="1")
        code = "import app; vlm, small, banner = app.load_models('tiny-llava', ''); print('loaded', vlm.name)"
        done = subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--", sys.executable,
                               "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        locked.chmod(0o755)
    if "Operation not permitted" in done.stderr and "setpriv" in done.stderr:
        pytest.skip("setpriv cannot drop capabilities here")
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert f"Cannot write the tiny model 'tiny-llava' to {locked / 'cache' / ('tiny-v%d' % TINY_VERSION)} (Permission denied)" \
        in done.stderr, done.stderr
    assert f"building it in {tmp_path / 'tmp'}" in done.stderr and "loaded tiny-llava" in done.stdout
