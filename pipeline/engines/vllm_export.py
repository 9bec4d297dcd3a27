"""The language model of a loaded VLM as a text-only checkpoint vLLM can serve.

zipchat keeps the vision tower and the selection; vLLM only runs the decoder on the prompt's embeddings
(`prompt_embeds`: the token embeddings with the compressed image features in the placeholders' rows,
generate.embed). So vLLM needs the language model alone: its config as a `*ForCausalLM`, its weights
under that class's names (`model.*`, `lm_head.weight`), and the tokenizer. No vision tower, no image
processor, no multimodal model class in vLLM.

Families whose decoder uses 1-D rotary positions (LLaVA-1.5 and NeXT: Llama/Mistral; OneVision and
InternVL3: Qwen2) export as is. Qwen2.5-VL's decoder needs M-RoPE positions (t, h, w) for the kept
tokens, which a prompt of embeddings cannot carry: it is refused rather than served with wrong positions.
"""

import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import InputError

CAUSAL_LM = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
QWEN_REFUSED = ("Qwen2.5-VL cannot answer on the vLLM engine: its kept visual tokens need their own M-RoPE "
                "positions (time, row, column), which vLLM cannot take with a prompt of embeddings. Use the "
                "transformers engine (--engine transformers) for Qwen2.5-VL.")


def causal_lm_class(vlm) -> str:
    """The transformers class name vLLM loads the VLM's language model as, or InputError."""
    if vlm.family.position_rows != 1:
        raise InputError(QWEN_REFUSED)
    model_type = vlm.language_model.config.model_type
    if model_type not in CAUSAL_LM:
        raise InputError(f"{vlm.name}'s language model is a {model_type} model; the vLLM engine serves "
                         f"{', '.join(CAUSAL_LM)} decoders.")
    return CAUSAL_LM[model_type]


EXPORT_VERSION = 1  # bump when what an export holds changes
STAMP = "zipchat_export.json"  # what an export was made from, beside its config


def made_from(vlm) -> dict:
    """What an export of `vlm`'s language model depends on: the model's name, its dtype, a fingerprint of its
    weights (each tensor's name, shape and first 1,024 values: another checkpoint, revision or tiny recipe
    differs) and zipchat's export version."""
    digest = hashlib.sha256()
    for name, tensor in list(vlm.language_model.state_dict().items()) + [("lm_head.weight", vlm.model.lm_head.weight)]:
        head = tensor.detach().flatten()[:1024].to("cpu", torch.float32)
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(head.numpy().tobytes())
    return {"model": vlm.name, "dtype": str(vlm.dtype).replace("torch.", ""), "weights": digest.hexdigest()[:32],
            "export_version": EXPORT_VERSION}


def export_language_model(vlm, path) -> Path:
    """Write the VLM's language model to `path` as a `*ForCausalLM` checkpoint (config, safetensors,
    tokenizer), stamped with what it was made from (`made_from`). An export with the same stamp is kept; one
    made from anything else (another dtype, other weights, an older zipchat) is written anew. -> path."""
    path, wanted = Path(path), made_from(vlm)
    stamp = path / STAMP
    if (path / "config.json").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return path
    cls = causal_lm_class(vlm)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, exist_ok=True)
    config = vlm.language_model.config.to_dict()
    config.update(architectures=[cls], tie_word_embeddings=False, torch_dtype=str(vlm.dtype).replace("torch.", ""))
    config.pop("dtype", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    weights = {f"model.{k}": v for k, v in vlm.language_model.state_dict().items()}
    weights["lm_head.weight"] = vlm.model.lm_head.weight
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in weights.items()},
              str(tmp / "model.safetensors"), metadata={"format": "pt"})
    vlm.tokenizer.save_pretrained(tmp)
    generation = {"eos_token_id": sorted(vlm.stop_ids)}
    (tmp / "generation_config.json").write_text(json.dumps(generation))
    (tmp / STAMP).write_text(json.dumps(wanted, indent=1))
    shutil.rmtree(path, ignore_errors=True)  # (a stale export)
    tmp.rename(path)
    return path


def prompt_embeds(vlm, ids: list, features: list) -> torch.Tensor:
    """The prompt as vLLM receives it: (L, D) float embeddings, image features in the placeholder rows.
    Checked here, since vLLM checks only the hidden size: every feature (n_i, D) with D the model's
    width, as many rows as placeholders, nothing but finite numbers."""
    from ..generate import embed
    width = vlm.language_model.config.hidden_size
    for i, f in enumerate(features):
        if f.ndim != 2 or f.shape[1] != width:
            raise InputError(f"Image {i + 1}'s features have shape {tuple(f.shape)}; {vlm.name} takes (n, {width}).")
        if not torch.isfinite(f).all():
            raise InputError(f"Image {i + 1}'s features contain NaN or infinite values.")
    placeholders = sum(1 for t in ids if t == vlm.image_token_id)
    rows = sum(f.shape[0] for f in features)
    if placeholders != rows:
        raise InputError(f"The prompt has {placeholders} image placeholders but the images have {rows} feature rows.")
    with torch.inference_mode():
        return embed(vlm, ids, features)[0].detach().cpu()
