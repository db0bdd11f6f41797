"""Exceptions the runtime raises for bad input; each names what is wrong."""
from qgmrn.preprocess import ImageError, QuestionError  # noqa: F401  (re-exported)


class ModelError(ValueError):
    """A model file that is missing, not a QGMRN export, or lacks its metadata."""


class NoModelConfigured(RuntimeError):
    """runtime.answer() was called without a model and none is configured."""
