"""Model preservation (SPEC 7): next-token CE and KL with the reconstruction spliced in, and with the
activation zero-ablated, on the same positions.

Positions: p with input token in T (not special) and a next token in the row; the target is the
token at p+1 (which may be special). The splice and the ablation replace the hooked activation at
every position in T and nowhere else; the SAE's error is not added back.
"""
from __future__ import annotations

import torch

from ..data.lm import patched_layer


class ModelPreservation:
    def __init__(self):
        f64 = torch.float64
        self.count = 0
        self.ce = {name: torch.zeros((), dtype=f64) for name in ("without_sae", "with_sae", "with_ablation")}
        self.kl = {name: torch.zeros((), dtype=f64) for name in ("with_sae", "with_ablation")}

    @torch.no_grad()
    def update(self, model, layer: int, rows: torch.Tensor, special: torch.Tensor, clean_logits: torch.Tensor, x_hat: torch.Tensor) -> None:
        """rows, special: (B, C); clean_logits: (B, C, V); x_hat: (|T|, d) in the order of rows[~special]."""
        device = clean_logits.device
        keep = (~special).to(device)
        scored = keep[:, :-1]
        targets = rows[:, 1:].to(device)[scored]
        clean = clean_logits[:, :-1][scored].float().log_softmax(-1)
        self.count += int(scored.sum())
        self.ce["without_sae"] += self._ce(clean, targets)

        def splice(hidden):
            out = hidden.clone()
            out[keep] = x_hat.to(device=device, dtype=hidden.dtype)
            return out

        def ablate(hidden):
            return hidden.masked_fill(keep[..., None], 0)

        for name, patch in (("with_sae", splice), ("with_ablation", ablate)):
            with patched_layer(model, layer, patch):
                logits = model(input_ids=rows.to(device), use_cache=False).logits
            patched = logits[:, :-1][scored].float().log_softmax(-1)
            self.ce[name] += self._ce(patched, targets)
            # KL(P_clean || P_patched) per position, summed.
            self.kl[name] += (clean.exp() * (clean - patched)).sum().double()

    @staticmethod
    def _ce(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return -log_probs.gather(1, targets[:, None]).double().sum()

    def results(self) -> dict:
        if self.count == 0:
            raise ValueError("no scored positions for CE/KL: every row is special tokens or one token long")
        ce = {name: float(total / self.count) for name, total in self.ce.items()}
        kl = {name: float(total / self.count) for name, total in self.kl.items()}
        ce_gap = ce["with_ablation"] - ce["without_sae"]
        return {
            "ce_loss_without_sae": ce["without_sae"],
            "ce_loss_with_sae": ce["with_sae"],
            "ce_loss_with_ablation": ce["with_ablation"],
            "ce_loss_increase": ce["with_sae"] - ce["without_sae"],
            "ce_loss_score": (ce["with_ablation"] - ce["with_sae"]) / ce_gap if ce_gap != 0 else float("nan"),
            "kl_div_with_sae": kl["with_sae"],
            "kl_div_with_ablation": kl["with_ablation"],
            "kl_div_score": (kl["with_ablation"] - kl["with_sae"]) / kl["with_ablation"] if kl["with_ablation"] != 0 else float("nan"),
            "ce_positions": self.count,
        }
