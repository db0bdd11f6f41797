"""The model behaves as the paper specifies: shapes, routing, gating, initialisation, loss."""
import math

import pytest
import torch

from qgmrn.config import get_config, preset_names
from qgmrn.model import PAD_LOGIT, count_macs, count_parameters, create_model
from qgmrn.routing import load_balancing_loss

TOY = {"image_size": 32, "vocab_size": 20, "num_answers": 7}


def toy_batch(cfg, b=3, t=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g)
    tokens = torch.randint(2, cfg.vocab_size, (b, t), generator=g)
    lengths = torch.tensor([t, max(1, t - 2), 1][:b] + [t] * max(0, b - 3))
    for i, n in enumerate(lengths):
        tokens[i, n:] = 0
    return image, tokens, lengths


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_runs_forward_and_backward_at_toy_size(name):
    torch.manual_seed(0)
    model = create_model(name, **TOY)
    cfg = model.cfg
    image, tokens, lengths = toy_batch(cfg)
    out = model(image, tokens, lengths)
    assert out.logits.shape == (3, 7)
    assert out.gates.shape == out.route_logits.shape == (3, cfg.num_layers, cfg.max_modules)
    (out.logits.sum() + load_balancing_loss(out.gates, cfg.layer_sizes)).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name,layers,modules", [
    ("brn-c8", 8, (8,) * 8), ("brn-c16", 8, (16,) * 8), ("brn-c32", 8, (32,) * 8),
    ("frn", 16, (64,) * 3 + (128,) * 4 + (256,) * 6 + (512,) * 3),
])
def test_paper_presets_have_the_papers_routing_shape(name, layers, modules):
    cfg = get_config(name)
    assert cfg.num_layers == layers and cfg.layer_sizes == modules
    assert (cfg.embed_dim, cfg.hidden_dim, cfg.image_size, cfg.tau) == (200, 512, 224, 1.0)
    assert math.isclose(cfg.route_bias, math.log(0.7 / 0.3))
    model = create_model(name, vocab_size=90, num_answers=28)
    params, macs = count_parameters(model), count_macs(model)
    print(f"{name}: {params / 1e6:.2f} M parameters, {macs / 1e9:.3f} GMACs at 224x224, routing {layers} x {max(modules)}")
    assert params > 1e6 and macs > 1e8


def test_brn_preset_is_resnext26():
    cfg = get_config("brn-c32")
    assert cfg.stage_depths == (2, 2, 2, 2) and cfg.stage_widths == (64, 128, 256, 256)
    assert 3 * sum(cfg.stage_depths) + 2 == 26 and cfg.block_norm == "group"


def test_contradictory_preset_overrides_are_refused():
    with pytest.raises(ValueError, match="attention"):
        get_config("brn-c32+attn", attention=False)
    with pytest.raises(ValueError, match="unknown preset"):
        get_config("brn-c64")
    with pytest.raises(ValueError, match="divisible"):
        get_config("brn-c32", stage_widths=(64, 128, 256, 250))


@pytest.mark.parametrize("name", ["tiny", "tiny-frn", "tiny+attn"])
def test_eval_routing_is_deterministic_threshold(name):
    torch.manual_seed(0)
    model = create_model(name, **TOY).eval()
    batch = toy_batch(model.cfg)
    a, b = model(*batch), model(*batch)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.gates, b.gates)
    assert torch.equal(a.gates, (a.route_logits > 0).float())


def test_padded_frn_slots_are_closed_and_far_from_threshold():
    model = create_model("tiny-frn", **TOY).eval()
    out = model(*toy_batch(model.cfg))
    sizes = model.cfg.layer_sizes
    assert sizes == (8, 16)
    assert (out.gates[:, 0, 8:] == 0).all() and (out.route_logits[:, 0, 8:] == PAD_LOGIT).all()


def test_training_gates_are_binary_stochastic_and_pass_gradients():
    torch.manual_seed(0)
    model = create_model("tiny", **TOY).train()
    batch = toy_batch(model.cfg, b=8)
    out1, out2 = model(*batch), model(*batch)
    assert set(out1.gates.unique().tolist()) <= {0.0, 1.0}
    assert not torch.equal(out1.gates, out2.gates), "gates must vary with the Gumbel noise"
    model.zero_grad()
    # a loss that reaches the question encoder only through the routing path
    (out1.gates * torch.arange(out1.gates.numel()).view_as(out1.gates)).sum().backward()
    assert model.router.fc.weight.grad.abs().sum() > 0
    assert model.text.gru.weight_hh_l0.grad.abs().sum() > 0
    assert model.text.embed.weight.grad.abs().sum() > 0


