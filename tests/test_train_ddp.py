"""Distributed training: 2 CPU processes under torchrun (DDP on gloo) train the same model as one
process on the same global batch. Token selection keeps every token's code independent of the
batch split (batch selection chooses among each rank's own tokens under DDP)."""
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _train(out_dir: str) -> dict:
    sys.path.insert(0, str(ROOT))
    from hsae_fast import HSAEConfig
    from hsae_fast.data.synthetic import SyntheticHierarchy
    from hsae_fast.train import TrainConfig, Trainer

    cfg = HSAEConfig(d_model=16, level_sizes=(16, 4, 2), k=(4, 2, 1), selection="token", lambda_cons=0.1)
    tcfg = TrainConfig(tokens=64 * 6, batch_size=64, progress=False, backend="torch", device="cpu", log_every=3,
                       checkpoint_every=3, b_dec_init_tokens=256, cons_warmup_frac=0.0)
    source = SyntheticHierarchy(d_model=16, level_sizes=(16, 4, 2), mean_active=(4.0, 2.0, 1.0), seed=2)
    trainer = Trainer(cfg, tcfg, source, out_dir)
    trainer.fit()
    state = {k: v.clone() for k, v in trainer.layer.state_dict().items()}
    trainer.dist.close()
    return state


def test_two_processes_train_the_same_model_as_one(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), str(tmp_path / "ddp")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp" / "state.pt")
    single = _train(str(tmp_path / "single"))
    for name, value in single.items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    # the run log counts global tokens
    last = (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()[-1]
    assert '"tokens": 384' in last


if __name__ == "__main__":
    state = _train(sys.argv[1])
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(state, Path(sys.argv[1]) / "state.pt")
