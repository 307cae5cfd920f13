"""The worker side of ``compare.py``: the three systems and one case in this process.

``build_trunk`` makes the network, ``build_lightstream`` wraps it in lightstream on the CPU,
``run_case`` builds the system a case names (plain PyTorch, ``tilefn.streamify`` or
lightstream), times its step and returns the record that ``worker_main`` prints for the parent.
torch, tilefn and lightstream are imported inside the functions, only in the worker.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

from _cases import RESULT_TAG, current_rss, machine_facts, peak_rss

SEED = 0
LABEL = 1  # the fixed class label of the loss

# Peak-memory model for the plain network: estimated peak = factor x `activation_bytes` (all
# layer outputs on the whole image). The factors are the largest ratio (peak RSS - RSS before
# the step) / activation_bytes measured with compare.py, rounded up (1 thread, float32, CPU):
#
#     ratio (train / infer)   1024^2        2048^2
#     tiny                    1.69 / 0.60   1.65 / 0.60
#     resnet18                1.91 / 0.31   1.25 / 0.31
#     resnet50                1.12 / 0.17   0.98 / 0.12
#
# The ratio falls with the image size (fixed costs such as weight gradients matter less), and
# only large images come near --max-plain-gb, so the factors follow the 2048^2 column. The
# estimate adds the RSS before the step (Python, PyTorch, the image).
PLAIN_MEMORY_FACTOR = {"train": 1.3, "infer": 0.35}


def build_trunk(name: str):
    """The streamed trunk: a fully local network, in eval mode (BatchNorm uses running stats)."""
    import torch
    from torch import nn

    torch.manual_seed(SEED)
    if name == "tiny":
        # A few convolutions, strides, a max pool and BatchNorm: runs in well under a second.
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1),
            nn.ReLU(),
        ).eval()
    import torchvision

    if not hasattr(torchvision.models, name):
        raise SystemExit(f"unknown model {name!r}; use tiny or a torchvision model name")
    net = getattr(torchvision.models, name)(weights=None)
    return nn.Sequential(*list(net.children())[:-2]).eval()


def lightstream_tile_counts(scnn, size: int) -> dict[str, Any]:
    """lightstream's forward and backward tile counts for an S x S image (its own formulas)."""
    tile = scnn.tile_shape[-1]
    stride = int(scnn.output_stride[-1])
    out_tile = scnn._tile_output_shape[-1]
    lost, glost = scnn.tile_output_lost, scnn.tile_gradient_lost
    if size <= tile:
        fwd = bwd = 1
    else:
        out_size = (size - tile) // stride + out_tile
        fwd = math.ceil(out_size / (out_tile - lost.top - lost.bottom))
        valid = (tile - glost.top - glost.bottom) // stride * stride
        bwd = math.ceil((size - glost.top - glost.bottom) / valid)
    return {
        "ls_forward_tiles": fwd * fwd,
        "ls_backward_tiles": bwd * bwd,
        "ls_forward_a": fwd * fwd * tile * tile / size**2,
        "ls_backward_a": bwd * bwd * tile * tile / size**2,
        "ls_output_lost": [lost.top, lost.left, lost.bottom, lost.right],
        "ls_gradient_lost": [glost.top, glost.left, glost.bottom, glost.right],
    }


def build_lightstream(trunk, tile: int):
    """lightstream's StreamingCNN around ``trunk``, entirely on the CPU.

    lightstream 1.0.7 cannot compute its statistics on a CPU-only machine as shipped:
    ``StreamingConstructor(statistics_on_cpu=False)`` moves the model to CUDA in ``__init__``,
    and ``statistics_on_cpu=True`` makes ``StreamingCNN._configure`` call ``.cuda()`` after the
    statistics pass (core/scnn/scnn.py, about line 134). Its ResNet wrappers (StreamingResNet)
    also download ImageNet weights. So we use the lower-level StreamingConstructor directly with
    our ``weights=None`` trunk, constructed with ``statistics_on_cpu=True`` (no move to CUDA in
    ``__init__``), and override only ``create_streaming_model`` to hand StreamingCNN
    ``statistics_on_cpu=False``: it then works on the device of the parameters, the CPU. The
    other options match StreamingResNet's, except no normalisation inside (our image is already
    float32) and no copy to a GPU. BatchNorm2d is kept during the statistics pass, as in
    StreamingResNet. Nothing else is patched.
    """
    import torch
    from lightstream.core.constructor import StreamingConstructor
    from lightstream.core.scnn.scnn import StreamingCNN

    class CPUConstructor(StreamingConstructor):
        def create_streaming_model(self):
            return StreamingCNN(
                self.model,
                tile_shape=(1, 3, self.tile_size, self.tile_size),
                deterministic=self.deterministic,
                saliency=self.saliency,
                copy_to_gpu=False,
                verbose=self.verbose,
                statistics_on_cpu=False,  # work on the parameters' device (CPU), never .cuda()
                normalize_on_gpu=False,
                mean=self.mean,
                std=self.std,
                state_dict=self.tile_cache,
            )

    constructor = CPUConstructor(
        trunk,
        tile,
        verbose=False,
        deterministic=False,
        saliency=False,
        copy_to_gpu=False,
        statistics_on_cpu=True,
        normalize_on_gpu=False,
        add_keep_modules=[torch.nn.BatchNorm2d],
    )
    return constructor.prepare_streaming_model()