def _with_gates(model, batch, gates):
    image, tokens, lengths = batch
    q = model.encode_question(tokens, lengths)
    return model.classify(model.encode_image(image, gates), q)


@pytest.mark.parametrize("name", ["tiny", "tiny-frn"])
@pytest.mark.parametrize("gate_open", [False, True])
def test_a_closed_gate_removes_its_module(name, gate_open):
    torch.manual_seed(0)
    model = create_model(name, **TOY).eval()
    cfg = model.cfg
    batch = toy_batch(cfg)
    layer, module = 1, 2
    gates = torch.ones(3, cfg.num_layers, cfg.max_modules)
    gates[:, layer, module] = float(gate_open)
    before = _with_gates(model, batch, gates)
    block = model.visual.blocks[layer]
    with torch.no_grad():
        if cfg.arch == "brn":        # branch m = channel group m of the grouped conv
            per = block.conv2.out_channels // cfg.cardinality
            block.conv2.weight[module * per:(module + 1) * per] += 1.0
        else:                        # filter m of the second conv
            block.conv2.weight[module] += 1.0
    after = _with_gates(model, batch, gates)
    if gate_open:
        assert not torch.allclose(before, after)
    else:
        assert torch.equal(before, after)


def test_initial_execution_probability_is_0_7():
    torch.manual_seed(0)
    model = create_model("brn-c32", vocab_size=50, num_answers=10, image_size=32).train()
    tokens = torch.randint(2, 50, (256, 10))
    q = model.encode_question(tokens, torch.full((256,), 10))
    gates, _ = model.route(q)
    n = gates.numel()                       # 256 * 256 Bernoulli(0.7) draws
    assert abs(gates.mean().item() - 0.7) < 4 * math.sqrt(0.21 / n)
    assert torch.sigmoid(model.route(q)[1]).mean().item() == pytest.approx(0.7, abs=0.01)


def test_load_balancing_loss_matches_hand_computation():
    # layer 0 loads: [2, 1, 0] -> mean 1, unbiased var 1 -> CV^2 = 1
    # layer 1 loads: [1, 1, 1] -> CV^2 = 0
    gates = torch.tensor([[[1., 1., 0.], [1., 0., 0.]],
                          [[1., 0., 0.], [0., 1., 1.]]])
    assert load_balancing_loss(gates, (3, 3)).item() == pytest.approx(1.0)
    equal = torch.tensor([[[1., 0.], [0., 1.]], [[0., 1.], [1., 0.]]])
    assert load_balancing_loss(equal, (2, 2)).item() == 0.0


def test_load_balancing_loss_ignores_padding():
    gates = torch.tensor([[[1., 1., 0., 0.], [1., 1., 1., 1.]]])     # layer 0 has 2 modules
    assert load_balancing_loss(gates, (2, 4)).item() == 0.0


@pytest.mark.parametrize("name", ["tiny", "tiny+attn"])
def test_padded_batch_gives_each_questions_own_feature(name):
    torch.manual_seed(0)
    model = create_model(name, **TOY).eval()
    questions = [[5, 6, 7, 8, 9, 10], [3, 4], [11, 12, 13]]
    tokens = torch.zeros(3, 6, dtype=torch.long)
    for i, q in enumerate(questions):
        tokens[i, :len(q)] = torch.tensor(q)
    batched = model.encode_question(tokens, torch.tensor([6, 2, 3]))
    for i, q in enumerate(questions):
        alone = model.encode_question(torch.tensor([q]), torch.tensor([len(q)]))
        torch.testing.assert_close(batched[i], alone[0], rtol=1e-5, atol=1e-6)


def test_field_overrides_take_the_fields_types():
    from qgmrn.config import parse_override
    from qgmrn.train import TrainConfig
    assert parse_override("hidden_dim=256") == ("hidden_dim", 256)
    assert parse_override("attention=yes") == ("attention", True)
    assert parse_override("stage_depths=1,2") == ("stage_depths", (1, 2))
    assert parse_override("lr=0.01", TrainConfig) == ("lr", 0.01)          # Optional[float], default None
    assert parse_override("data_root=/data/clevr", TrainConfig) == ("data_root", "/data/clevr")
    assert parse_override("jsonl=a.jsonl,b.jsonl", TrainConfig) == ("jsonl", ("a.jsonl", "b.jsonl"))  # str items
    assert parse_override("lr=none", TrainConfig) == ("lr", None)
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        parse_override("no_such_field=1")
    with pytest.raises(ValueError, match="expected an integer"):
        parse_override("hidden_dim=big")
