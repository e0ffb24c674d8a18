"""HSAELayer: SPEC 3 parameters and init, input checks, shapes, modes, pruning, dispatch, save/load."""
import json

import pytest
import torch

import hsae_fast
from hsae_fast import HSAEConfig, HSAELayer
from hsae_fast.io import CONFIG_NAME, WEIGHTS_NAME

from helpers import usable_backends

CFG = HSAEConfig(d_model=12, dict_size=84, k=(8, 4, 2))


def test_parameters_buffers_and_init_follow_spec():
    layer = HSAELayer(CFG)
    params = dict(layer.named_parameters())
    assert set(params) == {"W_enc", "b_enc", "W_dec", "b_dec", "edge_weight", "level_gain"}
    assert set(dict(layer.named_buffers())) == {"threshold", "parent", "path_mask"}
    F, d = CFG.dict_size, CFG.d_model
    assert layer.W_enc.shape == (F, d) and layer.W_dec.shape == (F, d)
    assert torch.equal(layer.W_enc, layer.W_dec)  # tied init
    assert torch.allclose(layer.W_dec.norm(dim=1), torch.ones(F))
    assert (layer.b_enc == 0).all() and (layer.edge_weight == 0).all() and (layer.level_gain == 1).all()
    assert layer.threshold.dtype == torch.float32 and (layer.threshold == 0).all()
    assert not layer.edge_weight.requires_grad  # learn_edges defaults to False
    assert HSAELayer(CFG.replace(learn_edges=True)).edge_weight.requires_grad
    assert (layer.parent[-CFG.level_sizes[-1]:] == -1).all() and layer.path_mask.all()


def test_any_leading_shape_and_codes_layout():
    layer = HSAELayer(CFG, backend="torch")
    x = torch.randn(2, 3, 5, 12)
    out = layer(x)
    assert out.x_hat.shape == x.shape and out.x_hat.dtype == x.dtype
    for l, (idx, vals) in enumerate(out.codes):
        assert idx.shape == (2, 3, 5, CFG.kmax(l)) and vals.shape == idx.shape
        lo, hi = CFG.level_offsets[l], CFG.level_offsets[l] + CFG.level_sizes[l]
        assert ((idx >= lo) & (idx < hi)).all()
    assert torch.allclose(layer.decode(out.codes), out.x_hat, atol=1e-5)
    enc = layer.encode(x)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(enc, layer.encode(x)))


@pytest.mark.parametrize("backend", usable_backends())
@pytest.mark.parametrize("selection", ["batch", "token"])
@pytest.mark.parametrize("lead", [(0,), (3, 0)])
def test_a_batch_of_no_tokens_gives_empty_outputs(backend, selection, lead):
    """A batch with no tokens (the tail of a data loader, a filter that kept nothing) runs: empty
    x_hat and codes of the usual widths, zero gradients, thresholds left alone, the same in eval."""
    torch.manual_seed(0)
    cfg = CFG.replace(selection=selection)
    layer = HSAELayer(cfg, backend=backend).train()
    x = torch.randn(*lead, 12)
    for training in (True, False):
        layer.train(training)
        threshold = layer.threshold.clone()
        out = layer(x)
        assert out.x_hat.shape == x.shape
        widths = [(*lead, cfg.kmax(l)) for l in range(cfg.num_levels)]
        assert [tuple(i.shape) for i, _ in out.codes] == widths and [tuple(v.shape) for _, v in out.codes] == widths
        assert torch.equal(layer.threshold, threshold)
        layer.zero_grad()
        (out.x_hat - x).pow(2).sum().backward()
        for name, p in layer.named_parameters():
            assert p.grad is None or not p.grad.to_dense().any(), name
        assert layer.decode(out.codes).shape == x.shape


def test_training_updates_threshold_and_eval_selects_by_it():
    layer = HSAELayer(CFG, backend="torch")
    x = torch.randn(64, 12)
    layer.train()
    for _ in range(3):
        layer(x)
    assert (layer.threshold > 0).all()
    layer.eval()
    assert layer.default_selection() == "threshold"
    out = layer(x)
    # eval mode: a token's code does not depend on the rest of its batch
    single = layer(x[:1])
    for (i1, v1), (i2, v2) in zip(out.codes, single.codes):
        assert torch.equal(i1[:1][v1[:1] != 0].sort().values, i2[v2 != 0].sort().values)


