"""Model configuration: one frozen dataclass, named presets, and the overrides that CLI flags apply.

The config is saved inside every checkpoint and every export, so the next step rebuilds exactly
the model that was trained from the file alone. Paper numbers: section 4.2 of Wu et al.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

ARCHS = ("brn", "frn")
READOUTS = ("paper", "film")            # the plain head's map projection (PlainHead)
POOLS = ("max", "max+sum")              # the plain head's pooling over positions
TAU_RANGE = (0.01, 100.0)               # Gumbel-sigmoid temperatures that can train (1e-300 overflows)
BLOCK_NORMS = ("group", "batch")
POSITIVE = ("vocab_size", "num_answers", "image_size", "embed_dim", "hidden_dim", "stem_width", "stem_kernel",
            "stage_depths", "stage_widths", "stage_strides", "cardinality", "bottleneck_expansion", "gn_groups",
            "head_dim", "mlp_dim", "attn_dim", "attn_layers", "attn_heads")


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "brn"                       # "brn": ResNeXt branches are modules; "frn": ResNet filters
    vocab_size: int = 100                   # set from the data's vocabulary when training starts
    num_answers: int = 28                   # set from the data's answer list when training starts
    image_size: int = 224                   # square input, pixels
    # textual network (paper 4.2: embedding 200, GRU 512)
    embed_dim: int = 200
    hidden_dim: int = 512
    # visual network
    stem_width: int = 64
    stem_kernel: int = 7                    # 7x7/2 conv + 3x3/2 max pool, as ResNet; small presets use 3
    stem_pool: bool = True
    stage_depths: tuple[int, ...] = (2, 2, 2, 2)        # BRN: ResNeXt-26 = 3 * 8 + 2
    stage_widths: tuple[int, ...] = (64, 128, 256, 256)
    stage_strides: tuple[int, ...] = (1, 2, 2, 2)
    cardinality: int = 32                   # BRN: branches per bottleneck = modules per layer (M)
    bottleneck_expansion: int = 1           # BRN: block output channels = width * expansion; the paper's
                                            # "width (channel number)" of a stage is both
    block_norm: str = "group"               # BRN: 3rd norm of the bottleneck (paper 4.5 ablation)
    gn_groups: int = 32
    # routing network (paper 3.3, 4.2)
    route_init_prob: float = 0.7            # routing FC bias = log(p / (1 - p))
    tau: float = 1.0                        # Gumbel-sigmoid temperature
    # head (paper 3.4 and 4.2)
    attention: bool = False
    question_to_classifier: bool = True     # paper table 2: "w/ q"
    readout: str = "paper"                  # plain head: "paper" (1x1 conv over [map, coords]) or "film"
                                            # (two 1x1 convs over [map, coords, tiled q]: the question
                                            # meets every position before pooling)
    pool: str = "max"                       # plain head: "max" (paper: GMP) or "max+sum" (GMP beside a
                                            # sum over positions, which grows with the number of objects)
    head_dim: int = 512
    mlp_dim: int = 1024
    attn_dim: int = 256
    attn_layers: int = 2
    attn_heads: int = 4

    def __post_init__(self):
        for name in POSITIVE:
            values = getattr(self, name)
            for v in (values if isinstance(values, tuple) else (values,)):
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise ValueError(f"{name} must be a positive integer, got {values!r}")
        if not 1e-4 <= self.route_init_prob <= 1 - 1e-4:      # the routing bias log(p / (1 - p)) stays finite
            raise ValueError(f"route_init_prob must lie in [0.0001, 0.9999], got {self.route_init_prob}")
        if not (math.isfinite(self.tau) and TAU_RANGE[0] <= self.tau <= TAU_RANGE[1]):
            raise ValueError(f"tau must lie in [{TAU_RANGE[0]:g}, {TAU_RANGE[1]:g}] (the paper's is 1), got {self.tau}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.block_norm not in BLOCK_NORMS:
            raise ValueError(f"block_norm must be one of {BLOCK_NORMS}, got {self.block_norm!r}")
        n = len(self.stage_depths)
        if not (len(self.stage_widths) == len(self.stage_strides) == n):
            raise ValueError("stage_depths, stage_widths and stage_strides must have the same length")
        if self.arch == "brn":
            for w in self.stage_widths:
                if w % self.cardinality:
                    raise ValueError(f"stage width {w} is not divisible by cardinality {self.cardinality}")
        if self.readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {self.readout!r}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if self.attention and (self.readout, self.pool) != ("paper", "max"):
            raise ValueError("readout and pool choose the plain head's read-out; the attention head has its own")
        if self.attention and self.attn_dim % self.attn_heads:
            raise ValueError("attn_dim must be divisible by attn_heads")

    # -- routing shape -------------------------------------------------------------------
    @property
    def layer_sizes(self) -> tuple[int, ...]:
        """Modules per modular layer: BRN c per bottleneck; FRN each block's conv2 filters."""
        sizes = []
        for depth, width in zip(self.stage_depths, self.stage_widths):
            sizes += [self.cardinality if self.arch == "brn" else width] * depth
        return tuple(sizes)

    @property
    def num_layers(self) -> int:
        return len(self.layer_sizes)

    @property
    def max_modules(self) -> int:
        return max(self.layer_sizes)

    @property
    def route_bias(self) -> float:
        return math.log(self.route_init_prob / (1.0 - self.route_init_prob))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(known)
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)

    def replace(self, **overrides) -> "ModelConfig":
        return dataclasses.replace(self, **overrides)


