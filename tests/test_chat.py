"""The prompt zipchat sends is the checkpoint's own chat template, as transformers' processors use it:
the template rendered to text, tokenized, and each image placeholder expanded to the image's tokens."""

import pytest

from pipeline import ChatSession, Turn

TURNS = [("What is in the image?", "A cat on a table."), ("What colour is it?", "It is brown and white.")]
QUESTION = "Describe the picture in one sentence."


def processor_prompt(vlm, messages, n_visual: int) -> list:
    """What `processor.apply_chat_template` + `processor(text=..., images=...)` give: the rendered text
    tokenized with the tokenizer's special tokens, the template's image placeholder repeated once per
    visual token (InternVL: wrapped in <img> ... </img>, as InternVLProcessor.replace_image_token)."""
    text = vlm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = vlm.tokenizer(text)["input_ids"]
    out = []
    for i in ids:
        if i != vlm.image_token_id:
            out.append(i)
        elif vlm.family.name == "internvl":
            tok = vlm.tokenizer.convert_tokens_to_ids
            out += [tok("<img>")] + [i] * n_visual + [tok("</img>")]
        else:
            out += [i] * n_visual
    return out


@pytest.mark.parametrize("method", ["visionzip", "full"])
def test_prompt_is_the_checkpoint_template(tiny_vlm, photo, method):
    s = ChatSession(tiny_vlm, method=method)
    comp = s.add_image(photo)
    key = s.state.last_image_key
    s.state.turns = [Turn(q, [key] if i == 0 else [], a) for i, (q, a) in enumerate(TURNS)]
    s.state.pending = []
    ids = s.plan(Turn(QUESTION)).ids
    messages = []
    for i, (q, a) in enumerate(TURNS):
        content = ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": q}]
        messages += [{"role": "user", "content": content},
                     {"role": "assistant", "content": [{"type": "text", "text": a}]}]
    messages.append({"role": "user", "content": [{"type": "text", "text": QUESTION}]})
    assert tiny_vlm.tokenizer.chat_template == tiny_vlm.family.chat_template  # the tiny model's copy of the real one
    assert ids == processor_prompt(tiny_vlm, messages, comp.num_tokens)
    assert ids.count(tiny_vlm.image_token_id) == comp.num_tokens
