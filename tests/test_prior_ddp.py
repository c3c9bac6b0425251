"""AttributionPrior under DDP: 2 gloo CPU processes on half batches equal one process on the full batch.

The Trainer script runs in a subprocess (``strategy="ddp"`` re-launches the script itself for rank 1, which
would re-run pytest if launched from inside the test process).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers import free_port

SCRIPT = textwrap.dedent(
    """
    import sys

    import lightning as L
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from negspace.callbacks import AttributionPrior

    GLOBAL_B, N, HW = 8, 24, 6


    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 3 * 3, 2)

        def forward(self, x):
            return self.fc(F.avg_pool2d(F.softplus(self.conv(x)), 2).flatten(1))

        def training_step(self, batch, batch_idx):
            x, y, _mask = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


    class RankBatches:
        # step s: the global batch is samples [s*8, s*8+8); rank r takes its r-th contiguous slice
        def __init__(self, rank, world):
            self.rank, self.world = rank, world

        def __len__(self):
            return N // GLOBAL_B

        def __iter__(self):
            per = GLOBAL_B // self.world
            for s in range(len(self)):
                start = s * GLOBAL_B + self.rank * per
                yield list(range(start, start + per))


    class Data(L.LightningDataModule):
        def train_dataloader(self):
            g = torch.Generator().manual_seed(1)
            x = torch.rand(N, 3, HW, HW, generator=g)
            y = torch.tensor([0, 1, 0, 1, 1, 1, 1, 1] * 3)
            mask = torch.zeros(N, 1, HW, HW)
            mask[y == 0, :, :3, :3] = 1.0  # in step 0 rank 1 (samples 4..7) has no mask at all
            x[y == 0, :, :3, :3] = 0.9
            ds = TensorDataset(x, y, mask)
            return DataLoader(ds, batch_sampler=RankBatches(self.trainer.global_rank, self.trainer.world_size))


    if __name__ == "__main__":
        mode, out = sys.argv[1], sys.argv[2]
        torch.set_num_threads(1)
        ddp = mode == "ddp"
        module = Module()
        trainer = L.Trainer(
            accelerator="cpu",
            devices=2 if ddp else 1,
            strategy="ddp" if ddp else "auto",
            max_epochs=2,
            use_distributed_sampler=False,
            callbacks=[AttributionPrior(lam=3.0, mode="presence_absence")],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, Data())
        if trainer.global_rank == 0:
            torch.save({k: v.detach().clone() for k, v in module.state_dict().items()}, out)
        # tear gloo down before interpreter exit: otherwise its threads can abort the process at exit
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    """
)



def _run(script, mode, out, tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc = subprocess.run(
        [sys.executable, str(script), mode, str(out)], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=180,
    )
    if proc.returncode != 0:
        raise AssertionError(f"{mode} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def _plain_loop_full_batch(script) -> dict[str, torch.Tensor]:
    """One process, full batches of 8: CE + 3·prior_loss with a plain PyTorch loop (no Lightning)."""
    import torch.nn.functional as F

    from negspace.priors import prior_loss

    ns: dict = {"__name__": "prior_ddp_reference"}
    exec(compile(script.read_text(), str(script), "exec"), ns)
    module = ns["Module"]()
    data = ns["Data"]()
    data.trainer = type("T", (), {"global_rank": 0, "world_size": 1})()  # plain object: rank 0 of 1
    dl = data.train_dataloader()
    opt = module.configure_optimizers()
    for _ in range(2):
        for x, y, mask in dl:
            loss = F.cross_entropy(module(x), y) + 3.0 * prior_loss(module, x, y, mask, mode="presence_absence")
            loss.backward()
            opt.step()
            opt.zero_grad()
    return {k: v.detach() for k, v in module.state_dict().items()}


@pytest.mark.ddp
def test_ddp_two_processes_equal_single_process(tmp_path):
    script = tmp_path / "prior_ddp_script.py"
    script.write_text(SCRIPT)
    out = tmp_path / "ddp.pt"
    _run(script, "ddp", out, tmp_path)
    ddp = torch.load(out, weights_only=True)
    torch.manual_seed(0)
    ref = _plain_loop_full_batch(script)
    init = _initial_state()
    assert ddp.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(ddp[k], ref[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
        assert not torch.allclose(ref[k], init[k])  # training happened


def _initial_state() -> dict[str, torch.Tensor]:
    from torch import nn

    torch.manual_seed(0)
    conv, fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 * 3 * 3, 2)
    return {
        "conv.weight": conv.weight.detach(), "conv.bias": conv.bias.detach(),
        "fc.weight": fc.weight.detach(), "fc.bias": fc.bias.detach(),
    }