@pytest.mark.parametrize(
    "make_input, error, fragment",
    [
        (lambda: torch.randn(4, 11), ValueError, "d_model=12"),
        (lambda: torch.randint(0, 3, (4, 12)), TypeError, "floating dtype"),
        (lambda: torch.randn(4, 12, dtype=torch.float64), TypeError, "weights are torch.float32"),
        (lambda: torch.tensor([[float("nan")] * 12]), ValueError, "NaN or Inf"),
        (lambda: torch.full((2, 12), float("inf")), ValueError, "NaN or Inf"),
        (lambda: torch.randn(4, 12, device="meta"), ValueError, "weights are on cpu"),
    ],
)
def test_bad_input_is_named(make_input, error, fragment):
    layer = HSAELayer(CFG, backend="torch")
    with pytest.raises(error, match=fragment):
        layer(make_input())


def _bad_codes(layer, how):
    codes = [(i.clone(), v.clone()) for i, v in layer.encode(torch.randn(5, 12))]
    i, v = codes[0]
    if how == "id too large":
        i[0, 0], v[0, 0] = CFG.dict_size, 1.0
    elif how == "negative id":
        i[0, 0], v[0, 0] = -1, 1.0
    elif how == "narrower values":
        codes[0] = (i, v[:, :1].contiguous())
    elif how == "level left out":
        codes = codes[:-1]
    elif how == "float ids":
        codes[0] = (i.float(), v)
    elif how == "leading shapes differ":
        codes[1] = (codes[1][0][:2], codes[1][1][:2])
    return codes


@pytest.mark.parametrize("backend", usable_backends())
@pytest.mark.parametrize("how, error, fragment", [
    ("id too large", ValueError, "outside \\[0, 84\\)"),
    ("negative id", ValueError, "feature id -1"),
    ("narrower values", ValueError, "must have one shape"),
    ("level left out", ValueError, "one \\(indices, values\\) pair per level \\(3"),
    ("float ids", TypeError, "integer feature ids"),
    ("leading shapes differ", ValueError, "leading shape"),
])
def test_decode_names_bad_codes(backend, how, error, fragment):
    """Codes given to decode are checked before any kernel reads W_dec by them (an id out of range
    read outside W_dec in the triton and cpp kernels; narrower values returned non-finite output)."""
    layer = HSAELayer(CFG, backend=backend)
    with pytest.raises(error, match=fragment):
        layer.decode(_bad_codes(layer, how))


@pytest.mark.parametrize("backend", usable_backends())
def test_decode_takes_int32_ids(backend):
    torch.manual_seed(0)
    layer = HSAELayer(CFG, backend=backend)
    out = layer(torch.randn(5, 12))
    narrow = [(i.int(), v) for i, v in out.codes]
    torch.testing.assert_close(layer.decode(narrow), out.x_hat, rtol=0, atol=0)


@pytest.mark.parametrize("backend", usable_backends())
def test_float64_decode_of_the_codes_is_the_forward(backend):
    """decode keeps float64 code values float64 (it once rounded them to float32: 8e-8 off)."""
    torch.manual_seed(0)
    layer = HSAELayer(CFG, backend=backend, dtype=torch.float64).eval()
    x = torch.randn(10, 12, dtype=torch.float64)
    with torch.no_grad():
        out = layer(x)
        assert torch.equal(layer.decode(out.codes), out.x_hat)


@pytest.mark.parametrize("convert", ["half", "bfloat16", "double", "to"])
def test_dtype_conversion_keeps_float32_thresholds_and_loads_back(convert, tmp_path):
    layer = HSAELayer(CFG, backend="torch").train()
    layer(torch.randn(64, 12))
    thresholds = layer.threshold.clone()
    layer = layer.to(torch.float16) if convert == "to" else getattr(layer, convert)()
    assert layer.threshold.dtype == torch.float32 and torch.equal(layer.threshold, thresholds)
    layer.save_pretrained(tmp_path)
    loaded = HSAELayer.from_pretrained(tmp_path)
    assert loaded.W_enc.dtype == layer.W_enc.dtype and torch.equal(loaded.threshold, thresholds)


@pytest.mark.parametrize("backend", usable_backends())
def test_editing_path_mask_in_place_prunes_in_the_next_forward(backend):
    """The routed levels' child lists are cached; an in-place edit of path_mask rebuilds them (it
    was once ignored: masked bottom features still fired)."""
    cfg = CFG.replace(selection="token")
    torch.manual_seed(0)
    layer = HSAELayer(cfg, backend=backend)
    x = torch.randn(50, 12)
    assert (layer(x).codes[0][1] != 0).any()
    with torch.no_grad():
        layer.path_mask[: cfg.level_sizes[0]] = False
    assert not (layer(x).codes[0][1] != 0).any()


