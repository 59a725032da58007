"""The browser chat in headless Chromium (Debian's chromium + chromium-driver, driven by selenium)."""
from __future__ import annotations

import time

import pytest

from test_deploy_serve import Running

pytestmark = pytest.mark.integration("chromium")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
         "--window-size=1100,900"]


@pytest.fixture(scope="module")
def page(chat_model):
    from deploy.backends import TransformersBackend
    from deploy.server import Limits, create_app

    backend = TransformersBackend(chat_model, device="cpu")
    r = Running(create_app(backend, Limits(max_tokens=64, timeout=60)))
    yield r, backend
    r.stop()


@pytest.fixture(scope="module")
def browser():
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for f in FLAGS:
        opts.add_argument(f)
    d = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    d.set_page_load_timeout(30)
    yield d
    d.quit()


def _wait(cond, timeout=60.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        v = cond()
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"condition not met within {timeout} s")


def _bubbles(b):
    from selenium.webdriver.common.by import By

    return [(e.get_attribute("class").split()[-1], e.get_property("textContent"), e.get_attribute("data-state"))
            for e in b.find_elements(By.CSS_SELECTOR, "#log .msg")]


def glyph_shapes(png: bytes, ink_delta: int = 80) -> list:
    """The ink of a screenshot of one line of text, cut at blank columns: one boolean array per glyph (or per part
    of a glyph whose halves a blank column separates, e.g. 北), cropped to its ink."""
    import io

    import numpy as np
    from PIL import Image

    g = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.int16)
    values, counts = np.unique(g, return_counts=True)
    ink = np.abs(g - values[counts.argmax()]) > ink_delta      # far from the bubble's background
    cols = np.append(ink.any(axis=0), False)
    shapes, x0 = [], None
    for x, on in enumerate(cols):
        if on and x0 is None:
            x0 = x
        elif not on and x0 is not None:
            part = ink[:, x0:x]
            rows = np.flatnonzero(part.any(axis=1))
            shapes.append(part[rows[0]:rows[-1] + 1])
            x0 = None
    return shapes


def distinct_shapes(shapes: list, tolerance: float = 0.12) -> int:
    """How many different glyph shapes: two shapes are one when their sizes differ by at most a pixel and, scaled to
    16x16, at most `tolerance` of their pixels differ (anti-aliasing at different sub-pixel offsets)."""
    import numpy as np
    from PIL import Image

    def norm(a):
        return np.asarray(Image.fromarray(a.astype(np.uint8) * 255).resize((16, 16))) > 127

    seen: list = []
    for s in shapes:
        if not any(abs(r.shape[0] - s.shape[0]) <= 1 and abs(r.shape[1] - s.shape[1]) <= 1
                   and (norm(r) != norm(s)).mean() < tolerance for r in seen):
            seen.append(s)
    return len(seen)


def test_web_chat_renders_chinese_glyphs(page, browser):
    """Chinese in a chat bubble is drawn with real glyphs: without a CJK font (.ci/run installs fonts-noto-cjk)
    Chromium draws every character as the same empty box (tofu), 1 distinct shape for the 11 characters."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    server, _ = page
    b = browser
    b.get(server.url + "/")
    _wait(lambda: b.find_element(By.ID, "model").text)
    mt = b.find_element(By.ID, "max_tokens")
    mt.clear()
    mt.send_keys("4")
    text = "你好，请介绍一下北京。"     # 11 different characters, none of them in a Latin font
    b.find_element(By.ID, "input").send_keys(text, Keys.ENTER)
    _wait(lambda: len(_bubbles(b)) == 2 and _bubbles(b)[1][2] == "done")
    user = b.find_elements(By.CSS_SELECTOR, "#log .msg.user")[0]
    assert user.get_property("textContent") == text
    shapes = glyph_shapes(user.screenshot_as_png)
    n = distinct_shapes(shapes)
    assert len(shapes) >= len(text), f"{len(shapes)} glyphs drawn for {len(text)} characters"
    assert n >= 8, (f"the 11 characters of {text!r} were drawn as {n} distinct shape(s): tofu, no CJK font "
                    "(apt-get install fonts-noto-cjk)")
    b.find_element(By.ID, "reset").click()


def test_web_chat_streams_two_turns_and_resets(page, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    from deploy.backends import Outcome, Sampling

    server, backend = page
    b = browser
    b.get(server.url + "/")
    _wait(lambda: b.find_element(By.ID, "model").text == backend.name)
    Select(b.find_element(By.ID, "preset")).select_by_value("greedy")
    mt = b.find_element(By.ID, "max_tokens")
    mt.clear()
    mt.send_keys("24")

    def greedy(msgs):
        return "".join(backend.stream(backend.chat_ids(msgs), Sampling(max_tokens=24, do_sample=False),
                                      lambda: False, Outcome()))

    box = b.find_element(By.ID, "input")
    q1, q2 = "你好，请介绍一下北京。", "谢谢！再说说上海。"
    box.send_keys(q1, Keys.ENTER)
    _wait(lambda: len(_bubbles(b)) == 2 and _bubbles(b)[1][2] == "done")
    a1 = _bubbles(b)[1][1]
    assert _bubbles(b)[0][:2] == ("user", q1)
    assert a1 == greedy([{"role": "user", "content": q1}])   # streamed into the page, same text as the model's
    b.find_element(By.ID, "input").send_keys(q2, Keys.ENTER)
    _wait(lambda: len(_bubbles(b)) == 4 and _bubbles(b)[3][2] == "done")
    got = _bubbles(b)
    assert [r for r, _, _ in got] == ["user", "assistant", "user", "assistant"]
    # the second answer was generated with the whole conversation as history
    assert got[3][1] == greedy([{"role": "user", "content": q1}, {"role": "assistant", "content": a1},
                                {"role": "user", "content": q2}])
    shot = tmp_path / "web_chat.png"
    b.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000
    b.find_element(By.ID, "reset").click()
    assert _bubbles(b) == []
