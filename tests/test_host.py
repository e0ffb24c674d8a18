"""hsae_fast/train/host.py: the allocator and collector settings of a CPU training loop."""
import gc
import sys

import pytest
import torch

from helpers import needs_cpp
from hsae_fast.train import host


def test_frozen_gc_freezes_inside_and_unfreezes_after():
    assert gc.get_freeze_count() == 0
    made_before = [object() for _ in range(10)]
    with host.frozen_gc():
        assert gc.get_freeze_count() >= len(made_before)
        # cycles made inside are still collected
        cycle = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1
    assert gc.get_freeze_count() == 0


def _frozen(obj) -> bool:
    """Whether the collector holds `obj` (a tracked container) in its permanent generation, where
    gc.freeze() puts it and gc.get_objects() does not look."""
    return not any(o is obj for o in gc.get_objects())


def test_frozen_gc_leaves_a_caller_freeze_alone():
    # Objects, not gc.get_freeze_count(): frozen objects still die and leave the count meanwhile.
    before = [[]]
    gc.freeze()
    try:
        after = [[]]
        assert _frozen(before) and not _frozen(after)
        with host.frozen_gc():
            assert not _frozen(after)  # not frozen again by us
        assert _frozen(before)  # not unfrozen by us
    finally:
        gc.unfreeze()
    assert not _frozen(before)


def test_frozen_gc_unfreezes_on_error():
    with pytest.raises(KeyError):
        with host.frozen_gc():
            raise KeyError("x")
    assert gc.get_freeze_count() == 0


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("HSAE_HOST_TUNING", "0")
    monkeypatch.setattr(host, "_tuned", False)
    assert not host.tune_allocator()
    with host.training_loop():
        assert gc.get_freeze_count() == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tune_allocator_on_linux_is_idempotent(monkeypatch):
    monkeypatch.setattr(host, "_tuned", False)
    assert host.tune_allocator()
    assert host.tune_allocator()


@pytest.fixture
def small_huge_pages(monkeypatch):
    """Huge-page placement from 1 MiB up, so small tensors take that path."""
    monkeypatch.setattr(host, "HUGE_PAGE_MIN_BYTES", 1 << 20)


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise")


@linux_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_huge_page_empty_is_an_aligned_contiguous_tensor(small_huge_pages, dtype):
    shape = (1031, 517)
    t = host.huge_page_empty(shape, dtype)
    assert t.shape == shape and t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu"
    assert t.data_ptr() % host.HUGE_PAGE_BYTES == 0
    values = torch.randn(shape).to(dtype)
    t.copy_(values)
    assert torch.equal(t, values)
    small = host.huge_page_empty((3, 5), dtype)  # under the threshold: a plain tensor
    assert small.shape == (3, 5) and small.untyped_storage().nbytes() == 15 * small.element_size()


@linux_only
def test_no_huge_page_copy_without_the_memory_for_it(small_huge_pages, monkeypatch):
    t = torch.randn(1024, 512)
    monkeypatch.setattr(host, "available_memory_bytes", lambda: 3 * t.numel() * 4)
    moved = host.to_huge_pages(t)
    assert moved is not t and torch.equal(moved, t) and moved.data_ptr() % host.HUGE_PAGE_BYTES == 0
    monkeypatch.setattr(host, "available_memory_bytes", lambda: t.numel() * 4)  # the copy would not fit twice
    assert host.to_huge_pages(t) is t


def test_huge_pages_off_by_environment(small_huge_pages, monkeypatch):
    monkeypatch.setenv("HSAE_HOST_TUNING", "0")
    t = torch.randn(1024, 512)
    assert host.to_huge_pages(t) is t
    assert host.huge_page_empty((1024, 512), torch.float32).untyped_storage().nbytes() == t.numel() * 4


@linux_only
@needs_cpp  # the moments are ours on the row update's path; torch's fused AdamW makes its own
def test_adamw_moves_its_matrices_and_moments_onto_huge_pages(small_huge_pages, tmp_path):
    from hsae_fast import HSAEConfig, HSAELayer
    from hsae_fast.io import atomic_save_tensors
    from hsae_fast.train.optim import MaskedAdamW
    from safetensors.torch import load_file

    torch.manual_seed(0)
    layer = HSAELayer(HSAEConfig(d_model=256, level_sizes=(1200, 80, 8), k=(6, 3, 2)), backend="torch").train()
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    W_enc = layer.W_enc
    opt = MaskedAdamW(layer, lr=1e-3)
    assert layer.W_enc is W_enc  # the same Parameter, new storage, same values
    for n, p in layer.named_parameters():
        assert torch.equal(p, before[n])
        if n in ("W_enc", "W_dec"):
            assert p.data_ptr() % host.HUGE_PAGE_BYTES == 0 and p.is_contiguous()
    x = torch.randn(64, 256)
    layer(x).x_hat.pow(2).sum().backward()
    opt.update(1.0, True)
    moments = [opt.state[p][key] for p in (layer.W_enc, layer.W_dec) for key in ("exp_avg", "exp_avg_sq")]
    assert all(m.data_ptr() % host.HUGE_PAGE_BYTES == 0 and m.abs().sum() > 0 for m in moments)
    # a checkpoint of these views holds just their values, and a resumed optimizer puts them back there
    path = tmp_path / "t.safetensors"
    atomic_save_tensors({"W_enc": layer.W_enc.detach(), "m": moments[0]}, path)
    loaded = load_file(str(path))
    assert torch.equal(loaded["W_enc"], layer.W_enc) and torch.equal(loaded["m"], moments[0])
    resumed = MaskedAdamW(layer, lr=1e-3)
    resumed.load_state_dict(opt.state_dict())
    for p in (layer.W_enc, layer.W_dec):
        for key in ("exp_avg", "exp_avg_sq"):
            m = resumed.state[p][key]
            assert torch.equal(m, opt.state[p][key]) and m.data_ptr() % host.HUGE_PAGE_BYTES == 0
