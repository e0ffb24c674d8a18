"""Per-token top-kmax over candidate lists: the last step of both encodes.

The dense encode leaves (N, n_chunks * kmax) partial winners, the routed encode (N, kp * C)
scores of the children of active parents; both are O(N * K), so one `torch.topk` over them is
the cheap exact merge. Batch selection itself (the k*N-th largest of these) lives in
`hsae_fast/selection.py` and needs no kernel.
"""
from __future__ import annotations

import torch


def top_candidates(cand_scores: torch.Tensor, cand_ids: torch.Tensor, cand_slots: torch.Tensor | None,
                   kmax: int, slot_width: int = 0):
    """Each row's kmax best candidates, in the encode contract's layout.

    cand_scores (N, M) (-inf: no candidate), cand_ids (N, M) level-local ids, cand_slots (N, M) parent
    slots or None; with `slot_width` > 0 the parent slot is the candidate's column // slot_width
    (the routed layout). Returns idx (N, kmax) int64, scores (N, kmax), parent_slot (N, kmax) int64;
    slots without a candidate hold -inf, id 0 and parent slot -1.
    """
    M = cand_scores.shape[1]
    width = min(kmax, M)
    # Few ops on purpose: on a GPU each one costs the host a launch, and this runs once per level.
    top_scores, top_pos = cand_scores.topk(width, dim=1)
    empty = top_scores == float("-inf")
    idx = cand_ids.gather(1, top_pos).to(torch.int64).masked_fill_(empty, 0)
    if slot_width > 0:
        slots = top_pos // slot_width
    elif cand_slots is not None:
        slots = cand_slots.gather(1, top_pos).to(torch.int64)
    else:
        slots = torch.full_like(top_pos, -1)
    slots.masked_fill_(empty, -1)
    if width < kmax:  # fewer candidates than slots: pad as empty slots
        pad = (0, kmax - width)
        top_scores = torch.nn.functional.pad(top_scores, pad, value=float("-inf"))
        idx, slots = torch.nn.functional.pad(idx, pad, value=0), torch.nn.functional.pad(slots, pad, value=-1)
    return idx, top_scores, slots