_BRN = dict(arch="brn", image_size=224, stage_depths=(2, 2, 2, 2), stage_widths=(64, 128, 256, 256))
_FRN = dict(arch="frn", image_size=224, stage_depths=(3, 4, 6, 3), stage_widths=(64, 128, 256, 512),
            block_norm="batch")
# CPU-sized BRN: 64x64 input, 3x3/2 stem without pooling, 8x8 final map, small text network.
_SMALL = dict(arch="brn", image_size=64, embed_dim=64, hidden_dim=128, stem_width=32, stem_kernel=3,
              stem_pool=False, stage_depths=(1, 1, 1, 1), stage_widths=(32, 64, 128, 128),
              stage_strides=(1, 2, 2, 1), cardinality=8, gn_groups=8, head_dim=128, mlp_dim=256,
              attn_dim=64, attn_layers=1, attn_heads=4)
_TINY = dict(arch="brn", image_size=32, embed_dim=16, hidden_dim=32, stem_width=8, stem_kernel=3,
             stem_pool=False, stage_depths=(1, 1), stage_widths=(16, 16), stage_strides=(1, 2),
             cardinality=4, bottleneck_expansion=1, gn_groups=4, head_dim=16, mlp_dim=32,
             attn_dim=16, attn_layers=1, attn_heads=2)

PRESETS: dict[str, dict] = {
    "brn-c8": {**_BRN, "cardinality": 8},
    "brn-c16": {**_BRN, "cardinality": 16},
    "brn-c32": {**_BRN, "cardinality": 32},
    "frn": _FRN,
    "small": _SMALL,
    "small-frn": {**_SMALL, "arch": "frn", "stage_widths": (16, 32, 64, 64), "block_norm": "batch"},
    "tiny": _TINY,
    "tiny-frn": {**_TINY, "arch": "frn", "stage_widths": (8, 16), "block_norm": "batch"},
}


def preset_names() -> list[str]:
    """Every preset, each also in its attention form ("name+attn")."""
    return [n + s for n in PRESETS for s in ("", "+attn")]


def get_config(name: str, **overrides) -> ModelConfig:
    """Config for a preset name ("brn-c32", "frn+attn", "small", ...) with field overrides."""
    base, plus, suffix = name.partition("+")
    if base not in PRESETS or (plus and suffix != "attn"):
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(preset_names())}")
    fields = dict(PRESETS[base])
    if suffix == "attn":
        if overrides.get("attention") is False:
            raise ValueError(f"preset {name!r} has an attention head; attention=False contradicts it")
        fields["attention"] = True
    fields.update(overrides)
    return ModelConfig(**fields)


def parse_override(text: str, cfg_cls=ModelConfig) -> tuple[str, object]:
    """Parse "field=value" for a dataclass field, converting to the field's annotated type."""
    from .settings import split_assignment, typed
    key, raw = split_assignment(text)
    return key, typed(cfg_cls, {key: raw}, "--set")[key]
