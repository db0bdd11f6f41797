"""QGMRN: Question Guided Modular Routing Networks for visual question answering.

Importing the package is cheap and torch-free; the PyTorch parts live in submodules
(qgmrn.model, qgmrn.train, ...), the shared torch-free preprocessing in qgmrn.preprocess.
"""
__version__ = "0.1.0"
