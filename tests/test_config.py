"""HSAEConfig validates every rule of SPEC 1 and 2 and names the field, the value and the rule."""
import pytest

from hsae_fast import HSAEConfig
from hsae_fast.config import sizes_from_ratios


def test_sizes_from_ratios_follow_spec_formula():
    assert sizes_from_ratios(336, (16, 4, 1)) == (256, 64, 16)
    # floor for every level but the top, which takes the remainder
    assert sizes_from_ratios(100, (0.5, 0.3, 0.2)) == (50, 30, 20)
    assert sizes_from_ratios(101, (16, 4, 1)) == (76, 19, 6)
    cfg = HSAEConfig(d_model=8, dict_size=100, level_ratios=(0.5, 0.3, 0.2), k=(4, 3, 2))
    assert cfg.level_sizes == (50, 30, 20) and cfg.level_offsets == (0, 50, 80)


def test_defaults_and_derived_values():
    cfg = HSAEConfig(d_model=16, dict_size=84, k=(8, 4, 2))
    assert cfg.level_sizes == (64, 16, 4) and cfg.num_levels == 3
    assert (cfg.gating, cfg.selection, cfg.cap, cfg.learn_edges) == ("hard", "batch", 4, False)
    assert cfg.kmax(0) == 32 and cfg.kmax(2) == 4  # min(F_l, cap * k_l)
    assert cfg.kmax(0, "token") == 8
    flat = HSAEConfig(d_model=16, level_sizes=(50,), k=7)
    assert flat.num_levels == 1 and flat.k == (7,) and flat.dict_size == 50


def test_replace_derives_the_sizes_again_from_what_changed():
    """New ratios or dict_size give new sizes (they were once ignored, or rejected against the old
    sizes); new sizes give their sum; other changes keep the sizes."""
    cfg = HSAEConfig(d_model=16, dict_size=84, k=(8, 4, 2))
    assert cfg.replace(level_ratios=(8, 4, 1)).level_sizes == sizes_from_ratios(84, (8, 4, 1))
    assert cfg.replace(dict_size=168).level_sizes == (128, 32, 8)
    assert cfg.replace(level_sizes=(50, 10, 4)).dict_size == 64
    assert cfg.replace(selection="token").level_sizes == (64, 16, 4)
    with pytest.raises(ValueError, match="dict_size"):
        cfg.replace(level_sizes=(50, 10, 4), dict_size=84)


def test_round_trip_through_dict():
    cfg = HSAEConfig(d_model=16, dict_size=84, k=(8, 4, 2), gating="none", selection="token")
    again = HSAEConfig.from_dict(cfg.to_dict())
    assert again == cfg


@pytest.mark.parametrize(
    "kwargs, field, fragment",
    [
        (dict(d_model=0, dict_size=84, k=(8, 4, 2)), "d_model", "positive"),
        (dict(d_model=8, dict_size=84, k=(8, 4)), "k", "3 ints"),
        (dict(d_model=8, dict_size=84, k=(0, 0, 0)), "k", "1 <= k_l <= F_l"),
        (dict(d_model=8, level_sizes=(4, 8), k=(1, 1)), "level_sizes", "non-increasing"),
        (dict(d_model=8, dict_size=84, k=(2, 4, 1)), "k", "non-increasing upward"),
        (dict(d_model=8, level_sizes=(16, 4), k=(9, 2)), "k", "hard gating"),
        (dict(d_model=8, dict_size=84, k=(8, 4, 2), gating="soft"), "gating", "one of"),
        (dict(d_model=8, dict_size=84, k=(8, 4, 2), selection="topk"), "selection", "one of"),
        (dict(d_model=8, dict_size=84, k=(8, 4, 2), cap=0), "cap", ">= 1"),
        (dict(d_model=8, dict_size=84, k=(8, 4, 2), k_aux=True), "k_aux", "an int"),
        (dict(d_model=8, dict_size=84, k=(8, 4, 2), dead_after_tokens=True), "dead_after_tokens", "positive int"),
        (dict(d_model=8, level_sizes=5, k=(8, 4, 2)), "level_sizes", "list of positive ints"),
        (dict(d_model=8, dict_size=84, level_sizes=(64, 16, 5), k=(8, 4, 2)), "dict_size", "sum(level_sizes)"),
        (dict(d_model=8, dict_size=84, k=(8, 4, 2), aux_coef=-1.0), "aux_coef", ">= 0"),
        (dict(d_model=8, dict_size=84, k=(8, 4, 2), prefix_until=2.0), "prefix_until", "[0, 1]"),
        (dict(d_model=8, dict_size=84, k=(8, 4, 2), k_aux=0), "k_aux", "[1, dict_size"),
        (dict(d_model=8, dict_size=84, k=(8, 4, 2), consistency="l1"), "consistency", "one of"),
        (dict(d_model=8, level_sizes=(4, 2), k=(1, 1), parent=(4, 4, 5, 9, -1, -1)), "parent", "level 1"),
        (dict(d_model=8, level_sizes=(4, 2), k=(1, 1), parent=(4, 4, 5, 5, -1, 0)), "parent", "parent -1"),
        (dict(d_model=8, level_sizes=(4, 2), k=(1, 1), parent=(4, 4)), "parent", "dict_size=6 entries"),
    ],
)
def test_violations_name_field_value_and_rule(kwargs, field, fragment):
    with pytest.raises(ValueError) as info:
        HSAEConfig(**kwargs)
    message = str(info.value)
    assert message.startswith(f"HSAEConfig.{field}="), message
    assert fragment in message, message


def test_no_gating_lifts_the_candidate_rule():
    # with gating="none" a child level may hold more actives than its parents' children
    HSAEConfig(d_model=8, level_sizes=(16, 4), k=(9, 2), gating="none")


def test_unknown_field_is_rejected():
    with pytest.raises(ValueError, match="unknown field"):
        HSAEConfig.from_dict({"d_model": 8, "dict_size": 84, "k": [8, 4, 2], "sparsity": 3})
