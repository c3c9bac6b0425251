"""``AttributionPrior(lam="auto", mask=ConceptMask(...))`` under DDP (2 gloo CPU processes).

Every rank must end with the same λ and the same concept direction, also when the ranks start with different
directions, when only one rank has masks at the calibration step, and when one rank skips its prior
(``on_nan="skip"``) on a step: λ is agreed after every batch, outside the penalty, so nothing deadlocks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from helpers import free_port

SCRIPT = textwrap.dedent(
    """
    import json
    import sys

    import lightning as L
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from negspace.callbacks import AttributionPrior
    from negspace.masks import ConceptMask

    N, HW = 32, 8


    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(F.relu(self.conv(x)).mean((2, 3)))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(torch.nan_to_num(x)), y)  # the task survives the broken image

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)


    def data(rank):
        g = torch.Generator().manual_seed(10 + rank)
        x = torch.rand(N, 3, HW, HW, generator=g) * 0.5
        y = torch.randint(0, 2, (N,), generator=g)
        if rank == 0:
            y[:8] = 0  # rank 0 has stickers in its first batch, rank 1 none (only rank 0 calibrates)
        else:
            y[:8] = 1
            x[9, 0, 7, 7] = float("nan")  # rank 1 skips its prior on its second batch
        x[y == 0, :, :3, :3] = 1.0
        return DataLoader(TensorDataset(x, y), batch_size=8)


    if __name__ == "__main__":
        out = sys.argv[1]
        torch.set_num_threads(1)
        module = Module()
        direction = torch.tensor([1.0, 0.5, 0.0, 0.0])
        source = ConceptMask("conv", direction, threshold=0.05, dilate=0)
        cb = AttributionPrior(lam="auto", mask=source, on_nan="skip", monitor=False)
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, use_distributed_sampler=False,
                            callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False)
        rank = int(__import__("os").environ.get("LOCAL_RANK", 0))
        if rank == 1:  # a different direction on rank 1: synchronize() must make rank 0's every rank's
            source.load_state_dict({**source.state_dict(), "direction": torch.tensor([0.0, 0.0, 1.0, 0.0])})
        trainer.fit(module, train_dataloaders=data(rank))
        with open(f"{out}.{trainer.global_rank}.json", "w") as f:
            json.dump({"lam": cb.lam, "calibrated": cb.calibrated, "direction": source.state_dict()["direction"].tolist(),
                       "threshold": float(source.threshold), "penalised": cb.penalised_batches}, f)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    """
)



@pytest.mark.ddp
def test_auto_lam_and_concept_direction_agree_across_ranks(tmp_path):
    script = tmp_path / "auto_ddp.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "out")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    r0, r1 = (json.loads((tmp_path / f"out.{r}.json").read_text()) for r in (0, 1))
    assert r0["calibrated"] and r1["calibrated"]
    assert r0["lam"] == r1["lam"] and r0["lam"] != 1.0
    assert r0["direction"] == r1["direction"] != [0.0, 0.0, 1.0, 0.0]
    assert r0["threshold"] == r1["threshold"]
    assert r1["penalised"] < r0["penalised"]  # rank 1 skipped a step (NaN) and had a batch without masks
