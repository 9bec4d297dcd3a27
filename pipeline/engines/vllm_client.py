"""zipchat's client of a running vLLM OpenAI server (engines/vllm.py makes it an engine): the prompt goes as `prompt_embeds`, answers stream back
as token ids.

The server serves the language model exported by vllm_export.py and is started with
`--enable-prompt-embeds` (and, for the statistics, `--enable-prompt-tokens-details`). vLLM batches the
requests of every conversation (continuous batching) and caches prefixes: its block hashes cover the
prompt embeddings, so turn 2 of a conversation reuses turn 1's blocks, images included. Closing a stream
aborts its request on the server (Stop).
"""

import base64
import io
import json
import urllib.error
import urllib.request
from dataclasses import dataclass

import torch

from ..errors import InputError, ModelUnavailable
from .base import Usage


@dataclass
class Completion:
    """One answer to generate, as vLLM's /v1/completions takes it: zipchat's own decoding rules said in vLLM's
    sampling terms (engines/vllm.py builds it from an engine Request)."""
    embeds: torch.Tensor  # (L, D) the prompt's embeddings
    max_tokens: int
    allowed_ids: list  # every id but the banned ones (zipchat's banned ids can never be picked)
    stop_ids: list  # the answer ends before any of these (not included)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    ignore_stops: bool = False  # always max_tokens (benchmarks on random weights)

    def body(self, model: str) -> dict:
        buffer = io.BytesIO()
        torch.save(self.embeds.contiguous(), buffer)
        body = dict(model=model, prompt_embeds=base64.b64encode(buffer.getvalue()).decode("ascii"),
                    max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                    allowed_token_ids=self.allowed_ids, stream=True, return_token_ids=True,
                    stream_options={"include_usage": True}, skip_special_tokens=False)
        if self.ignore_stops:
            body.update(ignore_eos=True, min_tokens=self.max_tokens)
        else:
            body["stop_token_ids"] = self.stop_ids
        if self.seed is not None and self.temperature > 0:
            body["seed"] = self.seed
        return body


class VLLMServer:
    """zipchat's client of one vLLM server (`url`, e.g. http://127.0.0.1:8000)."""

    def __init__(self, url: str, timeout: float = 600.0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._model = self._max_model_len = None

    def model(self) -> str:
        """The name the server serves its model under (asked once)."""
        if self._model is None:
            served = self._get("/v1/models")["data"][0]
            self._model, self._max_model_len = served["id"], served.get("max_model_len")
        return self._model

    def max_model_len(self) -> int | None:
        """Positions the server holds per request (prompt + answer): a conversation's window on this engine."""
        self.model()
        return self._max_model_len

    def _get(self, path: str) -> dict:
        try:
            with urllib.request.urlopen(self.url + path, timeout=30) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, OSError) as e:
            raise ModelUnavailable(f"The vLLM server at {self.url} does not answer ({e}). Start it, or use "
                                   "--engine transformers.") from None

    def stream(self, request: Completion, usage: Usage | None = None):
        """Yield the answer's token ids as the server generates them. Closing the generator aborts the
        request on the server. `usage` is filled in when the server reports it (at the end)."""
        usage = usage if usage is not None else Usage()
        data = json.dumps(request.body(self.model())).encode()
        http = urllib.request.Request(self.url + "/v1/completions", data=data,
                                      headers={"Content-Type": "application/json"})
        try:
            response = urllib.request.urlopen(http, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            raise InputError(f"The vLLM server refused the request: {server_message(e)}") from None
        except (urllib.error.URLError, OSError) as e:
            raise ModelUnavailable(f"The vLLM server at {self.url} does not answer ({e}).") from None
        with response:
            for line in response:
                line = line.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    u = chunk["usage"]
                    usage.prompt_tokens = u.get("prompt_tokens", 0)
                    usage.completion_tokens = u.get("completion_tokens", 0)
                    usage.cached_tokens = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                for choice in chunk.get("choices", []):
                    yield from choice.get("token_ids") or []
                    usage.finish_reason = choice.get("finish_reason") or usage.finish_reason


def server_message(error: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(error.read())
        return str(body.get("error", {}).get("message") or body.get("message") or body)[:500]
    except (ValueError, AttributeError, OSError):
        return f"HTTP {error.code}"
