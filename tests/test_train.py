"""Training: checkpoints, exact resume, interruption, bad files, distributed, fine-tuning, evaluation."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import qgmrn.train as train_mod
from conftest import REPO, tiny_train_config
from qgmrn.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from qgmrn.evaluate import main as evaluate_main
from qgmrn.train import TrainingStopped, train

quiet = dict(log=lambda *a, **k: None)


def test_checkpoint_holds_everything_and_loads_weights_only(tiny_checkpoint):
    state = torch.load(tiny_checkpoint, weights_only=True)
    for key in ("model_config", "vocab", "answers", "model", "optimizer", "scheduler", "step", "metrics",
                "train_config", "max_question_len"):
        assert key in state
    assert state["step"] == 4 and state["vocab"][:2] == ["<NULL>", "<UNK>"]
    assert "overall" in state["metrics"] and "per_type" in state["metrics"]
    model = model_from_checkpoint(load_checkpoint(tiny_checkpoint))
    assert model.cfg.vocab_size == len(state["vocab"]) and model.cfg.num_answers == len(state["answers"])


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_without_data_it_generates_its_dataset_once_and_trains(tmp_path, monkeypatch):
    """The default run (no --data-root, no --jsonl): the built-in dataset is generated into
    $QGMRN_CACHE the first time, in the generator's current question language, and reused."""
    from qgmrn.train.data import default_data_dir
    monkeypatch.setenv("QGMRN_CACHE", str(tmp_path / "cache"))
    said = []
    train(tiny_train_config(None, tmp_path / "run", steps=2, generate_images=6), log=said.append)
    root = default_data_dir(6)
    assert root.parent == tmp_path / "cache" and (root / "questions" / "CLEVR_val_questions.json").exists()
    info = json.loads((root / "questions" / "CLEVR_train_questions.json").read_text())["info"]
    assert info["question_language"] >= 2 and (tmp_path / "run" / "ckpt.pt").exists()
    assert any("generating" in str(m) for m in said)
    said.clear()
    train(tiny_train_config(None, tmp_path / "run2", steps=2, generate_images=6), log=said.append)
    assert not any("generating" in str(m) for m in said)


