"""NeuMF: forward computation, size, initialisation, reference state-dict layout and checkpoint loading."""

import math

import pytest
import torch
import torch.nn.functional as F

from neumf import NeuMF
from utils import CliError, load_model_weights

REFERENCE_KEYS = [
    "mf_user_embed.weight",
    "mf_item_embed.weight",
    "mlp_user_embed.weight",
    "mlp_item_embed.weight",
]


def small_model(seed=0, dropout=0.0, **kwargs):
    torch.manual_seed(seed)
    sizes = dict(nb_users=13, nb_items=17, mf_dim=8, mlp_layer_sizes=(16, 8, 4)) | kwargs
    return NeuMF(**sizes, dropout=dropout)


def ids(model, batch=32, seed=1):
    generator = torch.Generator().manual_seed(seed)
    user_table, item_table = model.embeddings()[0]
    users = torch.randint(0, user_table.num_embeddings, (batch,), generator=generator)
    items = torch.randint(0, item_table.num_embeddings, (batch,), generator=generator)
    return users, items


def test_output_is_a_logit_per_pair_computed_as_the_reference():
    model = small_model().eval()
    with torch.no_grad():
        model.final.bias.fill_(7.0)  # a logit, not a probability: far above 1
        users, items = ids(model, batch=32)
        out = model(users, items)
        assert out.shape == (32, 1) and out.dtype == torch.float32
        assert out.min() > 1.0
        mf = model.mf_user_embed.weight[users] * model.mf_item_embed.weight[items]
        mlp = torch.cat([model.mlp_user_embed.weight[users], model.mlp_item_embed.weight[items]], dim=1)
        for layer in model.mlp:
            mlp = torch.relu(mlp @ layer.weight.T + layer.bias)
        expected = torch.cat([mf, mlp], dim=1) @ model.final.weight.T + model.final.bias
    torch.testing.assert_close(out, expected)
    # int32 ids (what dataloading hands the model) give the same logits
    torch.testing.assert_close(model(users.int(), items.int()), out)


def test_batch_of_one():
    model = small_model().eval()
    assert model(torch.tensor([3]), torch.tensor([5])).shape == (1, 1)


def test_parameter_count_of_the_default_ml20m_model():
    with torch.device("meta"):
        model = NeuMF(138493, 26744, 64, (256, 256, 128, 64), dropout=0.5)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 31_832_577


def test_state_dict_has_the_reference_names_and_shapes():
    with torch.device("meta"):
        model = NeuMF(138493, 26744, 64, (256, 256, 128, 64))
    shapes = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    assert shapes == {
        "mf_user_embed.weight": [138493, 64],
        "mf_item_embed.weight": [26744, 64],
        "mlp_user_embed.weight": [138493, 128],
        "mlp_item_embed.weight": [26744, 128],
        "mlp.0.weight": [256, 256],
        "mlp.0.bias": [256],
        "mlp.1.weight": [128, 256],
        "mlp.1.bias": [128],
        "mlp.2.weight": [64, 128],
        "mlp.2.bias": [64],
        "final.weight": [1, 128],
        "final.bias": [1],
    }
    assert list(shapes)[:4] == REFERENCE_KEYS


def test_single_mlp_layer_has_no_hidden_linear():
    model = small_model(mlp_layer_sizes=(6,))
    assert len(model.mlp) == 0
    assert model.mlp_user_embed.weight.shape == (13, 3)
    assert model.final.weight.shape == (1, 8 + 6)
    assert model(*ids(model)).shape == (32, 1)


@pytest.mark.parametrize("layers", [(15, 8), (7,), (255, 128, 64)])
def test_odd_first_layer_is_rejected(layers):
    with pytest.raises(ValueError, match="even"):
        NeuMF(10, 10, 8, layers)


def test_initialisation_statistics():
    torch.manual_seed(0)
    model = NeuMF(3000, 2000, 64, (256, 256, 128, 64))
    for name in REFERENCE_KEYS:
        weight = getattr(model, name.removesuffix(".weight")).weight
        assert abs(weight.mean().item()) < 1e-3, name
        assert weight.std().item() == pytest.approx(0.01, rel=0.03), name
    for layer in model.mlp:
        fan_out, fan_in = layer.weight.shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))  # Glorot uniform
        assert layer.weight.abs().max().item() <= bound
        assert layer.weight.abs().max().item() > 0.98 * bound  # uniform over the whole range
        assert layer.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)
        assert layer.bias.abs().max().item() <= 1 / math.sqrt(fan_in)  # PyTorch's default bias
    fan_in = model.final.in_features
    assert fan_in == 64 + 64
    bound = math.sqrt(3.0 / fan_in)  # LeCun uniform
    assert model.final.weight.abs().max().item() <= bound
    assert model.final.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.2)
    assert model.final.bias.abs().item() <= 1 / math.sqrt(fan_in)


