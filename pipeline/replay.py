"""A private replay of a conversation's last question: a session on a copy of the conversation before that turn,
with another method or budget (Compare, the agreement with Full, the budget sweep). Nothing of the original
conversation changes: the copy has its own KV store entry; the compressions are shared."""

import copy
import uuid
from dataclasses import replace

from .session import ChatSession


def private_session(session, method: str, max_new_tokens: int | None, **settings):
    """A session on a copy of `session`'s conversation before its last turn (that turn's images pending), with
    `method` (and `settings`: set_method's keywords, a sweep's budget): its own KV store entry, the same Stop, the
    compressions shared."""
    st = session.state
    other_state = copy.copy(st)
    other_state.session_id = uuid.uuid4().hex  # a private KV store entry; Stop is the session's own
    other_state.turns, other_state.pending = st.turns[:-1], list(st.turns[-1].images)
    other_state.compressions = copy.copy(st.compressions)  # shared entries, private bookkeeping
    other_state.settings = replace(st.settings, max_new_tokens=max_new_tokens or st.settings.max_new_tokens)
    other_state.last_turn = None
    other = ChatSession(session.vlm, small=session.small, state=other_state, stop_at_eos=session.stop_at_eos,
                        context_window=session.context_window, examples=session.examples,
                        stop_flag=session.stop_flag, engine=session.engine)
    other.set_method(method, **settings)
    return other
