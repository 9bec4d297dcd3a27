"""zipchat calls transformers the way the installed version wants: a turn of every family (and an SGL
turn, which runs the decoder layer by layer) raises no deprecation, neither as a Python warning nor as
a transformers log record. (pytest.ini ignores DeprecationWarning for the rest of the suite; this test
records every warning itself.)"""

import logging
import re
import warnings

import pytest

from pipeline import ChatSession
from tests.conftest import FAMILY_FIXTURES

DEPRECATED = re.compile(r"deprecat|will be removed", re.IGNORECASE)


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def deprecations(run) -> list:
    """Messages of every deprecation warning or transformers log record while `run()` runs."""
    logging.Logger.warning_once.cache_clear()  # transformers says some things once per process: say them again
    handler = Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # every category, every time: overrides pytest.ini's ignore
            run()
    finally:
        logger.removeHandler(handler)
    return [str(w.message) for w in caught if DEPRECATED.search(str(w.message))] + \
           [m for m in handler.messages if DEPRECATED.search(m)]


@pytest.mark.filterwarnings("default::DeprecationWarning")
@pytest.mark.parametrize("fixture", FAMILY_FIXTURES.values())
def test_a_turn_of_every_family_uses_no_deprecated_api(fixture, request, photo):
    vlm = request.getfixturevalue(fixture)

    def turns():
        s = ChatSession(vlm, method="visionzip", max_new_tokens=3)
        s.add_image(photo)
        s.ask("What is it?")
        s.ask("And now?")  # on the reused KV cache
        s.set_method("full")
        s.ask("All tokens?")
    assert deprecations(turns) == []


@pytest.mark.filterwarnings("default::DeprecationWarning")
def test_an_sgl_turn_uses_no_deprecated_api(tiny_ov, tiny_ov_large, photo):
    def turn():
        s = ChatSession(tiny_ov_large, method="sgl", small=tiny_ov, early_exit=None, max_new_tokens=3)
        s.add_image(photo)
        s.ask("What is it?")
    assert deprecations(turn) == []


def test_the_check_sees_a_deprecation():
    """The detector itself: a transformers-style deprecation, as a warning and as a log record."""
    def old_api():
        warnings.warn("`past_key_values` is deprecated and will be removed in version 5.40.0", FutureWarning)
        logging.getLogger("transformers.models.x").warning_once("`foo` is deprecated; use `bar`.")
    assert len(deprecations(old_api)) == 2
