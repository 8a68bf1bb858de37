"""Models users hold, as their libraries build them: timm CNNs, segmentation_models_pytorch
and diffusers models, with random weights and randomised BatchNorm statistics.

Shared by the wild-zoo tests (``tests/test_zoo_wild.py``) and the coverage benchmark
(``benchmarks/zoo_coverage.py``). Nothing is downloaded.
"""

from __future__ import annotations

import torch

from tests.models import randomize_batchnorm

TIMM = [
    "resnet18",
    "resnet34d",
    "resnet26d",
    "resnet50d",
    "seresnet50",
    "resnext50_32x4d",
    "wide_resnet50_2",
    "resnetrs50",
    "res2net50_14w_8s",
    "skresnet18",
    "resnest14d",
    "gcresnet33ts",
    "bat_resnext26ts",
    "regnetx_002",
    "regnetx_004",
    "regnety_002",
    "regnetz_b16",
    "efficientnet_b0",
    "tf_efficientnet_b0",
    "efficientnet_lite0",
    "mobilenetv2_100",
    "mobilenetv3_large_100",
    "mobilenetv3_small_050",
    "mixnet_s",
    "ghostnet_100",
    "mnasnet_100",
    "semnasnet_100",
    "fbnetc_100",
    "tinynet_e",
    "lcnet_050",
    "spnasnet_100",
    "hardcorenas_a",
    "rexnet_100",
    "densenet121",
    "dla34",
    "dla46_c",
    "dpn68",
    "cspresnet50",
    "cspdarknet53",
    "cspresnext50",
    "darknet53",
    "repvgg_a0",
    "repvgg_b0",
    "inception_v3",
    "inception_v4",
    "xception41",
    "legacy_xception",
    "hrnet_w18_small",
    "hrnet_w18_small_v2",
    "ese_vovnet19b_dw",
    "vovnet39a",
    "selecsls42b",
    "gernet_s",
    "mobilevitv2_050",
]
SMP = ["Unet", "FPN", "DeepLabV3Plus", "Linknet"]
DIFFUSERS = ["UNet2DModel"]
LARGE_INPUT = {
    "inception_v3": 96,
    "inception_v4": 96,
    "legacy_xception": 96,
    "xception41": 96,
    "bat_resnext26ts": 256,  # its attention has a fixed feature size
}


def build(spec: str) -> tuple[torch.nn.Module, tuple]:
    """A model spec (``timm:NAME``, ``smp:ARCH``, ``diffusers:UNet2DModel``) and its example input."""
    library, name = spec.split(":", 1)
    torch.manual_seed(0)
    if library == "timm":
        import timm

        model = timm.create_model(name, pretrained=False)
        size = LARGE_INPUT.get(name, 64)
        inputs = (torch.randn(1, 3, size, size),)
    elif library == "smp":
        import segmentation_models_pytorch as smp

        model = getattr(smp, name)(encoder_name="resnet18", encoder_weights=None, classes=3)
        inputs = (torch.randn(1, 3, 64, 64),)
    else:
        from diffusers import UNet2DModel

        model = UNet2DModel(
            sample_size=16,
            block_out_channels=(32, 64),
            layers_per_block=1,
            norm_num_groups=8,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        )
        inputs = (torch.randn(1, 3, 16, 16), torch.tensor([10]))
    return randomize_batchnorm(model.eval()), inputs