def test_prune_takes_a_bool_mask_and_rejects_float_ids():
    layer = HSAELayer(CFG, backend="torch")
    mask = torch.zeros(CFG.dict_size, dtype=torch.bool)
    mask[[10, 20]] = True
    layer.prune(mask)
    assert (~layer.path_mask).nonzero().flatten().tolist() == [10, 20]
    with pytest.raises(ValueError, match="one entry per feature"):
        layer.prune(torch.zeros(5, dtype=torch.bool))
    with pytest.raises(TypeError, match="integer feature ids or a bool mask"):
        layer.prune([2.9])


def test_finite_check_can_be_turned_off():
    layer = HSAELayer(CFG.replace(check_finite=False), backend="torch")
    layer(torch.randn(3, 12))


def test_prune_takes_the_subtree_and_freezes_it():
    layer = HSAELayer(CFG, backend="torch")
    top = CFG.level_offsets[2]
    layer.prune([top])
    dead = ~layer.path_mask
    # one top feature of 4 owns 1/4 of the mid level and 1/4 of the bottom
    assert int(dead.sum()) == 1 + 4 + 16
    out = layer(torch.randn(40, 12))
    for idx, vals in out.codes:
        assert not dead[idx[vals != 0]].any()
    out.x_hat.square().sum().backward()
    for name in ("W_enc", "b_enc", "W_dec"):
        assert (getattr(layer, name).grad[dead] == 0).all()
    with pytest.raises(ValueError, match="prune ids"):
        layer.prune([CFG.dict_size])


def test_backend_dispatch_and_errors():
    status = hsae_fast.available_backends()
    assert status["torch"][0] is True and set(status) == {"torch", "cpp", "triton"}
    assert HSAELayer(CFG).backend_for(torch.device("cpu")) in ("torch", "cpp")
    with pytest.raises(ValueError, match="unknown"):
        HSAELayer(CFG, backend="cuda_magic")(torch.randn(2, 12))


def test_save_load_round_trip(tmp_path):
    layer = HSAELayer(CFG, backend="torch")
    with torch.no_grad():
        layer.b_enc.normal_()
        layer.edge_weight.normal_()
        layer.threshold.fill_(0.25)
    layer.prune([1, 2])
    layer.save_pretrained(tmp_path)
    again = HSAELayer.from_pretrained(tmp_path, backend="torch")
    assert again.cfg == layer.cfg
    for name, tensor in layer.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    x = torch.randn(9, 12)
    layer.eval(), again.eval()
    assert torch.equal(layer(x).x_hat, again(x).x_hat)
    assert not list(tmp_path.glob(".*.tmp"))  # no temp files left behind


def test_load_rejects_corrupt_or_mismatched_files(tmp_path):
    HSAELayer(CFG).save_pretrained(tmp_path / "a")
    HSAELayer(CFG.replace(k=(6, 3, 2))).save_pretrained(tmp_path / "b")
    weights = tmp_path / "a" / WEIGHTS_NAME
    # weights from another save: the recorded checksum does not match
    (tmp_path / "b" / WEIGHTS_NAME).replace(weights)
    (tmp_path / "b" / CONFIG_NAME).unlink()
    with pytest.raises(ValueError, match="does not match"):
        HSAELayer.from_pretrained(tmp_path / "a")
    HSAELayer(CFG).save_pretrained(tmp_path / "c")
    raw = bytearray((tmp_path / "c" / WEIGHTS_NAME).read_bytes())
    raw[100] ^= 0xFF
    (tmp_path / "c" / WEIGHTS_NAME).write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupt"):
        HSAELayer.from_pretrained(tmp_path / "c")
    HSAELayer(CFG).save_pretrained(tmp_path / "d")
    meta = json.loads((tmp_path / "d" / CONFIG_NAME).read_text())
    meta["config"]["dict_size"] = 90
    meta["config"]["level_sizes"] = None
    (tmp_path / "d" / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="expected"):
        HSAELayer.from_pretrained(tmp_path / "d")
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        HSAELayer.from_pretrained(tmp_path / "missing")
    # a weights file without W_enc whose checksum is recorded: named, not a KeyError
    from safetensors.torch import load_file, save_file

    from hsae_fast.io import sha256_file

    HSAELayer(CFG).save_pretrained(tmp_path / "e")
    state = load_file(str(tmp_path / "e" / WEIGHTS_NAME))
    del state["W_enc"]
    save_file(state, str(tmp_path / "e" / WEIGHTS_NAME))
    meta = json.loads((tmp_path / "e" / CONFIG_NAME).read_text())
    meta["weights_sha256"] = sha256_file(tmp_path / "e" / WEIGHTS_NAME)
    (tmp_path / "e" / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="missing tensors \\['W_enc'\\]"):
        HSAELayer.from_pretrained(tmp_path / "e")
