"""Compression methods, one file each, each registering one Method record (registry.py) when imported.

- full: every visual token;
- compress-once (`pick`: one crop's vision output -> what the LLM receives; methods/base.py),
  text-agnostic, so each image is compressed once and the KV cache is reused across turns: visionzip,
  divprune, vispruner, random, pool, hiprune;
- question-conditioned (`pick` with the relevance of each patch to the turn's question, `relevance`): every
  image selected again for each question, before the LLM: cdpruner;
- in-LLM (`answer`: a turn of their own, on zipchat's decoder), pruning inside the language model per
  question: fastv (the large model's own attention), dart (duplicates of a few pivots dropped) and sgl (a
  small model's attention);
- manual: the units picked by hand on the map.

A new method is one file that calls `register(Method(...))`, and its import line here (the app lists
the methods in this order).
"""

from . import full, visionzip, divprune, vispruner, random, pool, hiprune, cdpruner, fastv, dart, sgl, manual  # noqa: F401 (they register)
from .registry import COMPRESS_ONCE, FULL, IN_LLM, MANUAL, QUESTION, Method, get, label, names, of_kind  # noqa: F401