def activation_bytes(trunk, size: int, probe: int = 128) -> float:
    """Bytes of all layer outputs of ``trunk`` on a (1, 3, size, size) float32 image.

    Measured with forward hooks on a ``probe``-pixel image and scaled by the area; outputs that
    share storage (in-place activations) count once. Cheaper than ``tilefn.plan`` for one case
    (no meta-device warm-up), and close to its ``crop_activation_bytes`` with ``tile_size=size``.
    """
    import torch

    outputs: list = []  # kept alive, so that no storage is freed and its address reused

    def hook(_module, _inputs, output):
        if isinstance(output, torch.Tensor):
            outputs.append(output)

    leaves = [m for m in trunk.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            trunk(torch.zeros(1, 3, probe, probe))
    finally:
        for h in handles:
            h.remove()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in outputs}
    return sum(storages.values()) * (size / probe) ** 2


def projection(shape: Sequence[int], seed: int):
    """A fixed standard-normal tensor of ``shape`` (for checksums that see every element)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32)


def checksums(out, loss, params: list[tuple[str, Any]], head) -> dict[str, float]:
    """Scalars that plain, tilefn and lightstream should agree on."""
    import torch

    sums: dict[str, float] = {"loss": float(loss.detach())}
    out = out.detach()
    # A random projection of the trunk output, one channel at a time to keep memory flat.
    g = torch.Generator().manual_seed(SEED + 1)
    dot = scale = 0.0
    for c in range(out.shape[1]):
        prod = out[:, c].double() * torch.randn(out[:, c].shape, generator=g).double()
        dot, scale = dot + float(prod.sum()), scale + float(prod.abs().sum())
    # A projection's sum cancels; its differences are measured against sum |terms| (`_scale`).
    sums["out_dot"], sums["out_dot_scale"] = dot, scale
    sums["out_abs"] = float(out.double().abs().sum())
    grads = [(n, p.grad) for n, p in params if p.grad is not None]
    if grads:
        first = next(g_ for n, g_ in grads if g_.dim() == 4)
        sums["grad0_abs"] = float(first.double().abs().sum())
        prod = first.double() * projection(first.shape, SEED + 2).double()
        sums["grad0_dot"], sums["grad0_dot_scale"] = float(prod.sum()), float(prod.abs().sum())
        sums["grad_conv_abs"] = float(
            sum(g_.double().abs().sum() for _, g_ in grads if g_.dim() == 4)
        )
        sums["grad_all_abs"] = float(sum(g_.double().abs().sum() for _, g_ in grads))
        sums["n_param_grads"] = len(grads)
        sums["head_grad_abs"] = float(sum(p.grad.double().abs().sum() for p in head.parameters()))
    return sums


def slide_image(size: int, tissue: float, textured: bool, regions: int = 2):
    """A ``(1, 3, size, size)`` slide: ``regions`` discs of random tissue covering the fraction
    ``tissue`` of the area, on background that is one constant (1.0: masked glass) or, with
    ``textured``, random like the tissue (nothing can be skipped)."""
    import torch

    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(1, 3, size, size, generator=gen)
    if textured:
        return x
    r = math.sqrt(tissue / regions / math.pi) * size
    yy = torch.arange(size, dtype=torch.float32)[:, None]
    xx = torch.arange(size, dtype=torch.float32)[None, :]
    inside = torch.zeros(size, size, dtype=torch.bool)
    centres = [(0.3, 0.3), (0.69, 0.69), (0.3, 0.72), (0.72, 0.3)][:regions]
    for cy, cx in centres:
        inside |= (yy - cy * size) ** 2 + (xx - cx * size) ** 2 < r * r
    x[:, :, ~inside] = 1.0
    return x


def constant_crop_fraction(plan, x) -> float:
    """The fraction of crop area (summed over the plan's crops) whose crops are constant."""
    total = const = 0
    for crop in plan.crops:
        piece = x[(Ellipsis, *(slice(a, b) for a, b in crop.box))].flatten(2)
        area = piece.shape[-1]
        total += area
        if bool((piece == piece[..., :1]).all()):
            const += area
    return const / total


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """Run one case in this process and return its result record."""
    import torch
    from torch import nn

    torch.set_num_threads(case["threads"])
    import tilefn

    system, mode, size, tile = case["system"], case["mode"], case["size"], case["tile"]
    rec: dict[str, Any] = {**machine_facts()}
    trunk = build_trunk(case["model"])
    shape = (1, 3, size, size)

    if system == "plain":
        rec["activation_bytes"] = activation_bytes(trunk, size)
        est = (
            current_rss()
            + 4 * size * size * 3
            + PLAIN_MEMORY_FACTOR[mode] * rec["activation_bytes"]
        )
        rec["plain_estimate_bytes"] = est
        if est > case["max_plain_gb"] * 1e9:
            rec["status"] = "skipped"
            rec["short"] = f"skipped (est. {est / 1e9:.1f} GB)"
            rec["note"] = (
                f"skipped: estimated {est / 1e9:.1f} GB > --max-plain-gb {case['max_plain_gb']:g}"
            )
            return rec

    paired = None
    if case.get("slide"):
        x = slide_image(size, **case["slide"])
        if case.get("paired"):  # the same slide with textured background, timed alternately
            paired = slide_image(size, **{**case["slide"], "textured": True})
    else:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(SEED))
    target = torch.tensor([LABEL])
    with torch.no_grad():
        channels = trunk(torch.zeros(1, 3, 64, 64)).shape[1]
    torch.manual_seed(SEED + 3)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 2))

    t0 = time.perf_counter()
    if system == "plain":
        forward, params = trunk, list(trunk.named_parameters())
    elif system.startswith("tilefn"):
        backbone, _ = tilefn.streamify(trunk, tile, **case.get("options", {}))
        p = backbone.plan(shape)  # plans are cached: the step reuses this one
        rec.update(
            a=p.overlap,
            n_tiles=p.n_tiles,
            memory_estimate=p.memory_estimate,
            crop_activation_bytes=p.crop_activation_bytes,
        )
        forward, params = backbone, list(trunk.named_parameters())
    elif system == "lightstream":
        scnn = build_lightstream(trunk, tile)
        rec.update(lightstream_tile_counts(scnn, size))
        limit = case.get("lightstream_max_tiles") or 0
        if mode == "train" and limit and rec["ls_backward_tiles"] > limit:
            n, lost = rec["ls_backward_tiles"], rec["ls_gradient_lost"]
            rec["status"] = "skipped"
            rec["short"] = f"skipped ({n} bwd tiles)"
            rec["note"] = (
                f"skipped: lightstream's backward would run {n} tiles of {tile}² "
                f"(it discards {lost[0]} px of gradient per side), over --lightstream-max-tiles {limit}"
            )
            rec["setup_s"] = time.perf_counter() - t0
            return rec
        forward, params = scnn, list(scnn.stream_module.named_parameters())
    else:
        raise SystemExit(f"unknown system {system!r}")
    rec["setup_s"] = time.perf_counter() - t0
    if system != "plain" and not system.startswith("tilefn"):
        rec["a"] = tilefn.plan(trunk, shape, tile_size=tile).overlap  # tilefn's a, for reference

    def step(x=x):
        for _, q in params:
            q.grad = None
        for q in head.parameters():
            q.grad = None
        if mode == "infer":
            with torch.no_grad():
                out = forward(x)
            return out, None
        if system == "lightstream":
            # lightstream's forward runs without a graph; its backward takes the gradient of the
            # loss with respect to the trunk output and recomputes the tiles.
            out = forward(x).requires_grad_(True)
            loss = nn.functional.cross_entropy(head(out), target)
            loss.backward()
            forward.backward(x, out.grad)
        else:
            out = forward(x)
            loss = nn.functional.cross_entropy(head(out), target)
            loss.backward()
        return out, loss

    for _ in range(case.get("warmup", 0)):  # untimed: allocator and caches as in a loop
        step()
    rec["rss_before_step_bytes"] = current_rss()
    rec["peak_before_step"] = peak_rss()
    times, paired_times = [], []
    for _ in range(case["repeats"]):
        if paired is not None:  # alternate, so that both see the same machine state
            t0 = time.perf_counter()
            step(paired)
            paired_times.append(time.perf_counter() - t0)
            paired_stats = dict(backbone.last_stats) if system.startswith("tilefn") else {}
        t0 = time.perf_counter()
        out, loss = step()
        times.append(time.perf_counter() - t0)
    rec["peak"] = peak_rss()  # before the checksums, which allocate a little
    if paired is not None:
        rec["paired_step_s"] = min(paired_times)
        rec["paired_step_all_s"] = paired_times
        rec["paired_stats"] = {
            k: {"crops": v.crops, "constant": v.constant, "computed": v.computed}
            for k, v in paired_stats.items()
        }
    if system.startswith("tilefn"):
        rec["stats"] = {
            k: {"crops": v.crops, "constant": v.constant, "computed": v.computed}
            for k, v in backbone.last_stats.items()
        }
        if case.get("slide"):
            rec["constant_fraction"] = constant_crop_fraction(p, x)
    rec["step_s"] = min(times)
    rec["step_all_s"] = times
    if loss is None:
        with torch.no_grad():
            loss = nn.functional.cross_entropy(head(out), target)
    rec["check"] = checksums(out, loss, params, head)
    rec["out_shape"] = list(out.shape)
    rec["status"] = "ok"
    return rec


def worker_main(case_json: str) -> None:
    case = json.loads(case_json)
    rec = run_case(case)
    sys.stdout.flush()
    print(RESULT_TAG + json.dumps(rec), flush=True)
