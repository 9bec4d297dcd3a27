"""Kept importable: SGL lives in `pipeline/methods/sgl.py`."""

from .methods.sgl import (CONSISTENCY_KEEP, Guidance, ImportanceCapture, check_pair, geometric_mean,  # noqa: F401
                          probe_image, rescored_probability, sgl_answer, top_k_mask)
