"""The training loop (issue 7): one `Trainer` for HSAEs and flat SAEs, one process or many
(`torchrun`, DistributedDataParallel on gloo or NCCL), resumable bit-identically on CPU.

Per step: a global batch of `batch_size` tokens (under DDP each rank takes its slice of the same
global batch), the SPEC 5 loss with its schedules, AdamW that never moves pruned features,
gradient clipping, decoder rows renormalized with the parallel gradient removed, then the
trackers (dead features for AuxK, firing counts for logging, pruning and adaptive sparsity).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import HSAEConfig
from ..io import atomic_write_bytes
from ..layer import HSAELayer, NonFiniteInputError
from ..losses import DeadFeatureTracker, LossWeights, prefix_weight, total_loss
from ..metrics import ActivityCounter
from . import checkpoint as ckpt
from . import host
from .config import TrainConfig
from .optim import MaskedAdamW, init_b_dec
from .schedules import (
    AdaptiveSparsity, feasible_k, lambda_cons, level_utilization, lr_factor, progressive_k,
)


class TrainingDiverged(RuntimeError):
    """The loss became NaN/Inf; the message names the step and where the batch and checkpoint are."""


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1

    @staticmethod
    def from_env(device: torch.device) -> "Distributed":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return Distributed()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return Distributed(dist.get_rank(), dist.get_world_size())

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (autograd-free: only data constants are reduced)."""
        if self.world == 1:
            return tensor
        out = tensor.detach().clone()
        dist.all_reduce(out)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    @staticmethod
    def close() -> None:
        """Shut the process group down before exit (gloo aborts at interpreter exit otherwise)."""
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"TrainConfig.device={name!r}: CUDA is not available here (device='auto' or 'cpu')")
    return device


