"""Compression methods, one file each, behind this one registry (the way `families/` works).

- compress-once methods (`SELECT`): pure selection on one crop's vision output (methods/base.py),
  text-agnostic, so each image is compressed once and the KV cache is reused across turns:
  visionzip, divprune, vispruner, random, pool;
- in-LLM methods (`IN_LLM`): pruning inside the language model, decided per question, on all the
  image's tokens: fastv (the large model's own attention) and sgl (a small model's attention);
- "full" sends every token; "manual" sends the units picked by hand on the map.

A new method adds its file and one line here, and its label in LABELS (the app's method list).
"""

from . import divprune, fastv, pool, random, sgl, vispruner, visionzip

SELECT = {"visionzip": visionzip.pick, "divprune": divprune.pick, "vispruner": vispruner.pick,
          "random": random.pick, "pool": pool.pick}
COMPRESS_ONCE = tuple(SELECT)
ANSWER = {"fastv": fastv.fastv_answer, "sgl": sgl.sgl_answer}  # a turn of their own: (session, plan, stats, t0,
# generated) -> a generator of text deltas returning the answer ids
IN_LLM = tuple(ANSWER)
METHODS = ("full", *COMPRESS_ONCE, "fastv", "sgl", "manual")
LABELS = {"full": "Full", "visionzip": "VisionZip", "divprune": "DivPrune", "vispruner": "VisPruner",
          "random": "Random", "pool": "Pool", "fastv": "FastV", "sgl": "SGL", "manual": "Manual"}


def images_for(method: str, settings) -> str:
    """How `method` encodes images: itself, "full" for FastV (it prunes inside the model), SGL's
    `sgl_tokens` ("full" or "visionzip")."""
    return {"sgl": settings.sgl_tokens, "fastv": "full"}.get(method, method)


# what each method keeps, for the overlap of kept sets (Pool keeps no unit as itself; Full keeps all)
HAS_KEPT_SET = ("visionzip", "divprune", "vispruner", "random", "fastv", "sgl", "manual")
