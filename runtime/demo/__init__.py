"""A browser page that answers questions about an image and shows the routing the question chose.

    pip install -e '.[demo]'
    python -m runtime.demo [--model PATH|builtin] [--host 127.0.0.1] [--port 7860]   (runtime/demo/__main__.py)

The same page is at / of `python -m runtime.serve` when the demo extra is installed. The page
answers through the torch-free runtime (the uploaded file's own bytes, as runtime.answer reads
them) and draws the routing path: modular layers as rows, modules as cells, executed or skipped
(paper section 4.6, Figure 3).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import ImageError, ModelError, QuestionError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
ON, OFF, INK = (37, 99, 235), (229, 231, 235), (31, 41, 55)


def examples() -> list[list[str]]:
    """[image path, question] rows from the shipped scenes (rendered by our Blender renderer)."""
    doc = json.loads((EXAMPLES / "examples.json").read_text())
    return [[str(EXAMPLES / e["image"]), q["question"]] for e in doc["examples"] for q in e["questions"]]


def routing_picture(gates: list[list[int]], arch: str):
    """Layers as rows, modules as cells (filled: executed); each row ends with its execution ratio."""
    from PIL import Image, ImageDraw
    widest = max(len(g) for g in gates)
    cell = max(10, min(32, 800 // widest))                 # BRN's few branches large, FRN's filters compact
    label_w, ratio_w, row_h, top = 70, 110, cell + 14, 30
    width = label_w + widest * cell + ratio_w
    im = Image.new("RGB", (width, top + row_h * len(gates) + 8), "white")
    draw = ImageDraw.Draw(im)
    what = "filters" if arch == "frn" else "branches"
    draw.text((8, 8), f"modules each layer ran ({what}; filled: executed, grey: skipped)", fill=INK)
    for i, layer in enumerate(gates):
        y = top + i * row_h
        draw.text((8, y + cell // 2 - 5), f"layer {i + 1}", fill=INK)
        for j, g in enumerate(layer):
            x = label_w + j * cell
            draw.rectangle([x + 1, y + 1, x + cell - 2, y + cell - 2], fill=ON if g else OFF)
        ran = sum(layer)
        draw.text((label_w + widest * cell + 10, y + cell // 2 - 5),
                  f"{ran}/{len(layer)} ({100 * ran / len(layer):.0f}%)", fill=INK)
    return im


def card_line(model) -> str:
    """What the model is and how well it answers, from the built-in card or the export's metadata."""
    card_path = Path(str(model.path)).with_suffix(".json")
    meta = model.metadata
    name = f"`{Path(str(model.path)).name}` ({meta.get('arch', '?').upper()}, {meta.get('precision', '?')})"
    if card_path.name == "builtin.json" and card_path.exists():
        card = json.loads(card_path.read_text())
        real, data = card.get("real_clevr_all", {}), card.get("data", {})
        return (f"Built-in model {name}: trained on {data.get('name', 'generated')} scenes "
                f"({data.get('renderer', '?')} renderer); answers {100 * real.get('overall', 0):.1f}% of "
                f"{real.get('n', '?')} real CLEVR questions.")
    return f"Model {name}, trained {meta.get('train_steps', '?')} steps (recipe: {meta.get('recipe') or 'none'})."


def skipped_line(pred, modules: int) -> str:
    """How much of the network the question switched off, and what that saved in this graph."""
    off = modules - sum(map(sum, pred.gates))
    line = f"the question switched off {off} of {modules} modules ({100 * off / modules:.0f}%)"
    if pred.execution == "masked":
        return line + ("; this graph still computes them and multiplies them by zero (masked execution), "
                       "so no time is saved")
    return line + f"; this graph skips them ({pred.execution} execution)"


def answer_page(model, image, question: str):
    """The page's answer to one submit: (answer, top-5, routing picture, details); a bad input is
    a gr.Error with one message (shown in the page; the app keeps serving)."""
    import gradio as gr
    from ..api import MAX_BODY, BadRequest, check_question
    path = image.get("path") if isinstance(image, dict) else getattr(image, "path", None)
    if not path:
        raise gr.Error("give an image: upload one, drop one on the box, or pick an example below")
    if not isinstance(path, str) or not _uploaded(path):
        # the page answers about what was uploaded to it, never about a file a client names
        raise gr.Error("the image must be uploaded to this page (or be one of its examples)")
    try:
        check_question(question)
        with open(path, "rb") as f:                      # a regular file (checked), read up to the limit
            data = f.read(MAX_BODY + 1)
        if len(data) > MAX_BODY:
            raise BadRequest(413, f"the image file has more than {MAX_BODY} bytes; at most {MAX_BODY}")
        pred = model.predict(data, question, top_k=5)
    except (BadRequest, ImageError, QuestionError, ModelError, OSError) as e:
        raise gr.Error(str(e).replace("image bytes", "the image")) from None
    known = ("every word of the question is in the model's vocabulary" if not pred.unknown_words else
             "words the model never saw (read as unknown): " + ", ".join(pred.unknown_words))
    why = f" — {model.backend_reason}" if model.backend_reason else ""
    details = (f"- {known}\n- {skipped_line(pred, sum(model.layer_sizes))}\n"
               f"- answered by {model.backend}{why}\n- {card_line(model)}")
    return (pred.answer, {a: p for a, p in pred.top_k},
            picture_html(routing_picture(pred.gates, str(model.metadata.get("arch", "")))), details)


