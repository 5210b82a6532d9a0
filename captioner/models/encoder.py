"""CNN image encoder: a torchvision backbone cut before its classifier, giving a spatial grid."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn


class EncoderWeightsError(RuntimeError):
    pass


def _local_weights(name: str, weights: str):
    """The torchvision weights enum for ``weights``, checked to be in the local torch cache.

    We never download at run time: a missing file is a one-line error saying where it belongs.
    """
    try:
        enum = torchvision.models.get_model_weights(name)
        w = enum[weights] if weights != "DEFAULT" else enum.DEFAULT
    except (KeyError, ValueError) as e:
        raise EncoderWeightsError(f"unknown weights {weights!r} for encoder {name!r}") from e
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name
    if not path.exists():
        raise EncoderWeightsError(
            f"weights {name}/{weights} are not in the local cache ({path}) and nothing is "
            "downloaded at run time: copy the file there, or use model.encoder.weights=null"
        )
    return w


def _backbone(name: str, model: nn.Module, return_layer: str | None) -> nn.Sequential:
    """Layers of ``model`` up to its last spatial feature map (or up to ``return_layer``)."""
    if name.startswith(("resnet", "resnext", "wide_resnet")):
        names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        if return_layer is not None:
            names = names[: names.index(return_layer) + 1]
        return nn.Sequential(*[getattr(model, n) for n in names])
    if hasattr(model, "features"):  # vgg, mobilenet, efficientnet, convnext, densenet ...
        features = model.features
        if return_layer is not None:
            features = features[: int(return_layer) + 1]
        return features
    raise ValueError(f"encoder {name!r}: don't know where its feature grid is")


class CNNEncoder(nn.Module):
    """Image (B, 3, H, W) -> region features (B, R, C), R = grid cells of the last feature map.

    Args:
        name: torchvision model name (resnet18/34/50/101, mobilenet_v3_large, efficientnet_b0 ...).
        weights: None for random init, or a torchvision weights name ("IMAGENET1K_V1", "DEFAULT")
            read from the local torch cache.
        trainable: False freezes the backbone (and keeps its BatchNorm in eval mode).
        return_layer: cut the backbone earlier (e.g. "layer3" for ResNets, an index for
            ``.features``) for a finer grid on small images.
        grid_size: adaptive-average-pool the map to grid_size x grid_size (None keeps it).
    """

    def __init__(
        self,
        name: str = "resnet18",
        weights: str | None = None,
        trainable: bool = True,
        return_layer: str | None = None,
        grid_size: int | None = None,
    ):
        super().__init__()
        w = _local_weights(name, weights) if weights else None
        if w is not None:
            model = torchvision.models.get_model(name)
            model.load_state_dict(torch.load(
                Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name, weights_only=True
            ))
        else:
            model = torchvision.models.get_model(name, weights=None)
        self.backbone = _backbone(name, model, return_layer)
        self.pool = nn.AdaptiveAvgPool2d(grid_size) if grid_size else nn.Identity()
        self.trainable = trainable
        with torch.no_grad():
            self.out_dim = self.backbone(torch.zeros(1, 3, 64, 64)).shape[1]
        if not trainable:
            self.backbone.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.trainable:
            self.backbone.eval()  # frozen BatchNorm statistics
        return self

    def forward(self, images: Tensor) -> Tensor:
        x = self.pool(self.backbone(images))  # (B, C, h, w)
        return x.flatten(2).transpose(1, 2)  # (B, R, C)
