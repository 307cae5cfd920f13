"""Which networks of timm, segmentation_models_pytorch, MONAI and torchvision stream, from
shapes only: the table of docs/compatibility.md.

For each network (built with ``pretrained=False`` / ``encoder_weights=None`` / ``weights=None``;
nothing is downloaded) it plans a 4096 x 4096 image at tile 2048 with ``tilefn.plan`` (the
model is recorded on meta tensors, never run) and records either the minimum tile (the
receptive field) and the overlap factor ``a``, or the refusal: the layer and why. Exactness is
not measured here; the column "exact in" names the test that checks it against the plain model
in float64.

    python benchmarks/compatibility.py            # print the table
    python benchmarks/compatibility.py --doc docs/compatibility.md   # rewrite it there
"""

from __future__ import annotations

import argparse
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

import tilefn

SHAPE = (1, 3, 4096, 4096)
TILE = 2048
START, END = "<!-- table:start -->", "<!-- table:end -->"


def _timm(name: str, **kw) -> Callable[[], torch.nn.Module]:
    def build():
        import timm

        return timm.create_model(name, pretrained=False, num_classes=0, global_pool="", **kw)

    return build


def _timm_features(name: str) -> Callable[[], torch.nn.Module]:
    def build():
        import timm

        return timm.create_model(name, pretrained=False, features_only=True)

    return build


def _smp(arch: str, encoder: str = "resnet34") -> Callable[[], torch.nn.Module]:
    def build():
        import segmentation_models_pytorch as smp

        return getattr(smp, arch)(encoder, encoder_weights=None, classes=2)

    return build


def _monai(name: str, **kw) -> Callable[[], torch.nn.Module]:
    def build():
        from monai.networks import nets

        return getattr(nets, name)(**kw)

    return build


def _tv_fpn() -> torch.nn.Module:
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    return resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=5)


def _tv_deeplab() -> torch.nn.Module:
    from torchvision.models.segmentation import deeplabv3_resnet50

    class Out(torch.nn.Module):  # the dict output's "out" map
        def __init__(self) -> None:
            super().__init__()
            self.m = deeplabv3_resnet50(weights=None, weights_backbone=None, aux_loss=False)

        def forward(self, x):
            return self.m(x)["out"]

    return Out()


def _tv_trunk(name: str) -> Callable[[], torch.nn.Module]:
    def build():
        import torchvision

        return tilefn.split(getattr(torchvision.models, name)(weights=None))[0]

    return build


