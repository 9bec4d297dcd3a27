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


def tiny_model(name: str):
    """A session-wide fixture loading one tiny model."""
    @pytest.fixture(scope="session")
    def fixture():
        from pipeline import load_vlm
        return load_vlm(name)
    return fixture


tiny_llava = tiny_model("tiny-llava")
tiny_ov = tiny_model("tiny-ov-small")
tiny_ov_large = tiny_model("tiny-ov-large")
tiny_next = tiny_model("tiny-next")
tiny_internvl = tiny_model("tiny-internvl-small")
tiny_internvl_large = tiny_model("tiny-internvl-large")
tiny_qwen = tiny_model("tiny-qwen-small")
tiny_qwen_large = tiny_model("tiny-qwen-large")


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
