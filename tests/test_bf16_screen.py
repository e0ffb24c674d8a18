"""The cpp backend's bfloat16 screen of dense levels (csrc/hsae_cpu.cpp, "The bfloat16 screen";
`cpp.screen_mode`): the selection and scores of the float32-sum GEMM, proven per token, so it is held
to float32's tolerances against the float64 reference. Each test sets HSAE_CPU_BF16_SCREEN, whatever
this CPU would pick ("always": every level it applies to, so awkward shapes are screened too; "1": only
where it pays; "0": never), and checks from the backend's counters that the screen (and, where meant,
its second pass) really ran."""
import pytest
import torch

from helpers import SELECTION_TOLERANCE, assert_close_to_reference, case_seed, needs_cpp, random_layer
from hsae_fast import HSAEConfig
from hsae_fast.backends import cpp
from hsae_fast.backends.common import poisoned_outputs
from hsae_fast.losses import auxk_loss

pytestmark = needs_cpp


@pytest.fixture
def screen(monkeypatch):
    """Set the screen's mode for one test: screen("always"), screen("1") or screen("0")."""
    def set_mode(mode: str):
        monkeypatch.setenv(cpp.SCREEN_ENV, mode)
        cpp.screen_stats(reset=True)
    return set_mode


def dense_inputs(N, d, F, seed, prune=0.1, bias_scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    xc = torch.randn(N, d, generator=gen)
    W = torch.randn(F, d, generator=gen) / d**0.5
    b = torch.randn(F, generator=gen) * bias_scale
    keep = torch.rand(F, generator=gen) >= prune
    return xc, W, b, keep


def encode_dense(xc, W, b, keep, K):
    F = W.shape[0]
    with poisoned_outputs():
        return cpp.encode_forward(xc, W, b, torch.zeros(F), keep, torch.full((F,), -1), None, None, None, None, 0, K,
                                  False)


def assert_exact_selection(got, xc, W, b, keep, K):
    """Per token the K best float64 scores among kept features (a near-tie at the cut may swap), with
    their float64 scores to float32 precision; -inf and id 0 in the slots past the kept features."""
    idx, scores, slot = got
    s = (xc.double() @ W.double().T + b.double()).masked_fill(~keep, float("-inf"))
    want = s.topk(min(K, s.shape[1]), dim=1)
    tol = SELECTION_TOLERANCE[torch.float32] * max(s[:, keep].abs().max().item(), 1.0)
    n_keep = int(keep.sum())
    assert (slot == -1).all()
    for n in range(idx.shape[0]):
        filled = min(K, n_keep)
        assert torch.isinf(scores[n, filled:]).all() and (idx[n, filled:] == 0).all(), f"token {n}: unfilled slots"
        got_ids, want_ids = set(idx[n, :filled].tolist()), set(want.indices[n, :filled].tolist())
        cut = want.values[n, filled - 1].item()
        for f in got_ids ^ want_ids:
            assert abs(s[n, f].item() - cut) <= tol, f"token {n}: feature {f} differs from the exact top-{K}, not a tie"
        assert (scores[n, :filled].double() - s[n, idx[n, :filled]]).abs().max() <= tol, f"token {n}: scores"
        assert (scores[n, :filled - 1] >= scores[n, 1:filled]).all(), f"token {n}: not best first"


# (N, d, F, K): one token (the features split across threads), more tokens than one 512-row block,
# tiny and wide d, K=1, F not a multiple of the 512-feature tile.
SHAPES = [(1, 67, 1537, 8), (37, 3, 600, 1), (600, 67, 1300, 12), (5, 768, 3000, 37), (64, 130, 1900, 20)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("N,d,F,K", SHAPES, ids=lambda v: str(v))
def test_screened_encode_is_the_exact_float32_selection(N, d, F, K, dtype, screen):
    """float32: the float32 scores; bfloat16 tokens and weights: their float32-sum scores (the
    products of bfloat16 values are exact); float16 (upcast to float32 by the glue): the float32
    scores of its values; to float32 precision in every case."""
    xc, W, b, keep = dense_inputs(N, d, F, case_seed("screen", N, d, F, K))
    xc, W = xc.to(dtype), W.to(dtype)
    screen("always")
    got = encode_dense(xc, W, b, keep, K)
    screened, _ = cpp.screen_stats()
    assert screened >= N, "the screen did not run"
    assert_exact_selection(got, xc, W, b, keep, K)
    screen("0")
    plain = encode_dense(xc, W, b, keep, K)
    assert cpp.screen_stats() == (0, 0)
    assert_exact_selection(plain, xc, W, b, keep, K)


def test_scores_the_bound_cannot_separate_take_the_second_pass(screen):
    """Rows whose bfloat16 roundings are all equal (differences under half a bfloat16 step) give every
    feature the same bound, so no token's top-K is proven from its candidates: every token takes the
    second pass, which here scores every feature again."""
    gen = torch.Generator().manual_seed(case_seed("ties"))
    N, d, F, K = 9, 40, 900, 5
    base = torch.randn(d, generator=gen).bfloat16().float()  # exactly representable in bfloat16
    step = base.abs() * 2.0**-10  # a quarter of a bfloat16 step: rounds back to base
    W = base + step * torch.linspace(-1, 1, F)[:, None] * torch.sign(torch.randn(d, generator=gen))
    assert torch.equal(W.bfloat16().float(), base.expand(F, d))
    xc, b, keep = torch.randn(N, d, generator=gen), torch.zeros(F), torch.ones(F, dtype=torch.bool)
    screen("always")
    got = encode_dense(xc, W, b, keep, K)
    screened, second = cpp.screen_stats()
    assert second == screened >= N, "every token must take the second pass"
    assert_exact_selection(got, xc, W, b, keep, K)


@pytest.mark.parametrize("rounded", ["weights", "tokens"])
def test_features_the_bfloat16_gemm_underrates_are_still_found(rounded, screen):
    """Two winners score below 100 decoys in bfloat16 but above them exactly: a weight of theirs
    ("weights") or the token element they read ("tokens") rounds down by 0.49 of a bfloat16 step. The
    decoys have smaller ids, so they win every tie of bounds, and a third coordinate cancels most of
    the score, so the bound of the GEMM's output rounding (relative to the score) cannot cover the
    lost 0.49 step: only the |x~| |w_lo| or the |x_lo| |w| term keeps the winners among the candidates."""
    N, d, F, K = 4, 16, 700, 2
    half_step = 0.49 * 2.0**-7  # of bfloat16 at 1
    x = torch.zeros(N, d)
    x[:, :3] = torch.tensor([1.0 + (half_step if rounded == "tokens" else 0.0), 1.0, -1.0])
    W = torch.zeros(F, d)
    W[:, :3] = torch.tensor([-1.0, -1.0, 1.0])  # fillers, 0.1 apart (well beyond the bound): provable
    W[:, 0] -= 0.1 * torch.arange(F)
    W[:100, :3] = torch.tensor([0.0, 2.0**-5 + 9 * 2.0**-12, 0.0])  # decoys: bfloat16 values, score 2^-5 + 9 2^-12
    # winners: 2^-5 + 15.7 2^-12 exactly, 2^-5 in bfloat16
    W[200:202, :3] = torch.tensor([1.0 + (half_step if rounded == "weights" else 0.0), 2.0**-5, 1.0])
    assert torch.equal(W.bfloat16().float()[200, :3], torch.tensor([1.0, 2.0**-5, 1.0]))
    assert torch.equal(x.bfloat16().float()[0, :3], torch.tensor([1.0, 1.0, -1.0]))
    b, keep = torch.zeros(F), torch.ones(F, dtype=torch.bool)
    screen("always")
    got = encode_dense(x, W, b, keep, K)
    screened, second = cpp.screen_stats()
    # Proven from the candidates: the winners were among them (a second pass would hide a missing bound).
    assert screened >= N and second == 0
    assert (got[0].sort(dim=1).values == torch.tensor([200, 201])).all(), got[0]
    assert_exact_selection(got, x, W, b, keep, K)


def test_the_gemm_output_rounding_is_bounded(screen):
    """Every weight and token element is a bfloat16 value, but the GEMM's bfloat16 output rounds both
    the winners' 1 + 0.375 step and the decoys' 1 + 0.125 step to 1: without the bound on that
    rounding, the decoys (smaller ids) would be kept and proven best."""
    N, d, F, K = 3, 8, 700, 2
    x = torch.zeros(N, d)
    x[:, :2] = 1.0
    W = torch.zeros(F, d)
    W[:, :2] = -1.0
    W[:100, :2] = torch.tensor([1.0, 2.0**-10])
    W[200:202, :2] = torch.tensor([1.0, 3 * 2.0**-10])
    assert torch.equal(W.bfloat16().float(), W)
    b, keep = torch.zeros(F), torch.ones(F, dtype=torch.bool)
    screen("always")
    got = encode_dense(x, W, b, keep, K)
    assert cpp.screen_stats()[0] >= N
    assert (got[0].sort(dim=1).values == torch.tensor([200, 201])).all(), got[0]
    assert_exact_selection(got, x, W, b, keep, K)


def test_non_finite_weights_are_never_selected(screen):
    xc, W, b, keep = dense_inputs(20, 33, 1000, case_seed("nan"), prune=0.0)
    W[7, 3] = float("nan")
    keep[7] = False  # the exact reference's selection must not see the NaN row either
    screen("always")
    got = encode_dense(xc, W, b, torch.ones_like(keep), 6)
    assert not (got[0] == 7).any()
    assert_exact_selection(got, xc, W.nan_to_num(), b, keep, 6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("selection", ["token", "batch"])
# Big enough that the dense level is screened with batch selection's 4k candidates too.
@pytest.mark.parametrize("level_sizes,k", [((3600,), (12,)), ((10240, 2560, 1280), (12, 6, 3))], ids=["flat", "tree"])
@pytest.mark.parametrize("gating", ["hard", "none"])
def test_layer_forward_and_gradients_with_the_screen(level_sizes, k, gating, selection, dtype, screen):
    if len(level_sizes) == 1 and gating == "none":
        pytest.skip("a flat layer has no gating")
    cfg = HSAEConfig(d_model=67, level_sizes=level_sizes, k=k, gating=gating, selection=selection)
    layer = random_layer(cfg, "cpp", dtype, case_seed("layer", level_sizes, gating, selection))
    x = torch.randn(150, 67, generator=torch.Generator().manual_seed(case_seed("x", selection))).to(dtype)
    screen("always")
    assert_close_to_reference(layer, x, selection)
    assert cpp.screen_stats()[0] >= 150, "the dense level was not screened"


def test_auxk_stays_off_the_screen(screen):
    """AuxK's k_aux = d/2 candidates among a few thousand crowded dead features cost more to score
    again than the bfloat16 GEMM saves, so its dense scoring keeps the float32 GEMM."""
    cfg = HSAEConfig(d_model=48, level_sizes=(3000,), k=(8,))
    layer = random_layer(cfg, "cpp", torch.float32, case_seed("auxk"))
    gen = torch.Generator().manual_seed(case_seed("auxk-x"))
    x = torch.randn(70, 48, generator=gen)
    dead = (torch.rand(cfg.dict_size, generator=gen) < 0.9) & layer.path_mask
    screen("always")
    x_hat = layer(x).x_hat.detach()
    after_forward = cpp.screen_stats()
    assert after_forward[0] >= 70
    auxk_loss(layer, x, x_hat, dead, 8, sparse=True).backward()
    assert cpp.screen_stats() == after_forward


def test_bit_identical_run_to_run_and_across_thread_counts(screen):
    xc, W, b, keep = dense_inputs(3, 50, 3000, case_seed("threads"))  # 3 tokens: features split per thread
    screen("always")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(2, threads))
        first, second = encode_dense(xc, W, b, keep, 9), encode_dense(xc, W, b, keep, 9)
        torch.set_num_threads(1)
        single = encode_dense(xc, W, b, keep, 9)
    finally:
        torch.set_num_threads(threads)
    for a, b_, c in zip(first, second, single):
        assert torch.equal(a, b_) and torch.equal(a, c)


@pytest.mark.parametrize("N,d,F,K,pays", [
    (64, 64, 1200, 12, False),   # 32 (2K + 16) = 1280 > F: the candidates would be a large part of the level
    (64, 64, 1300, 12, True),
    (31, 64, 1300, 12, False),   # too few tokens to repay rounding W
    (64, 63, 1300, 12, False),   # too narrow
])
def test_mode_1_screens_only_where_it_pays(N, d, F, K, pays, screen):
    xc, W, b, keep = dense_inputs(N, d, F, case_seed("pays", N, d, F))
    screen("1")
    assert_exact_selection(encode_dense(xc, W, b, keep, K), xc, W, b, keep, K)
    assert (cpp.screen_stats()[0] > 0) == pays


def test_the_switch(monkeypatch):
    native = 1 if cpp.native_bf16() else 0
    for mode, expected in (("1", 1), ("0", 0), ("always", 2), ("auto", native), (" AUTO ", native)):
        monkeypatch.setenv(cpp.SCREEN_ENV, mode)
        assert cpp.screen_mode() == expected
    monkeypatch.delenv(cpp.SCREEN_ENV)
    assert cpp.screen_mode() == native
    monkeypatch.setenv(cpp.SCREEN_ENV, "yes")
    with pytest.raises(ValueError, match="HSAE_CPU_BF16_SCREEN"):
        cpp.screen_mode()


def test_float64_does_not_take_it(screen):
    screen("always")
    xc, W, b, keep = dense_inputs(8, 30, 1000, case_seed("dtypes"))
    F = W.shape[0]
    args = (xc.double(), W.double(), b, torch.zeros(F), keep, torch.full((F,), -1), None, None, None, None, 0, 4, False)
    assert_exact_selection(cpp.encode_forward(*args), xc.double(), W.double(), b, keep, 4)
    assert cpp.screen_stats() == (0, 0)
