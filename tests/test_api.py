"""The public API of tilefn behaves like a drop-in nn.Module plus a torch.func-style vjp."""

from __future__ import annotations

import copy
import subprocess
import sys
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import tilefn
import tilefn.testing

DTYPE = torch.float64
TOL = {"rtol": 0.0, "atol": 1e-10}


def make_model(seed: int = 0, dtype: torch.dtype = DTYPE) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 6, 3, padding=1, groups=2),
        nn.GELU(),
        nn.Conv2d(6, 4, 3, stride=2, padding=1),
    ).to(dtype)
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.normal_()
        model[1].bias.normal_()
    return model.eval()


def image(*shape: int, dtype: torch.dtype = DTYPE, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def reference(
    model: nn.Module, x: torch.Tensor, cot: Any
) -> tuple[Any, dict[str, torch.Tensor], torch.Tensor]:
    xr = x.detach().clone().requires_grad_(True)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out = model(xr)
    dot = sum(
        (o * c).sum() for o, c in zip(pytree.tree_leaves(out), pytree.tree_leaves(cot), strict=True)
    )
    grads = torch.autograd.grad(dot, [p for _, p in named] + [xr], allow_unused=True)
    pg = {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named, grads[:-1])}
    out = pytree.tree_map(lambda t: t.detach(), out)
    return out, pg, grads[-1]


def assert_grads(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected), (list(actual), list(expected))
    for name, g in expected.items():
        scale = max(g.abs().max().item(), 1.0)
        torch.testing.assert_close(
            actual[name], g, rtol=0, atol=1e-10 * scale, msg=lambda m, n=name: f"{n}: {m}"
        )


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- Streamed
def test_streamed_namedtuple() -> None:
    model = make_model()
    s = tilefn.streamify(model, 16)
    assert isinstance(s, tilefn.Streamed) and isinstance(s, tuple)
    assert s._fields == ("backbone", "vjp")
    backbone, streamed_vjp = s
    assert backbone is s.backbone is s[0]
    assert streamed_vjp is s.vjp is s[1]
    assert callable(streamed_vjp)
    assert isinstance(backbone, nn.Module)
    assert backbone.model is model


def test_forward_and_vjp_exact() -> None:
    model, x = make_model(), image(2, 3, 64, 56)
    backbone, streamed_vjp = tilefn.streamify(model, 24, saliency=True)
    out = backbone(x)
    cot = image(*out.shape, seed=2)
    ref_out, ref_pg, ref_gx = reference(model, x, cot)
    torch.testing.assert_close(out, ref_out, **TOL)
    pg, gx = streamed_vjp(x, cot)
    assert_grads(pg, ref_pg)
    torch.testing.assert_close(gx, ref_gx, **TOL)


def test_no_saliency_gives_none() -> None:
    model, x = make_model(), image(1, 3, 40, 40)
    _, streamed_vjp = tilefn.streamify(model, 24)
    pg, gx = streamed_vjp(x, torch.ones(1, 4, 10, 10, dtype=DTYPE))
    assert gx is None
    assert set(pg) == {n for n, _ in model.named_parameters()}


def test_frozen_params_are_excluded() -> None:
    model, x = make_model(), image(1, 3, 40, 40)
    model[0].weight.requires_grad_(False)
    model[1].bias.requires_grad_(False)
    backbone, streamed_vjp = tilefn.streamify(model, 24)
    cot = torch.ones(1, 4, 10, 10, dtype=DTYPE)
    pg, _ = streamed_vjp(x, cot)
    _, ref_pg, _ = reference(model, x, cot)
    assert "0.weight" not in pg and "1.bias" not in pg
    assert_grads(pg, ref_pg)
    (backbone(x) * cot).sum().backward()
    assert model[0].weight.grad is None and model[1].bias.grad is None
    torch.testing.assert_close(model[4].weight.grad, ref_pg["4.weight"], **TOL)


