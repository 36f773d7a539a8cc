"""The chat page at GET /: headless Chromium (Debian's `chromium`, driven by Playwright) loads it, sends a
message and sees the reply stream in; the reply equals the greedy chat completion of that message. The
screenshot is saved under the test's tmp dir."""

import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api")

sys.path.insert(0, str(Path(__file__).parent))
from serve_server import RunningServer, write_model  # noqa: E402

from flashlm import LLM, SamplingParams  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium)")
def test_chat_page_streams_a_reply(tmp_path):
    path = write_model_file(tmp_path)
    want = LLM(path).chat([{"role": "user", "content": "hello world"}],
                          SamplingParams(temperature=0, max_tokens=24)).outputs[0].text
    with RunningServer(LLM(path, max_num_seqs=4)) as server, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('model').textContent === 'tiny-llama'")
            page.fill("#max-tokens", "24")
            page.fill("#temperature", "0")
            # count the reply's growth: a streamed reply changes the page more than once
            page.evaluate("window.changes = 0; new MutationObserver(() => window.changes++).observe("
                          "document.getElementById('log'), {childList: true, subtree: true, characterData: true})")
            page.fill("#input", "hello world")
            page.click("#send")
            page.wait_for_selector(".msg.assistant[data-done='true']", timeout=60_000)
            page.screenshot(path=str(tmp_path / "chat.png"))
            reply = page.locator(".msg.assistant").inner_text()
            assert page.locator(".msg.user").inner_text() == "hello world"
            assert "error" not in page.locator(".msg.assistant").get_attribute("class")
            assert reply.strip() == want.strip()  # inner_text trims the bubble's edges
            assert page.evaluate("window.changes") > 3  # two bubbles added, then the reply grew piece by piece
        finally:
            browser.close()
    assert (tmp_path / "chat.png").stat().st_size > 0


def write_model_file(tmp_path) -> str:
    path = str(tmp_path / "tiny.gguf")
    write_model(path)
    return path
