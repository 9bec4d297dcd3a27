"""Full: every visual token, exactly as the checkpoint's own processing sends them (the reference)."""

from .registry import FULL, MapWords, Method, register


def caption(comp) -> str:
    return f"all {comp.num_tokens} visual tokens (no compression)"


register(Method("full", "Full", FULL, kept_set=False, not_in_overlap="Full keeps every patch", caption=caption,
                words=MapWords(kept="sent as itself (all tokens)"), doc="every visual token (no compression)"))
