"""Presets, `load_vlm`, and the loaded-model record `VLM`.

Everything that differs between model families (preprocessing, the vision tower, packing, chat
template, tiny and architecture configs) lives in `families/`; this module only finds the family
of a checkpoint and loads it through transformers' native classes.
"""

import os
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from .arch import ARCH_PRESETS, build_arch_model
from .chat import ChatFormat, control_ids
from .errors import ModelUnavailable
from .families import BY_MODEL_TYPE, FAMILIES, family_of_preset
from .tiny import TINY_SPECS, ensure_tiny_model

HUB_PRESETS = {name: repo for f in FAMILIES for name, repo in f.presets.items()}  # -> hub repository
SGL_PAIRS = {large: small for f in FAMILIES for large, small in f.sgl_pairs.items()}  # large -> its small guide
PRESETS = list(HUB_PRESETS) + list(TINY_SPECS) + list(ARCH_PRESETS)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class VLM:
    """A loaded vision-language model and everything needed to talk to it."""
    name: str
    model: torch.nn.Module
    tokenizer: object
    image_processor: object
    family: object  # the families.Family instance for this checkpoint
    device: torch.device  # where inputs go: the device of the token embeddings
    dtype: torch.dtype
    is_tiny: bool = False
    extra: dict = field(default_factory=dict)
    # held around an image encode: the tower's score captures are set up per call on its modules, so the
    # example warm-up (examples.py) and a turn never encode at the same time
    encode_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    # held around an answer on zipchat's decoder when the app answers several requests at once (the vLLM
    # engine): FastV's and SGL's hooks are set up per answer on the language model's modules
    answer_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def language_model(self):
        return self.model.model.language_model

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_id

    def describe(self) -> str:
        return f"{self.name} on {self.device.type} ({str(self.dtype).replace('torch.', '')})"

    @cached_property
    def chat(self) -> ChatFormat:
        """The checkpoint's chat template (the family's copy of it when the checkpoint has none)."""
        template = self.tokenizer.chat_template or self.family.chat_template
        return ChatFormat(self.tokenizer, template, self.image_token_id)

    @cached_property
    def stop_ids(self) -> frozenset:
        ids = {self.tokenizer.eos_token_id}
        for token in self.family.stop_strings:
            tid = self.tokenizer.convert_tokens_to_ids(token)
            if tid is not None and tid != self.tokenizer.unk_token_id:
                ids.add(tid)
        return frozenset(i for i in ids if i is not None)

    @cached_property
    def banned_ids(self) -> frozenset:
        """Ids generation never emits: control tokens that are not stop tokens (image placeholders,
        chat markers, BOS, padding) and embedding rows past the tokenizer's vocabulary. A random-weight
        model (the tiny twins, the -arch presets) also never emits a token that is not whole, printable
        text (a lone byte of a UTF-8 character, a control character): its answers are random words, not
        U+FFFD marks. A real checkpoint is never restricted so."""
        vocab = self.model.get_output_embeddings().weight.shape[0]
        banned = control_ids(self.tokenizer) | {self.image_token_id} | set(range(len(self.tokenizer), vocab))
        if self.is_tiny:
            banned |= {i for i in range(len(self.tokenizer)) if not printable(self.tokenizer.decode([i]))}
        return frozenset(banned - self.stop_ids)

    @property
    def context_window(self) -> int:
        """Positions the language model was trained for (prompt + answer)."""
        return int(self.language_model.config.max_position_embeddings)


def printable(text: str) -> bool:
    """Whole characters a person can read: no U+FFFD (a partial UTF-8 sequence) and no control character
    but newline and tab."""
    return "\ufffd" not in text and all(ch in "\n\t" or ch.isprintable() for ch in text)


def default_preset() -> str:
    """The model to start with on this hardware: a 7B OneVision on a GPU, the 0.5B one on a CPU."""
    return "llava-ov-7b" if torch.cuda.is_available() else "llava-ov-0.5b"


def offline_twin(name: str) -> str:
    """The tiny model standing in for `name` when its weights are unavailable: of the same family (the
    large model of its tiny SGL pair where it has one), OneVision's for an unknown checkpoint."""
    family = family_of_preset(name) or BY_MODEL_TYPE["llava_onevision"]
    return next((large for large in family.sgl_pairs if large in family.tiny), next(iter(family.tiny)))


