"""calibrate_batchnorm: exact full-image BatchNorm statistics, layer by layer, streamed; and the
warning StreamedModule gives when a first step saturates."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import tilefn

DTYPE = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


class Branchy(nn.Module):
    """BatchNorm in two branches and after their sum; the branch order differs from the
    order the layers are registered in."""

    def __init__(self) -> None:
        super().__init__()
        self.late = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6))
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6))
        self.side = nn.Sequential(nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6))
        self.out = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        return self.out(torch.relu(self.side(h)) + self.late(h))


def reference(model: nn.Module, xs: list[torch.Tensor]) -> nn.Module:
    """Plain PyTorch: for each BatchNorm in the order it runs, set its running statistics to
    the mean and unbiased variance of its input pooled over ``xs``."""
    model = copy.deepcopy(model).eval()
    order = [model.stem[1], model.side[1], model.late[1], model.out]
    for bn in order:
        seen = []
        handle = bn.register_forward_pre_hook(lambda m, a, seen=seen: seen.append(a[0]))
        with torch.no_grad():
            for x in xs:
                model(x)
        handle.remove()
        u = torch.cat([t.permute(1, 0, 2, 3).flatten(1) for t in seen], 1)  # (C, positions)
        bn.running_mean.copy_(u.mean(1))
        bn.running_var.copy_(u.var(1, unbiased=True))
    return model


def test_statistics_equal_the_plain_layer_by_layer_ones() -> None:
    torch.manual_seed(0)
    net = Branchy().to(DTYPE).train()
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(1, 3, 90, 76, generator=gen, dtype=DTYPE) * 4 + 2 for _ in range(2)]
    xs.append(torch.randn(2, 3, 64, 96, generator=gen, dtype=DTYPE))  # another size, batch 2
    want = reference(net, xs)
    assert tilefn.calibrate_batchnorm(net, xs, tile_size=40) is net
    assert net.training  # the mode is restored
    for (name, got), exp in zip(net.named_buffers(), want.buffers()):
        if "running" in name:
            torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-12, msg=name)
        else:  # num_batches_tracked is left alone
            assert int(got) == 0


def test_lazy_images_and_normalize() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)).to(DTYPE)
    rgb = np.random.default_rng(0).integers(0, 255, (80, 72, 3), dtype=np.uint8)
    image = tilefn.ArrayImage(rgb, "h w c")
    tilefn.calibrate_batchnorm(net, [image], tile_size=32, normalize=((0.5,), (0.25,)))
    x = (torch.from_numpy(rgb).permute(2, 0, 1)[None].to(DTYPE) / 255 - 0.5) / 0.25
    u = net[0](x).detach()
    torch.testing.assert_close(net[1].running_mean, u.mean((0, 2, 3)))
    torch.testing.assert_close(net[1].running_var, u.var((0, 2, 3)))


def test_no_images_is_an_error() -> None:
    with pytest.raises(tilefn.InputError, match="at least one image"):
        tilefn.calibrate_batchnorm(nn.BatchNorm2d(3), [], tile_size=32)


@pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning")
@pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec.*")
def test_a_saturated_first_step_warns_with_the_fix() -> None:
    L = pytest.importorskip("lightning")
    from torch.utils.data import DataLoader, TensorDataset

    from tilefn.lightning import StreamedModule

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    nn.init.constant_(conv.bias, -1e3)  # every ReLU off: the trunk gets no gradient at all
    trunk = nn.Sequential(conv, nn.ReLU())
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    module = StreamedModule(trunk, head, nn.functional.cross_entropy, tile_size=32)
    data = DataLoader(TensorDataset(torch.randn(1, 3, 48, 48), torch.tensor([1])), batch_size=1)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.warns(UserWarning, match=r"tilefn.calibrate_batchnorm\(trunk"):
        trainer.fit(module, data)