# --------------------------------------------------------------------------- nn.Module behaviour
def test_backbone_shares_parameters() -> None:
    model = make_model()
    backbone, _ = tilefn.streamify(model, 16)
    assert [id(p) for p in backbone.parameters()] == [id(p) for p in model.parameters()]
    assert [n for n, _ in backbone.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert [id(b) for b in backbone.buffers()] == [id(b) for b in model.buffers()]


def test_backward_through_backbone_and_optimizer_step() -> None:
    model, x = make_model(), image(2, 3, 48, 48)
    backbone, _ = tilefn.streamify(model, 24)
    x = x.requires_grad_(True)
    out = backbone(x)
    assert out.requires_grad
    cot = image(*out.shape, seed=3)
    (out * cot).sum().backward()
    _, ref_pg, ref_gx = reference(model, x, cot)
    assert_grads({n: p.grad for n, p in model.named_parameters()}, ref_pg)
    torch.testing.assert_close(x.grad, ref_gx, **TOL)

    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    # the backbone sees the new weights (no stale copy, no stale plan)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), model(x), **TOL)


def test_forward_under_no_grad() -> None:
    model, x = make_model(), image(1, 3, 48, 48)
    backbone, _ = tilefn.streamify(model, 24)
    with torch.no_grad():
        out = backbone(x)
    assert out.grad_fn is None and not out.requires_grad
    torch.testing.assert_close(out, model(x).detach(), **TOL)


def test_state_dict_roundtrip() -> None:
    model, other, x = make_model(0), make_model(5), image(1, 3, 48, 48)
    backbone, _ = tilefn.streamify(model, 24)
    assert list(backbone.state_dict()) == list(model.state_dict())
    backbone.load_state_dict(other.state_dict())
    for (n, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), n
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), other(x), **TOL)


def test_train_eval_toggle_model() -> None:
    model = make_model()
    backbone, _ = tilefn.streamify(model, 16)
    assert backbone.train() is backbone
    assert model.training and all(m.training for m in model.modules())
    assert backbone.eval() is backbone
    assert not model.training and not any(m.training for m in model.modules())
    backbone.train(True)
    assert model.training and backbone.training


def test_to_float64() -> None:
    model = make_model(dtype=torch.float32)
    backbone, _ = tilefn.streamify(model, 24)
    assert backbone.to(torch.float64) is backbone
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert all(b.dtype == torch.float64 for b in model.buffers() if b.is_floating_point())
    x = image(1, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), model(x), **TOL)


def test_batchnorm_uses_running_stats_in_train_mode() -> None:
    model, x = make_model(), image(2, 3, 48, 48)
    ref_model = copy.deepcopy(model).eval()
    backbone, streamed_vjp = tilefn.streamify(model, 24)
    backbone.train()
    stats = {n: b.clone() for n, b in model.named_buffers()}
    out = backbone(x)
    cot = image(*out.shape, seed=4)
    pg, _ = streamed_vjp(x, cot)
    (out * cot).sum().backward()
    ref_out, ref_pg, _ = reference(ref_model, x, cot)
    torch.testing.assert_close(out.detach(), ref_out, **TOL)
    assert_grads(pg, ref_pg)
    assert_grads({n: p.grad for n, p in model.named_parameters()}, ref_pg)
    for n, b in model.named_buffers():
        assert torch.equal(b, stats[n]), f"buffer {n} changed by streaming"
    assert model.training