def cpu_native_bf16(flags: str | None = None) -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX): there bf16 runs about twice as fast
    as float32 and halves the bytes read per token; without it, bf16 is emulated and hundreds of times
    slower (measured: 0.4 vs 159 GFLOP/s on an AVX2-only CPU). `flags`: /proc/cpuinfo's, for tests."""
    if flags is None:
        try:
            flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
        except OSError:  # not Linux: no way to tell cheaply, stay on float32
            return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def default_device_dtype(device=None, dtype=None):
    """CUDA with bf16 (fp16 where bf16 is unsupported); a CPU with bf16 where it is native, else float32."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or os.environ.get("ZIPCHAT_DTYPE") or None
    if dtype is None:
        if device.type == "cuda":
            try:
                dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            except RuntimeError:  # ZeroGPU's main process has no GPU to ask; its GPUs (A100/H200) have bf16
                dtype = torch.bfloat16
        else:
            dtype = torch.bfloat16 if cpu_native_bf16() else torch.float32
    elif isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"Unknown dtype {dtype!r} (--dtype / ZIPCHAT_DTYPE): use one of {', '.join(DTYPES)}.")
        dtype = DTYPES[dtype]
    return device, dtype


def resolve(name_or_path: str) -> tuple:
    """-> (local path or hub id, is_tiny)."""
    if name_or_path in TINY_SPECS:
        return str(ensure_tiny_model(name_or_path)), True
    if name_or_path in HUB_PRESETS:
        return HUB_PRESETS[name_or_path], False
    if name_or_path in ARCH_PRESETS:
        return name_or_path, True
    if Path(name_or_path).is_dir():
        return name_or_path, False
    if "/" in name_or_path and not name_or_path.startswith((".", "/")):
        return name_or_path, False  # a hub repository id
    raise ModelUnavailable(
        f"Unknown model '{name_or_path}'. Use a preset ({', '.join(PRESETS)}), "
        "a Hugging Face repository id, or a local directory."
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connection instead of the hub client's retries with back-off (~25 s offline)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    import socket
    from urllib.parse import urlparse
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def is_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def load_vlm(name_or_path: str, device=None, dtype=None, quick: bool = False, device_map=None) -> "VLM":
    """Load a transformers-native checkpoint of a known family (preset, hub id or local directory).
    "*-arch" presets are the real shapes with random weights (benchmarks; `quick` shrinks them).
    `device_map` ("auto" or {module name: device}) hands placement to accelerate, for models larger
    than one GPU; inputs then go to the token embeddings' device."""
    device, dtype = default_device_dtype(device, dtype)
    if name_or_path in ARCH_PRESETS:
        model, tokenizer, image_processor = build_arch_model(name_or_path, device, dtype, quick)
        family = ARCH_PRESETS[name_or_path][0]
        return VLM(name=name_or_path + ("-quick" if quick else ""), model=model, tokenizer=tokenizer,
                   image_processor=image_processor, family=family(model.config, image_processor, tokenizer),
                   device=device, dtype=dtype, is_tiny=True)
    source, is_tiny = resolve(name_or_path)
    local_only = Path(source).is_dir() or is_cached(source)
    if not local_only and not hub_reachable():
        raise ModelUnavailable(
            f"'{name_or_path}' ({source}) is not in the local Hugging Face cache and the hub cannot be reached. "
            "Download it where there is network (`hf download " + source + "`) or pass a local directory."
        )
    try:
        config = AutoConfig.from_pretrained(source)
        if config.model_type not in BY_MODEL_TYPE:
            raise ModelUnavailable(f"'{name_or_path}' is a {config.model_type} model; zipchat runs "
                                   f"{', '.join(BY_MODEL_TYPE)}.")
        family = BY_MODEL_TYPE[config.model_type]
        placement = {"device_map": device_map} if device_map is not None else {}
        model = family.model_class.from_pretrained(source, dtype=dtype, attn_implementation="sdpa", **placement)
        tokenizer = AutoTokenizer.from_pretrained(source)
        tokenizer.chat_template = tokenizer.chat_template or checkpoint_chat_template(source)
        image_processor = family.image_processor_class.from_pretrained(source)  # AutoImageProcessor needs
        # torchvision in some transformers versions; the PIL class reads the same preprocessor_config.json
    except ModelUnavailable:
        raise
    except (OSError, ValueError) as e:
        raise ModelUnavailable(
            f"Could not load '{name_or_path}' ({source}): {str(e).splitlines()[0]}. Without network, download "
            f"it elsewhere with `hf download {source}` and pass the local directory."
        ) from None
    if device_map is None:
        model.to(device)
    else:
        device = model.get_input_embeddings().weight.device
    return VLM(name=name_or_path, model=model.eval(), tokenizer=tokenizer, image_processor=image_processor,
               family=family(model.config, image_processor, tokenizer), device=device, dtype=dtype, is_tiny=is_tiny)


def checkpoint_chat_template(source: str) -> str | None:
    """The processor-level chat template of a checkpoint (chat_template.jinja or .json), if any."""
    import json
    from transformers.utils import cached_file
    for name in ("chat_template.jinja", "chat_template.json"):
        try:
            path = cached_file(source, name, _raise_exceptions_for_missing_entries=False,
                               _raise_exceptions_for_connection_errors=False)
        except OSError:
            path = None
        if path:
            text = Path(path).read_text()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return None
