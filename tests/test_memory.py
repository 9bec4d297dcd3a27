"""Big photos from many users keep the server's memory bounded: 20 sessions each send five 40 MP JPEGs
to `python app.py` (its own process, the default 1 GiB image budget, under an address-space limit so
that a regression fails this test instead of the machine)."""

import io
import resource
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio")
from gradio_client import Client  # noqa: E402

from tests.appclient import AppProcess, send, stat  # noqa: E402

pytestmark = pytest.mark.slow
BUDGET = 1 << 30  # app.py's default --image-memory
SIZE = (7300, 5479)  # 40.0 MP, just under the pixel cap


def status(pid: int, key: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(key)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Five different 40 MP JPEGs, each well under the 25 MB upload cap."""
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for seed in range(5):
        rng = np.random.default_rng(seed)
        image = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).resize(SIZE, Image.BILINEAR)
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=85)
        path = folder / f"photo{seed}.jpg"
        path.write_bytes(buf.getvalue())
        assert len(buf.getvalue()) < 25e6
        paths.append(str(path))
    return paths


def test_many_sessions_of_big_photos_stay_within_the_budget(photos):
    server = AppProcess("--model", "tiny-ov-large", "--max-new-tokens", "2", env={"MALLOC_ARENA_MAX": "2"})
    try:
        pid = server.process.pid
        warm = Client(server.url, verbose=False)
        send(warm, [], "What is it?", photos[:1])  # imports, thread pools, first decode
        before = status(pid, "VmRSS")
        limit = status(pid, "VmSize") + BUDGET + (2 << 30)  # room for the budget and the work, not for a leak
        resource.prlimit(pid, resource.RLIMIT_AS, (limit, limit))
        started = time.time()
        for n in range(20):
            c = Client(server.url, verbose=False)
            history, stats, _, caption = send(c, [], f"Session {n}: what are these?", photos)
            assert stat(stats, "image") == "5 encoded", stats  # all five reached the model
        peak = status(pid, "VmHWM")
        growth = peak - before
        print(f"20 sessions x five 40 MP JPEGs in {time.time() - started:.0f} s: peak RSS {peak / 2**20:.0f} MiB, "
              f"growth {growth / 2**20:.0f} MiB (budget {BUDGET / 2**20:.0f} MiB + 500)")
        assert server.process.poll() is None
        assert growth < BUDGET + (500 << 20)
        # the first sessions' images were dropped: such a session is told so when it writes again
        assert "dropped" in warm.predict([], {"text": "And now?", "files": []}, "VisionZip", 54, 10, 0.35, 0.4,
                                         True, 0.8, False, api_name="/add_message")[0][-1]["content"][0]["text"]
    finally:
        server.close()
