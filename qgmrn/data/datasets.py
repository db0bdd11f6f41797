"""torch Datasets over Sample lists; images from the prepared cache when present, else decoded."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from ..preprocess import Vocab, load_rgb, normalize, resize_uint8
from .prepare import ImageCache
from .sources import Sample


class VQADataset(Dataset):
    """Item: (image (3, S, S) float32, token ids (T,) int64, answer id or -1 if not in the list),
    plus the scene/program targets (K, 7) float32 when the dataset carries them (training only)."""

    def __init__(self, samples: list[Sample], vocab: Vocab, answers: list[str], image_size: int,
                 cache: ImageCache | None = None, targets=None):
        self.samples = samples
        self.targets = targets                  # data.supervision.SceneTargets, one row per sample
        self.image_size = image_size
        self.cache = cache if cache is not None and cache.size == image_size and \
            cache.covers(s.image for s in samples) else None
        answer_ids = {a: i for i, a in enumerate(answers)}
        self.tokens = [torch.tensor(vocab.encode(s.question)[0], dtype=torch.long) for s in samples]
        self.labels = torch.tensor([answer_ids.get(s.answer, -1) for s in samples], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.samples)

    def image_u8(self, i: int) -> np.ndarray:
        path = self.samples[i].image
        if self.cache is not None:
            return np.asarray(self.cache.get(path))
        return resize_uint8(load_rgb(path), self.image_size)

    def __getitem__(self, i: int):
        item = (torch.from_numpy(normalize(self.image_u8(i))), self.tokens[i], self.labels[i])
        if self.targets is not None:
            return item + (torch.from_numpy(self.targets.item(i)),)
        return item


def collate(batch):
    """Pad questions with NULL (id 0): image (B, 3, S, S), tokens (B, T), lengths (B,), labels (B,),
    and targets (B, K, 7) when the items carry them."""
    images, tokens, labels, *targets = zip(*batch)
    lengths = torch.tensor([len(t) for t in tokens], dtype=torch.long)
    padded = torch.zeros(len(tokens), int(lengths.max()), dtype=torch.long)
    for row, t in enumerate(tokens):
        padded[row, :len(t)] = t
    out = (torch.stack(images), padded, lengths, torch.stack(labels))
    return out + (torch.stack(targets[0]),) if targets else out
