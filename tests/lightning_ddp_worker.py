"""Two-process DDP run of the Lightning adapter on CPU (gloo), for tests/test_lightning.py.

``python tests/lightning_ddp_worker.py OUT_DIR [ACCUMULATE]`` trains one optimizer step with
``Trainer(accelerator="cpu", devices=2, strategy="ddp")`` (Lightning relaunches this script
once per extra rank) and writes the gradients each rank sees before its optimizer step to
``OUT_DIR/grads_rank{r}.pt``. The model and data builders are imported by the test to compute
the single-process reference.
"""

from __future__ import annotations

import functools
import sys
import warnings
from pathlib import Path

import torch
from torch import nn


def make_trunk() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1, dilation=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 6, 3, padding=1),
    ).double()


def make_head() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(6, 3)).double()


def make_data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 2, 72, 72, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (4,), generator=g)
    return x, y


def main(out_dir: Path, accumulate: int) -> None:
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from tilefn.lightning import StreamedModule

    class Recording(StreamedModule):
        def on_before_optimizer_step(self, optimizer):
            super().on_before_optimizer_step(optimizer)
            grads = {n: p.grad.detach().clone() for n, p in self.named_parameters()}
            torch.save(grads, out_dir / f"grads_rank{self.global_rank}.pt")

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    module = Recording(
        make_trunk(),
        make_head(),
        nn.functional.cross_entropy,
        tile_size=40,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        accumulate_grad_batches=accumulate,
    )
    x, y = make_data()
    # Lightning adds a DistributedSampler: rank 0 reads images 0, 2; rank 1 reads 1, 3.
    data = DataLoader(TensorDataset(x, y), batch_size=1, shuffle=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)
    # Tear the gloo group down before the interpreter exits: left to exit, its threads can
    # abort the process ("terminate called without an active exception") after a clean run.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1)
