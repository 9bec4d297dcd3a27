"""zipchat's model pipeline: load a VLM, compress images with VisionZip, chat with KV-cache reuse.

Importable without gradio; the UI lives in app.py.
"""

from .compress import Compression, CropInfo, encode_image
from .errors import InputError, ModelUnavailable
from .generate import Sampling
from .models import PRESETS, SGL_PAIRS, VLM, load_vlm
from .session import ChatSession, TurnStats, compare_with_full

__all__ = ["ChatSession", "Compression", "CropInfo", "InputError", "ModelUnavailable", "PRESETS", "SGL_PAIRS",
           "Sampling", "TurnStats", "VLM", "compare_with_full", "encode_image", "load_vlm"]
