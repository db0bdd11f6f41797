"""The state of one training run and how it is built: a new model, one restored from --resume,
or one grown from --init-from, with its datasets, optimizer and schedule."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from ..config import get_config
from ..data.datasets import VQADataset
from ..data.prepare import open_cache
from ..data.sources import DataError, answer_list
from ..model import QGMRN, grow_model
from ..evaluate import within_limit
from ..preprocess import Vocab
from .data import Data, question_limit, warn_about_val
from .hardware import training_precision
from .schedule import Curriculum, build_curriculum, lr_lambda, resolve_lr
from .settings import SettingsError, TrainConfig
from .supervision import SupervisionHeads, TrainingForward, build_heads


# -- the run -------------------------------------------------------------------------------------
@dataclass
class Run:
    """Everything one training run holds; the stages below read and advance it."""
    cfg: TrainConfig
    model: QGMRN
    heads: "SupervisionHeads | None"           # training-only scene/where heads (None: the paper's loss)
    ddp: torch.nn.Module                        # TrainingForward(model, heads), DDP-wrapped when distributed
    optimizer: torch.optim.Optimizer
    scheduler: object
    vocab: Vocab
    answers: list[str]
    max_len: int
    train_ds: VQADataset
    val_ds: VQADataset
    curriculum: "Curriculum | None"
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    rank: int
    world: int
    per_epoch: int
    total: int
    step: int = 0
    train_seconds: float = 0.0
    result: dict = field(default_factory=dict)

    @property
    def main(self) -> bool:
        return self.rank == 0


def planned_steps(cfg: TrainConfig, n_train: int, world: int) -> tuple[int, int]:
    """(steps per epoch, steps of the whole run): --steps, or --epochs of full batches."""
    per_epoch = n_train // (cfg.batch_size * world)
    if per_epoch == 0:
        raise DataError(f"{n_train} training questions cannot fill one batch of "
                        f"{cfg.batch_size} on {world} process(es)")
    return per_epoch, cfg.steps if cfg.steps > 0 else cfg.epochs * per_epoch


def build_or_restore(cfg: TrainConfig, data: Data, resume_state, init_from, model_overrides, device, rank,
                     world, say) -> Run:
    """Stage 2: a new model, one restored from --resume, or one grown from --init-from."""
    train_samples = data.train
    if resume_state is not None:
        vocab = Vocab(list(resume_state["vocab"]))
        answers = list(resume_state["answers"])
        max_len = resume_state["max_question_len"]
        model = model_from_checkpoint(resume_state)
    elif init_from:
        init = load_checkpoint(init_from)
        model = model_from_checkpoint(init)
        vocab = Vocab(list(init["vocab"]))
        new_words = vocab.extend(s.question for s in train_samples)
        answers = list(init["answers"]) + [a for a in answer_list(train_samples) if a not in init["answers"]]
        model = grow_model(model, len(vocab), len(answers))
        max_len = max(init["max_question_len"], question_limit(train_samples))
        say(f"fine-tuning from {init_from}: {len(new_words)} new words, "
            f"{len(answers) - len(init['answers'])} new answers")
    else:
        vocab = Vocab.build(s.question for s in train_samples)
        answers = answer_list(train_samples)
        max_len = question_limit(train_samples)
        model = QGMRN(get_config(cfg.preset, vocab_size=len(vocab), num_answers=len(answers),
                                 **(model_overrides or {})))
    mcfg = model.cfg
    cfg = resolve_lr(cfg, mcfg)
    size = mcfg.image_size
    caches = []
    for samples, name in zip((train_samples, data.val), data.names):
        images = [s.image for s in samples]
        cache = open_cache(data.cache_dir, name, size, images, build=rank == 0, log=say)
        if dist.is_initialized():
            dist.barrier()
            cache = cache or open_cache(data.cache_dir, name, size, images, build=False)
        caches.append(cache)
    train_ds = VQADataset(train_samples, vocab, answers, size, caches[0], data.targets)
    val_subset, skipped = within_limit(data.val[:cfg.max_val] if cfg.max_val else data.val, max_len)
    if skipped and rank == 0:
        say(f"val: {skipped} questions longer than the model's {max_len} tokens are skipped (as evaluate does)")
    val_ds = VQADataset(val_subset, vocab, answers, size, caches[1])
    if rank == 0:
        warn_about_val(val_subset, vocab, answers, say)

    if cfg.count_weight and model.cfg.pool != "max+sum":
        raise SettingsError("count_weight reads the head's sum over positions: it needs the model setting "
                            f"pool=max+sum (--set pool=max+sum), not pool={model.cfg.pool}")
    if cfg.count_weight and not any(a.isdigit() for a in answers):
        raise SettingsError("count_weight needs count questions (answers that are whole numbers); this "
                            "data's answers have none")
    heads = build_heads(model.visual.out_channels, cfg.scene_weight, cfg.where_weight, cfg.count_weight,
                        answers, model.cfg.head_dim,
                        scene_channels=model.cfg.stem_width if cfg.scene_gates == "stem" else 0)
    if resume_state is not None and heads is not None:
        try:
            heads.load_state_dict(resume_state["supervision"])
        except (KeyError, RuntimeError) as e:
            raise CheckpointError(f"the checkpoint's scene/where/count heads are missing or do not fit: {e}") from e
    model.to(device)
    amp_dtype = training_precision(cfg, device)
    channels_last = device.type == "cuda" or amp_dtype is not None     # faster for both there
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    per_epoch, total = planned_steps(cfg, len(train_ds), world)
    trainer = TrainingForward(model, heads, cfg.scene_gates).to(device)
    optimizer = torch.optim.Adam(param_groups(trainer, model, cfg), lr=cfg.lr, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total))
    step, seconds = 0, 0.0
    if resume_state is not None:
        try:
            optimizer.load_state_dict(resume_state["optimizer"])
            scheduler.load_state_dict(resume_state["scheduler"])
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
            raise CheckpointError(f"the checkpoint's optimizer state does not fit its model ({e}): it cannot "
                                  "be resumed; start from its weights with --init-from instead") from e
        step, seconds = resume_state["step"], float(resume_state.get("train_seconds", 0.0))
    ddp = torch.nn.parallel.DistributedDataParallel(trainer) if dist.is_initialized() else trainer
    return Run(cfg, model, heads, ddp, optimizer, scheduler, vocab, answers, max_len, train_ds, val_ds,
               build_curriculum(cfg, train_samples), device, amp_dtype, channels_last, rank, world,
               per_epoch, total, step, seconds)




def param_groups(trainer, model, cfg) -> list:
    """One group, or with router_lr != 1 two: the routing FC at lr x router_lr, the rest at lr (the
    schedule scales both alike). Runs saved with one group resume with one: router_lr is kept."""
    if cfg.router_lr == 1.0:
        return [{"params": list(trainer.parameters())}]
    routing = {id(p) for p in model.router.parameters()}
    return [{"params": [p for p in trainer.parameters() if id(p) not in routing]},
            {"params": list(model.router.parameters()), "lr": cfg.lr * cfg.router_lr}]
