"""zipchat's model pipeline: load a VLM, compress images (VisionZip and the other methods in methods/), chat
with KV-cache reuse.

Importable without gradio; the page lives in ui/ (app.py only launches it). docs/architecture.md shows the
floors and the data flow.
"""

from .compress import Compression, CropInfo, encode_image
from .errors import InputError, ModelUnavailable
from .config import Sampling, Settings
from .kvstore import KVStore
from .models import PRESETS, SGL_PAIRS, VLM, load_vlm
from .compare import compare, compare_stream, compare_with_full
from .session import ChatSession, TurnStats
from .state import ChatState, Turn

__all__ = ["ChatSession", "ChatState", "Compression", "CropInfo", "InputError", "KVStore", "ModelUnavailable",
           "PRESETS", "SGL_PAIRS", "Sampling", "Settings", "Turn", "TurnStats", "VLM", "compare", "compare_stream",
           "compare_with_full", "encode_image", "load_vlm"]
