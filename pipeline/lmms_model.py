"""zipchat as a model of lmms-eval (the harness VisionZip, HiPrune and LightCompress report with), in its own
environment (requirements-eval.txt, docs/eval.md):

    python -m pipeline.lmms_model --model zipchat \\
        --model_args model=llava-1.5-7b,method=visionzip,dominant=54,contextual=10 --tasks pope --batch_size 1

is lmms-eval's own command line with the model `zipchat` registered (lmms-eval finds other models through
Python entry points of an installed package; zipchat is a folder, so this module registers it and hands over).

Each request is a conversation of its own (a ChatSession): the task's images, then its text as the question,
asked through the family's chat template with `method` at its settings. `generate_until` answers greedily (or
samples, with the task's temperature) up to the task's max_new_tokens, cut at its `until` strings;
`loglikelihood` scores the continuation as the answer (teacher forcing over the method's prefill, as agreement
with Full does: agreement.answer_logprobs) -> (the mean negative log-probability of its tokens, whether each
token is the most likely). A loss, not a log-likelihood, as lmms-eval's own models return it (llava_hf: the
transformers loss over the continuation) and as its multiple_choice ranks the choices (the lowest wins: its
issue #370). The continuation is tokenized alone as the answer's first tokens, without its leading
spaces (lmms-eval's target delimiter: the answer starts right after the chat template's assistant prompt).

model_args: model (a preset, hub id or folder: models.load_vlm), method, budget (visual tokens per crop, split as
the sweep does) or set_method's own keywords (dominant, contextual, keep_ratio, prune_layer, fastv_layer, ...),
small (SGL's small model), device, dtype, max_new_tokens (when a task gives none).
"""

import sys

from lmms_eval.api.instance import GenerationResult
from lmms_eval.api.model import lmms

from .agreement import answer_logprobs
from .methods import registry
from .session import ChatSession
from .sweep import budget_settings

NAME = "zipchat"


class Zipchat(lmms):
    is_simple = True

    def __init__(self, model: str = "tiny-llava", method: str = "visionzip", budget: int | None = None,
                 small: str | None = None, device: str | None = None, dtype: str | None = None,
                 max_new_tokens: int = 128, batch_size: int = 1, **settings):
        super().__init__()
        from .models import load_vlm
        if method not in registry.names():
            raise ValueError(f"Unknown method {method!r}. Choose from: {', '.join(registry.names())}.")
        if int(batch_size) != 1:
            raise ValueError("zipchat answers one request at a time: --batch_size 1.")
        settings.pop("max_batch_size", None)  # (lmms-eval's additional config)
        self.vlm = load_vlm(str(model), device=device, dtype=dtype)
        self.small = load_vlm(str(small), device=device, dtype=dtype) if small else None
        self.method, self.budget, self.settings = method, budget, settings
        self.max_new_tokens = int(max_new_tokens)

    def session(self, images: list, max_new_tokens: int | None = None, temperature: float = 0.0) -> ChatSession:
        """A fresh conversation with `images` waiting for the question, `method` set."""
        session = ChatSession(self.vlm, method="full", small=self.small, max_new_tokens=self.max_new_tokens)
        if images:
            session.add_images(images)
        settings = dict(self.settings)
        if self.budget is not None:
            settings.update(budget_settings(session, self.method, int(self.budget)))
        session.set_method(self.method, max_new_tokens=max_new_tokens, temperature=temperature or None, **settings)
        return session

    def doc(self, task, split, doc_id):
        return self.task_dict[task][split][doc_id]

    def images(self, doc_to_visual, doc) -> list:
        visuals = doc_to_visual(doc) if doc_to_visual is not None else []
        flat = [v for group in visuals for v in (group if isinstance(group, (list, tuple)) else [group])]
        if any(isinstance(v, str) or not hasattr(v, "size") for v in flat):
            raise ValueError("zipchat answers about images: this task gives video or audio.")
        return flat

    def generate_until(self, requests) -> list:
        out = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            session = self.session(self.images(doc_to_visual, self.doc(task, split, doc_id)),
                                   int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
                                   float(gen_kwargs.get("temperature") or 0.0))
            answer = session.ask(context)
            for stop in until:
                if stop:
                    answer = answer.split(stop, 1)[0]
            out.append(answer)
        return out

    def loglikelihood(self, requests) -> list:
        out = []
        tokenizer = self.vlm.tokenizer
        for request in requests:
            context, target, doc_to_visual, doc_id, task, split = request.args
            doc = self.doc(task, split, doc_id)
            continuation = (target if isinstance(target, str) else str(target(doc))).lstrip()  # (the delimiter)
            ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"The continuation {continuation!r} has no tokens.")
            logprobs, greedy = answer_logprobs(self.session(self.images(doc_to_visual, doc)), context, ids)
            # (wrapped: lmms-eval 0.7.3's evaluator turns a bare (float, bool) into its str(); the wrapper's
            # payload passes through unchanged)
            out.append(GenerationResult((-sum(logprobs) / len(logprobs), bool(all(greedy)))))
        return out

    def generate_until_multi_round(self, requests) -> list:
        raise NotImplementedError("zipchat does not run lmms-eval's multi-round tasks; python -m pipeline.eval "
                                  "asks multi-turn items in one conversation (docs/eval.md).")


def register():
    """Make `--model zipchat` known to lmms-eval in this process."""
    from lmms_eval.models import MODEL_REGISTRY_V2
    from lmms_eval.models.registry_v2 import ModelManifest
    MODEL_REGISTRY_V2.register_manifest(ModelManifest(model_id=NAME, simple_class_path=f"{__name__}.Zipchat"),
                                        overwrite=True)


def main(argv=None):
    register()
    from lmms_eval.__main__ import cli_evaluate
    sys.argv = [sys.argv[0]] + list(sys.argv[1:] if argv is None else argv)
    cli_evaluate()


if __name__ == "__main__":
    main()
