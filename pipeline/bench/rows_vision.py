"""Rows of the vision side: the encode with VisionZip's selection (1-2), the heatmap (6), Qwen2.5-VL's
encode (13), identical crops (19), each compress-once method's selection (21-22)."""

import copy

import torch
from PIL import Image

from ..compress import encode_image
from ..heatmap import render_map
from ..models import load_vlm
from ..families.llava_common import attention_statistics, run_tower
from ..methods.visionzip import select
from .core import ASSETS, QUESTION, SMOKE_MODELS, Row, arch, floor_s, ov_image, qwen_preset, row, side_by_side


@row('1', '2', title="CLIP-L/336 encode + VisionZip vs the reference-style encode; the selection's share")
def row_encode(b) -> list:
    """1-2: CLIP-L/336 tower up to layer -2 + VisionZip vs the reference-style encode."""
    args, clock, hw = b.args, b.clock, b.hw
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from ..arch import shrink
    from ..families.llava import CLIP_L_336
    shape = shrink(CLIP_L_336) if args.quick else CLIP_L_336
    if args.smoke:
        shape = dict(CLIP_L_336, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4)
    default = torch.get_default_dtype()
    torch.set_default_dtype(args.dtype)
    with torch.device(args.device):
        tower = CLIPVisionModel(CLIPVisionConfig(**shape, attn_implementation="sdpa")).eval()
    torch.set_default_dtype(default)
    reference = copy.deepcopy(tower)
    reference.set_attn_implementation("eager")
    from transformers import CLIPImageProcessorPil
    pixels = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})(
        images=[Image.open(ASSETS / "chelsea.png").convert("RGB")], return_tensors="pt")["pixel_values"]
    pixels = pixels.to(args.device, args.dtype)
    run = shape["num_hidden_layers"] - 1  # feature layer -2
    layer = tower.encoder.layers[run - 1] if hasattr(tower, "encoder") else tower.vision_model.encoder.layers[run - 1]

    @torch.inference_mode()
    def ours():
        out = run_tower(tower, pixels, run, has_cls=True, with_stats=True)
        return select(out.units[0], out.scores[0], out.keys[0], 54, 10, True)

    @torch.inference_mode()
    def original_style():
        # as the original VisionZip: every layer eager with its attention materialised, all layers run
        out = reference(pixels, output_attentions=True, output_hidden_states=True)
        scores = out.attentions[run - 1][0, :, 0, :].sum(0)
        ref_layer = getattr(reference, "vision_model", reference).encoder.layers[run - 1]
        x = ref_layer.layer_norm1(out.hidden_states[run - 1])
        keys = ref_layer.self_attn.k_proj(x).view(1, x.shape[1], -1, ref_layer.self_attn.head_dim).mean(2)
        return select(out.hidden_states[run][0], scores, keys[0], 54, 10, True)

    ta, tb = side_by_side(clock, ours, original_style, args.repeats)
    h = (pixels.shape[-1] // shape["patch_size"]) ** 2 + 1
    per_layer = 2 * h * (4 * shape["hidden_size"] ** 2 + 2 * shape["hidden_size"] * shape["intermediate_size"]) \
        + 4 * h * h * shape["hidden_size"]
    weights = sum(p.numel() for p in tower.parameters()) * (torch.finfo(args.dtype).bits // 8)
    rows = [Row("1", "vision encode + VisionZip selection, CLIP-L/336", "ours: SDPA, layers to -2, 1 attention row",
                "original-style: eager, all layers, attentions materialised", ta, tb, target="<= 0.55",
                floor_a_s=floor_s((per_layer * run, weights), hw),
                floor_b_s=floor_s((per_layer * shape["num_hidden_layers"], weights), hw))]
    return rows + [selection_share(b, tower, layer, pixels, run, ours)]


def selection_share(b, tower, layer, pixels, run: int, encode) -> Row:
    """2: VisionZip's selection alone (the scores from the captured layer input, and the merge) over `encode`."""
    captured = {}
    hook = layer.register_forward_pre_hook(lambda m, a, k: captured.__setitem__("x", a[0] if a else k["hidden_states"]),
                                           with_kwargs=True)
    encode()
    hook.remove()
    feats = run_tower(tower, pixels, run, has_cls=True, with_stats=False).units[0]

    @torch.inference_mode()
    def selection_only():
        scores, keys, _ = attention_statistics(layer, captured["x"], True)
        return select(feats, scores[0], keys[0], 54, 10, True)

    ts, te = side_by_side(b.clock, selection_only, encode, b.args.repeats)
    return Row("2", "selection alone (scores + merge) / whole encode", "scores + merge", "encode + selection",
               ts, te, target="<= 0.03")


@row('6', title='heatmap render')
def row_heatmap(b) -> Row:
    """6: rendering the selection map + score map (median of repeats), 5-crop anyres image."""
    clock = b.clock
    vlm = b.model("llava-ov-0.5b-arch")
    image = ov_image(4)
    comp = encode_image(vlm, image, "visionzip")
    times = [clock(lambda: (render_map(image, comp, "kept"), render_map(image, comp, "scores"))) for _ in range(10)]
    budget = [0.150] * len(times)
    return Row("6", f"maps (kept + scores views) for {len(comp.crops)} crops", "render", "150 ms budget",
               times, budget, target="<= 1.0")


@row('13', title='Qwen2.5-VL encode')
def row_qwen_encode(b) -> Row:
    """13: Qwen2.5-VL's vision encode with the score capture (hooks on the last block, its attention
    statistic by hand) vs the plain tower, both on a 1024x768 image."""
    args, clock = b.args, b.clock
    preset, quick = qwen_preset(args)
    vlm = arch(preset, args, quick)
    prepared = vlm.family.prepare(Image.open(ASSETS / "astronaut.png").convert("RGB").resize((1024, 768)))
    visual = vlm.family.tower(vlm.model)
    pixels = prepared.pixel_values.to(visual.device, visual.dtype)
    grid = prepared.extra["grid_thw"].to(visual.device)
    with torch.inference_mode():
        ta, tb = side_by_side(clock, lambda: vlm.family.encode(vlm.model, prepared, with_stats=True),
                              lambda: visual(pixels, grid_thw=grid), args.repeats)
    return Row("13", f"vision encode, {vlm.name} tower, 1024x768 ({prepared.pixel_values.shape[0]} patches)",
               "with VisionZip's score capture", "plain tower", ta, tb, target="<= 1.05")


@row('19', title='identical crops encoded once')
def row_identical_crops(b) -> Row:
    """19: the vision encode of a 384x384 image on OneVision, whose base image and single tile are the
    same pixels: encoded once (identical crops found by comparing the preprocessed tensors) vs each."""
    args, clock = b.args, b.clock
    from ..compress import encode_distinct
    vlm = arch("llava-ov-0.5b-arch", args)
    prepared = vlm.family.prepare(ov_image(1))
    with torch.inference_mode():
        ta, tb = side_by_side(clock, lambda: encode_distinct(vlm.family, vlm.model, prepared, True),
                              lambda: vlm.family.encode(vlm.model, prepared, True), args.repeats)
    return Row("19", f"vision encode + VisionZip statistic, {vlm.name}, 384x384 ({len(prepared.crops)} crops, "
               "the same pixels)", "identical crops encoded once", "every crop encoded", ta, tb, target="<= 0.6")


def as_vlm(name: str, family, model, args):
    """The vision side as a VLM record: CDPruner's relevance reads the language model's word embeddings (given
    random weights here where they were left on the meta device) or CLIP's text tower (text_tower.py)."""
    from ..models import VLM
    embeddings = model.get_input_embeddings()
    if embeddings.weight.is_meta:
        embeddings.to_empty(device=args.device)
        torch.nn.init.normal_(embeddings.weight, 0, 0.02)
    return VLM(name=name, model=model, tokenizer=family.tokenizer, image_processor=family.image_processor,
               family=family, device=torch.device(args.device), dtype=args.dtype, is_tiny=True)


def vision_only(name: str, args, quick: bool = False):
    """A preset's vision tower and projector with random weights, its language model left on the meta
    device (a 7B preset's vision side fits anywhere) -> (family, model, image processor)."""
    if args.smoke:
        vlm = load_vlm(SMOKE_MODELS[name], device=args.device, dtype=args.dtype)
        return vlm.family, vlm.model
    from ..arch import ARCH_PRESETS, build_arch_model
    model, tokenizer, processor = build_arch_model(name, "meta", args.dtype, quick=args.quick or quick)
    family = ARCH_PRESETS[name][0](model.config, processor, tokenizer)
    for module in (family.tower(model), model.model.multi_modal_projector):
        module.to_empty(device=args.device)
        with torch.no_grad():
            for pname, p in module.named_parameters():
                if p.dim() > 1:
                    p.normal_(0, 0.02)
                else:
                    p.fill_(1.0) if pname.endswith("weight") else p.zero_()
            for bname, b in module.named_buffers():  # (non-persistent buffers come back uninitialised)
                if bname.endswith("position_ids"):
                    b.copy_(torch.arange(b.shape[-1]).expand_as(b))
    return family, model


@row('21', '22', title="each compress-once and question-conditioned method's selection / the encode")
def row_selection(b) -> list:
    """21-22: each compress-once method's selection (with the projection it needs) over the vision
    encode it follows, on CLIP-L/336 (LLaVA-1.5-7B: projector to 4096) and SigLIP-so400m (OneVision-0.5B,
    a 384 px image: base + 1 tile). DivPrune, Pool and CDPruner project every unit (their rules work on P;
    CDPruner's also measures the question's relevance: CLIP's text tower on CLIP-L, the word embeddings on
    SigLIP). A method that
    reads other layers' attention (HiPrune: its object and output layers) is timed whole: its encode with those
    statistics and its selection, against the encode VisionZip needs (its extra cost is the ratio above 1)."""
    args, clock = b.args, b.clock
    from ..methods import registry
    from ..methods.base import CropInput
    rows = []
    for row_id, preset, image in (("21", "llava-1.5-7b-arch", Image.open(ASSETS / "chelsea.png").convert("RGB")),
                                  ("22", "llava-ov-0.5b-arch", ov_image(1))):
        family, model = vision_only(preset, args)
        prepared = family.prepare(image)
        with torch.inference_mode():
            out = family.encode(model, prepared, with_stats=True)
        offset = 1 if family.has_cls else 0

        vlm = as_vlm(preset, family, model, args)

        def selection(method):
            record = registry.get(method)
            layers = tuple(record.attention_layers(family, {})) if record.attention_layers else ()

            @torch.inference_mode()
            def run():  # a method that reads other layers' attention: its whole encode (minus VisionZip's, in B)
                o = family.encode(model, prepared, with_stats=True, received_at=layers) if layers else out
                relevance = record.relevance(vlm, o, QUESTION) if record.relevance else None  # (CDPruner)
                for i, crop in enumerate(prepared.crops):
                    d, c = family.budget(54, 10, o.units.shape[1] - offset)
                    picked = record.pick(CropInput(
                        units=o.units[i], scores=o.scores[i], keys=o.keys[i], has_cls=family.has_cls,
                        grid=crop.grid, dominant=d, contextual=c, seed=i,
                        project=lambda u: family.project(model, u[None])[0], project_parts=family.project_parts(model),
                        received={k: v[i] for k, v in o.received.items()}, attention_layers=layers,
                        knobs={k.name: k.default for k in record.knobs},
                        relevance=None if relevance is None else relevance[i]))
                    if not picked.projected:
                        family.project(model, picked.tokens[None])
            return run, bool(layers)

        encode = torch.inference_mode()(lambda: family.encode(model, prepared, with_stats=True))
        targets = {"divprune": "<= 0.08", "cdpruner": "<= 0.10"}
        crops = f"({len(prepared.crops)} crop{'s' * (len(prepared.crops) > 1)})"
        for k, method in enumerate(registry.of_kind(registry.COMPRESS_ONCE) + registry.of_kind(registry.QUESTION)):
            run, whole = selection(method)
            run()  # (CDPruner: CLIP's text tower is loaded at its first use)
            ta, tb = side_by_side(clock, run, encode, args.repeats)
            if whole:  # (its extra statistics are part of its encode: the whole against VisionZip's encode)
                rows.append(Row(f"{row_id}{chr(ord('a') + k)}", f"{method} encode with its statistics + selection / "
                                f"VisionZip's encode, {preset} {crops}", f"{method} encode + selection",
                                "encode to the feature layer (+ VisionZip's scores)", ta, tb, target="<= 1.03"))
                continue
            rows.append(Row(f"{row_id}{chr(ord('a') + k)}", f"{method} selection / vision encode, {preset} {crops}",
                            f"{method} selection", "encode to the feature layer (+ scores)", ta, tb,
                            target=targets.get(method, "<= 0.03")))
    return rows
