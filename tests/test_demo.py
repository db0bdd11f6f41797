"""The browser demo, driven in a real headless Chromium: it answers a real CLEVR image exactly as
runtime.answer does, shows the routing and the model card, says what is wrong with a file that is
not an image, and keeps answering after it."""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import runtime
from serving import ENV, HAVE, output, start, stop

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
                 if p and os.path.exists(p)), None)
DRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None)
HAVE_GRADIO = importlib.util.find_spec("gradio") is not None
QUESTION = "How many cylinders are there?"
# Where the README's screenshot comes from: QGMRN_SCREENSHOT=docs/demo.png python -m pytest tests/test_demo.py
SCREENSHOT = os.environ.get("QGMRN_SCREENSHOT")


def test_without_gradio_the_demo_says_what_to_install(tmp_path):
    hide = tmp_path / "sitecustomize.py"
    hide.write_text("import sys\nsys.modules['gradio'] = None\n")
    r = subprocess.run([sys.executable, "-m", "runtime.demo"], capture_output=True, text=True, timeout=60,
                       env={**ENV, "PYTHONPATH": f"{tmp_path}:{ENV['PYTHONPATH']}"})
    assert r.returncode == 2 and r.stderr.strip() == "error: the demo needs Gradio: pip install -e '.[demo]'"


@pytest.mark.skipif(not (HAVE["local"] and HAVE_GRADIO), reason="the demo extra is not installed (pip install -e '.[demo]')")
def test_the_examples_and_the_routing_picture():
    from runtime.demo import examples, routing_picture
    rows = examples()
    assert len(rows) >= 4 and all(Path(p).exists() and q.endswith("?") for p, q in rows)
    model = runtime.load("builtin")
    pred = model.predict(rows[0][0], rows[0][1])
    pic = routing_picture(pred.gates, "frn")
    assert pic.height > 20 * len(model.layer_sizes) and pic.width > max(model.layer_sizes)


@pytest.fixture(scope="module")
def browser():
    if not (HAVE["local"] and HAVE_GRADIO):
        pytest.skip("the demo extra is not installed (pip install -e '.[demo]')")
    if CHROMIUM is None or DRIVER is None or importlib.util.find_spec("selenium") is None:
        pytest.skip("no headless browser: apt-get install chromium chromium-driver; pip install selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1400"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


@pytest.fixture(scope="module", params=[
    "local", pytest.param("ray", marks=pytest.mark.skipif(not HAVE["ray"], reason="Ray Serve is not installed"))])
def page(request):
    url, proc = start(request.param)                    # the page at / of the serving app, either engine
    yield url, proc, request.param
    stop(proc)


def _ask(driver, image: Path, question: str, wait_for):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import WebDriverWait
    def element(css):
        return WebDriverWait(driver, 60).until(ready.presence_of_element_located((By.CSS_SELECTOR, css)))
    element("#image input[type=file]").send_keys(str(image))
    box = element("#question textarea")
    box.clear()
    box.send_keys(question)
    element("#submit").click()
    return WebDriverWait(driver, 60).until(wait_for)


def _answer_shown(driver):
    from selenium.webdriver.common.by import By
    value = driver.find_element(By.CSS_SELECTOR, "#answer textarea").get_attribute("value")
    return value or False


@pytest.mark.slow
def test_the_page_answers_a_real_image_as_runtime_answer_and_survives_a_non_image(browser, page, real_sample, tmp_path):
    from selenium.webdriver.common.by import By
    url, proc, engine = page
    browser.get(url + "/")
    image = sorted((real_sample / "images" / "val").glob("*.png"))[0]
    shown = _ask(browser, image, QUESTION, _answer_shown)
    assert shown == runtime.answer(str(image), QUESTION)
    details = browser.find_element(By.CSS_SELECTOR, "#details").text
    assert "real CLEVR questions" in details and "answered by" in details
    assert browser.find_element(By.CSS_SELECTOR, "#routing img").get_attribute("src")
    browser.save_screenshot(str(tmp_path / "demo.png"))
    if SCREENSHOT and engine == "local":
        shutil.copy(tmp_path / "demo.png", SCREENSHOT)

    # a file that is not an image: refused at upload (the page keeps images only), one message in
    # the page, no stack trace
    browser.get(url + "/")
    fake = tmp_path / "notes.png"
    fake.write_bytes(b"these are not pixels")
    _ask(browser, fake, QUESTION, lambda d: "the page takes images only" in d.page_source)
    assert "Traceback" not in browser.page_source

    # and the next good request still answers
    browser.get(url + "/")
    other = sorted((real_sample / "images" / "val").glob("*.png"))[1]
    assert _ask(browser, other, QUESTION, _answer_shown) == runtime.answer(str(other), QUESTION)
    assert proc.poll() is None, output(proc)


@pytest.mark.skipif(not (HAVE["local"] and HAVE_GRADIO), reason="the demo extra is not installed (pip install -e '.[demo]')")
@pytest.mark.parametrize("make, question, message", [
    (lambda d: None, QUESTION, "give an image"),
    (lambda d: d / "notes.png", QUESTION, "not an image format"),
    (lambda d: d / "scene.png", "   ", "non-empty question"),
    (lambda d: d / "scene.png", "is " * 400 + "it?", "characters"),
    (lambda d: d / "scene.png", "Is there " + "a red cube and " * 30 + "a ball?", "tokens"),
    (lambda d: d / "huge.png", QUESTION, "megapixels"),
])
def test_bad_input_is_one_message_in_the_page( real_sample, make, question, message):
    """What the page shows for each mistake: gr.Error's one line (the page keeps serving)."""
    import gradio as gr
    from gradio.utils import get_upload_folder
    from PIL import Image
    from runtime.demo import answer_page
    Path(get_upload_folder()).mkdir(parents=True, exist_ok=True)       # where the page's uploads land
    import tempfile
    tmp_path = Path(tempfile.mkdtemp(dir=get_upload_folder()))
    shutil.copy(sorted((real_sample / "images" / "val").glob("*.png"))[0], tmp_path / "scene.png")
    (tmp_path / "notes.png").write_bytes(b"these are not pixels")
    Image.new("1", (9000, 9000)).save(tmp_path / "huge.png")
    path = make(tmp_path)
    try:
        with pytest.raises(gr.Error) as e:
            answer_page(runtime.load("builtin"), None if path is None else {"path": str(path)}, question)
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)
    assert message in e.value.message and "Traceback" not in e.value.message
