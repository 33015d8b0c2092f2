"""The chat page end to end in real headless Chromium: upload a world image, ask, read the streamed reply."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from xllm.demo.server import Service, make_server
from xllm.demo.web import render_page
from xllm.models.builder import build_model, build_processors
from xllm.models.config import resolve_model
from xllm.world.render import render
from xllm.world.scenes import Scene, Shape

CHROMIUM = Path("/usr/lib/chromium/chromium")
# No name resolves but the machine itself: the browser stays off the network (its own background requests too).
HERMETIC = "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1, EXCLUDE localhost"

sync_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (the test extra)")
pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} is absent: apt-get install chromium")


@pytest.fixture(scope="module")
def page_server(micro_model_cfg):
    image = {**micro_model_cfg["modalities"]["image"], "processor": {"name": "image", "image_size": 32}}
    torch.manual_seed(0)
    model = build_model(resolve_model({**micro_model_cfg, "modalities": {"image": image}}))
    service = Service(model, build_processors(model.config), "micro", max_request_bytes=2_000_000, max_new_tokens=12)
    service.page = render_page(service)
    httpd = make_server(service, port=0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield service, f"http://127.0.0.1:{httpd.server_port}/"
    httpd.shutdown()


def test_the_page_streams_the_models_answer_about_an_uploaded_image(page_server, tmp_path):
    service, url = page_server
    picture = tmp_path / "world.png"
    render(Scene((Shape("circle", "red", "large", "center"),)), 32, random.Random(0)).save(picture)
    expected = service.model.generate({"image": service.processors["image"](picture)[None],
                                       "prompt": ["<Image><ImageHere></Image> Describe the image."]},
                                      max_new_tokens=12)[0]
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=[HERMETIC])
        page = browser.new_page()
        page.goto(url)
        sync_api.expect(page.locator("#model")).to_have_text("micro")
        page.locator("#medium").set_input_files(str(picture))
        page.locator("#question").fill("Describe the image.")
        page.locator("#send").click()
        reply = page.locator(".assistant[data-done=true]")
        sync_api.expect(reply).to_have_count(1, timeout=60_000)
        assert reply.text_content() == f"xllm: {expected}"
        sync_api.expect(page.locator("img.thumb")).to_be_visible()
        page.screenshot(path=str(tmp_path / "chat.png"))
        # A file that is no image, audio or video is refused by the page before anything is sent.
        text_file = tmp_path / "notes.txt"
        text_file.write_text("not a medium")
        page.locator("#medium").set_input_files(str(text_file))
        page.locator("#question").fill("And this?")
        page.locator("#send").click()
        sync_api.expect(page.locator(".turn.note")).to_contain_text("not an image, audio or video file: notes.txt")
        browser.close()
    assert (tmp_path / "chat.png").stat().st_size > 5_000
