"""SPEC 5 losses from sparse codes: fvu, the coarse-to-fine prefix loss, AuxK with dead-feature
tracking, hierarchical consistency (orphan + L2, or revision 1's KL), and their weighted total.

Every function takes the (N, kmax) slots of `HSAEOutput.levels` (idx, vals, scores), never an
N x F buffer; AuxK scores only the dead subset, keeping N x k_aux of it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as Fn

from .metrics import parent_activation
from .ops.auxk import dead_decode, dead_topk

KL_EPS = 1e-6


GlobalSum = Optional[Callable[[torch.Tensor], torch.Tensor]]


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def total_variance(x: torch.Tensor, global_sum: GlobalSum = None) -> torch.Tensor:
    """sum ||x - mean(x)||^2 over the tokens of the (global) batch; a data constant (no gradient).
    `global_sum` sums a tensor over data-parallel ranks, so the denominator is the whole batch's."""
    reduce = global_sum or (lambda t: t)
    x = x.detach().reshape(-1, x.shape[-1]).to(_acc(x.dtype))
    count = reduce(x.new_tensor(float(x.shape[0])))
    mean = reduce(x.sum(0)) / count.clamp_min(1)
    return reduce((x - mean).pow(2).sum())


def fvu(x: torch.Tensor, x_hat: torch.Tensor, denominator: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over the batch (rows are tokens), in float32 or better.
    `denominator` (from `total_variance`) replaces the local one, e.g. the global batch's under DDP."""
    acc = _acc(x.dtype)
    x, x_hat = x.reshape(-1, x.shape[-1]).to(acc), x_hat.reshape(-1, x_hat.shape[-1]).to(acc)
    total = total_variance(x) if denominator is None else denominator
    return (x - x_hat).pow(2).sum() / total.clamp_min(torch.finfo(acc).tiny)


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ||x - x_hat||^2 (summed over d), reported beside fvu."""
    acc = _acc(x.dtype)
    diff = (x.to(acc) - x_hat.to(acc)).reshape(-1, x.shape[-1])
    return diff.pow(2).sum(1).mean()


def prefix_weight(progress: float, prefix_until: float) -> float:
    """w(t) = max(0, 1 - t / (prefix_until * T)), progress = t / T in [0, 1]."""
    if prefix_until <= 0:
        return 0.0
    return max(0.0, 1.0 - progress / prefix_until)


def prefix_loss(x: torch.Tensor, prefixes: torch.Tensor, denominator: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sum_{m=1}^{L-1} fvu(x, P_m); prefixes (L, N, d) as `HSAEOutput.prefixes` (P_0 = x_hat is not charged)."""
    x2 = x.reshape(-1, x.shape[-1])
    if denominator is None:
        denominator = total_variance(x2)
    terms = [fvu(x2, prefixes[m], denominator) for m in range(1, prefixes.shape[0])]
    return torch.stack(terms).sum() if terms else x2.new_zeros((), dtype=torch.float32)


class DeadFeatureTracker:
    """Tokens since each feature last fired; dead = not active for `dead_after_tokens` tokens."""

    def __init__(self, num_features: int, dead_after_tokens: int, device=None):
        self.dead_after_tokens = int(dead_after_tokens)
        self.tokens_since_fired = torch.zeros(num_features, dtype=torch.int64, device=device)

    @staticmethod
    def fired(levels: Sequence, num_features: int) -> torch.Tensor:
        """(F,) bool: features active on at least one token of these codes."""
        out = torch.zeros(num_features, dtype=torch.bool, device=levels[0].idx.device)
        for codes in levels:
            out[codes.idx[codes.vals != 0]] = True
        return out

    def update(self, fired: torch.Tensor, n_tokens: int) -> None:
        """fired: (F,) bool over the (global) batch of `n_tokens` tokens."""
        self.tokens_since_fired += int(n_tokens)
        self.tokens_since_fired[fired] = 0

    def dead(self, path_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(F,) bool: dead and, if a mask is given, unpruned."""
        dead = self.tokens_since_fired >= self.dead_after_tokens
        return dead & path_mask if path_mask is not None else dead

    def state_dict(self) -> dict:
        return {"tokens_since_fired": self.tokens_since_fired.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.tokens_since_fired.copy_(state["tokens_since_fired"])


def level_of(level_sizes: Sequence[int], device=None) -> torch.Tensor:
    """(F,) int64: the level of every global feature id."""
    return torch.repeat_interleave(torch.arange(len(level_sizes), device=device),
                                   torch.tensor(level_sizes, device=device))


# Above this many dead features per AuxK code the sparse ops win; below it, small dense products do
# (bench/bench_auxk.py: at k_aux 288 the two tie near 1,000 dead features; at the demo's sizes the
# sparse ops' fixed cost made the whole step 20-35% slower).
AUXK_SPARSE_ABOVE = 4


# AuxK treats scores below this as no activation (value and gradient 0). Why: dead features' scores
# sit far below zero (about -90 to -100 on Gemma's residual stream), where softplus and its gradient
# are subnormal floats, and CPU matrix products on subnormal operands run tens of times slower (our
# flat SAE's AuxK products took 100 ms each instead of 5, its training step 3.5x longer). What is
# dropped is below softplus(-60) = 9e-27 per code, and the gradients that remain, of order
# sigmoid(-60) times the loss gradient, stay in the normal range for any data scale seen here.
AUXK_SCORE_FLOOR = -60.0


def _softplus_floored(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s > AUXK_SCORE_FLOOR, Fn.softplus(s), torch.zeros((), dtype=s.dtype, device=s.device))


def auxk_loss(layer, x: torch.Tensor, x_hat: torch.Tensor, dead: torch.Tensor, k_aux: int,
              global_sum: GlobalSum = None, sparse: Optional[bool] = None) -> torch.Tensor:
    """SPEC 5 AuxK: ||e - e_hat||^2 / ||e||^2, e = x - x_hat (held constant), e_hat the decode of the
    top k_aux softplus(s) among the dead features (`dead`: (F,) bool, pruned ones excluded by the
    caller), scored without gating and without the edge term (a dead feature's parent is usually
    silent). Only the dead rows of W_enc, b_enc, W_dec receive gradient: b_dec and the level gains
    are held constant, since the dead features are what this loss is for. Scores below
    AUXK_SCORE_FLOOR count as 0 (softplus there is under 1e-26; see the constant).

    With many dead features (`sparse=None`: more than AUXK_SPARSE_ABOVE * k_aux) it runs on sparse
    ops (`ops/auxk.py`): the dead rows are scored by one fused GEMM + top-k, only the N x k_aux
    chosen codes are decoded and differentiated, and the weight gradients cover the dead rows only:
    they are sparse COO tensors, which autograd adds in place into the dense gradients of the main
    loss. Differentiated alone (no other term reaching W_enc, b_enc is dense), W_enc.grad and
    W_dec.grad then stay sparse; optimizers such as AdamW need dense ones, so add AuxK to the main
    loss (as `total_loss` does). With few dead features, dense products over the dead rows."""
    dead_ids = torch.nonzero(dead).squeeze(1)
    layer.current_encoder_rows()  # the dead rows of W_enc are read below, outside the encode
    x2 = x.reshape(-1, x.shape[-1])
    if dead_ids.numel() == 0 or x2.shape[0] == 0:
        return x2.new_zeros((), dtype=torch.float32)
    acc = _acc(x.dtype)
    e = (x2 - x_hat.reshape(-1, x2.shape[1])).detach().to(acc)
    k = min(int(k_aux), dead_ids.numel())
    gain = layer.level_gain.detach().to(acc)[level_of(layer.cfg.level_sizes, x.device)[dead_ids]]
    if sparse is None:
        sparse = dead_ids.numel() > AUXK_SPARSE_ABOVE * k
    if sparse:
        backend = layer.backend_for(x2.device)
        xc = (x2 - layer.b_dec).detach().to(layer.W_enc.dtype)  # as the main encode sees it
        scores, local = dead_topk(xc, layer.W_enc, layer.b_enc, dead_ids, k, backend)
        vals = _softplus_floored(scores.to(acc)) * gain[local]
        e_hat = dead_decode(local, vals, layer.W_dec, dead_ids, backend).to(acc)
    else:
        rows_enc = _rows(layer, layer.W_enc, dead_ids).to(acc)
        xc_acc = x2.detach().to(acc) - layer.b_dec.detach().to(acc)
        scores = xc_acc @ rows_enc.T + layer.b_enc[dead_ids].to(acc)  # (N, |dead|)
        top = scores.topk(k, dim=1)
        acts = torch.zeros_like(scores).scatter(1, top.indices, _softplus_floored(top.values))
        e_hat = acts @ (_rows(layer, layer.W_dec, dead_ids).to(acc) * gain[:, None])
    e_norm = e.pow(2).sum()
    if global_sum is not None:
        e_norm = global_sum(e_norm)
    return (e - e_hat).pow(2).sum() / e_norm.clamp_min(torch.finfo(acc).tiny)


def _rows(layer, W: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """W[ids], whose gradient is a row gradient (sparse COO over ids) when the layer's are
    (`HSAELayer.row_grads`): a gather's dense F x d gradient would make the main one dense again."""
    if layer.row_grads_now():
        return torch.nn.functional.embedding(ids, W, sparse=True)
    return W[ids]


def orphan_loss(levels: Sequence, parent: torch.Tensor, n_tokens: Optional[float] = None) -> torch.Tensor:
    """(1/N) sum_n sum_{l<L-1} sum_i a_l[n, i] * 1[parent of i inactive for n]; the indicator is constant.
    `n_tokens` replaces N (the global batch's token count under data parallelism)."""
    total = levels[0].vals.new_zeros((), dtype=torch.float32)
    n = max(n_tokens if n_tokens is not None else levels[0].vals.shape[0], 1)
    for l in range(len(levels) - 1):
        child, upper = levels[l], levels[l + 1]
        orphan = parent_activation(child.idx, parent, upper.idx, upper.vals.detach()) == 0
        total = total + (child.vals * orphan).sum() / n
    return total


def decoder_tie_loss(W_dec: torch.Tensor, parent: torch.Tensor, path_mask: torch.Tensor) -> torch.Tensor:
    """Mean over unpruned edges of ||W_dec[i] - W_dec[parent[i]]||^2 (0 without edges)."""
    child = torch.nonzero((parent >= 0) & path_mask).squeeze(1)
    if child.numel() == 0:
        return W_dec.new_zeros(())
    return (W_dec[child] - W_dec[parent[child]]).pow(2).sum(1).mean()


def kl_consistency_loss(levels: Sequence, parent: torch.Tensor, n_tokens: Optional[float] = None) -> torch.Tensor:
    """Revision 1's consistency, kept for ablations: per token and level pair, KL(q || p) where q is
    the distribution of the children's summed activity over their parents and p the parents'
    activity distribution, both with eps 1e-6 (an orphan child costs about log(1/eps) = 14 nats).
    Averaged over tokens (`n_tokens` replaces N, as in `orphan_loss`), summed over pairs."""
    n = max(n_tokens if n_tokens is not None else levels[0].vals.shape[0], 1)
    total = levels[0].vals.new_zeros((), dtype=torch.float32)
    for l in range(len(levels) - 1):
        child, upper = levels[l], levels[l + 1]
        # The support per token: the active parents' slots, then the parents of the active children.
        keys = torch.cat([upper.idx, parent[child.idx]], dim=1)  # (N, Kp + Kc)
        live = torch.cat([upper.vals != 0, child.vals != 0], dim=1)
        same = (keys[:, :, None] == keys[:, None, :]) & live[:, None, :]
        earlier = torch.ones(keys.shape[1], keys.shape[1], dtype=torch.bool, device=keys.device).tril(-1)
        first = live & ~(same & earlier).any(-1)  # one slot per distinct parent id
        Kp = upper.idx.shape[1]
        p_mass = (same[:, :, :Kp] * upper.vals[:, None, :]).sum(-1) * first
        q_mass = (same[:, :, Kp:] * child.vals[:, None, :]).sum(-1) * first
        p = p_mass / p_mass.sum(1, keepdim=True).clamp_min(KL_EPS)
        q = q_mass / q_mass.sum(1, keepdim=True).clamp_min(KL_EPS)
        kl = (q * torch.log((q + KL_EPS) / (p + KL_EPS))).sum(1)
        total = total + kl.sum() / n
    return total


def consistency_loss(levels: Sequence, layer, n_tokens: Optional[float] = None) -> torch.Tensor:
    """L_cons of SPEC 5 for `layer.cfg.consistency`: "orphan" (+ beta * decoder L2) or "kl" (+ the same L2).
    With `n_tokens` (the global batch) this rank's share is returned: the token terms divide by
    n_tokens and the parameter-only L2 term by the number of equal shares."""
    cfg = layer.cfg
    data_term = orphan_loss if cfg.consistency == "orphan" else kl_consistency_loss
    main = data_term(levels, layer.parent, n_tokens)
    if cfg.beta > 0:
        share = levels[0].vals.shape[0] / n_tokens if n_tokens else 1.0
        main = main + cfg.beta * share * decoder_tie_loss(layer.W_dec, layer.parent, layer.path_mask)
    return main


@dataclass
class LossWeights:
    """The time-dependent weights of SPEC 5's total at one step."""

    prefix: float = 0.0
    aux: float = 0.0
    cons: float = 0.0


def total_loss(layer, x: torch.Tensor, out, weights: LossWeights, dead: Optional[torch.Tensor] = None,
               global_sum: GlobalSum = None) -> tuple:
    """fvu + w(t) * L_prefix + aux_coef * auxk + lambda_cons(t) * L_cons -> (loss, parts as floats).
    `out` must carry prefixes when weights.prefix > 0; terms with weight 0 are not computed.
    Under data parallelism pass `global_sum` (a sum over ranks): the ratio terms then divide by the
    global batch's denominators, so the ranks' losses add up to the one-process loss. The
    consistency term is this rank's share likewise (ranks hold equal token counts).
    Under input_norm="token" (`out.input_scale` set) every term is taken on the scaled tokens, the
    input the SPEC forward saw, so each token weighs the same."""
    x2 = x.reshape(-1, x.shape[-1])
    x_hat, prefixes = out.x_hat.reshape(x2.shape), out.prefixes
    if out.input_scale is not None:
        s = out.input_scale
        x2, x_hat = x2 * s, x_hat * s
        prefixes = prefixes * s if prefixes is not None else None
    denominator = total_variance(x2, global_sum)
    rec = fvu(x2, x_hat, denominator)
    loss, parts = rec, {"fvu": rec.detach()}
    if weights.prefix > 0 and layer.cfg.num_levels > 1:
        if prefixes is None:
            raise ValueError("total_loss: weights.prefix > 0 needs the forward's prefixes (return_prefixes=True)")
        pre = prefix_loss(x2, prefixes, denominator)
        loss = loss + weights.prefix * pre
        parts["prefix"] = pre.detach()
    if weights.aux > 0 and dead is not None and bool(dead.any()):
        aux = auxk_loss(layer, x2, x_hat, dead, layer.cfg.resolved_k_aux, global_sum)
        loss = loss + weights.aux * aux
        parts["auxk"] = aux.detach()
    if weights.cons > 0 and layer.cfg.num_levels > 1:
        n_tokens = float(global_sum(x2.new_tensor(float(x2.shape[0])))) if global_sum is not None else None
        cons = consistency_loss(out.levels, layer, n_tokens)
        loss = loss + weights.cons * cons
        parts["cons"] = cons.detach()
    return loss, {k: float(v) for k, v in parts.items()}
