"""The router's own learning rate (issue 39): router_lr scales the routing FC's step against the
rest of the network, survives --resume as part of the run, and is checked before any file."""
import pytest
import torch

from conftest import tiny_train_config
from qgmrn.settings import SettingsError
from qgmrn.train import train

QUIET = dict(log=lambda *a, **k: None)


def _trained(tiny_data, out, **settings):
    train(tiny_train_config(tiny_data, out, steps=3, **settings), **QUIET)
    return torch.load(out / "ckpt.pt", weights_only=True)


def test_router_lr_moves_the_router_by_its_own_rate(tiny_data, tmp_path):
    slow = _trained(tiny_data, tmp_path / "slow", router_lr=0.01, warmup_steps=0)
    same = _trained(tiny_data, tmp_path / "same", warmup_steps=0)
    groups = slow["optimizer"]["param_groups"]
    assert len(groups) == 2 and len(same["optimizer"]["param_groups"]) == 1
    assert groups[1]["lr"] == pytest.approx(groups[0]["lr"] * 0.01)
    # the schedule (warm-up, anneal) scales both groups alike: the ratio holds at every step
    assert [sorted(g["params"]) for g in groups] != [[], []] and groups[0]["initial_lr"] == same["optimizer"][
        "param_groups"][0]["initial_lr"]
    routing = set(groups[1]["params"])
    assert len(routing) == sum(1 for k in slow["model"] if k.startswith("router."))   # the routing FC only


def test_router_lr_is_kept_on_resume_and_checked_before_any_file(tiny_data, tmp_path):
    out = tmp_path / "run"
    train(tiny_train_config(tiny_data, out, steps=2, router_lr=0.1), **QUIET)
    train(tiny_train_config(tiny_data, out, steps=3), resume=str(out / "ckpt.pt"), given={"steps": 3}, **QUIET)
    state = torch.load(out / "ckpt.pt", weights_only=True)
    assert state["step"] == 3 and state["train_config"]["router_lr"] == 0.1
    with pytest.raises(SettingsError, match="router_lr=1.0 contradicts its router_lr=0.1"):
        train(tiny_train_config(tiny_data, out, steps=4), resume=str(out / "ckpt.pt"),
              given={"steps": 4, "router_lr": 1.0}, **QUIET)
    for bad in (0.0, -1.0, float("nan"), 1e3):
        with pytest.raises(SettingsError, match="router_lr"):
            train(tiny_train_config(tiny_data, tmp_path / f"bad{bad}", steps=1, router_lr=bad), **QUIET)
        assert not (tmp_path / f"bad{bad}").exists()
