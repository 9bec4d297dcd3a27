"""vLLM as an engine: zipchat plans the prompt (its own token ids from the checkpoint's chat template, the
compressed images in the placeholders) and sends its embeddings; vLLM decodes. zipchat's decoding rules
hold: the banned ids are never allowed, the stop ids end the answer, the window bounds it, closing the
stream (a Stop) aborts the request on the server. Pruning inside the model (FastV, SGL) is zipchat's
decoder's alone: such a request is refused."""

from ..config import MIN_TEMPERATURE
from ..errors import InputError
from .base import Request, Usage
from .vllm_client import Completion, VLLMServer
from .vllm_export import prompt_embeds


def allowed_ids(vlm) -> list:
    """Every id of the output vocabulary that zipchat's decoder may emit (cached on the VLM)."""
    if "vllm_allowed" not in vlm.extra:
        vocab = vlm.model.get_output_embeddings().weight.shape[0]
        vlm.extra["vllm_allowed"] = [i for i in range(vocab) if i not in vlm.banned_ids]
    return vlm.extra["vllm_allowed"]


def completion(vlm, request: Request) -> Completion:
    """What vLLM is asked for a request (checked before anything reaches the server)."""
    if request.prune is not None or request.watch is not None or request.max_probs is not None:
        raise InputError("Pruning inside the language model (FastV, SGL) runs on zipchat's own engine, not on vLLM.")
    greedy = request.sampling.temperature < MIN_TEMPERATURE
    return Completion(prompt_embeds(vlm, request.ids, request.features), max_tokens=max(1, request.max_tokens),
                      allowed_ids=allowed_ids(vlm), stop_ids=list(request.stop_ids),
                      temperature=0.0 if greedy else request.sampling.temperature,
                      top_p=1.0 if greedy else request.sampling.top_p, seed=request.seed,
                      ignore_stops=request.ignore_stops)


class VLLMEngine:
    """The engine interface (engines/base.py) on a vLLM server serving `vlm`'s exported language model."""
    name = "vllm"
    concurrent = True

    def __init__(self, server: VLLMServer, vlm):
        self.server, self.vlm = server, vlm

    @property
    def url(self) -> str:
        return self.server.url

    def model(self) -> str:
        return self.server.model()

    def max_model_len(self) -> int | None:
        return self.server.max_model_len()

    def stream(self, request: Request, usage: Usage | None = None):
        return self.server.stream(completion(self.vlm, request), usage)