def test_resume_continues_exactly(tiny_data, tmp_path):
    """N + M steps == N steps, a resume, M steps (same weights, same data order)."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(tiny_train_config(tiny_data, straight, steps=6), **quiet)
    train(tiny_train_config(tiny_data, split, steps=3), **quiet)
    train(tiny_train_config(tiny_data, split, steps=6), resume=str(split / "ckpt.pt"), **quiet)
    a, b = _weights(straight / "ckpt.pt"), _weights(split / "ckpt.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = torch.load(straight / "ckpt.pt", weights_only=True)
    sb = torch.load(split / "ckpt.pt", weights_only=True)
    assert sa["step"] == sb["step"] == 6
    assert sa["scheduler"]["last_epoch"] == sb["scheduler"]["last_epoch"]
    assert sa["optimizer"]["param_groups"][0]["lr"] == sb["optimizer"]["param_groups"][0]["lr"]


def test_anneal_decays_the_last_steps_to_zero_and_a_resume_may_add_it(tiny_data, tmp_path):
    """The learning-study schedule: warmup, constant, then the last anneal_steps linearly to 0;
    a resumed run may extend itself with an anneal (it only shapes steps still to come)."""
    from qgmrn.train import TrainConfig, lr_lambda
    f = lr_lambda(TrainConfig(lr=1e-3, warmup_steps=10, anneal_steps=20), total=100)
    assert f(0) == pytest.approx(3e-3) and f(10) == f(79) == f(80) == 1.0
    assert f(90) == pytest.approx(0.5) and f(100) == 0.0
    out = tmp_path / "run"
    train(tiny_train_config(tiny_data, out, steps=4), **quiet)
    before = torch.load(out / "ckpt.pt", weights_only=True)["optimizer"]["param_groups"][0]["lr"]
    train(tiny_train_config(tiny_data, out, steps=8, anneal_steps=4), resume=str(out / "ckpt.pt"),
          given={"steps": 8, "anneal_steps": 4, "out": str(out)}, **quiet)
    state = torch.load(out / "ckpt.pt", weights_only=True)
    assert before > 0 and state["optimizer"]["param_groups"][0]["lr"] == 0.0
    assert state["train_config"]["anneal_steps"] == 4 and state["step"] == 8


def test_bad_checkpoint_files_give_clear_errors(tiny_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(tiny_checkpoint.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(truncated)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(CheckpointError, match="foreign"):
        load_checkpoint(foreign)


def test_a_crash_mid_save_keeps_the_last_good_checkpoint(tiny_checkpoint, tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(tiny_checkpoint.read_bytes())
    state = load_checkpoint(path)
    model = model_from_checkpoint(state)

    def dying_save(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt("power cut")
    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model=model, vocab=state["vocab"], answers=state["answers"], max_question_len=5)
    assert load_checkpoint(path)["step"] == state["step"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_data, tmp_path, monkeypatch):
    real = train_mod.load_balancing_loss
    calls = {"n": 0}

    def poisoned(gates, sizes):
        calls["n"] += 1
        value = real(gates, sizes)
        return value * float("nan") if calls["n"] > 3 else value
    monkeypatch.setattr(train_mod, "load_balancing_loss", poisoned)
    with pytest.raises(TrainingStopped, match="non-finite loss at step 3") as e:
        train(tiny_train_config(tiny_data, tmp_path, steps=8, save_every=1), **quiet)
    assert e.value.code == 3
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 3


@pytest.mark.slow
def test_sigterm_writes_a_resumable_checkpoint(tiny_data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "qgmrn.train", "--data-root", str(tiny_data), "--preset", "tiny",
           "--steps", "100000", "--batch-size", "8", "--out", str(out), "--set", "log_every=1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.stat().st_size > 0):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "resume with --resume" in err
    step = load_checkpoint(out / "ckpt.pt")["step"]
    assert step >= 1
    # --resume without the data flags: the run's own data, preset and batch size come back
    assert train_mod.main(["--resume", "--out", str(out), "--steps", str(step + 2)]) == 0
    assert load_checkpoint(out / "ckpt.pt")["step"] == step + 2


def _ddp_worker(rank, world, port, data_root, out, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    cfg = tiny_train_config(data_root, out, steps=3, batch_size=4)
    try:
        train(cfg, on_finish=lambda m: torch.save(m.state_dict(), Path(result_dir) / f"rank{rank}.pt"),
              log=lambda *a, **k: None)
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_gloo_training_ends_with_identical_weights(tiny_data, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(tiny_data), str(tmp_path / "out"), str(tmp_path)),
                                nprocs=2, join=True)
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "out" / "ckpt.pt").exists()
    assert load_checkpoint(tmp_path / "out" / "ckpt.pt")["step"] == 3


def test_fine_tuning_extends_vocabulary_without_moving_ids(tiny_checkpoint, tiny_data, tmp_path):
    base = load_checkpoint(tiny_checkpoint)
    image = next((tiny_data / "images" / "train").iterdir())
    rows = [{"image": str(image), "question": "Which blob is the most glorious?", "answer": "purple"},
            {"image": str(image), "question": "Is anything wobbly?", "answer": "maybe"}] * 8
    for name in ("train", "val"):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = tiny_train_config(None, tmp_path / "ft", jsonl=(str(tmp_path / "train.jsonl"), str(tmp_path / "val.jsonl")),
                            steps=2)
    train(cfg, init_from=str(tiny_checkpoint), **quiet)
    tuned = load_checkpoint(tmp_path / "ft" / "ckpt.pt")
    n = len(base["vocab"])
    assert tuned["vocab"][:n] == base["vocab"] and {"glorious", "wobbly"} <= set(tuned["vocab"][n:])
    assert tuned["answers"][:len(base["answers"])] == base["answers"] and "maybe" in tuned["answers"]


def test_evaluate_cli_prints_the_table_and_writes_json(tiny_checkpoint, tiny_data, tmp_path, capsys):
    assert evaluate_main([str(tiny_checkpoint), "--data-root", str(tiny_data), "--json", str(tmp_path / "e.json")]) == 0
    printed = capsys.readouterr().out
    for title in ("Overall", "Count", "Exist", "Query Attribute", "execution ratio"):
        assert title in printed
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["n"] == 48 and len(result["routing"]["per_layer"]) == 2
    assert set(result["per_type"]) <= {"count", "exist", "compare_numbers", "query_attribute", "compare_attribute"}


def test_evaluate_refuses_a_foreign_checkpoint(tmp_path, capsys):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "x.pt")
    assert evaluate_main([str(tmp_path / "x.pt"), "--data-root", str(tmp_path)]) == 2
    assert "not a QGMRN checkpoint" in capsys.readouterr().err


def test_defaults_pick_rate_and_precision():
    from qgmrn.config import get_config
    from qgmrn.train import TrainConfig, cpu_has_bf16, resolve_lr, training_precision
    assert resolve_lr(TrainConfig(), get_config("small")).lr == 1e-3                 # CPU-sized
    assert resolve_lr(TrainConfig(), get_config("brn-c32")).lr == 3e-4               # paper 4.2
    cpu_device = torch.device("cpu")
    assert training_precision(TrainConfig(precision="fp32"), cpu_device) is None
    expected = torch.bfloat16 if cpu_has_bf16() else None
    assert training_precision(TrainConfig(), cpu_device) is expected
    with pytest.raises(ValueError, match="precision"):
        training_precision(TrainConfig(precision="fp16"), cpu_device)