def picture_html(im) -> str:
    """The routing picture inside the reply (a PNG data URL): no server file, no server path."""
    import base64
    import io
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return (f'<img alt="routing path" style="max-width:100%" '
            f'src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">')


async def _not_found(request, exc):
    """Unknown paths under the page answer in the API's words, not Gradio's."""
    from fastapi.responses import JSONResponse
    from ..api import ENDPOINTS
    return JSONResponse({"error": f"{request.method} {request.url.path}: {ENDPOINTS}"},
                        status_code=getattr(exc, "status_code", 404))


def _uploaded(path: str) -> bool:
    """True for a regular file in Gradio's upload folder or among the shipped examples."""
    import os
    from gradio.utils import get_upload_folder, is_in_or_equal
    try:
        real = Path(os.path.realpath(path))
        regular = real.is_file()
    except (OSError, ValueError):
        return False
    allowed = (Path(os.path.realpath(get_upload_folder())), Path(os.path.realpath(EXAMPLES)))
    return regular and any(is_in_or_equal(real, root) for root in allowed)


def build_demo(model):
    """The page as Gradio Blocks (named components; the routing as a picture)."""
    import gradio as gr
    # Uploads live in Gradio's cache for 10 minutes at most (swept every minute, and at shutdown)
    with gr.Blocks(title="QGMRN: question-guided routing", delete_cache=(60, 600)) as page:
        gr.Markdown("## QGMRN — ask about a scene, see which modules the question switches on")
        with gr.Row():
            with gr.Column():
                image = gr.Image(label="image", type="filepath", image_mode=None, elem_id="image",
                                 sources=["upload", "clipboard"])
                question = gr.Textbox(label="question", placeholder="How many cubes are there?", elem_id="question")
                submit = gr.Button("Answer", variant="primary", elem_id="submit")
            with gr.Column():
                answer = gr.Textbox(label="answer", interactive=False, elem_id="answer")
                top = gr.Label(label="top-5", num_top_classes=5, elem_id="top5")
        routing = gr.HTML(label="routing path", elem_id="routing")
        details = gr.Markdown(elem_id="details")
        gr.Examples(examples(), inputs=[image, question], label="example scenes (rendered by our Blender renderer)")
        # preprocess=False: the handler reads the uploaded file's own bytes, so a file that is not an
        # image gets the runtime's message, and an image answers exactly as runtime.answer(path).
        # One endpoint, named for what it does (gradio_client: .predict(image, question, api_name="/answer"))
        gr.on([submit.click, question.submit], lambda im, q: answer_page(model, im, q), inputs=[image, question],
              outputs=[answer, top, routing, details], preprocess=False, api_name="answer")
    return page


def mount_demo(app, model) -> bool:
    """Mount the page at / of a FastAPI app; False (and / says what to install) without Gradio."""
    try:
        import gradio as gr
    except ImportError:
        from fastapi.responses import JSONResponse

        @app.get("/")
        async def no_demo():
            return JSONResponse({"error": "the browser demo needs pip install -e '.[demo]'; the API: POST /answer"},
                                status_code=404)
        return False
    from ..api import MAX_BODY
    page = build_demo(model)
    gr.mount_gradio_app(app, page, path="/", max_file_size=MAX_BODY, show_error=True,
                        app_kwargs={"openapi_url": None, "docs_url": None, "redoc_url": None,
                                    "exception_handlers": {404: _not_found, 405: _not_found}})
    # Gradio checks that a request's files were uploaded to the page only once the page "has
    # launched", which mounting never sets: without this, a client could name any server file.
    page.has_launched = True
    # Inside the body limits (the innermost middleware): uploads must be images, bounded in what
    # they keep together, and are named without server paths (runtime/demo/uploads.py)
    from starlette.middleware import Middleware
    from .uploads import UploadGuard
    app.user_middleware.append(Middleware(UploadGuard))
    return True
