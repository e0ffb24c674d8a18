"""bench/gpu_run.sh is the one command a session with a lent GPU runs, once, on a 15-minute budget:
its dry run (no GPU: imports, test and bench collection, the standalone timing script at tiny
shapes under the Triton interpreter) must pass every step here first. It once fell behind a kernel
signature change and would have lost the GPU's timing table."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(sys.platform != "linux", reason="bash script for the Linux device machines")
def test_gpu_run_dry_run_passes_every_step(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "OUT": str(tmp_path), "HOME": str(tmp_path)}
    done = subprocess.run(["bash", "bench/gpu_run.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    steps = re.findall(r"^== (.+): exit (\d+) after", done.stdout, flags=re.M)
    assert {name for name, _ in steps} >= {"import backend", "collect tests", "collect bench", "trainer",
                                              "standalone timing and step profiles"}
    failed = [name for name, rc in steps if rc != "0"]
    assert not failed, f"steps failed: {failed}\n" + "".join(p.read_text()[-3000:] for p in tmp_path.glob("*.log"))
    assert "triton encode_routed" in (tmp_path / "timing.md").read_text()