def test_dropout_only_in_train_mode():
    model = small_model(dropout=0.5)
    users, items = ids(model, batch=64)
    model.train()
    first, second = model(users, items), model(users, items)
    assert not torch.equal(first, second)
    model.eval()
    with torch.no_grad():
        evaluated = model(users, items)
        assert torch.equal(evaluated, model(users, items))
        no_dropout = small_model(dropout=0.0)
        no_dropout.load_state_dict(model.state_dict())
        no_dropout.train()  # dropout 0 is deterministic even in train mode
        assert torch.equal(no_dropout(users, items), evaluated)


def test_dropout_zeroes_hidden_units_at_the_given_rate():
    model = small_model(dropout=0.5, mlp_layer_sizes=(16, 64)).train()
    users, items = ids(model, batch=4000)
    seen = {}
    model.mlp[0].register_forward_hook(lambda module, args, out: seen.setdefault("pre", out))
    captured = {}
    model.final.register_forward_pre_hook(lambda module, args: captured.setdefault("in", args[0]))
    model(users, items)
    after = captured["in"][:, 8:]  # the MLP half of the final layer's input
    relu = torch.relu(seen["pre"])
    dropped = (after == 0) & (relu > 0)
    assert dropped.sum().item() / (relu > 0).sum().item() == pytest.approx(0.5, abs=0.02)
    kept = after != 0
    torch.testing.assert_close(after[kept], 2 * relu[kept])  # survivors scaled by 1/(1-p)


def test_gradients_reach_every_parameter():
    model = small_model(dropout=0.5).train()
    users, items = ids(model, batch=64)
    loss = F.binary_cross_entropy_with_logits(model(users, items).flatten(), (users % 2).float())
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("wrap", ["module_prefix", "plain", "training_state"])
def test_reference_checkpoint_loads_with_identical_outputs(tmp_path, wrap):
    source = small_model(seed=1).eval()
    state = source.state_dict()
    if wrap == "module_prefix":  # the reference saves its DDP-wrapped model
        state = {f"module.{name}": tensor for name, tensor in state.items()}
    elif wrap == "training_state":  # our last.pth
        state = {"model": state, "optimizer": {}, "epochs_done": 1}
    path = tmp_path / "model.pth"
    torch.save(state, path)
    target = small_model(seed=2).eval()
    users, items = ids(target, batch=50)
    assert not torch.equal(target(users, items), source(users, items))
    load_model_weights(target, path)
    assert torch.equal(target(users, items), source(users, items))


def test_checkpoint_mismatch_names_the_tensor(tmp_path):
    path = tmp_path / "model.pth"
    torch.save(small_model(nb_users=14).state_dict(), path)
    with pytest.raises(CliError, match=r"mf_user_embed\.weight is \[14, 8\] there but \[13, 8\] here"):
        load_model_weights(small_model(), path)
    torch.save(small_model(mlp_layer_sizes=(16, 8)).state_dict(), path)
    with pytest.raises(CliError, match=r"has no tensor mlp\.1\.(weight|bias)"):
        load_model_weights(small_model(), path)
    torch.save({"module.mf_user_embed.weight": torch.zeros(13, 8)}, path)
    with pytest.raises(CliError, match=r"has no 2-D tensor mf_item_embed\.weight"):
        load_model_weights(small_model(), path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CliError, match="corrupt"):
        load_model_weights(small_model(), path)
    with pytest.raises(CliError, match="does not exist"):
        load_model_weights(small_model(), tmp_path / "missing.pth")


# --- GMF and MLP, pre-training, L2 --------------------------------------------------------------------


def family_model(kind, seed=0):
    model = small_model(seed=seed, kind=kind).eval()
    with torch.no_grad():  # spread the logits: an error in any term would show
        for tables in model.embeddings():
            for table in tables:
                table.weight.normal_(0.0, 1.0)
    return model


def test_gmf_is_the_mf_branch_and_the_final_layer():
    model = family_model("gmf")
    assert sorted(model.state_dict()) == ["final.bias", "final.weight", "mf_item_embed.weight", "mf_user_embed.weight"]
    assert model.final.weight.shape == (1, 8)
    users, items = ids(model)
    u, v = model.mf_user_embed.weight[users], model.mf_item_embed.weight[items]
    h, b = model.final.weight[0], model.final.bias[0]
    expected = torch.stack([(u[j] * v[j] * h).sum() + b for j in range(len(users))])
    torch.testing.assert_close(model(users, items).detach()[:, 0], expected.detach())