class Trainer:
    """Train `cfg` on `source` into `out_dir` (RUN_DIR of SPEC 9, or RUN_DIR/flat for the baseline)."""

    def __init__(self, cfg: HSAEConfig, tcfg: TrainConfig, source, out_dir, resume: bool = False):
        self.tcfg, self.source, self.out_dir = tcfg, source, Path(out_dir)
        self.device = resolve_device(tcfg.device)
        if self.device.type == "cuda" and "LOCAL_RANK" in os.environ:
            self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        self.dist = Distributed.from_env(self.device)
        if tcfg.batch_size % self.dist.world:
            raise ValueError(f"TrainConfig.batch_size={tcfg.batch_size}: must divide evenly over {self.dist.world} ranks")
        self.total_steps = tcfg.tokens // tcfg.batch_size
        self.target_k = tuple(cfg.k)
        torch.manual_seed(tcfg.seed)  # the same initial model on every rank
        self.layer = HSAELayer(cfg, backend=tcfg.backend, device=self.device, dtype=getattr(torch, tcfg.dtype))
        self.optimizer = MaskedAdamW(self.layer, tcfg.lr, (tcfg.beta1, tcfg.beta2), tcfg.weight_decay)
        # Backward then writes only the rows of W_enc's and W_dec's gradients that the batch touched,
        # and the row update reads only those (the same update: see HSAELayer.row_grads). DDP
        # all-reduces dense gradients, so one process only.
        self.layer.row_grads = self.optimizer.takes_row_grads() and self.dist.world == 1
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total_steps, tcfg.warmup_frac, tcfg.decay_start))
        F, L = cfg.dict_size, cfg.num_levels
        self.dead = DeadFeatureTracker(F, cfg.dead_after_tokens, self.device)
        self.adaptive = AdaptiveSparsity(L, tcfg.adapt_target_util, tcfg.adapt_rate, tcfg.adapt_max_mult)
        self.log_window = ActivityCounter(cfg.level_sizes, self.device)
        self.prune_window = ActivityCounter(cfg.level_sizes, self.device)
        self.adapt_window = ActivityCounter(cfg.level_sizes, self.device)
        self.step, self.elapsed = 0, 0.0
        self.model = self.layer
        if self.dist.world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.layer, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self._lr_used = self.scheduler.get_last_lr()[0]  # the learning rate of the last step taken
        self._threshold_before_step = None
        if resume:
            self._restore()
        else:
            if self.dist.main:
                self._start_fresh()
            sample = source.sample(tcfg.b_dec_init_tokens, tcfg.seed)
            init_b_dec(self.layer, sample.to(self.device), tcfg.b_dec_init)

    # ------------------------------------------------------------------ schedules
    def current_k(self, progress: float) -> tuple:
        wanted = progressive_k(self.target_k, progress, self.tcfg.k_start_mult, self.tcfg.k_schedule_until)
        if self.tcfg.adaptive_sparsity:
            wanted = [k * float(m) for k, m in zip(wanted, self.adaptive.mult)]
        return feasible_k(self.layer.cfg, wanted)

    def loss_weights(self, progress: float) -> LossWeights:
        cfg = self.layer.cfg
        return LossWeights(
            prefix=self.tcfg.prefix_coef * prefix_weight(progress, cfg.prefix_until) if cfg.num_levels > 1 else 0.0,
            aux=cfg.aux_coef,
            cons=lambda_cons(progress, cfg.lambda_cons, self.tcfg.cons_warmup_frac),
        )

    # ----------------------------------------------------------------------- step
    def _local_slice(self, batch: torch.Tensor) -> torch.Tensor:
        share = batch.shape[0] // self.dist.world
        return batch[self.dist.rank * share: (self.dist.rank + 1) * share]

    def train_step(self, batch: torch.Tensor) -> dict:
        """One optimizer step on the global batch (B, d); returns the loss parts (floats)."""
        tcfg, layer = self.tcfg, self.layer
        progress = self.step / self.total_steps
        k = self.current_k(progress)
        if k != tuple(layer.cfg.k):
            layer.cfg = layer.cfg.replace(k=k)
        x = self._local_slice(batch).to(device=self.device, dtype=layer.W_dec.dtype)
        weights = self.loss_weights(progress)
        dead = self.dead.dead(layer.path_mask) if weights.aux > 0 else None
        # the forward moves the thresholds (SPEC 4): kept, so a diverged step's checkpoint is the state before it
        self._threshold_before_step = layer.threshold.clone()
        try:
            out = self.model(x, return_prefixes=weights.prefix > 0)
        except NonFiniteInputError:  # the data's fault (the layer's own check): stopped as a divergence
            self._diverged(batch, {}, reason="the batch holds NaN or Inf")
        loss, parts = total_loss(layer, x, out, weights, dead, self.dist.sum if self.dist.world > 1 else None)
        loss_value = float(self.dist.sum(loss.detach()))
        if not math.isfinite(loss_value):
            self._diverged(batch, parts)
        self.optimizer.zero_grad(set_to_none=True)
        # Each rank's loss is its share of the global loss; DDP averages gradients, hence the factor.
        (loss * self.dist.world).backward()
        # decoder gradient projected, clipped, AdamW, decoder rows renormalized: one pass on CPU
        # nothing between backward and update changes a gradient: the clip norm may take the row norms
        # the backward computed (one process; DDP's all-reduce rewrites the gradients)
        self.optimizer.update(tcfg.grad_clip, tcfg.renorm_decoder, backward_norms=self.dist.world == 1)
        self._lr_used = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self._track(out.levels, batch.shape[0])
        self.step += 1
        parts = dict(parts, loss=loss_value)
        if self.dist.world > 1:
            for key in [k for k in parts if k != "loss"]:
                # ratio terms are shares of the global value; fvu's parts sum over ranks as well
                parts[key] = float(self.dist.sum(torch.tensor(parts[key], dtype=torch.float64)))
        return parts

    @torch.no_grad()
    def _track(self, levels, global_tokens: int) -> None:
        step_counts = ActivityCounter(self.layer.cfg.level_sizes, self.device)
        step_counts.update(levels)
        fired = self.dist.sum((step_counts.fires > 0).to(torch.int64)) > 0
        self.dead.update(fired, global_tokens)
        for counter in (self.log_window, self.prune_window, self.adapt_window):
            counter.add(step_counts)
        if self.tcfg.prune_unused and self.step / self.total_steps >= self.tcfg.prune_after:
            if self.prune_window.tokens * self.dist.world >= self.tcfg.prune_window_tokens:
                self.prune_unused()
        if self.tcfg.adaptive_sparsity and self.adapt_window.tokens * self.dist.world >= self.tcfg.adapt_every_tokens:
            fires = self.dist.sum(self.adapt_window.fires)
            self.adaptive.update(level_utilization(fires, self.layer.path_mask, self.layer.cfg.level_sizes))
            self.adapt_window = ActivityCounter(self.layer.cfg.level_sizes, self.device)

    @torch.no_grad()
    def prune_unused(self) -> torch.Tensor:
        """Prune every unpruned feature that did not fire over the window (with its subtree)."""
        fires = self.dist.sum(self.prune_window.fires)
        unused = torch.nonzero((fires == 0) & self.layer.path_mask).squeeze(1)
        if unused.numel():
            self.layer.prune(unused)
        self.prune_window = ActivityCounter(self.layer.cfg.level_sizes, self.device)
        return unused

    def _diverged(self, batch: torch.Tensor, parts: dict, reason: str = "") -> None:
        if self._threshold_before_step is not None:
            with torch.no_grad():
                self.layer.threshold.copy_(self._threshold_before_step)
        path = self.save_checkpoint()
        batch_path = self.out_dir / "checkpoints" / f"nan_batch_step_{self.step:09d}.safetensors"
        if self.dist.main:
            from ..io import atomic_save_tensors

            atomic_save_tensors({"batch": batch}, batch_path)
        what = reason or "loss is not finite"
        detail = "" if reason else f" (parts {parts})"
        raise TrainingDiverged(
            f"{what} at step {self.step}{detail}; the batch is saved in {batch_path}, the state before this step in {path}"
        )

    # -------------------------------------------------------------- checkpoints
    def _start_fresh(self) -> None:
        """A new run in a folder that holds an earlier one (no --resume): its checkpoints and log go, or
        the earlier run's later steps would outlive this run's checkpoints and its records mix into the log."""
        removed = ckpt.clear_checkpoints(self.out_dir / "checkpoints")
        log = self.out_dir / "metrics.jsonl"
        if log.is_file():
            log.unlink()
            removed.append(log.name)
        if removed:
            print(f"{self.out_dir}: starting a new run; removed the previous run's checkpoints and log "
                  f"({len(removed)} files; --resume continues a run instead)")

    def _cut_log(self) -> None:
        """Resuming at step s: the log's records after s (written before the interruption, after the
        checkpoint) are dropped, since this run writes them again."""
        log = self.out_dir / "metrics.jsonl"
        if not self.dist.main or not log.is_file():
            return
        lines = log.read_text().splitlines(keepends=True)
        kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= self.step]
        if len(kept) != len(lines):
            from ..io import atomic_write_bytes

            atomic_write_bytes(log, "".join(kept).encode())

    def _state_tensors(self) -> dict:
        tensors = {f"model.{k}": v for k, v in self.layer.state_dict().items()}
        tensors["dead.tokens_since_fired"] = self.dead.tokens_since_fired
        tensors["adaptive.mult"] = self.adaptive.mult
        for name in ("log_window", "prune_window", "adapt_window"):
            counter = getattr(self, name)
            tensors[f"{name}.fires"] = counter.fires
            tensors[f"{name}.active"] = counter.active_per_level
        tensors["rng.cpu"] = torch.get_rng_state()
        return tensors

    def save_checkpoint(self) -> Path:
        directory = self.out_dir / "checkpoints"
        if not self.dist.main:
            self.dist.barrier()
            return directory
        meta = {
            "scheduler": self.scheduler.state_dict(),
            "k": list(self.layer.cfg.k),
            "elapsed_s": self.elapsed,
            "lr_used": self._lr_used,
            "windows_tokens": {n: getattr(self, n).tokens for n in ("log_window", "prune_window", "adapt_window")},
        }
        path = ckpt.save_checkpoint(directory, self.step, self._state_tensors(), self.optimizer.state_dict(), meta,
                                    self.tcfg.keep_checkpoints)
        self.dist.barrier()
        return path

    def _restore(self) -> None:
        tensors, optimizer_state, meta = ckpt.load_checkpoint(self.out_dir / "checkpoints")
        self.layer.cfg = self.layer.cfg.replace(k=tuple(meta["k"]))
        self.layer.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        self.optimizer.load_state_dict(optimizer_state)
        self.scheduler.load_state_dict(meta["scheduler"])
        self.dead.load_state_dict({"tokens_since_fired": tensors["dead.tokens_since_fired"]})
        self.adaptive.load_state_dict({"mult": tensors["adaptive.mult"]})
        for name in ("log_window", "prune_window", "adapt_window"):
            counter = getattr(self, name)
            counter.fires.copy_(tensors[f"{name}.fires"])
            counter.active_per_level.copy_(tensors[f"{name}.active"])
            counter.tokens = meta["windows_tokens"][name]
        torch.set_rng_state(tensors["rng.cpu"])
        self.step, self.elapsed = meta["step"], meta["elapsed_s"]
        self._lr_used = meta.get("lr_used", self._lr_used)
        self._cut_log()

    # --------------------------------------------------------------------- loop
    def _batches(self):
        stream = self.source.batches(self.tcfg.batch_size, self.tcfg.seed, start=self.step)
        return iter(stream)

    def log_record(self, parts: dict, tokens_per_s: float) -> dict:
        cfg = self.layer.cfg
        fires = self.dist.sum(self.log_window.fires)
        active = self.dist.sum(self.log_window.active_per_level)
        n = max(self.log_window.tokens * self.dist.world, 1)
        dead = self.dead.dead(self.layer.path_mask)
        dead_frac, start = [], 0
        for size in cfg.level_sizes:
            alive = self.layer.path_mask[start: start + size]
            dead_frac.append(float(dead[start: start + size].sum()) / max(int(alive.sum()), 1))
            start += size
        record = {
            "step": self.step,
            "tokens": self.step * self.tcfg.batch_size,
            "loss": parts["loss"],
            "fvu": parts["fvu"],
            "l0": [float(a) / n for a in active],
            "dead_frac": dead_frac,
            "lr": self._lr_used,  # the step's (the scheduler has moved on to the next one's)
            "elapsed_s": round(self.elapsed, 3),
            "tokens_per_s": round(tokens_per_s, 1),
            "k": list(cfg.k),
            "pruned": int((~self.layer.path_mask).sum()),
            "fired_frac": [float((fires[s: s + z] > 0).double().mean()) for s, z in
                           zip(cfg.level_offsets, cfg.level_sizes)],
        }
        record.update({k: v for k, v in parts.items() if k not in ("loss", "fvu")})
        self.log_window = ActivityCounter(cfg.level_sizes, self.device)
        return record

    def fit(self, desc: str = "train") -> None:
        tcfg = self.tcfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        metrics_path = self.out_dir / "metrics.jsonl"
        bar = None
        if self.dist.main and tcfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps * tcfg.batch_size, initial=self.step * tcfg.batch_size,
                       unit="tok", unit_scale=True, desc=desc, dynamic_ncols=True)
        batches = self._batches()
        window_start, window_tokens = time.perf_counter(), 0
        # host.training_loop: freed blocks reused instead of faulted in again, the collector
        # skipping the objects made before the loop (a sixth of a routed CPU step; host.py).
        # encoder_step_in_forward: W_enc's AdamW step taken by the next forward's encode as it reads
        # each row (one pass over W_enc a step instead of two; the same bits); one process only.
        fused = self.optimizer.encoder_step_in_forward() if self.dist.world == 1 else contextlib.nullcontext()
        with open(metrics_path, "a") as log, host.training_loop(cpu=self.device.type == "cpu"), fused:
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                parts = self.train_step(next(batches))
                self.elapsed += time.perf_counter() - t0
                window_tokens += tcfg.batch_size
                if bar is not None:
                    bar.update(tcfg.batch_size)
                last = self.step == self.total_steps
                if self.step % tcfg.log_every == 0 or last:
                    rate = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                    record = self.log_record(parts, rate)
                    if self.dist.main:
                        log.write(json.dumps(record) + "\n")
                        log.flush()
                    if bar is not None:
                        bar.set_postfix_str(
                            f"loss {record['loss']:.4f} fvu {record['fvu']:.4f} "
                            f"L0 {'/'.join(f'{v:.1f}' for v in record['l0'])} "
                            f"dead {'/'.join(f'{v:.2f}' for v in record['dead_frac'])}", refresh=False)
                    window_start, window_tokens = time.perf_counter(), 0
                if self.step % tcfg.checkpoint_every == 0 or last:
                    self.save_checkpoint()
        if bar is not None:
            bar.close()

    def save_final(self) -> Path:
        final = self.out_dir / "final"
        if self.dist.main:
            layer = self.layer
            # The run ends with the target k (a schedule may have left it elsewhere).
            layer.cfg = layer.cfg.replace(k=self.target_k)
            layer.save_pretrained(final)
        self.dist.barrier()
        return final


def _step_of(line: str):
    """A log record's step, or None for a line that is not a whole record (one torn by a kill)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record.get("step") if isinstance(record, dict) else None


def write_json(path, data) -> None:
    """Strict JSON (NaN, e.g. a flat SAE's tree recovery, becomes null), written atomically."""
    atomic_write_bytes(Path(path), json.dumps(_plain(data), indent=2, allow_nan=False).encode())


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if torch.is_tensor(value):
        return _plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
