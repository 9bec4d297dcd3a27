"""Every value of `python app.py`, from a flag or a Space variable, is checked before anything loads: a wrong one
ends the start with one line naming it, its value and what is allowed (no traceback, no model loaded)."""

import importlib.util

import pytest

import app

GOOD_ENV = ("ZIPCHAT_MAX_TILES", "ZIPCHAT_MAX_NEW_TOKENS", "ZIPCHAT_METHOD", "ZIPCHAT_DTYPE", "GRADIO_SERVER_PORT",
            "ZIPCHAT_ENGINE", "ZIPCHAT_VLLM_URL", "ZIPCHAT_IMAGE_MEMORY_MB", "ZIPCHAT_ANSWERS_AT_ONCE",
            "ZIPCHAT_CLIP_FRAMES")


@pytest.fixture
def start(monkeypatch, capsys):
    """app.main with these flags and Space variables -> (exit code, what it printed); it never loads a model."""
    def loads(*a, **k):
        raise AssertionError("a model was loaded before the values were checked")
    monkeypatch.setattr(app, "load_models", loads)
    for name in GOOD_ENV:
        monkeypatch.delenv(name, raising=False)

    def run(*argv, **env):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        with pytest.raises(SystemExit) as ended:
            app.main(list(argv))
        return ended.value.code, capsys.readouterr().err
    return run


@pytest.mark.parametrize("argv, env, names, allowed", [
    ((), {"ZIPCHAT_MAX_TILES": "-3"}, "ZIPCHAT_MAX_TILES='-3'", "0 to 36"),
    ((), {"ZIPCHAT_MAX_TILES": "500"}, "ZIPCHAT_MAX_TILES='500'", "0 to 36"),
    (("--max-tiles", "37"), {}, "--max-tiles='37'", "0 to 36"),
    ((), {"ZIPCHAT_CLIP_FRAMES": "0"}, "ZIPCHAT_CLIP_FRAMES='0'", "1 to 64"),
    (("--clip-frames", "65"), {}, "--clip-frames='65'", "1 to 64"),
    ((), {"ZIPCHAT_MAX_NEW_TOKENS": "0"}, "ZIPCHAT_MAX_NEW_TOKENS='0'", "1 to 1,000,000"),
    ((), {"ZIPCHAT_MAX_NEW_TOKENS": "many"}, "ZIPCHAT_MAX_NEW_TOKENS='many' is not a whole number", "1 to"),
    ((), {"GRADIO_SERVER_PORT": "http"}, "GRADIO_SERVER_PORT='http' is not a whole number", "1 to 65,535"),
    (("--port", "99999"), {}, "--port='99999'", "1 to 65,535"),
    ((), {"ZIPCHAT_METHOD": "zip"}, "ZIPCHAT_METHOD='zip'", "full, visionzip"),
    (("--method", "zip"), {}, "--method='zip'", "full, visionzip"),
    ((), {"ZIPCHAT_DTYPE": "fp16"}, "ZIPCHAT_DTYPE='fp16'", "float32, bfloat16, float16"),
    ((), {"ZIPCHAT_ENGINE": "VLLM"}, "ZIPCHAT_ENGINE='VLLM'", "transformers, vllm"),
    (("--vllm-url", "http://127.0.0.1:8000"), {}, "--vllm-url='http://127.0.0.1:8000' needs --engine vllm", ""),
])
def test_a_wrong_value_ends_the_start_with_one_line(start, argv, env, names, allowed):
    code, err = start(*argv, **env)
    assert code == 2 and names in err and allowed in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_the_vllm_engine_without_vllm_says_so_before_exporting(start):
    code, err = start("--engine", "vllm")
    assert code == 2 and "--engine='vllm' needs vLLM installed" in err and "requirements-vllm.txt" in err


def test_a_mismatched_sgl_partner_is_refused_at_start(monkeypatch, capsys):
    """A partner named on purpose that cannot guide the large model stops the start with the reason (before, every
    message of every method answered with it); the preset's own is checked the same way."""
    monkeypatch.setattr(app, "build_demo", lambda *a, **k: pytest.fail("the app started"))
    with pytest.raises(SystemExit) as ended:
        app.main(["--model", "tiny-ov-large", "--small-model", "tiny-llava"])
    err = capsys.readouterr().err
    assert ended.value.code == 1 and "SGL needs two models with the same visual-token layout" in err
    vlm, small, banner = app.load_models("tiny-ov-large", "auto")
    assert small is not None and small.name == "tiny-ov-small"


def test_a_tiny_model_named_on_purpose_shows_the_random_weights_banner():
    vlm, small, banner = app.load_models("tiny-ov-h32", "")
    assert small is None and "random weights" in banner and "tiny-ov-h32" in banner