MONAI_2D = {"spatial_dims": 2, "in_channels": 3, "out_channels": 2}
# (library, family, network, builder, test that checks exactness against the plain model)
NETWORKS: list[tuple[str, str, str, Callable[[], torch.nn.Module], str]] = [
    ("timm", "ResNet", "resnet50", _timm("resnet50"), ""),
    (
        "timm",
        "ResNet",
        "resnet18 (trunk, feature pyramid)",
        _timm("resnet18"),
        "test_libraries (slow)",
    ),
    ("timm", "ResNet-D", "resnet50d", _timm("resnet50d"), ""),
    ("timm", "ResNeXt", "resnext50_32x4d", _timm("resnext50_32x4d"), ""),
    ("timm", "ConvNeXt", "convnext_tiny", _timm("convnext_tiny"), ""),
    ("timm", "RegNetX", "regnetx_016", _timm("regnetx_016"), ""),
    ("timm", "RegNetY", "regnety_016", _timm("regnety_016"), ""),
    ("timm", "CSP", "cspresnet50", _timm("cspresnet50"), ""),
    ("timm", "DenseNet", "densenet121", _timm("densenet121"), ""),
    ("timm", "VGG", "vgg16", _timm("vgg16"), ""),
    ("timm", "MobileNetV2", "mobilenetv2_100", _timm("mobilenetv2_100"), ""),
    ("timm", "EfficientNet-lite", "efficientnet_lite0", _timm("efficientnet_lite0"), ""),
    ("timm", "EfficientNet", "efficientnet_b0", _timm("efficientnet_b0"), ""),
    (
        "timm",
        "GCResNeXt (global context)",
        "gcresnext26ts",
        _timm("gcresnext26ts"),
        "test_attention_pooling (stage 3)",
    ),
    ("timm", "HRNet", "hrnet_w18_small", _timm("hrnet_w18_small"), ""),
    ("timm", "Xception", "xception41", _timm("xception41"), ""),
    ("timm", "Inception", "inception_v3", _timm("inception_v3"), ""),
    ("timm", "feature pyramid", "resnet50, features_only", _timm_features("resnet50"), ""),
    (
        "timm",
        "feature pyramid",
        "regnetx_002, features_only",
        _timm_features("regnetx_002"),
        "test_libraries (slow)",
    ),
    (
        "timm",
        "feature pyramid",
        "mobilenetv2_050, features_only",
        _timm_features("mobilenetv2_050"),
        "test_libraries (slow)",
    ),
    ("smp", "Unet", "Unet(resnet34)", _smp("Unet"), ""),
    ("smp", "Unet", "Unet(resnet18)", _smp("Unet", "resnet18"), "test_libraries (slow)"),
    *(
        ("smp", "Unet", f"Unet({encoder})", _smp("Unet", encoder), "test_libraries (slow)")
        for encoder in (
            "vgg11",
            "mobilenet_v2",
            "timm-regnetx_002",
            "dpn68",
            "tu-regnetx_002",
            "tu-cspresnet50",
        )
    ),
    ("smp", "Unet", "Unet(densenet121)", _smp("Unet", "densenet121"), ""),
    ("smp", "Unet", "Unet(efficientnet-b0)", _smp("Unet", "efficientnet-b0"), ""),
    ("smp", "Unet", "Unet(mit_b0)", _smp("Unet", "mit_b0"), ""),
    ("smp", "Unet++", "UnetPlusPlus(resnet34)", _smp("UnetPlusPlus"), ""),
    (
        "smp",
        "Unet++",
        "UnetPlusPlus(resnet18)",
        _smp("UnetPlusPlus", "resnet18"),
        "test_libraries (slow)",
    ),
    ("smp", "Linknet", "Linknet(resnet34)", _smp("Linknet"), ""),
    ("smp", "Linknet", "Linknet(resnet18)", _smp("Linknet", "resnet18"), "test_libraries (slow)"),
    ("smp", "MAnet", "MAnet(resnet34)", _smp("MAnet"), ""),
    ("smp", "PAN", "PAN(resnet34)", _smp("PAN"), ""),
    ("smp", "FPN", "FPN(resnet34)", _smp("FPN"), ""),
    ("smp", "PSPNet", "PSPNet(resnet34)", _smp("PSPNet"), "test_pooling_bins (resnet18)"),
    ("smp", "DeepLabV3+", "DeepLabV3Plus(resnet34)", _smp("DeepLabV3Plus"), ""),
    (
        "MONAI",
        "UNet",
        "UNet (default norm)",
        _monai("UNet", **MONAI_2D, channels=(16, 32, 64), strides=(2, 2)),
        "test_staged (smaller config)",
    ),
    (
        "MONAI",
        "UNet",
        "UNet(norm='batch')",
        _monai("UNet", **MONAI_2D, channels=(16, 32, 64), strides=(2, 2), norm="batch"),
        "test_libraries",
    ),
    ("MONAI", "BasicUNet", "BasicUNet", _monai("BasicUNet", **MONAI_2D), "test_staged (slow)"),
    (
        "MONAI",
        "DynUNet",
        "DynUNet",
        _monai(
            "DynUNet",
            **MONAI_2D,
            kernel_size=[3, 3, 3],
            strides=[1, 2, 2],
            upsample_kernel_size=[2, 2],
        ),
        "test_staged (smaller config)",
    ),
    (
        "MONAI",
        "AttentionUnet",
        "AttentionUnet",
        _monai("AttentionUnet", **MONAI_2D, channels=(16, 32, 64), strides=(2, 2)),
        "test_staged (smaller config)",
    ),
    (
        "MONAI",
        "SegResNet",
        "SegResNet",
        _monai("SegResNet", **MONAI_2D),
        "test_staged (smaller config)",
    ),
    ("torchvision", "ResNet", "resnet50 (split trunk)", _tv_trunk("resnet50"), "test_zoo"),
    (
        "torchvision",
        "ConvNeXt",
        "convnext_tiny (split trunk)",
        _tv_trunk("convnext_tiny"),
        "test_split",
    ),
    (
        "torchvision",
        "FPN",
        "resnet_fpn_backbone(resnet50)",
        _tv_fpn,
        "test_libraries (slow, resnet18 with returned layers [2, 3, 4], [1, 2, 3, 4], [4])",
    ),
    ("torchvision", "segmentation", "deeplabv3_resnet50", _tv_deeplab, ""),
]


def _first_sentence(msg: str) -> str:
    msg = msg.removeprefix("streamify: ")
    cut = re.search(r"\. (How to fix|It is part|See |Streaming)", msg)
    return (msg[: cut.start()] if cut else msg).replace("|", "\\|").replace("\n", " ")


def _streams(plan) -> str:
    if isinstance(plan, tilefn.StagedPlan):
        return f"streams, staged ({len(plan.barriers)} barriers)"
    return "streams"


def row(library: str, family: str, network: str, build, exact_in: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = build().eval()
        except Exception as e:  # noqa: BLE001 - a model this version cannot build
            return f"| {library} | {family} | {network} | not built: {type(e).__name__} | | | |"
        try:
            plan = tilefn.plan(model, SHAPE, TILE, dtype=torch.float32)
        except tilefn.TileSizeError:
            plan = None
        except tilefn.TilefnError as e:
            return (
                f"| {library} | {family} | {network} | refused: {_first_sentence(str(e))} | | | |"
            )
        if plan is None:  # tile 2048 is below the receptive field: report the minimum
            try:
                whole = tilefn.plan(model, SHAPE, 4096, dtype=torch.float32)
            except tilefn.TilefnError as e:
                return f"| {library} | {family} | {network} | refused: {_first_sentence(str(e))} | | | |"
            minimum = max(whole.min_tile_size)
            return f"| {library} | {family} | {network} | {_streams(whole)} | {minimum} | tile {TILE} is below it | {exact_in} |"
        result = _streams(plan)
        return (
            f"| {library} | {family} | {network} | {result} | {max(plan.min_tile_size)} | "
            f"{plan.overlap:.2f} | {exact_in} |"
        )


def table() -> str:
    lines = [
        "| library | family | network | result | minimum tile | `a` at tile 2048 | exact in |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in NETWORKS:
        lines.append(row(*entry))
        print(lines[-1], flush=True)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--doc", type=Path, help="rewrite the table between the markers of this page"
    )
    args = parser.parse_args()
    text = table()
    if args.doc:
        page = args.doc.read_text()
        head, rest = page.split(START)
        _, tail = rest.split(END)
        args.doc.write_text(f"{head}{START}\n{text}\n{END}{tail}")


if __name__ == "__main__":
    main()
