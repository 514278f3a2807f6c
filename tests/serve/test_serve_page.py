"""The page at GET /, driven in headless Chromium over the DevTools protocol (--remote-debugging-pipe):
upload a PNG and see every model's caption; pick a rendered scene and see them again."""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from PIL import Image

from satic.serve import ServeSettings, create_app

from browser import CHROMIUM, FLAGS, needs_browser


class DevTools:
    """Chromium with the DevTools protocol on fds 3 (commands in) and 4 (replies out): JSON messages
    ended by a NUL byte. `page(url)` opens a tab and returns its session id."""

    def __init__(self, profile: Path):
        commands_read, self._commands = os.pipe()
        self._replies, replies_write = os.pipe()

        def child_fds():  # the protocol pipe must be fds 3 and 4 in the browser (moved out of the way first)
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (commands_read, replies_write)]
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        # close_fds=False keeps the new 3 and 4; descriptors Python opens are not inherited anyway (PEP 446)
        self.process = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
            preexec_fn=child_fds, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(commands_read)
        os.close(replies_write)
        self._buffer = b""
        self._next_id = 0

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buffer:
                assert time.monotonic() < deadline, f"no reply to {method} within {timeout} s"
                chunk = os.read(self._replies, 1 << 16)
                assert chunk, "chromium closed the DevTools pipe"
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next_id:  # events and other replies are skipped
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply["result"]

    def page(self, url: str) -> str:
        target = self.send("Target.createTarget", {"url": url})["targetId"]
        return self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def evaluate(self, session: str, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
        return result["result"].get("value")

    def wait_for(self, session: str, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(session, expression)):
            assert time.monotonic() < deadline, f"{expression} still false after {timeout} s"
            time.sleep(0.05)
        return value

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (AssertionError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._commands)
        os.close(self._replies)


@pytest.fixture()
def server(captioners):
    """The app under uvicorn on a free loopback port, in a thread of this process."""
    config = uvicorn.Config(create_app(captioners, ServeSettings(scenes=3)), host="127.0.0.1", port=0,
                            log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


def scene_caption(server: str, scene: int, model: str, **options) -> str:
    from urllib.request import Request, urlopen

    body = json.dumps({"scene": scene, "model": model, **options}).encode()
    with urlopen(Request(server + "/v1/captions", body, {"content-type": "application/json"}), timeout=30) as reply:
        return json.loads(reply.read())["captions"][0]


CARDS = "Array.from(document.querySelectorAll('.model')).map(c => c.innerText)"
DONE = "document.body.dataset.pending === '0'"


@needs_browser
def test_upload_a_png_and_see_every_models_caption(server, captioners, tmp_path):
    photo = tmp_path / "red square.png"
    Image.fromarray(np.tile(np.array([220, 30, 30], np.uint8), (96, 128, 1))).save(photo)
    expected = captioners["grid"].caption_images([photo])[0]
    browser = DevTools(tmp_path / "profile")
    try:
        page = browser.page(server + "/")
        browser.wait_for(page, "document.readyState === 'complete' && document.querySelectorAll('.model').length === 2")
        document = browser.send("DOM.getDocument", session=page)["root"]["nodeId"]
        file_input = browser.send("DOM.querySelector", {"nodeId": document, "selector": "#file"}, page)["nodeId"]
        browser.send("DOM.setFileInputFiles", {"nodeId": file_input, "files": [str(photo)]}, page)
        browser.wait_for(page, DONE)
        grid_card, tiny_card = browser.evaluate(page, CARDS)[1], browser.evaluate(page, CARDS)[0]
        assert grid_card.startswith("grid (K=1)") and expected in grid_card and " ms" in grid_card, grid_card
        assert "reads precomputed bottom-up features" in tiny_card  # side by side, says why it has none

        browser.evaluate(page, "document.getElementById('scene-1').click()")  # a rendered scene
        browser.wait_for(page, "document.getElementById('reference').textContent.startsWith('scene: ')")
        browser.wait_for(page, DONE)
        for card in browser.evaluate(page, CARDS):  # every model captions a scene: its regions or its image
            assert " ms" in card and "\u2026" not in card and "error" not in card, card

        browser.evaluate(page, "const d = document.getElementById('decoding'); d.value = '3';"
                               "d.dispatchEvent(new Event('change'))")  # the same scene again, beam search
        browser.wait_for(page, DONE)
        for name, card in zip(captioners, browser.evaluate(page, CARDS)):
            assert scene_caption(server, 1, name, beam_size=3) in card, card
        assert any(scene_caption(server, 1, name, beam_size=3) != scene_caption(server, 1, name)
                   for name in captioners)  # the choice shows
    finally:
        browser.close()


def test_a_scene_gives_a_box_model_its_regions_with_their_box_geometry(captioners, tmp_path):
    """A bottom-up model trained with use_box reads the scene's regions of its feature size less the 5 box numbers,
    those numbers appended: the same regions a model without boxes reads, largest box first."""
    from satic.data.stores import BOX_GEOMETRY
    from satic.data.vocab import Vocabulary
    from satic.model.checkpoint import FeatureSpec, save_checkpoint
    from satic.serve.page import render_scenes, scene_regions

    from serve_helpers import DIM, WORDS, load, serving, tiny_model

    boxed = load(save_checkpoint(tmp_path / "boxed", tiny_model(3, 2, DIM + BOX_GEOMETRY), Vocabulary(WORDS),
                                 FeatureSpec(use_box=True)), "boxed")
    rendered = render_scenes(2)[1]
    with_boxes, plain = scene_regions(rendered, boxed), scene_regions(rendered, captioners["tiny"])
    assert with_boxes.shape == (len(plain), DIM + BOX_GEOMETRY)
    assert sorted(map(tuple, with_boxes[:, :DIM].tolist())) == sorted(map(tuple, plain.tolist()))
    assert np.all(np.diff(with_boxes[:, -1]) <= 0)  # the box area, largest first
    with serving({"boxed": boxed}, scenes=2) as client:
        answer = client.post("/v1/captions", json={"scene": 1})
    assert answer.status_code == 200, answer.text
    assert answer.json()["captions"] == boxed.caption([with_boxes])
