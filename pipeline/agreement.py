"""Agreement with Full: what a method's compression costs in the answer, measured against the uncompressed
model's own greedy answer to the same question (EffiVLM-Bench's "loyalty").

Per method, for Full's answer F = f_1..f_n (its token ids, without the stop token):
  - log-likelihood: the mean over i of log p_method(f_i | prompt, f_<i): the method's prompt (its compressed
    images, or its pruned pass for FastV, DART, SGL) prefilled as the method runs it, then F fed in one forward
    over that cache (teacher forcing; `Request.forced`), each f_i scored under the distribution the method
    picks from (control tokens suppressed). SGL is scored under its pruned large model (no early exit);
  - share: exp(mean log p_method - mean log p_Full): the method's per-token probability of Full's answer as a
    share of Full's own (exactly 1.0 for Full; below 1 where the method finds Full's answer less likely);
  - parting: the first token (0-based) where the method's greedy answer differs from Full's (None: the same);
  - F1: SQuAD's token F1 of the two answers' texts (scoring.py).
The scoring always runs on zipchat's decoder (vLLM is not asked for prompt log-probabilities).
"""

import math
import time
from dataclasses import dataclass, replace

from .replay import private_session
from .scoring import token_f1


@dataclass
class Agreement:
    logprob: float | None  # mean log-probability per token of Full's answer under the method (None: empty)
    share: float | None  # exp(logprob - Full's logprob)
    parting: int | None  # the first token where its greedy answer leaves Full's; None: the same answer
    f1: float  # token F1 of its answer and Full's
    tokens: int  # Full's answer's tokens scored
    seconds: float = 0.0  # the scoring's time


class ForcedAnswer:
    """An engine that answers with given ids (teacher forcing) through zipchat's decoder `inner`, collecting
    each id's log-probability in `logprobs`."""
    name, concurrent = "transformers", False

    def __init__(self, inner, answer_ids: list):
        self.inner, self.answer_ids, self.logprobs, self.greedy = inner, list(answer_ids), [], []

    def max_model_len(self):
        return None

    def stream(self, request, usage=None):
        self.logprobs.clear()
        self.greedy.clear()
        forced = replace(request, forced=self.answer_ids, logprobs=self.logprobs, greedy=self.greedy,
                         max_tokens=len(self.answer_ids), ignore_stops=True, reuse=False)
        return self.inner.stream(forced, usage)


def answer_logprobs(session, question: str, answer_ids: list) -> tuple:
    """Ask `question` in `session` with `answer_ids` as the answer (teacher forcing, on zipchat's decoder; SGL
    under its large model) -> (each id's log-probability, whether each id is the most likely there). The turn
    is recorded in `session` with that answer."""
    session.engine = None  # zipchat's decoder
    session.state.settings = replace(session.state.settings, early_exit=None)  # SGL: its large model scores
    large = session.decoders["large"]
    forcing = session.decoders["large"] = ForcedAnswer(large, answer_ids)
    try:
        for _ in session.ask_stream(question, accepted=True):
            pass
    finally:
        session.decoders["large"] = large
    return list(forcing.logprobs), list(forcing.greedy)


def forced_logprobs(session, method: str, answer_ids: list, **settings) -> list:
    """The log-probability of each of `answer_ids` as the answer to the session's last question, under `method`
    (with `settings`, set_method's keywords; a private copy of the conversation before that turn:
    compare.private_session)."""
    other = private_session(session, method, None, **settings)
    try:
        return answer_logprobs(other, session.state.turns[-1].question, answer_ids)[0]
    finally:
        session.kv.drop(other.state.session_id)


def first_parting(ids: list, reference: list) -> int | None:
    """The first index where two token sequences differ (one ending first counts), or None if they are equal."""
    for i, (a, b) in enumerate(zip(ids, reference)):
        if a != b:
            return i
    return None if len(ids) == len(reference) else min(len(ids), len(reference))


def agreement_of(answer: str, ids: list, logprobs: list, full_text: str, full_ids: list, full_logprob: float | None,
                 seconds: float = 0.0) -> Agreement:
    """An answer's Agreement with Full's, from Full's answer's `logprobs` under its method."""
    lp = mean(logprobs)
    share = None if lp is None or full_logprob is None else math.exp(lp - full_logprob)
    return Agreement(lp, share, first_parting(ids, full_ids), token_f1(answer, full_text), len(full_ids), seconds)


def mean(values: list) -> float | None:
    return sum(values) / len(values) if values else None


def agreements_stream(session, results: list):
    """Score Compare's `results` [(method, answer, TurnStats)] against Full's among them (none without Full, or
    when Full's answer was stopped): yields each method as its scoring starts; returns {method: Agreement}, each
    also on its stats (`agreement`). A Stop ends the scoring (the rest get none)."""
    full = next(((a, t) for m, a, t in results if m == "full"), None)
    if full is None or full[1].stopped:
        return {}
    full_text, full_ids = full[0], full[1].answer_ids
    order = ["full"] + [m for m, _, _ in results if m != "full"]  # Full's own score first: the others' share
    by_method = {m: (a, t) for m, a, t in results}
    out, full_lp = {}, None
    for method in order:
        answer, stats = by_method[method]
        if session.stop_flag.is_set() or stats.stopped:
            continue
        yield method
        t0 = time.perf_counter()
        logprobs = forced_logprobs(session, method, full_ids)
        if session.stop_flag.is_set() or len(logprobs) != len(full_ids):
            continue
        full_lp = mean(logprobs) if method == "full" else full_lp
        out[method] = stats.agreement = agreement_of(answer, stats.answer_ids, logprobs, full_text, full_ids, full_lp,
                                                     time.perf_counter() - t0)
    return out


def agreements(session, results: list) -> dict:
    """`agreements_stream`, run to the end -> {method: Agreement}."""
    stream = agreements_stream(session, results)
    while True:
        try:
            next(stream)
        except StopIteration as end:
            return end.value
