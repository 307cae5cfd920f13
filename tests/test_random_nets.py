"""Property tests: random CNNs stream exactly like the plain model (float64).

A hypothesis strategy draws a random list of layer specs (plain data, so a failing
case prints as a readable spec and shrinks well), builds the network from it and
checks, for a random image size, batch and tile size, that:

* either tilefn refuses with a ``TileSizeError`` for a tile below the minimum it
  states, and then the stated minimum works, or it streams;
* ``backbone(x)`` equals ``model(x)`` (to 1e-10 of the output's max abs value);
* ``streamed_vjp(x, c)`` (saliency=True) gives every parameter gradient and the
  input gradient of ``<c, model(x)>`` as computed by ``torch.autograd``.

The staged variants insert whole-image ops (squeeze-excitation, GroupNorm, a variance,
softmax attention pooling, pooling to bins) anywhere in such nets.

A second family checks ``tilefn.plan`` alone: crops lie inside the image, no crop
side exceeds the tile size, the overlap factor agrees with the crops.

Run the long variants with ``pytest -m slow tests/test_random_nets.py``.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st
from torch import nn

import tilefn

DTYPE = torch.float64
RTOL = 1e-10  # relative to the reference's max abs value

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
MAXPOOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
AVGPOOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
BATCHNORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
LINEAR_MODE = {1: "linear", 2: "bilinear", 3: "trilinear"}
# circular padding is left out on purpose: tilefn supports it only when every layer of the
# network wraps alike (see test_errors.py::test_circular_padding_streams_exactly).
PADDING_MODES = ["zeros", "reflect", "replicate"]

HEALTH = [HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large]
# The default (non-slow) runs shrink one failure per test only, which keeps a failing run
# within a few minutes; the slow variants report every distinct failure.
FAST = {"deadline": None, "suppress_health_check": HEALTH, "report_multiple_bugs": False}

# padding="same" with an even kernel makes torch warn about a padded copy; not our concern.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These nets and crops are tiny: one intra-op thread is faster, and much faster on a
    loaded machine, where OpenMP barriers between 2 threads cost ~30 ms per conv call."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


# --------------------------------------------------------------------------- modules
class Residual(nn.Module):
    """``body(x) + shortcut(x)``; shortcut is the identity when None."""

    def __init__(self, body: nn.Module, shortcut: nn.Module | None = None) -> None:
        super().__init__()
        self.body = body
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x if self.shortcut is None else self.shortcut(x)
        return self.body(x) + s


class Concat(nn.Module):
    """``cat([a(x), b(x)], dim=1)``; a branch that is None is the identity."""

    def __init__(self, a: nn.Module, b: nn.Module | None) -> None:
        super().__init__()
        self.a = a
        self.b = b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), x if self.b is None else self.b(x)], dim=1)


# --------------------------------------------------------------------------- specs
# A spec is a tuple ("kind", {params}); the builder turns it into a module.


class GlobalBlock(nn.Module):
    """A whole-image op without parameters (any channels, any rank), streamed by staged
    streaming: a squeeze-excitation gate, a one-group GroupNorm, a normalisation by hand with
    ``var``, GCNet-style softmax attention pooling over the flattened positions, or pooling to
    ``bins`` interpolated back linearly."""

    def __init__(self, fn: str, bins: tuple[int, ...] = (), align: bool = False) -> None:
        super().__init__()
        self.fn, self.bins, self.align = fn, bins, align

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(2, x.dim()))
        if self.fn == "se":
            return x * torch.sigmoid(x.mean(dims, keepdim=True))
        if self.fn == "groupnorm":
            return nn.functional.group_norm(x, 1)
        if self.fn == "var":
            m, v = x.mean(dims, keepdim=True), x.var(dims, keepdim=True, correction=0)
            return (x - m) / (v + 1).sqrt()
        if self.fn == "attention":
            b, c = x.shape[:2]
            weights = torch.softmax(x.mean(1).flatten(1), dim=-1)  # (b, positions)
            context = torch.bmm(x.flatten(2), weights.unsqueeze(-1))  # (b, c, 1)
            return x + context.view(b, c, *[1] * len(dims))
        pool = getattr(nn.functional, f"adaptive_avg_pool{len(dims)}d")
        mode = LINEAR_MODE[len(dims)]
        up = nn.functional.interpolate(
            pool(x, self.bins), size=x.shape[2:], mode=mode, align_corners=self.align
        )
        return x + up

    def extra_repr(self) -> str:
        return f"{self.fn!r}, bins={self.bins}, align={self.align}"


def _per_dim(ndim: int, lo: int, hi: int) -> st.SearchStrategy[tuple[int, ...]]:
    return st.tuples(*[st.integers(lo, hi)] * ndim)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def _same_conv(draw: Any, ndim: int, cin: int, cout: int) -> dict[str, Any]:
    """A stride-1 conv whose output has the input's size (odd kernel, padding (k//2)*d)."""
    k = draw(st.tuples(*[st.sampled_from([1, 3, 5])] * ndim))
    d = draw(_per_dim(ndim, 1, 3))
    return {
        "cin": cin,
        "cout": cout,
        "k": k,
        "s": (1,) * ndim,
        "d": d,
        "p": tuple(ki // 2 * di for ki, di in zip(k, d)),
        "groups": draw(st.sampled_from(_divisors(math.gcd(cin, cout)))),
        "mode": draw(st.sampled_from(PADDING_MODES)),
        "bias": draw(st.booleans()),
    }


@st.composite
def layer_specs(draw: Any, ndim: int, cin: int, max_layers: int = 6) -> list[tuple[str, dict]]:
    n_layers = draw(st.integers(1, max_layers))
    specs: list[tuple[str, dict]] = []
    c = cin
    down = Fraction(1)  # product of strides / upsampling factors so far (per dim, max)
    for _ in range(n_layers):
        can_stride = down < 8
        can_up = down > Fraction(1, 2)
        kinds = ["conv", "conv", "maxpool", "avgpool", "bn", "act", "residual", "concat"]
        if can_up:
            kinds += ["convT", "upsample"]
        if can_stride:
            kinds += ["residual_down"]
        kind = draw(st.sampled_from(kinds))
        max_s = 3 if can_stride else 1
        if kind == "conv":
            cout = draw(st.integers(1, 6))
            k = draw(_per_dim(ndim, 1, 5))
            s = draw(_per_dim(ndim, 1, max_s))
            d = draw(_per_dim(ndim, 1, 3))
            if all(si == 1 for si in s) and draw(st.integers(0, 4)) == 0:
                p: Any = "same"
            else:
                p = tuple(draw(st.integers(0, ki // 2 * di)) for ki, di in zip(k, d))
            spec = {
                "cin": c,
                "cout": cout,
                "k": k,
                "s": s,
                "d": d,
                "p": p,
                "groups": draw(st.sampled_from(_divisors(math.gcd(c, cout)))),
                "mode": draw(st.sampled_from(PADDING_MODES)),
                "bias": draw(st.booleans()),
            }
            specs.append(("conv", spec))
            c = cout
            down *= max(s)
        elif kind in ("maxpool", "avgpool"):
            k = draw(_per_dim(ndim, 1, 4))
            s = draw(st.tuples(*[st.integers(1, min(max_s, 3))] * ndim))
            p = tuple(draw(st.integers(0, ki // 2)) for ki in k)
            spec = {"k": k, "s": s, "p": p, "ceil": draw(st.booleans())}
            if kind == "maxpool":
                # padding <= k//2 is checked by torch against the kernel, not the dilated one
                spec["d"] = draw(_per_dim(ndim, 1, 2))
            else:
                spec["count_include_pad"] = draw(st.booleans())
            specs.append((kind, spec))
            down *= max(s)
        elif kind == "bn":
            specs.append(("bn", {"c": c}))
        elif kind == "act":
            specs.append(("act", {"fn": draw(st.sampled_from(["relu", "gelu"]))}))
        elif kind == "convT":
            cout = draw(st.integers(1, 6))
            k = draw(_per_dim(ndim, 1, 4))
            s = draw(_per_dim(ndim, 1, 2))
            d = draw(_per_dim(ndim, 1, 2))
            p = tuple(draw(st.integers(0, di * (ki - 1))) for ki, di in zip(k, d))
            op = tuple(draw(st.integers(0, si - 1)) for si in s)
            spec = {
                "cin": c,
                "cout": cout,
                "k": k,
                "s": s,
                "d": d,
                "p": p,
                "op": op,
                "groups": draw(st.sampled_from(_divisors(math.gcd(c, cout)))),
                "bias": draw(st.booleans()),
            }
            specs.append(("convT", spec))
            c = cout
            down /= min(s)
        elif kind == "upsample":
            specs.append(("upsample", {"mode": draw(st.sampled_from(["nearest", "linear"]))}))
            down /= 2
        elif kind == "residual":
            body = [draw(_same_conv(ndim, c, c))]
            if draw(st.booleans()):
                body.append(("act", {"fn": "relu"}))
                body.append(draw(_same_conv(ndim, c, c)))
            specs.append(("residual", {"body": body}))
        elif kind == "residual_down":
            cout = draw(st.integers(1, 6))
            # 3-wide stride-2 conv with padding 1 and a 1-wide stride-2 conv (or a 2-wide
            # ceil-mode avg pool when channels agree) both give ceil(n / 2) positions.
            pool_shortcut = cout == c and draw(st.booleans())
            specs.append(
                (
                    "residual_down",
                    {
                        "cin": c,
                        "cout": cout,
                        "mode": draw(st.sampled_from(PADDING_MODES)),
                        "pool_shortcut": pool_shortcut,
                    },
                )
            )
            c = cout
            down *= 2
        elif kind == "concat":
            ca = draw(st.integers(1, 4))
            a = draw(_same_conv(ndim, c, ca))
            b_kind = draw(st.sampled_from(["identity", "conv", "maxpool"]))
            if b_kind == "conv":
                cb = draw(st.integers(1, 4))
                b: Any = draw(_same_conv(ndim, c, cb))
            else:
                cb = c
                b = b_kind
            specs.append(("concat", {"a": a, "b": b}))
            c = ca + cb
    return specs


def _conv(ndim: int, spec: dict[str, Any]) -> nn.Module:
    return CONV[ndim](
        spec["cin"],
        spec["cout"],
        spec["k"],
        stride=spec["s"],
        padding=spec["p"],
        dilation=spec["d"],
        groups=spec["groups"],
        bias=spec["bias"],
        padding_mode=spec["mode"],
    )


def _bn(ndim: int, c: int) -> nn.Module:
    bn = BATCHNORM[ndim](c)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    return bn


def build(ndim: int, specs: list[tuple[str, dict]]) -> nn.Module:
    """Turn layer specs into an eval-mode float64 ``nn.Sequential``."""

    def one(kind: str, spec: Any) -> nn.Module:
        if kind == "conv":
            return _conv(ndim, spec)
        if kind == "maxpool":
            return MAXPOOL[ndim](
                spec["k"], spec["s"], spec["p"], dilation=spec["d"], ceil_mode=spec["ceil"]
            )
        if kind == "avgpool":
            return AVGPOOL[ndim](
                spec["k"],
                spec["s"],
                spec["p"],
                ceil_mode=spec["ceil"],
                count_include_pad=spec["count_include_pad"],
            )
        if kind == "bn":
            return _bn(ndim, spec["c"])
        if kind == "act":
            return nn.ReLU() if spec["fn"] == "relu" else nn.GELU()
        if kind == "convT":
            return CONVT[ndim](
                spec["cin"],
                spec["cout"],
                spec["k"],
                stride=spec["s"],
                padding=spec["p"],
                output_padding=spec["op"],
                groups=spec["groups"],
                bias=spec["bias"],
                dilation=spec["d"],
            )
        if kind == "upsample":
            if spec["mode"] == "nearest":
                return nn.Upsample(scale_factor=2, mode="nearest")
            return nn.Upsample(scale_factor=2, mode=LINEAR_MODE[ndim], align_corners=False)
        if kind == "residual":
            return Residual(
                nn.Sequential(
                    *[one("conv", b) if isinstance(b, dict) else one(*b) for b in spec["body"]]
                )
            )
        if kind == "residual_down":
            ones, twos, threes = (1,) * ndim, (2,) * ndim, (3,) * ndim
            body = nn.Sequential(
                CONV[ndim](
                    spec["cin"],
                    spec["cout"],
                    threes,
                    twos,
                    ones,
                    bias=False,
                    padding_mode=spec["mode"],
                ),
                _bn(ndim, spec["cout"]),
            )
            if spec["pool_shortcut"]:
                shortcut: nn.Module = AVGPOOL[ndim](twos, twos, ceil_mode=True)
            else:
                shortcut = CONV[ndim](spec["cin"], spec["cout"], ones, twos, bias=False)
            return Residual(body, shortcut)
        if kind == "global":
            return GlobalBlock(spec["fn"], tuple(spec.get("bins", ())), spec.get("align", False))
        if kind == "concat":
            a = _conv(ndim, spec["a"])
            b = spec["b"]
            if b == "identity":
                bm = None
            elif b == "maxpool":
                bm = MAXPOOL[ndim](3, 1, 1)
            else:
                bm = _conv(ndim, b)
            return Concat(a, bm)
        raise AssertionError(kind)

    model = nn.Sequential(*[one(kind, spec) for kind, spec in specs])
    return model.to(DTYPE).eval()


@st.composite
def global_specs(draw: Any, ndim: int) -> tuple[str, dict]:
    kinds = ["se", "groupnorm", "var", "bins", "attention"]
    fn = draw(st.sampled_from(kinds))
    spec: dict[str, Any] = {"fn": fn}
    if fn == "bins":
        spec["bins"] = draw(st.tuples(*[st.integers(1, 6)] * ndim))
        spec["align"] = draw(st.booleans())
    return ("global", spec)


@st.composite
def cases(
    draw: Any,
    ndim: int,
    size: tuple[int, int],
    tile: tuple[int, int],
    max_layers: int = 6,
    max_globals: int = 0,
) -> dict[str, Any]:
    cin = draw(st.integers(1, 3))
    specs = draw(layer_specs(ndim, cin, max_layers))
    for _ in range(draw(st.integers(1, max_globals)) if max_globals else 0):
        specs.insert(draw(st.integers(0, len(specs))), draw(global_specs(ndim)))
    shape = (draw(st.integers(1, 2)), cin, *draw(_per_dim(ndim, *size)))
    if draw(st.booleans()):
        tile_size: Any = draw(st.integers(*tile))
    else:
        tile_size = draw(_per_dim(ndim, *tile))
    return {
        "ndim": ndim,
        "specs": specs,
        "shape": shape,
        "tile": tile_size,
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


# --------------------------------------------------------------------------- helpers
def _materialize(case: dict[str, Any]) -> tuple[nn.Module, torch.Tensor]:
    with torch.random.fork_rng():
        torch.manual_seed(case["seed"])
        model = build(case["ndim"], case["specs"])
        x = torch.randn(case["shape"], dtype=DTYPE)
    note(f"model = {model!r}")
    note(f"x.shape = {tuple(x.shape)}, tile_size = {case['tile']!r}")
    return model, x


def _plain_or_reject(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The plain model's output; reject the example when the plain model itself fails."""
    # A max-pool window that lies wholly in the padding gives -inf, and its backward corrupts
    # memory in PyTorch 2.14 ("double free or corruption", plain model alone, e.g.
    # MaxPool2d((2, 1), padding=(1, 0), dilation=(2, 1)) on a height-1 input): reject those.
    all_padding: list[bool] = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: all_padding.append(bool(o.isneginf().any())))
        for m in model.modules()
        if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d))
    ]
    try:
        with torch.no_grad():
            ref = model(x)
    except RuntimeError:  # e.g. image too small, reflect padding >= size
        assume(False)
    finally:
        for h in hooks:
            h.remove()
    assume(ref.numel() > 0 and not any(all_padding))
    return ref


def _as_tuple(tile: Any, ndim: int) -> tuple[int, ...]:
    return tuple(tile) if isinstance(tile, tuple) else (tile,) * ndim


def _stated_minimum(err: Exception, ndim: int) -> tuple[int, ...]:
    msg = str(err)
    m = re.search(r"tile_size\s*>=\s*(\(?[\d,\s]+\)?|\[[\d,\s]+\])", msg)
    assert m, f"TileSizeError does not state the minimum ('Use tile_size >= N'): {msg!r}"
    nums = tuple(int(v) for v in re.findall(r"\d+", m.group(1)))
    assert len(nums) in (1, ndim), msg
    return nums * ndim if len(nums) == 1 else nums


def _finite_max(t: torch.Tensor) -> float:
    finite = t[t.isfinite()]
    return finite.abs().max().item() if finite.numel() else 0.0


def assert_scaled_close(
    actual: Any, expected: torch.Tensor, what: str, scale: float | None = None
) -> None:
    """Close to 1e-10 of ``scale`` (by default the expected tensor's max abs value)."""
    assert isinstance(actual, torch.Tensor), f"{what}: expected a tensor, got {type(actual)}"
    # Random nets can produce -inf (max pooling over a window that lies in the padding) and
    # then nan (gelu(-inf)); the streamed result must have them in the same places.
    scale = _finite_max(expected) if scale is None else scale
    torch.testing.assert_close(
        actual,
        expected,
        rtol=0,
        atol=RTOL * scale + 1e-300,
        equal_nan=True,
        msg=lambda m: f"{what}: {m}",
    )


def reference_vjp(
    model: nn.Module, x: torch.Tensor, cot: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    xr = x.detach().clone().requires_grad_(True)
    out = model(xr)
    grads = torch.autograd.grad(out, [xr, *params.values()], cot, allow_unused=True)
    pg = {
        n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads[1:])
    }
    gx = torch.zeros_like(xr) if grads[0] is None else grads[0]
    return pg, gx


def stream(
    model: nn.Module, x: torch.Tensor, tile: Any, **opts: Any
) -> tuple[Any, torch.Tensor, Any]:
    """streamify + forward; on a TileSizeError retry with the stated minimum.

    Returns (streamed, output, tile actually used).
    """
    ndim = x.dim() - 2
    try:
        streamed = tilefn.streamify(model, tile, **opts)
        return streamed, streamed.backbone(x), tile
    except tilefn.TileSizeError as err:
        minimum = _stated_minimum(err, ndim)
        requested = _as_tuple(tile, ndim)
        assert any(t < m for t, m in zip(requested, minimum)), (
            f"TileSizeError for tile_size={tile!r} that is not below the stated minimum {minimum}: {err}"
        )
        assert not all(t >= s for t, s in zip(requested, x.shape[2:])), (
            f"TileSizeError for tile_size={tile!r} although the input {tuple(x.shape)} fits in one tile: {err}"
        )
        note(f"TileSizeError -> retrying with the stated minimum {minimum}: {err}")
        streamed = tilefn.streamify(model, minimum, **opts)
        return streamed, streamed.backbone(x), minimum
    except tilefn.TilefnError as err:  # any other refusal of a streamable net is a bug
        raise AssertionError(
            f"tilefn refused a streamable network: {type(err).__name__}: {err}"
        ) from err


def check_case(case: dict[str, Any]) -> None:
    model, x = _materialize(case)
    ref = _plain_or_reject(model, x)
    streamed, out, _ = stream(model, x, case["tile"], saliency=True)
    assert_scaled_close(out, ref, "backbone(x) vs model(x)")

    cot = torch.randn_like(ref)
    param_grads, input_grad = streamed.vjp(x, cot)
    ref_pg, ref_gx = reference_vjp(model, x, cot)
    assert set(param_grads) == set(ref_pg), (sorted(param_grads), sorted(ref_pg))
    # A whole-image normalisation makes the gradient of a bias before it zero in exact
    # arithmetic (rounding on both sides), and of every parameter before it where they only
    # scale and shift (BatchNorm then GroupNorm): with whole-image ops, every parameter
    # gradient is compared on the scale of the largest gradient, the input's included.
    staged = any(kind == "global" for kind, _ in case["specs"])
    grads = [*ref_pg.values(), ref_gx]
    largest = max(_finite_max(g) for g in grads) if staged else None
    for name, g in ref_pg.items():
        assert_scaled_close(param_grads[name], g, f"param grad {name!r}", largest)
    assert_scaled_close(input_grad, ref_gx, "input grad (saliency)")


# --------------------------------------------------------------------------- streaming properties
@settings(max_examples=300, **FAST)
@given(case=cases(ndim=2, size=(20, 90), tile=(8, 96)))
def test_random_net_2d(case: dict[str, Any]) -> None:
    check_case(case)


@settings(max_examples=200, **FAST)
@given(case=cases(ndim=1, size=(20, 200), tile=(4, 200)))
def test_random_net_1d(case: dict[str, Any]) -> None:
    check_case(case)


@settings(max_examples=50, **FAST)
@given(case=cases(ndim=3, size=(10, 20), tile=(6, 20), max_layers=3))
def test_random_net_3d(case: dict[str, Any]) -> None:
    check_case(case)


@settings(max_examples=25, **FAST)
@given(case=cases(ndim=2, size=(20, 90), tile=(8, 96), max_layers=4, max_globals=2))
def test_random_staged_net_2d(case: dict[str, Any]) -> None:
    """Random nets with whole-image ops (staged streaming) inserted anywhere."""
    check_case(case)


@settings(max_examples=50, **FAST)
@given(case=cases(ndim=1, size=(20, 200), tile=(4, 200), max_layers=4, max_globals=2))
def test_random_staged_net_1d(case: dict[str, Any]) -> None:
    check_case(case)


@settings(max_examples=150, deadline=None, suppress_health_check=HEALTH)
@given(case=cases(ndim=2, size=(20, 90), tile=(8, 96), max_layers=8, max_globals=3))
@pytest.mark.slow
def test_random_staged_net_2d_slow(case: dict[str, Any]) -> None:
    check_case(case)


@settings(max_examples=3000, deadline=None, suppress_health_check=HEALTH)
@given(case=cases(ndim=2, size=(20, 90), tile=(8, 96), max_layers=8))
@pytest.mark.slow
def test_random_net_2d_slow(case: dict[str, Any]) -> None:
    check_case(case)


@settings(max_examples=2000, deadline=None, suppress_health_check=HEALTH)
@given(case=cases(ndim=1, size=(20, 300), tile=(4, 300), max_layers=8))
@pytest.mark.slow
def test_random_net_1d_slow(case: dict[str, Any]) -> None:
    check_case(case)


# --------------------------------------------------------------------------- plan properties
def _plan_or_minimum(
    model: nn.Module, shape: tuple[int, ...], tile: Any
) -> tuple[Any, tuple[int, ...]]:
    ndim = len(shape) - 2
    try:
        return tilefn.plan(model, shape, tile), _as_tuple(tile, ndim)
    except tilefn.TileSizeError as err:
        minimum = _stated_minimum(err, ndim)
        assert any(t < m for t, m in zip(_as_tuple(tile, ndim), minimum)), str(err)
        return tilefn.plan(model, shape, minimum), minimum


def check_plan(case: dict[str, Any]) -> None:
    model, x = _materialize(case)
    _plain_or_reject(model, x)
    shape = tuple(x.shape)
    ndim = case["ndim"]
    spatial = shape[2:]
    p, tile = _plan_or_minimum(model, shape, case["tile"])
    note(f"plan = {p}")

    assert tuple(p.input_shape) == shape
    assert tuple(p.tile_size) == tile
    assert len(p.alignment) == ndim and all(isinstance(a, int) and a >= 1 for a in p.alignment)
    assert len(p.min_tile_size) == ndim
    assert all(m <= t for m, t in zip(p.min_tile_size, tile)) or all(
        t >= s for t, s in zip(tile, spatial)
    ), (
        p.min_tile_size,
        tile,
    )
    assert isinstance(p.n_tiles, int) and p.n_tiles == len(p.crops) >= 1
    assert isinstance(p.memory_estimate, int) and p.memory_estimate > 0
    volume = 0
    for crop in p.crops:
        box = tuple(crop.box)
        assert len(box) == ndim, box
        for (start, stop), t, size, a in zip(box, tile, spatial, p.alignment):
            assert 0 <= start < stop <= size, (box, spatial)
            assert stop - start <= t, f"crop {box} wider than tile_size {tile}"
            # docs/design.md#exactness: a crop starts at a multiple of the alignment, and either
            # ends at the image end or has a length congruent to the image length mod A.
            assert start % a == 0, (
                f"crop {box} does not start at a multiple of alignment {p.alignment}"
            )
            assert stop == size or (stop - start - size) % a == 0, (box, spatial, p.alignment)
        volume += math.prod(stop - start for start, stop in box)
    # overlap is sum of crop volumes / image volume: >= 1 whenever the network reads every
    # pixel, below 1 only when strides larger than kernels leave pixels unread.
    assert p.overlap > 0.0, p.overlap
    assert math.isclose(p.overlap, volume / math.prod(spatial), rel_tol=1e-9), (p.overlap, volume)
    assert str(p)

    # Blocks, when the plan exposes them (crop.blocks: per output, per dim (start, stop) in
    # output positions): over all crops they partition every output exactly once.
    if all(getattr(crop, "blocks", None) is not None for crop in p.crops):
        with torch.no_grad():
            outs = model(x)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        for o, out in enumerate(outs):
            count = torch.zeros(out.shape[2:], dtype=torch.int64)
            for crop in p.crops:
                block = crop.blocks[o]
                if block is None:
                    continue
                count[tuple(slice(lo, hi) for lo, hi in block)] += 1
            assert bool((count == 1).all()), (
                f"blocks do not partition output {o}: cover counts {count.unique().tolist()}"
            )


@settings(max_examples=300, **FAST)
@given(case=cases(ndim=2, size=(20, 90), tile=(8, 96)))
def test_plan_properties_2d(case: dict[str, Any]) -> None:
    check_plan(case)


@settings(max_examples=200, **FAST)
@given(case=cases(ndim=1, size=(20, 300), tile=(4, 300)))
def test_plan_properties_1d(case: dict[str, Any]) -> None:
    check_plan(case)


@settings(max_examples=3000, deadline=None, suppress_health_check=HEALTH)
@given(case=cases(ndim=2, size=(20, 200), tile=(8, 200), max_layers=8))
@pytest.mark.slow
def test_plan_properties_2d_slow(case: dict[str, Any]) -> None:
    check_plan(case)


# --------------------------------------------------------------------------- fixed regressions
def test_min_tile_size_streams_exactly() -> None:
    """tile_size == plan.min_tile_size works and is exact; one less in a dim is refused."""
    torch.manual_seed(0)
    model = (
        nn.Sequential(
            nn.Conv2d(2, 4, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 4, 3, padding=2, dilation=2),
            nn.AvgPool2d(3, 2, 1, ceil_mode=True),
            nn.Conv2d(4, 3, 3, padding=1, padding_mode="reflect"),
        )
        .to(DTYPE)
        .eval()
    )
    x = torch.randn(1, 2, 150, 170, dtype=DTYPE)
    minimum = tuple(tilefn.plan(model, tuple(x.shape), 150).min_tile_size)
    assert all(m < 150 for m in minimum), minimum
    check_case_direct(model, x, minimum)
    with pytest.raises(tilefn.TileSizeError, match=r"tile_size >= "):
        tilefn.streamify(model, (minimum[0] - 1, minimum[1])).backbone(x)


def check_case_direct(model: nn.Module, x: torch.Tensor, tile: Any) -> None:
    streamed = tilefn.streamify(model, tile, saliency=True)
    ref = model(x)
    assert_scaled_close(streamed.backbone(x), ref.detach(), "backbone(x)")
    cot = torch.randn_like(ref)
    pg, gx = streamed.vjp(x, cot)
    ref_pg, ref_gx = reference_vjp(model, x, cot)
    for name, g in ref_pg.items():
        assert_scaled_close(pg[name], g, f"param grad {name!r}")
    assert_scaled_close(gx, ref_gx, "input grad")


# Minimal cases that hypothesis found; each one pins a property above on a fixed network.
def test_bilinear_upsample_under_deterministic_algorithms() -> None:
    """conftest turns on torch.use_deterministic_algorithms; bilinear upsampling must still stream."""
    torch.manual_seed(0)
    model = (
        nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear"),
            nn.Conv2d(3, 2, 3),
        )
        .to(DTYPE)
        .eval()
    )
    x = torch.randn(1, 2, 40, 36, dtype=DTYPE)
    det = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        check_case_direct(model, x, 16)
    finally:
        torch.use_deterministic_algorithms(det)


def test_tile_size_at_stated_minimum_is_accepted() -> None:
    torch.manual_seed(0)
    model = (
        nn.Sequential(
            nn.Conv2d(2, 2, (1, 3), stride=(1, 2), dilation=(1, 2), bias=False),
            nn.Conv2d(2, 1, (1, 3), padding="same", dilation=(1, 3), bias=False),
        )
        .to(DTYPE)
        .eval()
    )
    x = torch.randn(1, 2, 20, 20, dtype=DTYPE)
    minimum = tuple(tilefn.plan(model, tuple(x.shape), 20).min_tile_size)
    check_case_direct(model, x, minimum)
    check_case_direct(model, x, max(minimum))
    with pytest.raises(tilefn.TileSizeError) as info:
        tilefn.streamify(model, 8).backbone(x)
    check_case_direct(model, x, max(_stated_minimum(info.value, 2)))


def test_tile_size_error_states_a_minimum_that_works() -> None:
    """Anisotropic receptive field: the stated minimum must satisfy every dim at once."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 1, (5, 21), padding=(2, 10))).to(DTYPE).eval()
    x = torch.randn(1, 1, 64, 64, dtype=DTYPE)
    with pytest.raises(tilefn.TileSizeError) as info:
        tilefn.streamify(model, 2).backbone(x)
    minimum = _stated_minimum(info.value, 2)
    check_case_direct(model, x, minimum if len(set(minimum)) > 1 else minimum[0])


@pytest.mark.parametrize("ndim", [1, 2])
def test_conv_transpose_kernel_smaller_than_stride(ndim: int) -> None:
    torch.manual_seed(0)
    model = (
        nn.Sequential(CONVT[ndim](1, 2, 1, stride=2), CONV[ndim](2, 1, 3, padding=1))
        .to(DTYPE)
        .eval()
    )
    x = torch.randn(1, 1, *(40,) * ndim, dtype=DTYPE)
    check_case_direct(model, x, 16)