def test_mlp_is_the_mlp_branch_and_the_final_layer():
    model = family_model("mlp")
    names = ["final.bias", "final.weight", "mlp.0.bias", "mlp.0.weight", "mlp.1.bias", "mlp.1.weight"]
    assert sorted(model.state_dict()) == names + ["mlp_item_embed.weight", "mlp_user_embed.weight"]
    assert model.mlp_user_embed.weight.shape == (13, 8) and model.final.weight.shape == (1, 4)
    users, items = ids(model)
    expected = []
    for user, item in zip(users.tolist(), items.tolist(), strict=True):
        x = torch.cat([model.mlp_user_embed.weight[user], model.mlp_item_embed.weight[item]])
        for layer in model.mlp:
            x = torch.clamp(layer.weight @ x + layer.bias, min=0)
        expected.append(model.final.weight[0] @ x + model.final.bias[0])
    torch.testing.assert_close(model(users, items).detach()[:, 0], torch.stack(expected).detach())


def test_branch_checkpoints_hold_neumf_names_and_load_only_into_their_kind(tmp_path):
    neumf = small_model().state_dict()
    for kind in ("gmf", "mlp"):
        state = small_model(kind=kind).state_dict()
        assert all(neumf[name].shape == tensor.shape for name, tensor in state.items() if not name.startswith("final"))
        path = tmp_path / f"{kind}.pth"
        torch.save(state, path)
        other = "mlp" if kind == "gmf" else "gmf"
        with pytest.raises(CliError, match=f"holds a {kind.upper()} model, not a {other.upper()}"):
            load_model_weights(small_model(kind=other), path)
        with pytest.raises(CliError, match=f"holds a {kind.upper()} model, not a NEUMF"):
            load_model_weights(small_model(), path)


@pytest.mark.parametrize("alpha", [0.5, 0.2, 1.0])
def test_pretrained_neumf_starts_as_the_weighted_sum_of_gmf_and_mlp(alpha):
    gmf, mlp = family_model("gmf", seed=1), family_model("mlp", seed=2)
    with torch.no_grad():
        gmf.final.bias.fill_(0.3)
        mlp.final.bias.fill_(-1.1)
    neumf = small_model(seed=3).eval()
    neumf.init_from_pretrained(gmf, mlp, alpha)
    users, items = ids(neumf, batch=64)
    with torch.no_grad():
        expected = alpha * gmf(users, items) + (1 - alpha) * mlp(users, items)
        torch.testing.assert_close(neumf(users, items), expected)
        assert torch.equal(neumf.mf_item_embed.weight, gmf.mf_item_embed.weight)
        assert torch.equal(neumf.mlp[1].weight, mlp.mlp[1].weight)
        torch.testing.assert_close(neumf.final.bias, alpha * gmf.final.bias + (1 - alpha) * mlp.final.bias)


@pytest.mark.parametrize("kind", ["neumf", "gmf", "mlp"])
def test_embedding_l2_sums_the_rows_each_sample_uses(kind):
    model = family_model(kind)
    users, items = torch.tensor([0, 0, 5]), torch.tensor([3, 3, 3])  # repeated rows count each time
    expected = sum(
        user_table.weight[users].pow(2).sum() + item_table.weight[items].pow(2).sum()
        for user_table, item_table in model.embeddings()
    )
    torch.testing.assert_close(model.embedding_l2(users, items), expected)
    model.embedding_l2(users, items).backward()
    for user_table, item_table in model.embeddings():  # rows the batch does not use get no gradient
        assert user_table.weight.grad[[1, 2, 3, 4]].abs().sum() == 0 and item_table.weight.grad[0].abs().sum() == 0
        torch.testing.assert_close(user_table.weight.grad[0], 4 * user_table.weight[0].detach())


def test_unknown_kind_is_rejected():
    with pytest.raises(ValueError, match="kind"):
        small_model(kind="ncf")


def test_score_grid_takes_the_first_layer_row_by_row_on_cpu_only(monkeypatch):
    """On a GPU the per-row loop of the first layer's user half would launch a kernel per 16 users;
    there the plain product runs (a meta tensor stands in for a CUDA one), with the same values."""
    import neumf

    model = small_model().eval()
    users, items = torch.arange(13), torch.arange(17)
    user_mlp = model.mlp_user_embed(users)
    weight = model.mlp[0].weight[:, : user_mlp.shape[1]]
    torch.testing.assert_close(neumf._rowwise_linear(user_mlp, weight), F.linear(user_mlp, weight))

    rowwise_calls = []

    def rowwise(x, weight):
        rowwise_calls.append(x.device.type)
        return F.linear(x, weight)

    monkeypatch.setattr(neumf, "_rowwise_linear", rowwise)
    with torch.no_grad():
        model.score_grid(users, items)
        assert rowwise_calls == ["cpu"]
        assert model.to("meta").score_grid(users.to("meta"), items.to("meta")).shape == (13, 17)
    assert rowwise_calls == ["cpu"]
