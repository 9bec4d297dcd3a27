import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["HF_HUB_OFFLINE"] = "1"  # a test never reaches the hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("ZIPCHAT_CACHE", str(ROOT / ".pytest_cache" / "zipchat"))
os.environ["ZIPCHAT_DTYPE"] = "float32"  # the references are float32, whatever this CPU computes fastest

_real_connect = socket.socket.connect


def _loopback_only(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and not (host.startswith("127.") or host in ("localhost", "::1")) and self.family != socket.AF_UNIX:
        raise RuntimeError(f"test tried to reach the network: {address}")
    return _real_connect(self, address)


socket.socket.connect = _loopback_only


@pytest.fixture(scope="session")
def tiny_llava():
    from pipeline import load_vlm
    return load_vlm("tiny-llava")


@pytest.fixture(scope="session")
def tiny_ov():
    from pipeline import load_vlm
    return load_vlm("tiny-ov-small")


@pytest.fixture(scope="session")
def tiny_ov_large():
    from pipeline import load_vlm
    return load_vlm("tiny-ov-large")


@pytest.fixture(scope="session")
def tiny_next():
    from pipeline import load_vlm
    return load_vlm("tiny-next")


@pytest.fixture(scope="session")
def tiny_internvl():
    from pipeline import load_vlm
    return load_vlm("tiny-internvl-small")


@pytest.fixture(scope="session")
def tiny_internvl_large():
    from pipeline import load_vlm
    return load_vlm("tiny-internvl-large")


@pytest.fixture(scope="session")
def tiny_qwen():
    from pipeline import load_vlm
    return load_vlm("tiny-qwen-small")


@pytest.fixture(scope="session")
def tiny_qwen_large():
    from pipeline import load_vlm
    return load_vlm("tiny-qwen-large")


FAMILY_FIXTURES = {"tiny-llava": "tiny_llava", "tiny-ov-small": "tiny_ov", "tiny-next": "tiny_next",
                   "tiny-internvl-small": "tiny_internvl", "tiny-qwen-small": "tiny_qwen"}


@pytest.fixture(params=list(FAMILY_FIXTURES))
def tiny_vlm(request):
    """One tiny model per family."""
    return request.getfixturevalue(FAMILY_FIXTURES[request.param])


@pytest.fixture(scope="session")
def photo():
    from PIL import Image
    return Image.open(ROOT / "assets" / "chelsea.png").convert("RGB")  # 451x300


@pytest.fixture(scope="session")
def photo2():
    from PIL import Image
    return Image.open(ROOT / "assets" / "coffee.png").convert("RGB")