# --------------------------------------------------------------------------- packaging
def test_import_does_not_import_lightning() -> None:
    code = (
        "import sys, tilefn\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------- options
def test_deterministic_bit_identical() -> None:
    model, x = make_model(), image(2, 3, 64, 64)
    backbone, streamed_vjp = tilefn.streamify(model, 24, deterministic=True, saliency=True)
    cot = image(2, 4, 16, 16, seed=5)
    pg1, gx1 = streamed_vjp(x, cot)
    pg2, gx2 = streamed_vjp(x, cot)
    assert torch.equal(gx1, gx2)
    for n in pg1:
        assert torch.equal(pg1[n], pg2[n]), n
    out1, out2 = backbone(x), backbone(x)
    assert torch.equal(out1, out2)
    grads = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        (backbone(x) * cot).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _normalized(x: torch.Tensor) -> torch.Tensor:
    xf = x.to(DTYPE)
    if x.dtype == torch.uint8:
        xf = xf / 255
    mean = torch.tensor(MEAN, dtype=DTYPE).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=DTYPE).view(1, 3, 1, 1)
    return (xf - mean) / std


def test_normalize_uint8() -> None:
    model = make_model()
    x = torch.randint(
        0, 256, (2, 3, 64, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    backbone, streamed_vjp = tilefn.streamify(model, 24, normalize=(MEAN, STD))
    out = backbone(x)
    cot = image(*out.shape, seed=6)
    ref_out, ref_pg, _ = reference(model, _normalized(x), cot)
    torch.testing.assert_close(out, ref_out, **TOL)
    pg, _ = streamed_vjp(x, cot)
    assert_grads(pg, ref_pg)
    assert x.dtype == torch.uint8  # the input is not converted in place


def test_normalize_float_input_is_not_divided() -> None:
    model = make_model()
    x = image(1, 3, 48, 48) * 3
    backbone, streamed_vjp = tilefn.streamify(model, 24, normalize=(MEAN, STD), saliency=True)
    cot = torch.ones(1, 4, 12, 12, dtype=DTYPE)
    xn = _normalized(x).requires_grad_(True)
    torch.testing.assert_close(backbone(x), model(xn).detach(), **TOL)
    pg, gx = streamed_vjp(x, cot)
    _, ref_pg, _ = reference(model, _normalized(x), cot)
    assert_grads(pg, ref_pg)
    # d/dx of <cot, model((x - mean) / std)> = grad_xn / std
    (g_xn,) = torch.autograd.grad(model(xn), xn, cot)
    torch.testing.assert_close(gx, g_xn / torch.tensor(STD, dtype=DTYPE).view(1, 3, 1, 1), **TOL)


class Pyramid(nn.Module):
    """A trunk returning maps at strides 2, 4 and 8 as a tuple, list or dict."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.c1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(4, 5, 3, stride=2, padding=1)
        self.c3 = nn.Conv2d(5, 6, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> Any:
        a = torch.relu(self.c1(x))
        b = torch.relu(self.c2(a))
        c = self.c3(b)
        if self.kind == "tuple":
            return a, b, c
        if self.kind == "list":
            return [a, c]
        return {"p4": b, "p8": c, "p2": a}


@pytest.mark.parametrize("kind", ["tuple", "list", "dict"])
def test_multi_output_structure(kind: str) -> None:
    torch.manual_seed(0)
    model = Pyramid(kind).to(DTYPE).eval()
    x = image(2, 3, 72, 64)
    backbone, streamed_vjp = tilefn.streamify(model, 32, saliency=True)
    out = backbone(x)
    ref_struct = model(x)
    assert type(out) is type(ref_struct)
    if kind == "dict":
        assert list(out) == list(ref_struct)
    assert pytree.tree_structure(out) == pytree.tree_structure(ref_struct)
    cot = pytree.tree_map(lambda t: image(*t.shape, seed=t.shape[1]), ref_struct)
    ref_out, ref_pg, ref_gx = reference(model, x, cot)
    for a, e in zip(pytree.tree_leaves(out), pytree.tree_leaves(ref_out), strict=True):
        torch.testing.assert_close(a, e, **TOL)
    pg, gx = streamed_vjp(x, cot)
    assert_grads(pg, ref_pg)
    torch.testing.assert_close(gx, ref_gx, **TOL)
    # differentiable through the backbone as well
    dot = sum((o * c).sum() for o, c in zip(pytree.tree_leaves(out), pytree.tree_leaves(cot)))
    dot.backward()
    assert_grads({n: p.grad for n, p in model.named_parameters()}, ref_pg)


def test_verbose_runs(capfd: pytest.CaptureFixture[str]) -> None:
    model, x = make_model(), image(1, 3, 64, 64)
    backbone, streamed_vjp = tilefn.streamify(model, 24, verbose=True, saliency=True)
    out = backbone(x)
    streamed_vjp(x, torch.ones_like(out))
    torch.testing.assert_close(out, model(x).detach(), **TOL)
    captured = capfd.readouterr()
    assert (captured.err + captured.out).strip(), "verbose=True printed nothing"


def test_device_option_cpu() -> None:
    model, x = make_model(), image(1, 3, 48, 48)
    backbone, _ = tilefn.streamify(model, 24, device="cpu")
    torch.testing.assert_close(backbone(x), model(x).detach(), **TOL)


def test_device_option_is_where_crops_are_computed() -> None:
    """Crops go to ``device=``, not to the device of the parameters: with the model on the
    CPU, ``device="meta"`` is refused because the parameters are not there, and with the model
    on meta, ``device="cpu"`` is; without the option the parameters' device is used."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 4, 4)).double()
    x = image(1, 3, 48, 48)
    backbone, _ = tilefn.streamify(model, 24, device="meta")
    with pytest.raises(
        tilefn.InputError, match=r"parameter '0.weight' is on cpu, but crops are computed on meta"
    ):
        backbone(x)
    model.to("meta")
    backbone, _ = tilefn.streamify(model, 24, device="cpu")
    with pytest.raises(tilefn.InputError, match=r"is on meta, but crops are computed on cpu"):
        backbone(x)
    default, _ = tilefn.streamify(model, 24)
    with torch.no_grad():
        out = default(x)  # crops follow the (meta) parameters; the image stays on the CPU
    assert out.device.type == "meta" and out.shape == (1, 4, 12, 12)


def test_vjp_does_not_touch_grad() -> None:
    model, x = make_model(), image(1, 3, 48, 48)
    _, streamed_vjp = tilefn.streamify(model, 24, saliency=True)
    cot = torch.ones(1, 4, 12, 12, dtype=DTYPE)
    streamed_vjp(x, cot)
    assert all(p.grad is None for p in model.parameters())
    sentinels = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, s in zip(model.parameters(), sentinels):
        p.grad = s
    xg = x.clone().requires_grad_(True)
    streamed_vjp(xg, cot)
    assert all(
        p.grad is s and bool((s == 7.0).all()) for p, s in zip(model.parameters(), sentinels)
    )
    assert xg.grad is None


def test_assert_streams_like() -> None:
    import tilefn.testing

    model, x = make_model(), image(1, 3, 48, 40)
    tilefn.testing.assert_streams_like(model, x, 24)
    tilefn.testing.assert_streams_like(model, x, (24, 16), rtol=0, atol=1e-10)


def test_first_call_under_inference_mode_plans_and_matches():
    """Lightning's validation and predict loops run under torch.inference_mode: planning a
    new input shape there must still see every op (composite ops are not decomposed there)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, stride=2), torch.nn.ReLU()).double()
    backbone, _ = tilefn.streamify(net, tile_size=24)
    x = torch.randn(1, 1, 61, 53, dtype=torch.float64)
    with torch.inference_mode():
        got = backbone(x)
        want = net(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_assert_streams_like_on_a_checkpointed_model_with_batchnorm_in_train_mode():
    """The reference backward recomputes checkpointed blocks; BatchNorm must stay on running
    statistics there too (it did not: CheckpointError)."""
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            return checkpoint(lambda t: self.bn(self.conv(t)), x, use_reentrant=False)

    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    tilefn.testing.assert_streams_like(Net().double().train(), x, 16)
