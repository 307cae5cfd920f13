"""A streamed backbone under ordinary PyTorch compositions: exact against the plain model in
float64, or a typed ``TilefnError`` that names the cause, never a silently different result.

Each case here was silently wrong before: stale plans after an in-place edit,
``functional_call`` and ``torch.func`` transforms, double backward, forwards that depend on
the input size, and one model used from two threads.
"""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

import tilefn
import tilefn.testing

DTYPE = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)
    ).to(DTYPE)


def image(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def assert_exact(a, b, what: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_exact(a[k], b[k], f"{what}[{k}]")
        return
    assert a.shape == b.shape, what
    assert rel(a, b) < 1e-10, f"{what}: rel error {rel(a, b):.3g}"


X = image(1, 1, 96, 96)  # 16 crops of tile 32


# --------------------------------------------------------------------------- stale plans
def test_replacing_a_layer_replans() -> None:
    net = make_net()
    backbone, _ = tilefn.streamify(net, 32)
    backbone(X)
    net[2] = nn.Conv2d(4, 4, 15, padding=7).to(DTYPE)
    with torch.no_grad():
        assert_exact(backbone(X), net(X))


def test_editing_hyperparameters_in_place_replans() -> None:
    net = make_net()
    backbone, _ = tilefn.streamify(net, 32)
    backbone(X)
    net[0].dilation, net[0].padding = (2, 2), (2, 2)
    with torch.no_grad():
        assert_exact(backbone(X), net(X))
    net.eval()  # train/eval flags are part of what decides on reuse, too
    with torch.no_grad():
        assert_exact(backbone(X), net(X))


# --------------------------------------------------------------------------- functional_call
def _params(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().requires_grad_() for k, v in net.named_parameters()}


def test_functional_call_differentiates_the_given_parameters() -> None:
    net = make_net()
    backbone, _ = tilefn.streamify(net, 32)
    p = _params(net)
    got = torch.autograd.grad(functional_call(backbone, p, (X,)).square().sum(), list(p.values()))
    want = torch.autograd.grad(functional_call(net, p, (X,)).square().sum(), list(p.values()))
    for g, w in zip(got, want):
        assert_exact(g, w)
    assert all(q.grad is None for q in net.parameters())


def test_parameters_replaced_between_forward_and_backward_do_not_leak_in() -> None:
    net, ref = make_net(), make_net()
    backbone, _ = tilefn.streamify(net, 32)
    out = backbone(X)
    net[0].weight = nn.Parameter(torch.randn_like(net[0].weight))  # after the forward
    out.square().sum().backward()
    ref(X).square().sum().backward()
    assert_exact(net[2].weight.grad, ref[2].weight.grad)


def test_weight_norm_parametrization_streams_exactly() -> None:
    torch.manual_seed(0)
    conv = nn.utils.parametrizations.weight_norm(nn.Conv2d(1, 4, 3, padding=1))
    net = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1)).to(DTYPE)
    tilefn.testing.assert_streams_like(net, X, 32)


# --------------------------------------------------------------------------- torch.func
def _loss(model: nn.Module):
    return lambda params: functional_call(model, params, (X,)).square().sum()


def test_torch_func_grad_and_grad_and_value_are_exact() -> None:
    net = make_net()
    backbone, _ = tilefn.streamify(net, 32)
    params = {k: v.detach() for k, v in net.named_parameters()}
    assert_exact(torch.func.grad(_loss(backbone))(params), torch.func.grad(_loss(net))(params))
    (g, v), (g_ref, v_ref) = (torch.func.grad_and_value(_loss(m))(params) for m in (backbone, net))
    assert_exact(g, g_ref)
    assert_exact(v, v_ref)


def test_torch_func_vjp_is_exact() -> None:
    net = make_net()
    backbone, _ = tilefn.streamify(net, 32)
    out, vjp_fn = torch.func.vjp(backbone, X)
    ref, ref_fn = torch.func.vjp(net, X)
    assert_exact(out, ref)
    c = image(*ref.shape, seed=5)
    assert_exact(vjp_fn(c)[0], ref_fn(c)[0])


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_forward_mode_and_vmap_are_refused_with_what_to_do() -> None:
    backbone, _ = tilefn.streamify(make_net(), 32)
    with pytest.raises(tilefn.TransformError, match=r"^streamify: forward-mode"):
        torch.func.jvp(backbone, (X,), (torch.ones_like(X),))
    with pytest.raises(tilefn.TransformError, match=r"^streamify: torch.func.vmap .*flatten"):
        torch.func.vmap(backbone)(X[None].expand(2, -1, -1, -1, -1))


