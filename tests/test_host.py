"""hsae_fast/train/host.py: the allocator and collector settings of a CPU training loop."""
import gc
import sys

import pytest

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


def test_frozen_gc_leaves_a_caller_freeze_alone():
    gc.freeze()
    try:
        count = gc.get_freeze_count()
        with host.frozen_gc():
            assert gc.get_freeze_count() == count
        assert gc.get_freeze_count() == count  # not unfrozen by us
    finally:
        gc.unfreeze()


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
