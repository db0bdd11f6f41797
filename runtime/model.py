"""A loaded QGMRN export: answers questions about images with numpy + Pillow + onnxruntime."""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from qgmrn.preprocess import MEAN, STD, Vocab, encode_batch, load_rgb, normalize, resize_uint8

from .backends import open_runner
from .errors import ModelError
from .metadata import UINT8_NHWC


_POOL_SIZE = min(8, os.cpu_count() or 1)
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """One pool of image workers per process, shared by every Model (made on first use)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(_POOL_SIZE, thread_name_prefix="qgmrn-image")
        return _POOL


DECODE_AHEAD = 2          # batches whose images decode while the model runs the one in hand


def _identity(image):
    """A key that is equal for the same image given twice in one batch."""
    if isinstance(image, (str, os.PathLike)):
        return ("path", os.fspath(image))
    if isinstance(image, bytes):
        return ("bytes", image)
    return ("object", id(image))


EXECUTIONS = ("masked", "compact", "compact-batch1")    # export.onnx_export's metadata["execution"]
IMAGE_INPUTS = ("float-nchw", UINT8_NHWC)


@dataclass
class Prediction:
    """One answer with its probabilities and the routing path the question took."""

    answer: str
    probability: float
    top_k: list[tuple[str, float]]
    gates: list[list[int]]                 # per modular layer, one 0/1 per module (the routing path)
    execution_ratio: list[float]           # per layer: executed modules / modules
    overall_execution_ratio: float
    unknown_words: list[str] = field(default_factory=list)   # words the model never saw (read as UNK)
    # how the graph ran the routing: "masked" (every module computed, the switched-off ones
    # multiplied by zero: no time saved) or "compact"/"compact-batch1" (switched-off modules skipped)
    execution: str = "masked"

    def to_dict(self) -> dict:
        # "score" beside "probability": the field Hugging Face's VQA pipeline returns
        return {"answer": self.answer, "probability": self.probability, "score": self.probability,
                "top_k": [{"answer": a, "probability": p, "score": p} for a, p in self.top_k],
                "routing": {"gates": self.gates, "execution_ratio": self.execution_ratio,
                            "overall_execution_ratio": self.overall_execution_ratio, "execution": self.execution},
                "unknown_words": self.unknown_words}


class Model:
    """model.answer(image, question) -> str; predict() adds probabilities and the routing path.

    Images: a path, bytes, a PIL image or a uint8 array (HxW, HxWx3, HxWx4). Questions: str, at
    most `max_question_len` tokens (longer ones are refused, never truncated). Thread-safe.
    """

    def __init__(self, path: str | os.PathLike, backend: str = "auto", _runner=None):
        # _runner: an opened runner for `path` (export.benchmark times every parity row this way)
        self._runner, self.path = (_runner, path) if _runner is not None else open_runner(path, backend)
        meta = self.metadata = self._runner.metadata
        self.backend = self._runner.name
        # why auto chose this backend (the parity row it passed, its speed), where it chose by rows
        self.backend_reason: str | None = getattr(self._runner, "reason", None)
        try:
            self.vocab = Vocab(list(meta["vocab"]))
        except (TypeError, ValueError) as e:
            raise ModelError(f"{self.path}: its vocabulary metadata is unusable ({e})") from e
        self.answers: list[str] = list(meta["answers"])
        self.image_size = int(meta["image_size"])
        self.max_question_len = int(meta["max_question_len"])
        self.layer_sizes = [int(m) for m in meta["layer_sizes"]]
        # exports before compact execution existed carry no "execution": they are masked graphs
        self.execution = meta.get("execution", "masked")
        # what the graph's image input takes: the normalised float tensor (every export before issue
        # 40) or the decoded uint8 pixels, which it converts itself (export/uint8_input.py)
        self.image_input = meta.get("image_input", "float-nchw")
        if self.image_input not in IMAGE_INPUTS:
            raise ModelError(f"{self.path}: its metadata names an image input {str(self.image_input)[:40]!r} this "
                             f"runtime does not know ({', '.join(IMAGE_INPUTS)}); upgrade qgmrn")
        if self.execution not in EXECUTIONS:
            raise ModelError(f"{self.path}: its metadata names an execution {str(self.execution)[:40]!r} this "
                             f"runtime does not know ({', '.join(EXECUTIONS)}); upgrade qgmrn")
        if not (np.allclose(meta["mean"], MEAN) and np.allclose(meta["std"], STD)):
            raise ModelError(f"{self.path} was exported with image normalisation {meta['mean']}/{meta['std']}, "
                             f"which this runtime ({MEAN}/{STD}) does not apply; upgrade qgmrn")

    def __repr__(self) -> str:
        return f"Model({str(self.path)!r}, backend={self.backend!r}, answers={len(self.answers)})"

    # -- public API ----------------------------------------------------------------------------
    def __call__(self, image, question: str) -> str:
        """model(image, question) is model.answer(image, question)."""
        return self.answer(image, question)

    def answer(self, image, question: str) -> str:
        """The answer string, e.g. "cyan", "3" or "yes".

        Raises ImageError (unreadable, corrupt or too large image), QuestionError (empty, or longer
        than the model's limit) and ValueError (arguments of the wrong type).
        """
        return self.predict(image, question, top_k=1).answer

    def predict(self, image, question: str, top_k: int = 5) -> Prediction:
        """The answer, its probability, the `top_k` most probable answers, the gates of every
        modular layer (the routing path), the execution ratio per layer and overall, and the
        question's words the model never saw (read as UNK)."""
        return self.predict_batch([image], [question], top_k)[0]

    def answer_batch(self, images, questions, batch_size: int = 16) -> list[str]:
        """Answers for `images[i]` and `questions[i]`, run `batch_size` at a time (one image asked
        several questions in a batch is decoded once)."""
        return [p.answer for p in self.predict_batch(images, questions, 1, batch_size)]

    def predict_batch(self, images, questions, top_k: int = 5, batch_size: int = 16) -> list[Prediction]:
        """predict() for lists of images and questions of the same length, `batch_size` at a time."""
        if isinstance(questions, str):
            raise ValueError("questions must be a list of strings, one per image, not one str "
                             "(use predict() for a single question)")
        if isinstance(images, (str, bytes, os.PathLike, np.ndarray)):
            raise ValueError("images must be a list, one per question (use predict() for a single image)")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError("batch_size must be a positive integer")
        images, questions = list(images), list(questions)
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        if len(images) <= batch_size:
            return self._predict_chunk(images, questions, top_k)
        return self._predict_stream(images, questions, top_k, batch_size)

    # -- internals ------------------------------------------------------------------------------
    def _pixels(self, images) -> np.ndarray:
        """Decode and resize each image (on the cores: Pillow releases the GIL while it decodes and
        resizes), then normalise the batch in one step: the same numbers as preprocess_image."""
        size = self.image_size
        one = lambda im: resize_uint8(load_rgb(im), size)      # noqa: E731
        # One image asked several questions is decoded once (the same object, path or bytes):
        # faster, and a lazily opened PIL image is never decoded by two threads at once.
        index: dict = {}
        distinct, slot = [], []                               # slot: each image's row in distinct
        for im in images:
            key = _identity(im)
            if key not in index:
                index[key] = len(distinct)
                distinct.append(im)
            slot.append(index[key])
        if len(distinct) > 1 and _POOL_SIZE > 1:
            u8 = list(_pool().map(one, distinct))             # the first bad image's error, in order
        else:
            u8 = [one(im) for im in distinct]
        return self._feed(np.stack([u8[k] for k in slot]))

    def _feed(self, u8: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 -> what the graph's image input takes."""
        return u8 if self.image_input == UINT8_NHWC else normalize(u8)

    def _predict_stream(self, images, questions, top_k: int, batch_size: int) -> list[Prediction]:
        """Batches of one call, with each distinct image (the same path, bytes or object) decoded
        once for the whole call, and decoding running ahead of the model on the image workers
        (Pillow and onnxruntime both release the GIL): the batch in hand runs while the next
        ones decode. The first bad image (in call order) raises, as batch by batch would."""
        size = self.image_size
        one = lambda im: resize_uint8(load_rgb(im), size)      # noqa: E731
        index: dict = {}
        slot, first, last_chunk = [], [], []                  # per position; per distinct image
        for i, im in enumerate(images):
            key = _identity(im)
            if key not in index:
                index[key] = len(first)
                first.append(i)
                last_chunk.append(i // batch_size)
            slot.append(index[key])
            last_chunk[index[key]] = i // batch_size
        chunks = (len(images) + batch_size - 1) // batch_size
        by_chunk: list[list[int]] = [[] for _ in range(chunks)]
        for d, i in enumerate(first):
            by_chunk[i // batch_size].append(d)
        pending: dict = {}
        out: list[Prediction] = []
        submitted = 0
        try:
            for c in range(chunks):
                while submitted < min(chunks, c + 1 + DECODE_AHEAD):    # keep the workers fed
                    for d in by_chunk[submitted]:
                        pending[d] = _pool().submit(one, images[first[d]])
                    submitted += 1
                rows = slot[c * batch_size:(c + 1) * batch_size]
                u8 = {d: pending[d].result() for d in dict.fromkeys(rows)}
                pixels = self._feed(np.stack([u8[d] for d in rows]))
                out += self._predict_pixels(pixels, questions[c * batch_size:(c + 1) * batch_size], top_k)
                for d in u8:                                    # free what no later batch reads
                    if last_chunk[d] == c:
                        del pending[d]
        finally:
            for f in pending.values():
                f.cancel()
        return out

    def _run_graph(self, feeds: dict) -> dict:
        """The graph on a batch; a batch-1 graph (compact-batch1: its modules are chosen by one
        question's gates) runs each question alone, with its tokens cut to its length."""
        n = len(feeds["tokens"])
        if self.execution != "compact-batch1" or n == 1:
            return self._runner.run(feeds)
        rows = [self._runner.run({"image": feeds["image"][i:i + 1], "lengths": feeds["lengths"][i:i + 1],
                                  "tokens": feeds["tokens"][i:i + 1, :int(feeds["lengths"][i])]}) for i in range(n)]
        return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}

    def _predict_chunk(self, images, questions, top_k) -> list[Prediction]:
        return self._predict_pixels(None, questions, top_k, images)

    def _predict_pixels(self, pixels, questions, top_k, images=None) -> list[Prediction]:
        # encode_batch refuses non-strings, questions without a word and too-long questions
        tokens, lengths, unknown = encode_batch(self.vocab, questions, self.max_question_len)
        if pixels is None:
            pixels = self._pixels(images)
        out = self._run_graph({"image": pixels, "tokens": tokens, "lengths": lengths})
        if not all(np.isfinite(out[k]).all() for k in ("logits", "route_logits")):
            raise ModelError(f"{self.path} produced non-finite outputs (NaN or infinity): its weights are "
                             "broken; re-export a good checkpoint")
        logits = out["logits"].astype(np.float64)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        k = min(top_k, len(self.answers))
        preds = []
        for row in range(len(questions)):
            order = np.argsort(-probs[row], kind="stable")[:k]
            gates = [[int(g) for g in out["gates"][row, l, :m]] for l, m in enumerate(self.layer_sizes)]
            ratio = [sum(g) / len(g) for g in gates]
            preds.append(Prediction(
                answer=self.answers[int(order[0])], probability=float(probs[row, order[0]]),
                top_k=[(self.answers[int(j)], float(probs[row, j])) for j in order],
                gates=gates, execution_ratio=ratio,
                overall_execution_ratio=sum(map(sum, gates)) / sum(self.layer_sizes),
                unknown_words=unknown[row], execution=self.execution))
        return preds
