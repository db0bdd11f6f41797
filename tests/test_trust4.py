"""Trust, round 4 (issue 41): what a hostile or careless user did to the demo page, the server,
training and the runtime, each as a test that failed before its fix."""
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

HAVE_DEMO = all(importlib.util.find_spec(m) is not None for m in ("gradio", "fastapi", "httpx"))
QUESTION = "How many cylinders are there?"
needs_demo = pytest.mark.skipif(not HAVE_DEMO, reason="the demo extra is not installed (pip install 'qgmrn[demo]')")


@pytest.fixture(scope="module")
def demo_client():
    """The serving app with the page at /, in this process, as a client reaches it over HTTP."""
    if not HAVE_DEMO:
        pytest.skip("the demo extra is not installed (pip install 'qgmrn[demo]')")
    from fastapi.testclient import TestClient
    from runtime.engines import LocalEngine, build_asgi
    with TestClient(build_asgi(LocalEngine("builtin"))) as client:
        yield client


def _call(client, endpoint: str, data: list) -> tuple[str, str]:
    """(event, data) of one call through Gradio's HTTP API (/gradio_api/call/NAME, then its stream)."""
    r = client.post(f"/gradio_api/call/{endpoint}", json={"data": data})
    assert r.status_code == 200, r.text
    stream = client.get(f"/gradio_api/call/{endpoint}/{r.json()['event_id']}").text
    events = [line.split(": ", 1)[1] for line in stream.splitlines() if line.startswith("event: ")]
    datas = [line.split(": ", 1)[1] for line in stream.splitlines() if line.startswith("data: ")]
    return events[-1], datas[-1]


def _endpoint(client) -> str:
    named = client.get("/gradio_api/info").json()["named_endpoints"]
    return "answer" if "/answer" in named else next(iter(named)).lstrip("/")


@needs_demo
@pytest.mark.parametrize("target", ["/etc/passwd", "/proc/self/environ", "/dev/zero", "/nonexistent/x.png"])
def test_d1_d2_the_page_never_reads_a_server_file_a_client_names(demo_client, target, real_sample):
    """D1: a client-written file reference made the server read, cache and serve any file; D2:
    /dev/zero hung the server. Now every such request is refused alike, and the server keeps answering."""
    event, data = _call(demo_client, _endpoint(demo_client),
                        [{"path": target, "meta": {"_type": "gradio.FileData"}}, QUESTION])
    assert event == "error" and "uploaded" in data
    assert demo_client.get("/healthz").json() == {"status": "ok"}
    # and an image that was uploaded to the page is answered
    image = sorted((real_sample / "images" / "val").glob("*.png"))[0]
    with open(image, "rb") as f:
        paths = demo_client.post("/gradio_api/upload", files={"files": (image.name, f, "image/png")}).json()
    event, data = _call(demo_client, _endpoint(demo_client),
                        [{"path": paths[0], "meta": {"_type": "gradio.FileData"}}, QUESTION])
    import runtime
    assert event == "complete" and json.loads(data)[0] == runtime.answer(str(image), QUESTION)


@needs_demo
def test_m7_the_page_has_one_named_endpoint_no_openapi_and_the_apis_wording(demo_client, real_sample):
    named = demo_client.get("/gradio_api/info").json()["named_endpoints"]
    assert list(named) == ["/answer"]
    assert demo_client.get("/openapi.json").status_code == 404
    r = demo_client.get("/no/such/page")
    assert r.status_code == 404 and "POST /answer" in r.json()["error"]
    image = sorted((real_sample / "images" / "val").glob("*.png"))[0]
    with open(image, "rb") as f:
        paths = demo_client.post("/gradio_api/upload", files={"files": (image.name, f, "image/png")}).json()
    event, data = _call(demo_client, "answer", [{"path": paths[0], "meta": {"_type": "gradio.FileData"}}, QUESTION])
    picture = json.loads(data)[2]
    assert event == "complete" and picture.startswith('<img alt="routing path"')
    assert "data:image/png;base64," in picture and "/tmp" not in picture    # no server path, no server file
