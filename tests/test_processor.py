"""Images are preprocessed as each family's transformers Processor does: its image defaults over the
checkpoint's preprocessor_config.json (InternVLProcessor turns tiling on, which InternVL3-*-hf's config
turns off). The references here are transformers' own: the image processor called the way the Processor
calls it, the Processor's token arithmetic, and the model's own image features."""

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

from pipeline import ChatSession
from pipeline.families.base import processor_image_defaults

LARGE = ["tiny-llava", "tiny-next", "tiny-ov-large", "tiny-internvl-large", "tiny-qwen-large"]
FIXTURE = {"tiny-llava": "tiny_llava", "tiny-next": "tiny_next", "tiny-ov-large": "tiny_ov_large",
           "tiny-internvl-large": "tiny_internvl_large", "tiny-qwen-large": "tiny_qwen_large"}
SIZES = [(64, 64), (300, 300), (1152, 768), (2000, 250), (250, 2000), (4000, 3000)]  # (w, h): 12 MP last


def image_of(w, h):
    rng = np.random.default_rng(w * 7 + h)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_processor_defaults_are_read_from_the_class():
    """What transformers' Processor classes set over preprocessor_config.json, in this transformers
    (5.17 keeps them in <X>ProcessorKwargs._defaults, 5.24 in <X>Processor.images_kwargs; CI runs both)."""
    assert processor_image_defaults(transformers.InternVLProcessor) == {"crop_to_patches": True}
    assert processor_image_defaults(transformers.LlavaNextProcessor) == {"do_pad": True}
    for name in ("LlavaProcessor", "LlavaOnevisionProcessor", "Qwen2_5_VLProcessor"):
        assert processor_image_defaults(getattr(transformers, name)) == {}


def test_tiny_twins_ship_what_the_checkpoints_ship(tiny_internvl_large):
    """InternVL3-*-hf's preprocessor_config.json says crop_to_patches false; the Processor turns it on."""
    ip = tiny_internvl_large.image_processor
    assert ip.crop_to_patches is False and (ip.min_patches, ip.max_patches) == (1, 12)
    assert tiny_internvl_large.family.image_option("crop_to_patches") is True


def reference_tokens(vlm, w, h) -> int:
    """Visual tokens transformers' Processor puts in the prompt for a w x h image, by its own arithmetic."""
    family, ip, config = vlm.family, vlm.image_processor, vlm.model.config
    defaults = processor_image_defaults(getattr(transformers, PROCESSOR_MAPPING_NAMES[family.model_type]))
    if family.name == "internvl":  # InternVLProcessor: image_seq_length (256) per patch
        return 256 * ip.get_number_of_image_patches(h, w, defaults)
    if family.name == "qwen2_5_vl":
        return ip.get_number_of_image_patches(h, w, defaults) // ip.merge_size ** 2
    if family.name == "llava_onevision":  # the Processor cannot be built without torchvision: its method
        side = ip.size["height"]
        processor = object.__new__(transformers.LlavaOnevisionProcessor)  # its methods, with the values it reads
        vars(processor).update(image_processor=ip, num_image_tokens=(side // 14) ** 2,
                               vision_aspect_ratio=config.vision_aspect_ratio)
        count = processor._get_number_of_features(h, w, side, side)
        return count - (config.vision_feature_select_strategy == "default")
    processor = getattr(transformers, PROCESSOR_MAPPING_NAMES[family.model_type])(  # llava-hf's processor_config.json values
        image_processor=ip, tokenizer=vlm.tokenizer, patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy, num_additional_image_tokens=1)
    return processor._get_num_multimodal_tokens(image_sizes=[(h, w)])["num_image_tokens"][0]


@pytest.mark.parametrize("name", LARGE)
def test_crops_and_full_tokens_are_the_processors(name, request):
    """Without the tile cap, zipchat's crops are the pixels the image processor gives when called with
    the Processor's defaults, and its Full token count is the Processor's."""
    vlm = request.getfixturevalue(FIXTURE[name])
    family = vlm.family
    defaults = processor_image_defaults(getattr(transformers, PROCESSOR_MAPPING_NAMES[family.model_type]))
    for w, h in SIZES:
        image = image_of(w, h)
        prepared = family.prepare(image)
        reference = vlm.image_processor(images=[image], return_tensors="pt", **defaults)["pixel_values"]
        if family.name in ("llava_next", "llava_onevision"):
            reference = reference[0]  # (1, crops, 3, S, S): one image
        assert prepared.pixel_values.shape == reference.shape, (w, h)
        assert torch.equal(prepared.pixel_values, reference), (w, h)
        assert len(family.layout(image).crops) == len(prepared.crops)
        full_tokens = len(family.full_token_map(vlm.model, family.layout(image)))
        assert full_tokens == reference_tokens(vlm, w, h), (w, h)


@pytest.mark.parametrize("name", LARGE)
def test_the_stats_count_what_the_model_received(name, request):
    """A Full turn and a VisionZip turn: the visual tokens in the stats are the features the language
    model got (the placeholders in the prompt), and Full's are transformers' count."""
    vlm = request.getfixturevalue(FIXTURE[name])
    image = image_of(1152, 768)
    for method in ("full", "visionzip"):
        s = ChatSession(vlm, method=method, max_new_tokens=2)
        comp = s.add_image(image)
        received = []
        hook = vlm.model.get_input_embeddings().register_forward_hook(
            lambda m, args, out: received.append(int((args[0] == vlm.image_token_id).sum())))
        try:
            s.ask("What is it?")
        finally:
            hook.remove()
        assert s.last_turn.visual_tokens == comp.num_tokens == comp.features.shape[0] == received[0]
        assert s.last_turn.visual_tokens_full == reference_tokens(vlm, 1152, 768)
        if method == "full":
            assert comp.num_tokens == s.last_turn.visual_tokens_full
        else:  # every crop the map shows was encoded and compressed
            assert len(comp.crops) == len(vlm.family.prepare(image, s.settings.max_tiles or None).crops)
