"""Rows of the methods that prune inside the language model: SGL vs the large model (9), FastV's and SGL's
first turn (24)."""

from collections import OrderedDict

from ..session import ChatSession
from .core import QUESTION, Row, arch, ov_image, row, side_by_side


@row('9', '9b', title='SGL vs the large model', where='cuda')
def row_sgl(b) -> list:
    """9: SGL llava-ov-0.5b-arch -> llava-ov-7b-arch, keep 9% at 0.4 depth, 32 new tokens per
    question (stop tokens ignored: random weights would stop at random). The image is compressed
    once beforehand, as in a conversation; each repeat is a fresh question."""
    args, clock = b.args, b.clock
    small = arch("llava-ov-0.5b-arch", args)
    large = arch("llava-ov-7b-arch", args)
    image = ov_image(1)
    shared = OrderedDict()  # one compress-once cache for every session below

    def question(vlm, **kw):
        def run():
            s = ChatSession(vlm, max_new_tokens=32, stop_at_eos=False, **kw)
            s.state.compressions = shared
            s.add_image(image)
            s.ask(QUESTION)
        return run

    sgl = dict(method="sgl", small=small, keep_ratio=0.09, prune_layer=0.4)
    ta, tb = side_by_side(clock, question(large, early_exit=None, **sgl), question(large, method="full"), args.repeats)
    rows = [Row("9", "SGL end to end per question, 32 new tokens", "SGL (small answers and ranks, large pruned)",
                "large model alone", ta, tb, target="<= 0.7")]
    # early_exit=0 always exits: the small model's answer with guidance capture plus the exit score
    tg, tp = side_by_side(clock, question(large, early_exit=0.0, **sgl), question(small, method="full"), args.repeats)
    rows.append(Row("9b", "small model: answer with guidance capture (+ exit score) vs plain answer", "with capture",
                    "plain", tg, tp, target="<= 1.15"))
    return rows


@row('24', title='FastV, SGL and DART first turn')
def row_in_llm_first_turn(b) -> list:
    """24: FastV (K = 2, keep 50%) and SGL (small ranks, large keeps 35% from 0.4 depth, no early exit)
    first turn vs Full on the OneVision pair: a new image and question, 32 new tokens (stop tokens
    ignored), VisionZip-free (all 1,836 tokens of a 2x2-tile image reach the model's first layers).
    On a CPU the 7B at --quick shapes (full ones do not fit in 24 GB)."""
    args, clock = b.args, b.clock
    cpu = args.device.type != "cuda"
    large = arch("llava-ov-7b-arch", args, quick=cpu)
    small = arch("llava-ov-0.5b-arch", args)
    image = ov_image(4)

    def first_turn(vlm, **kw):
        def run():
            s = ChatSession(vlm, max_new_tokens=32, stop_at_eos=False, **kw)
            s.add_image(image)
            s.ask(QUESTION)
            return s.last_turn
        return run
    full = first_turn(large, method="full")
    ta, tb = side_by_side(clock, first_turn(large, method="fastv"), full, args.repeats)
    t = first_turn(large, method="fastv")()
    rows = [Row("24", f"first turn, {large.name}{' (quick shapes)' if cpu and not args.smoke else ''}, 768 px image, "
                f"32 new tokens", "FastV K=2, keep 50%", "full", ta, tb, target="<= 0.9",
                notes=f"FastV keeps {len(t.guidance.kept)} of {t.visual_tokens} visual tokens from layer 2")]
    ta, tb = side_by_side(clock, first_turn(large, method="sgl", small=small, early_exit=None), full, args.repeats)
    rows.append(Row("24b", "first turn, the same: SGL (0.5b ranks, large keeps 35% from 0.4 depth) vs full",
                    "SGL, no early exit", "full", ta, tb, target="<= 0.9"))
    ta, tb = side_by_side(clock, first_turn(large, method="dart"), full, args.repeats)
    t = first_turn(large, method="dart")()
    rows.append(Row("24c", "first turn, the same: DART (K=2, 4+4 pivots, keep 22.2%) vs full", "DART", "full", ta, tb,
                    target="<= 0.9", notes=f"DART keeps {len(t.guidance.kept)} of {t.visual_tokens} visual tokens "
                                           "from layer 2"))
    return rows
