"""The Lightning adapter: gradients, accumulation, clipping, schedulers, frozen trunk, mixed
precision, checkpoints, DDP, against a plain PyTorch reference."""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

L = pytest.importorskip("lightning")
torchmetrics = pytest.importorskip("torchmetrics")

import tilefn  # noqa: E402
from tilefn.lightning import StreamedModule  # noqa: E402

# Lightning's advice (dataloader workers, logging intervals, no val loop) is noise here.
pytestmark = [
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec.*:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:.*isinstance.treespec, LeafSpec.*:FutureWarning"),
]

TILE = 40


def make_trunk(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 6, 3, padding=1),
    ).to(dtype)


def make_head(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).to(dtype)


def make_data(n=4, size=72, dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 2, size, size, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def loader(x, y, batch_size=1):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def trainer(**kw) -> L.Trainer:
    opts = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    opts.update(kw)
    return L.Trainer(**opts)


class Recording(StreamedModule):
    """Records the gradients each optimizer step sees (after clipping), and the trunk mode."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.seen_grads: list[dict[str, torch.Tensor]] = []
        self.trunk_training: list[bool] = []

    def training_step(self, batch, batch_idx):
        self.trunk_training.append(self.trunk.model.training)
        return super().training_step(batch, batch_idx)

    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        self.seen_grads.append(
            {n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None}
        )


def plain_grads(trunk, head, x, y, loss_fn=nn.functional.cross_entropy):
    """Reference: the plain model (BatchNorm on running statistics, as in the streamed trunk)."""
    trunk, head = copy.deepcopy(trunk), copy.deepcopy(head)
    trunk.eval()
    loss = loss_fn(head(trunk(x)), y)
    loss.backward()
    grads = {f"trunk.{n}": p.grad for n, p in trunk.named_parameters()}
    grads.update({f"head.{n}": p.grad for n, p in head.named_parameters()})
    return grads


def assert_grads_close(got, want, rtol=1e-10):
    assert set(got) == set(want)
    for name in want:
        err = (got[name] - want[name]).abs().max() / want[name].abs().max().clamp_min(1e-30)
        assert err < rtol, f"{name}: relative error {err:.2e}"


def sgd(lr=0.1):
    return functools.partial(torch.optim.SGD, lr=lr)


def test_one_step_gradients_equal_the_plain_model():
    trunk, head = make_trunk(), make_head()
    x, y = make_data(n=1)
    want = plain_grads(trunk, head, x, y)
    module = Recording(trunk, head, nn.functional.cross_entropy, tile_size=TILE, optimizer=sgd())
    assert module.trunk.plan(x.shape).n_tiles > 1  # really streamed
    trainer(max_steps=1).fit(module, loader(x, y))
    assert len(module.seen_grads) == 1
    assert_grads_close(module.seen_grads[0], want)


def test_accumulation_matches_a_plain_loop_including_the_partial_group():
    trunk, head = make_trunk(), make_head()
    x, y = make_data(n=3)
    ref_trunk, ref_head = copy.deepcopy(trunk).eval(), copy.deepcopy(head)
    params = list(ref_trunk.parameters()) + list(ref_head.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    for group in ([0, 1], [2]):  # k = 2: one full group, then the partial group at epoch end
        for i in group:
            loss = nn.functional.cross_entropy(ref_head(ref_trunk(x[i : i + 1])), y[i : i + 1])
            (loss / 2).backward()
        opt.step()
        opt.zero_grad()

    module = Recording(
        trunk,
        head,
        nn.functional.cross_entropy,
        tile_size=TILE,
        optimizer=sgd(),
        accumulate_grad_batches=2,
    )
    trainer(max_epochs=1).fit(module, loader(x, y))
    assert len(module.seen_grads) == 2
    for got, want in zip(module.trunk.model.parameters(), ref_trunk.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for got, want in zip(module.head.parameters(), ref_head.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping(algorithm):
    trunk, head = make_trunk(), make_head()
    x, y = make_data(n=1)
    want = plain_grads(trunk, head, x, y)
    clip = 1e-3
    module = Recording(
        trunk,
        head,
        nn.functional.cross_entropy,
        tile_size=TILE,
        optimizer=sgd(),
        gradient_clip_val=clip,
        gradient_clip_algorithm=algorithm,
    )
    trainer(max_steps=1).fit(module, loader(x, y))
    got = module.seen_grads[0]
    if algorithm == "norm":
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in got.values()]))
        want_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in want.values()]))
        assert want_norm > 10 * clip  # clipping really happened
        assert abs(norm - clip) < 1e-9
        assert_grads_close(got, {n: g * (clip / want_norm) for n, g in want.items()}, rtol=1e-6)
    else:
        assert max(g.abs().max() for g in got.values()) <= clip
        assert_grads_close(got, {n: g.clamp(-clip, clip) for n, g in want.items()})


@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_lr_schedulers_are_stepped(interval):
    x, y = make_data(n=4)

    def scheduler(opt):
        return {
            "scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5),
            "interval": interval,
        }

    module = StreamedModule(
        make_trunk(),
        make_head(),
        nn.functional.cross_entropy,
        tile_size=TILE,
        optimizer=sgd(0.1),
        lr_scheduler=scheduler,
        accumulate_grad_batches=2,
    )
    trainer(max_epochs=3).fit(module, loader(x, y))
    steps = 3 * 2 if interval == "step" else 3  # 2 optimizer steps per epoch
    lr = module.optimizers().param_groups[0]["lr"]
    assert lr == pytest.approx(0.1 * 0.5**steps)


def test_reduce_lr_on_plateau_with_monitor():
    x, y = make_data(n=2)

    def scheduler(opt):
        s = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5, threshold=10)
        return {"scheduler": s, "monitor": "val_loss"}

    module = StreamedModule(
        make_trunk(),
        make_head(),
        nn.functional.cross_entropy,
        tile_size=TILE,
        optimizer=sgd(0.1),
        lr_scheduler=scheduler,
    )
    trainer(max_epochs=3).fit(module, loader(x, y), loader(x, y))
    # A relative threshold of 10 means no epoch counts as an improvement (not even the first,
    # against best = inf), so each of the 3 epochs halves the rate; step(None) would raise.
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


def test_frozen_trunk_trains_the_head_only():
    trunk, head = make_trunk(), make_head()
    trunk.train()
    before_trunk = copy.deepcopy(trunk.state_dict())
    before_head = copy.deepcopy(head.state_dict())
    x, y = make_data(n=2)
    module = Recording(
        trunk,
        head,
        nn.functional.cross_entropy,
        tile_size=TILE,
        optimizer=sgd(),
        freeze_trunk=True,
    )
    trainer(max_epochs=1).fit(module, loader(x, y), loader(x, y))
    assert module.trunk_training == [False, False]  # the trunk stayed in eval mode
    assert all(set(g) == {"head.2.weight", "head.2.bias"} for g in module.seen_grads)
    for k, v in trunk.state_dict().items():
        assert torch.equal(v, before_trunk[k]), k
    assert not torch.equal(head.state_dict()["2.weight"], before_head["2.weight"])
    with torch.enable_grad():  # no crop graphs: the trunk output is not part of any graph
        assert module.trunk(x[:1]).grad_fn is None


def test_metrics_and_losses_are_logged_per_stage():
    x, y = make_data(n=4)
    module = StreamedModule(
        make_trunk(),
        make_head(),
        nn.functional.cross_entropy,
        tile_size=TILE,
        metrics={"acc": torchmetrics.Accuracy(task="multiclass", num_classes=3)},
    )
    t = trainer(max_epochs=1)
    t.fit(module, loader(x, y), loader(x, y))
    logged = t.callback_metrics
    for key in ("train_loss_epoch", "val_loss", "train_acc", "val_acc"):
        assert key in logged, sorted(logged)
    (result,) = t.test(module, loader(x, y), verbose=False)
    assert set(result) == {"test_loss", "test_acc"}
    # The logged validation loss is the plain model's mean loss.
    with torch.no_grad():
        ref = nn.functional.cross_entropy(module.head(module.trunk.model.eval()(x)), y)
    assert result["test_loss"] == pytest.approx(ref.item(), rel=1e-6)


def test_predict_returns_the_head_output():
    trunk, head = make_trunk(), make_head()
    x, _ = make_data(n=3)
    module = StreamedModule(trunk, head, nn.functional.cross_entropy, tile_size=TILE)
    preds = trainer().predict(module, DataLoader(TensorDataset(x), batch_size=2))
    with torch.no_grad():
        want = head(trunk.eval()(x))
    torch.testing.assert_close(torch.cat(preds), want, rtol=1e-10, atol=1e-12)


class LazySlides(torch.utils.data.Dataset):
    """Images as lazy ArrayImages (numpy, read crop by crop), with or without targets."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None = None):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        image = tilefn.ArrayImage(self.x[i].numpy())  # (1, C, H, W) -> read as n c h w
        return image if self.y is None else (image, self.y[i])


def test_lazy_images_through_fit_validate_and_predict_with_tilefn_collate():
    trunk, head = make_trunk(), make_head()
    x, y = make_data(n=2)
    x = x[:, None]  # one (1, C, H, W) array per sample
    module = StreamedModule(trunk, head, nn.functional.cross_entropy, tile_size=TILE)
    collate = tilefn.collate
    train = DataLoader(LazySlides(x, y), batch_size=1, collate_fn=collate)
    trainer(max_epochs=1).fit(module, train, train)
    preds = trainer().predict(module, DataLoader(LazySlides(x), batch_size=1, collate_fn=collate))
    with torch.no_grad():
        want = torch.cat([module.head(module.trunk.model.eval()(xi)) for xi in x])
    torch.testing.assert_close(torch.cat(preds), want, rtol=1e-10, atol=1e-12)


def test_bf16_mixed_precision_on_cpu():
    trunk, head = make_trunk(torch.float32), make_head(torch.float32)
    x, y = make_data(n=1, dtype=torch.float32)
    ref_trunk, ref_head = copy.deepcopy(trunk).eval(), copy.deepcopy(head)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(ref_head(ref_trunk(x)), y)
    loss.backward()
    want = {f"trunk.{n}": p.grad for n, p in ref_trunk.named_parameters()}
    want.update({f"head.{n}": p.grad for n, p in ref_head.named_parameters()})

    module = Recording(trunk, head, nn.functional.cross_entropy, tile_size=TILE, optimizer=sgd())
    outputs = []
    module.trunk.register_forward_hook(lambda m, i, o: outputs.append(o.dtype))
    trainer(max_steps=1, precision="bf16-mixed").fit(module, loader(x, y))
    assert outputs == [torch.bfloat16]  # the trunk really ran in bf16
    got = module.seen_grads[0]
    assert set(got) == set(want)
    for name in want:  # bf16 has 8 mantissa bits; crops round differently from the whole
        err = (got[name] - want[name]).abs().max() / want[name].abs().max()
        assert err < 3e-2, f"{name}: {err:.2e}"


def test_fp16_grad_scaler_unscales_before_clipping():
    """fp16 with a GradScaler (what precision="16-mixed" does on GPU), here on CPU: the
    gradients that clipping and the optimizer see are unscaled, and equal the plain model's."""
    from lightning.pytorch.plugins import MixedPrecision

    trunk, head = make_trunk(torch.float32), make_head(torch.float32)
    x, y = make_data(n=1, dtype=torch.float32)
    want = plain_grads(trunk, head, x, y)
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in want.values()]))
    scale = 2.0**12
    module = Recording(
        trunk,
        head,
        nn.functional.cross_entropy,
        tile_size=TILE,
        optimizer=sgd(),
        gradient_clip_val=float(10 * norm),  # far above the true norm, far below the scaled one
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    trainer(max_steps=1, plugins=[plugin]).fit(module, loader(x, y))
    got = module.seen_grads[0]
    for name in want:  # neither scaled (x 4096) nor clipped; fp16 rounding only
        err = (got[name] - want[name]).abs().max() / want[name].abs().max()
        assert err < 2e-2, f"{name}: {err:.2e}"


# Lightning asks for the ModelCheckpoint callback again when resuming; not needed here.
@pytest.mark.filterwarnings("ignore:Be aware that when using:UserWarning")
def test_checkpoint_resume_equals_an_uninterrupted_run(tmp_path):
    x, y = make_data(n=3)
    adam = functools.partial(torch.optim.Adam, lr=1e-2)

    def module():
        return StreamedModule(
            make_trunk(),
            make_head(),
            nn.functional.cross_entropy,
            tile_size=TILE,
            optimizer=adam,
        )

    straight = module()
    trainer(max_epochs=2).fit(straight, loader(x, y))

    first = module()
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer(max_epochs=1, enable_checkpointing=True, callbacks=[ckpt]).fit(first, loader(x, y))
    resumed = module()
    with torch.no_grad():  # start from different weights: the checkpoint must overwrite them
        for p in resumed.parameters():
            p.add_(1.0)
    trainer(max_epochs=2).fit(resumed, loader(x, y), ckpt_path=tmp_path / "last.ckpt")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    assert resumed.optimizers().state_dict()["state"][0]["step"] == 6  # Adam state restored

    loaded = StreamedModule.load_from_checkpoint(
        tmp_path / "last.ckpt",
        trunk=make_trunk(),
        head=make_head(),
        loss_fn=nn.functional.cross_entropy,
    )
    for (name, a), b in zip(first.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert loaded.trunk.tile_size == TILE


def test_plain_state_dict_loads_into_the_trunk():
    module = StreamedModule(make_trunk(), make_head(), nn.functional.cross_entropy, tile_size=TILE)
    plain = make_trunk()
    with torch.no_grad():
        for p in plain.parameters():
            p.mul_(-2.0)
    module.trunk.load_state_dict(plain.state_dict())
    x, _ = make_data(n=1)
    with torch.no_grad():
        torch.testing.assert_close(module.trunk(x), plain.eval()(x), rtol=1e-10, atol=1e-12)


def test_a_streamed_backbone_is_accepted_and_train_eval_switching_is_kept():
    backbone, _ = tilefn.streamify(make_trunk(), tile_size=TILE)
    module = StreamedModule(backbone, make_head(), nn.functional.cross_entropy)
    assert module.trunk is backbone
    module.eval()
    assert not backbone.model.training and not module.head.training
    module.train()
    assert backbone.model.training and module.head.training


def test_bad_arguments_raise_clear_errors():
    head, loss = make_head(), nn.functional.cross_entropy
    with pytest.raises(tilefn.OptionError, match="tile_size is required"):
        StreamedModule(make_trunk(), head, loss)
    backbone, _ = tilefn.streamify(make_trunk(), tile_size=TILE)
    with pytest.raises(tilefn.OptionError, match="already streamed"):
        StreamedModule(backbone, head, loss, tile_size=TILE, verbose=True)
    with pytest.raises(tilefn.OptionError, match="accumulate_grad_batches"):
        StreamedModule(make_trunk(), head, loss, tile_size=TILE, accumulate_grad_batches=0)
    with pytest.raises(tilefn.OptionError, match="gradient_clip_algorithm"):
        StreamedModule(make_trunk(), head, loss, tile_size=TILE, gradient_clip_algorithm="l2")
    with pytest.raises(tilefn.OptionError, match="head must be an nn.Module"):
        StreamedModule(make_trunk(), lambda f: f, loss, tile_size=TILE)
    with pytest.raises(tilefn.OptionError, match="metrics must be"):
        StreamedModule(make_trunk(), head, loss, tile_size=TILE, metrics="accuracy")
    with pytest.raises(tilefn.OptionError, match="valid options"):
        StreamedModule(make_trunk(), head, loss, tile_size=TILE, tile_cache=True)


DDP_SCRIPT = Path(__file__).with_name("lightning_ddp_worker.py")


@pytest.mark.parametrize("accumulate", [1, 2])
def test_ddp_two_processes_match_single_process_gradients(tmp_path, accumulate):
    """Trainer(devices=2, strategy="ddp") on CPU (gloo): after one optimizer step each rank
    holds the gradient of the mean loss over the global batch (2 images per accumulated
    batch), as one process would compute it."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(DDP_SCRIPT), str(tmp_path), str(accumulate)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sys.path.insert(0, str(DDP_SCRIPT.parent))
    try:
        import lightning_ddp_worker as worker
    finally:
        sys.path.pop(0)
    trunk, head = worker.make_trunk(), worker.make_head()
    x, y = worker.make_data()
    n = 2 * accumulate  # rank 0 reads images 0, 2; rank 1 reads 1, 3
    want = plain_grads(trunk, head, x[:n], y[:n])  # the mean loss over the global batch
    for rank in (0, 1):
        got = torch.load(tmp_path / f"grads_rank{rank}.pt")
        assert_grads_close(got, want)


def test_to_moves_the_trunk_with_the_module():
    """.to()/.double() on the LightningModule reach the streamed trunk's parameters (shared with
    the plain trunk), and the streamed forward follows them."""
    trunk, head = make_trunk(torch.float32), make_head(torch.float32)
    module = StreamedModule(trunk, head, nn.functional.cross_entropy, tile_size=TILE)
    module.double()
    assert all(p.dtype == torch.float64 for p in trunk.parameters())
    x, _ = make_data(n=1)
    with torch.no_grad():
        torch.testing.assert_close(module(x), head(trunk.eval()(x)), rtol=1e-12, atol=1e-12)


def test_batches_of_another_layout_need_unpack_batch():
    module = StreamedModule(make_trunk(), make_head(), nn.functional.cross_entropy, tile_size=TILE)
    with pytest.raises(tilefn.InputTypeError, match="Override unpack_batch"):
        module.unpack_batch(torch.zeros(1, 2, 8, 8))
    x, y = make_data(n=1)
    assert module.unpack_batch({"image": x, "target": y}) == (x, y)
