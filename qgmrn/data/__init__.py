"""Datasets: the CLEVR-style generator, CLEVR / CLEVR-Humans / JSON-lines loaders, the image cache."""
