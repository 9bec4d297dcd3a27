"""The conversation as the checkpoint's own chat template renders it, tokenized so that no text a
person typed (or a model wrote) can become a control token.

The template is rendered with a private-use sentinel in place of every message text; the result is
cut at the sentinels, and the whole string is tokenized at once, so the ids are exactly the
template's. Only if a control token (an image placeholder, `<|im_end|>`, `</s>`, ...) lands inside
a message text are the pieces tokenized one by one, the texts with special tokens split into plain
text. Each image placeholder the template emits becomes an image segment, which the session
expands to that image's (compressed) visual tokens.
"""

import re
from dataclasses import dataclass, field

SENTINEL = "\ue000{}\ue001"
_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")
_PRIVATE_USE = re.compile("[\ue000-\uf8ff]")


@dataclass
class Message:
    role: str  # "user" | "assistant"
    text: str
    images: list = field(default_factory=list)  # image keys, rendered before the text as the templates do


def control_ids(tokenizer) -> set:
    """Ids of the tokenizer's special added tokens (chat markers, image placeholders, BOS/EOS...)."""
    ids = {i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}
    return ids | {i for i in tokenizer.all_special_ids if i is not None}


class ChatFormat:
    def __init__(self, tokenizer, template: str, image_token_id: int):
        self.tokenizer = tokenizer
        self.template = template
        self.image_token_id = image_token_id
        self.control = control_ids(tokenizer) | {image_token_id}
        with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        at = next(i for i in range(len(with_special)) if with_special[i:i + len(plain)] == plain)
        self.prefix, self.suffix = with_special[:at], with_special[at + len(plain):]  # e.g. BOS

    def render(self, messages: list, add_generation_prompt: bool = True) -> list:
        """-> segments [("text", ids) | ("image", key)] of the whole conversation."""
        if not messages and not add_generation_prompt:
            return []
        texts, rendered_messages = [], []
        for m in messages:
            content = [{"type": "image"} for _ in m.images]
            content.append({"type": "text", "text": SENTINEL.format(len(texts))})
            texts.append(_PRIVATE_USE.sub("", m.text))
            rendered_messages.append({"role": m.role, "content": content})
        rendered = self.tokenizer.apply_chat_template(rendered_messages, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        pieces, last = [], 0  # (is message text, string)
        for match in _SENTINEL_RE.finditer(rendered):
            pieces += [(False, rendered[last:match.start()]), (True, texts[int(match.group(1))])]
            last = match.end()
        pieces.append((False, rendered[last:]))
        ids = self._tokenize([p for p in pieces if p[1]])
        images = [key for m in messages for key in m.images]
        where = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(where) != len(images):
            raise ValueError(f"the chat template rendered {len(where)} image placeholders for {len(images)} images")
        segments, start = [], 0
        for i, key in zip(where, images):
            segments += [("text", ids[start:i]), ("image", key)]
            start = i + 1
        segments.append(("text", ids[start:]))
        return [s for s in segments if s[0] == "image" or s[1]]

    def _tokenize(self, pieces: list) -> list:
        tok = self.tokenizer
        whole = tok("".join(text for _, text in pieces), add_special_tokens=True, return_offsets_mapping=True)
        spans, at = [], 0
        for is_text, text in pieces:
            if is_text:
                spans.append((at, at + len(text)))
            at += len(text)
        leaked = any(t in self.control and s < e and any(s < b and e > a for a, b in spans)
                     for t, (s, e) in zip(whole["input_ids"], whole["offset_mapping"]))
        if not leaked:
            return list(whole["input_ids"])
        ids = list(self.prefix)
        for is_text, text in pieces:
            ids += tok(text, add_special_tokens=False, split_special_tokens=is_text)["input_ids"]
        return ids + list(self.suffix)
