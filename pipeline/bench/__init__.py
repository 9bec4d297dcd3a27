"""`python -m pipeline.bench`: the one place where speed is measured.

Every comparison runs both sides in one process, alternating (A B, B A, ...), after a warm-up, and
reports the median and spread (min..max) of the repeats and the ratio of medians. CUDA timings use
events after a synchronise. Models are the architecture presets: real shapes, random weights.
On a GPU each row also gets a floor: max(FLOPs / measured matmul rate, bytes / measured copy
bandwidth), both measured at start.

    python -m pipeline.bench            # CPU rows 1-6, 10-24 (about an hour on 2 cores)
    python -m pipeline.bench --quick    # half-width/half-depth shapes, fewer repeats (< 3 minutes)
    python -m pipeline.bench --device cuda   # rows 1-14, 18-24 on a GPU (bf16)
    python -m pipeline.bench --rows 25,26,27 # vLLM serving, in the vLLM environment (bench/serving.py)

The rows are declared where they are defined (`@row(ids..., title=...)`, bench/core.py), one file per
subject (rows_vision, rows_prefill, rows_cpu, rows_in_llm, serving); `--rows` selects them by id.
"""

from .main import main  # noqa: F401
