"""Kept importable: VisionZip lives in `pipeline/methods/visionzip.py`."""

from .methods.visionzip import BUDGETS, Selection, check_budget, gather, select  # noqa: F401