def test_double_backward_is_refused() -> None:
    backbone, _ = tilefn.streamify(make_net(), 32)
    xs = X.clone().requires_grad_()
    (gx,) = torch.autograd.grad(backbone(xs).square().sum(), xs, create_graph=True)
    assert gx.requires_grad  # so that a penalty on it cannot silently lose its gradient
    with pytest.raises(tilefn.TransformError, match=r"^streamify: double backward"):
        gx.square().sum().backward()


def test_first_order_create_graph_still_gives_exact_gradients() -> None:
    net = make_net()
    backbone, _ = tilefn.streamify(net, 32)
    xs = X.clone().requires_grad_()
    (gx,) = torch.autograd.grad(backbone(xs).square().sum(), xs, create_graph=True)
    xr = X.clone().requires_grad_()
    (want,) = torch.autograd.grad(net(xr).square().sum(), xr)
    assert_exact(gx.detach(), want)


# --------------------------------------------------------------------------- size-dependent
class Branch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.a(t) if t.shape[-1] > 64 else self.b(t)


class ScaleBySize(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.a(t) / t.shape[-2]


@pytest.mark.parametrize(
    "model, layer",
    [(Branch(), r"layer 'a' \(Conv2d\).*layer 'b' \(Conv2d\)"), (ScaleBySize(), r"aten.div")],
    ids=["branch-on-size", "scale-by-size"],
)
def test_forwards_that_depend_on_the_size_are_refused(model: nn.Module, layer: str) -> None:
    backbone, _ = tilefn.streamify(model.to(DTYPE), 32)
    with pytest.raises(
        tilefn.PlanError, match=rf"^streamify: the model runs different ops(?s:.*){layer}"
    ):
        backbone(X)


# --------------------------------------------------------------------------- threads
def _in_threads(fn, n: int = 2) -> list:
    results: list = [None] * n
    errors: list = []

    def run(k: int) -> None:
        try:
            results[k] = fn(k)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def _batchnorm_net() -> nn.Module:
    """conv -> BatchNorm (random running statistics) -> ReLU, in train mode."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).to(DTYPE)
    with torch.no_grad():
        net[1].running_mean.normal_()
        net[1].running_var.uniform_(0.5, 2.0)
    return net.train()


def test_one_batchnorm_model_in_two_threads() -> None:
    net = _batchnorm_net()
    net.train()
    backbone, _ = tilefn.streamify(net, 32)
    net.eval()
    with torch.no_grad():
        want = net(X)
    net.train()

    def step(k: int) -> torch.Tensor:
        outs = []
        for _ in range(5):
            with torch.no_grad():
                outs.append(backbone(X))
        return torch.stack(outs)

    seen: list[bool] = []
    net[1].register_forward_hook(lambda m, i, o: seen.append(m.training))
    for outs in _in_threads(step):
        for out in outs:
            assert_exact(out, want)
    assert all(m.training for m in net.modules())
    assert seen and all(seen)  # streaming forwards never switched the module to eval


def test_one_batchnorm_model_trained_from_two_threads() -> None:
    net = _batchnorm_net()
    backbone, _ = tilefn.streamify(net.train(), 32)
    ref = nn.Sequential(*[m for m in net]).eval()  # same modules, eval semantics
    xs = [image(1, 1, 96, 96, seed=k) for k in range(2)]
    want = []
    for x in xs:
        net.eval()
        grads = torch.autograd.grad(ref(x).square().sum(), list(net.parameters()))
        want.append(grads)
    net.train()

    def step(k: int) -> list:
        got = []
        for _ in range(3):
            out = backbone(xs[k])
            got.append(torch.autograd.grad(out.square().sum(), list(net.parameters())))
        return got

    for k, got in enumerate(_in_threads(step)):
        for grads in got:
            for g, w in zip(grads, want[k]):
                assert_exact(g, w)


def _dropout_step(net: nn.Module, backbone: nn.Module) -> float:
    """One streamed step of ``conv -> Dropout2d``; the error of the conv weight gradient
    against the plain conv with the channels the streamed forward dropped (Dropout2d zeroes
    whole channels, so the stitched output shows which)."""
    out = backbone(X)
    out.square().sum().backward()
    got = net[0].weight.grad.clone()
    net.zero_grad()
    kept = (out.detach().abs().sum((2, 3)) > 0).to(DTYPE)[..., None, None] * 2.0
    (net[0](X) * kept).square().sum().backward()
    err = rel(got, net[0].weight.grad)
    net.zero_grad()
    return err


def _dropout_net() -> tuple[nn.Module, nn.Module]:
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Dropout2d(0.5)).to(DTYPE).train()
    return net, tilefn.streamify(net, 32).backbone


def test_random_models_in_two_threads_replay_their_draws_exactly() -> None:
    torch.manual_seed(0)
    nets = [_dropout_net() for _ in range(2)]
    errors = _in_threads(lambda k: max(_dropout_step(*nets[k]) for _ in range(6)))
    assert max(errors) < 1e-10


def test_a_thread_that_reseeds_meanwhile_is_caught_not_mixed_in() -> None:
    """Another thread using the global RNG in the middle of a streamed pass of a random
    model: each step is exact or raises a typed error, never a silently mixed result."""
    net, backbone = _dropout_net()
    stop = threading.Event()

    def reseed(_: int) -> None:
        while not stop.is_set():
            torch.manual_seed(1)

    def stream(_: int) -> list:
        results = []
        try:
            for _ in range(8):
                try:
                    results.append(_dropout_step(net, backbone))
                except tilefn.PlanError as e:
                    assert "random number generator changed" in str(e)
                    results.append(None)
                    net.zero_grad()
        finally:
            stop.set()
        return results

    results = _in_threads(lambda k: stream(k) if k == 0 else reseed(k))[0]
    assert all(r is None or r < 1e-10 for r in results), results


# --------------------------------------------------------------------------- properties
@settings(max_examples=15, deadline=None)
@given(
    kernels=st.lists(st.sampled_from([1, 3, 5]), min_size=1, max_size=3),
    dilation=st.integers(1, 2),
    stride=st.integers(1, 2),
    size=st.integers(40, 70),
    tile=st.integers(24, 48),
    edit=st.sampled_from(["none", "hook", "dilate", "replace"]),
)
def test_random_nets_under_torch_func_grad_after_edits(
    kernels, dilation, stride, size, tile, edit
) -> None:
    """Random conv nets: stream once, edit the model (a forward hook, an in-place change of
    dilation and padding, a replaced layer), then ``torch.func.grad`` through
    ``functional_call`` of the streamed backbone equals the plain model's."""
    torch.manual_seed(size + tile)
    layers: list[nn.Module] = []
    cin = 1
    for i, k in enumerate(kernels):
        s = stride if i == 0 else 1
        layers += [nn.Conv2d(cin, 3, k, stride=s, padding=dilation * (k // 2), dilation=dilation)]
        layers += [nn.Tanh()]
        cin = 3
    net = nn.Sequential(*layers).to(DTYPE)
    x = image(1, 1, size, size + 3)
    backbone, _ = tilefn.streamify(net, tile)
    try:
        backbone.plan(x.shape)
    except tilefn.TileSizeError:
        return  # tile below the receptive field: refused with the minimum (tested elsewhere)
    with torch.no_grad():
        backbone(x)
    last = len(layers) - 2  # the last conv
    if edit == "hook":
        net[0].register_forward_hook(lambda m, i, o: o * 1.5)
    elif edit == "dilate":
        conv = net[last]
        conv.dilation = (conv.dilation[0] + 1,) * 2
        conv.padding = (conv.dilation[0] * (conv.kernel_size[0] // 2),) * 2
    elif edit == "replace":
        net[last] = nn.Conv2d(net[last].in_channels, 3, 3, padding=1).to(DTYPE)
    params = {k: v.detach() for k, v in net.named_parameters()}
    loss = lambda m: lambda p: functional_call(m, p, (x,)).square().sum()
    try:
        got = torch.func.grad(loss(backbone))(params)
    except tilefn.TileSizeError:
        return  # the edit grew the receptive field beyond the tile: refused, not wrong
    assert_exact(got, torch.func.grad(loss(net))(params))


# --------------------------------------------------------------------------- clear errors
def test_lazy_modules_are_refused_until_initialised() -> None:
    net = nn.Sequential(nn.LazyConv2d(4, 3, padding=1), nn.ReLU()).to(DTYPE)
    backbone, _ = tilefn.streamify(net, 32)
    with pytest.raises(
        tilefn.UnsupportedLayerError,
        match=r"^streamify: layer '0' \(LazyConv2d\) has uninitialised",
    ):
        backbone(X)
    net(X[..., :16, :16])  # initialises the lazy layer
    with torch.no_grad():
        assert_exact(backbone(X), net(X))


def test_wrong_channels_and_unbatched_inputs_name_the_layer() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU()).to(DTYPE)
    backbone, _ = tilefn.streamify(net, 32)
    with pytest.raises(
        tilefn.InputError,
        match=r"layer '0' \(Conv2d\) expects 3 input channels, but the input of shape \(1, 2, 64, 64\) has 2",
    ):
        backbone(image(1, 2, 64, 64))
    with pytest.raises(tilefn.InputError, match=r"2-d convolution.*backbone\(x\[None\]\)"):
        backbone(image(3, 64, 64))  # (C, H, W): not read as a batch of 1-d signals
    deep = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(5, 4, 3)).to(DTYPE)
    with pytest.raises(
        tilefn.TraceError, match=r"^streamify: layer '1' \(Conv2d\) fails on the input"
    ):
        tilefn.streamify(deep, 32).backbone(X)


def test_inputs_and_models_on_unexpected_devices_are_named() -> None:
    net = make_net()
    backbone, _ = tilefn.streamify(net, 32)
    with pytest.raises(tilefn.InputError, match=r"input is on the meta device"):
        backbone(X.to("meta"))
    net.to("meta")
    with pytest.raises(tilefn.InputError, match=r"parameter '0.weight' is on meta"):
        tilefn.streamify(net, 32, device="cpu").backbone(X)


def test_normalize_must_match_the_channels() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)).to(DTYPE)
    backbone, _ = tilefn.streamify(net, 32, normalize=([0.5, 0.5], [0.2, 0.2]))
    with pytest.raises(
        tilefn.InputError, match=r"normalize has 2 mean values, but the input .* has 3 channels"
    ):
        backbone(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_integer_like_options_are_accepted() -> None:
    np = pytest.importorskip("numpy")
    net = make_net()
    backbone, _ = tilefn.streamify(net, np.int64(32), crop_batch=np.int64(2))
    with torch.no_grad():
        assert_exact(backbone(X), net(X))
    assert tilefn.plan(net, X.shape, (np.int32(32), 48)).tile_size == (32, 48)


def test_complex_cotangents_are_refused() -> None:
    _, streamed_vjp = tilefn.streamify(make_net(), 32)
    with pytest.raises(tilefn.InputTypeError, match=r"cotangent 0 is complex"):
        streamed_vjp(X, torch.zeros(1, 4, 96, 96, dtype=torch.complex128))


def test_torch_compile_of_the_backbone_streams_eagerly_and_exactly() -> None:
    net = make_net()
    backbone, _ = tilefn.streamify(net, 32)
    backbone(X)
    compiled = torch.compile(backbone)
    with torch.no_grad():
        assert_exact(compiled(X), net(X))
        assert_exact(compiled(X), net(X))


def test_collate_keeps_lazy_images_lazy() -> None:
    np = pytest.importorskip("numpy")
    slide = tilefn.ArrayImage(np.zeros((40, 30), np.float32), "h w")
    image_, target = tilefn.collate([(slide, 3)])
    assert image_ is slide and target.tolist() == [3]
    assert tilefn.collate([{"image": slide, "target": 1}])["image"] is slide
    with pytest.raises(tilefn.InputError, match=r"batch_size=1"):
        tilefn.collate([(slide, 1), (slide, 2)])
    tensors = tilefn.collate([(torch.zeros(1, 2, 2), 0), (torch.ones(1, 2, 2), 1)])
    assert tensors[0].shape == (2, 1, 2, 2)
