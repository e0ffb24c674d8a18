"""One benchmark per case: every candidate of the case timed round-robin (see bench/harness.py)."""
import pytest

from bench.candidates import PEERS, peer_missing
from bench.harness import run_case


def test_case(case, benchmark, bench_state):
    info = run_case(case, benchmark, bench_state)
    timed = [label for label in info["candidates"] if label not in ("encoder GEMM", "matmul+topk")]
    assert timed, f"{case.name}: no implementation could run ({info['skipped']})"


@pytest.mark.parametrize("peer", PEERS)
def test_peer_installed(peer):
    """Skipped, with the reason, where a peer is absent: its rows are then missing from every table."""
    reason = peer_missing(peer)
    if reason:
        pytest.skip(reason)
