"""Many sessions at once, and many one after the other, against `python app.py` in its own process."""

import gc
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image, ImageOps

pytest.importorskip("gradio")
from gradio_client import Client  # noqa: E402

from tests.appclient import CAT, AppProcess, send, stat, texts  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    proc = AppProcess("--model", "tiny-llava", "--max-new-tokens", "6")
    yield proc
    proc.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Six different pictures: the four examples and two mirrored."""
    folder = tmp_path_factory.mktemp("images")
    paths = [ROOT / "assets" / n for n in ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg")]
    for p in paths[:2]:
        mirrored = folder / f"mirrored-{p.stem}.png"
        ImageOps.mirror(Image.open(p).convert("RGB")).save(mirrored)
        paths.append(mirrored)
    return [str(p) for p in paths]


def conversation(url: str, image: str, tag: int) -> list:
    """Three turns about one image -> [(answer, visual tokens, cache reused)] per turn."""
    c = Client(url, verbose=False)
    history, out = [], []
    for i, q in enumerate([f"Session {tag}: what is this?", "What colours?", "Anything else?"]):
        history, stats, _, caption = send(c, history, q, [image] if i == 0 else [])
        out.append((texts(history)[-1][1], stat(stats, "visual tokens to the LLM"),
                    stat(stats, "KV cache reused / size").split(" /")[0]))
        assert "64 of 576" in caption
    return out


def test_parallel_sessions_equal_sequential_ones(server, images):
    jobs = list(enumerate(images))
    sequential = [conversation(server.url, image, tag) for tag, image in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        parallel = list(pool.map(lambda job: conversation(server.url, job[1], job[0]), jobs))
    assert parallel == sequential  # each session saw only its own image and history
    for turns in parallel:
        assert [t[1] for t in turns] == ["64 of 576"] * 3 and [t[2] for t in turns] == ["no", "yes", "yes"]
    assert len({turns[0][0] for turns in parallel}) > 1  # different images, different answers


def rss_bytes(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_sessions_opened_and_cleared_do_not_grow_memory(server):
    def one_session():
        c = Client(server.url, verbose=False)
        send(c, [], "What is this?", [CAT])
        c.predict(api_name="/clear")

    for _ in range(8):  # warm-up: caches, thread pools, lazily imported code
        one_session()
    gc.collect()
    time.sleep(1)
    before = rss_bytes(server.process.pid)
    for _ in range(40):
        one_session()
    time.sleep(1)
    growth = (rss_bytes(server.process.pid) - before) / 40
    print(f"RSS growth per session after warm-up: {growth / 1e6:.3f} MB")
    assert growth < 1e6
