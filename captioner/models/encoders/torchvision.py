"""torchvision backbones: CNNs (ResNet, MobileNet, EfficientNet, ConvNeXt, Swin ... cut before
their classifier: ``CNNEncoder``) and the Vision Transformer (``TorchvisionViTEncoder``: patch
tokens as regions). Weights are read from the local torch cache only."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from captioner.models.encoders.base import (
    FINAL,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderWeightsError,
    GridEncoder,
    TokenEncoder,
    make_preprocess,
    stored_architecture,
)


def _weights_enum(name: str, weights: str):
    try:
        enum = torchvision.models.get_model_weights(name)
        return enum[weights] if weights != "DEFAULT" else enum.DEFAULT
    except (KeyError, ValueError) as e:
        raise EncoderWeightsError(f"unknown weights {weights!r} for encoder {name!r}") from e


def _weights_path(w) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name


def _local_weights(name: str, weights: str):
    """The torchvision weights enum for ``weights``, checked to be in the local torch cache.

    We never download at run time: a missing file is a one-line error saying where it belongs.
    """
    w = _weights_enum(name, weights)
    path = _weights_path(w)
    if not path.exists():
        raise EncoderWeightsError(
            f"weights {name}/{weights} are not in the local cache ({path}) and nothing is "
            "downloaded at run time: copy the file there (with internet, once: python -c "
            f"\"import torchvision; torchvision.models.get_model('{name}', weights='{weights}')\"), "
            "or use model.encoder.weights=null"
        )
    return w


def _torchvision_model(name: str, weights: str | None) -> nn.Module:
    """The architecture, with the cached weights unless building from a checkpoint (whose state
    dict replaces them anyway)."""
    w = _local_weights(name, weights) if weights and stored_architecture() is None else None
    model = torchvision.models.get_model(name, weights=None)
    if w is not None:
        model.load_state_dict(torch.load(_weights_path(w), weights_only=True))
    return model


def _declared_transform(name: str, weights: str | None):
    """torchvision's own eval transform of these weights (or of the architecture's default
    weights: the statistics it was designed for), read from the weights' metadata: no download.
    None for a model torchvision has no weights for."""
    try:
        w = _weights_enum(name, weights or "DEFAULT")
    except EncoderWeightsError:
        return None
    return w.transforms()


def _interpolation(t) -> str:
    return t.interpolation.value if t is not None else "bilinear"


class _Stage(nn.Module):
    """A run of layers as one block (the stem or the head)."""

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def _backbone_blocks(name: str, model: nn.Module, return_layer: str | None) -> list[nn.Module]:
    """The stages of ``model`` up to its last spatial feature map (or up to ``return_layer``),
    in order: the units that ``trainable_layers`` counts from the end."""
    if name.startswith(("resnet", "resnext", "wide_resnet")):
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        names = ["layer1", "layer2", "layer3", "layer4"]
        if return_layer is not None:
            names = names[: names.index(return_layer) + 1]
        return [stem, *[getattr(model, n) for n in names]]
    if hasattr(model, "features"):  # vgg, mobilenet, efficientnet, convnext, densenet, swin ...
        features = model.features
        if return_layer is not None:
            features = features[: int(return_layer) + 1]
        blocks = list(features)
        if name.startswith("swin"):  # Swin's stages work channels-last: (B, h, w, C)
            last = return_layer is None or int(return_layer) == len(model.features) - 1
            # its final LayerNorm when the last stage is kept, then back to (B, C, h, w)
            blocks.append(_Stage(*([model.norm] if last else []), model.permute))
        return blocks
    raise ValueError(f"encoder {name!r}: don't know where its feature grid is "
                     "(vision transformers: model/encoder=torchvision_vit)")


class CNNEncoder(GridEncoder):
    """Image (B, 3, H, W) -> features (B, R, C), R = cells of the last feature map.

    Args:
        name: torchvision model name (resnet18/34/50/101, mobilenet_v3_large, efficientnet_b0,
            convnext_tiny, swin_t ...).
        weights: None for random init, or a torchvision weights name ("IMAGENET1K_V1", "DEFAULT")
            read from the local torch cache.
        trainable: False freezes the backbone for good (and keeps its BatchNorm in eval mode).
        trainable_layers: with trainable, only the last N blocks train (None: all). ResNet blocks:
            stem, layer1..layer4; ``.features`` models: its children (Swin: and its final norm).
        finetune_after_epoch: with trainable, keep the encoder frozen until this epoch (0-based),
            then unfreeze ``trainable_layers`` (Show, Attend and Tell's second stage).
        finetune_lr: learning rate of the encoder's weights (None: the optimizer's).
        return_layer: cut the backbone earlier (e.g. "layer3" for ResNets, an index for
            ``.features``) for a finer grid on small images.
        grid_size: adaptive-average-pool the map to grid_size x grid_size (None keeps it).

    Preprocessing: the mean, std and interpolation torchvision declares for the weights (every
    torchvision classification weight uses the ImageNet statistics), the image resized whole to
    the square ``data.image_size`` (any size works; no crop, so nothing a caption mentions near
    the border is cut off, as this project has always fed its CNNs).
    """

    def __init__(
        self,
        name: str = "resnet18",
        weights: str | None = None,
        trainable: bool = True,
        trainable_layers: int | None = None,
        finetune_after_epoch: int | None = None,
        finetune_lr: float | None = None,
        return_layer: str | None = None,
        grid_size: int | None = None,
    ):
        super().__init__()
        model = _torchvision_model(name, weights)
        self.name, self.weights = name, weights
        self.return_layer, self.grid_size = return_layer, grid_size
        t = _declared_transform(name, weights)
        self.preprocess = make_preprocess(
            t.crop_size[0] if t is not None else 224,
            t.mean if t is not None else IMAGENET_MEAN, t.std if t is not None else IMAGENET_STD,
            interpolation=_interpolation(t), any_size=True)
        self._setup(_backbone_blocks(name, model, return_layer), grid_size, trainable,
                    trainable_layers, finetune_after_epoch, finetune_lr)

    def identity(self) -> dict:
        return {"class": "CNNEncoder", "name": self.name, "weights": self.weights,
                "return_layer": self.return_layer, "grid_size": self.grid_size}


class TorchvisionViTEncoder(TokenEncoder):
    """torchvision's Vision Transformer (vit_b_16, vit_b_32, vit_l_16, vit_h_14): (B, 3, S, S)
    -> features (B, R, C), R = (S / patch)^2 patch tokens (+1 with ``class_token=keep``), after
    the encoder's final LayerNorm. Its position embeddings fix the input size S (224; 384 or 518
    for the SWAG weights).

    Args:
        name / weights: as ``CNNEncoder`` (weights from the local torch cache).
        class_token: ``drop`` (regions are the patches) or ``keep`` (the class token as an
            extra first region).
        trainable / trainable_layers / finetune_after_epoch / finetune_lr: as ``CNNEncoder``;
            units: the stem (patch projection, class token, position embeddings), then
            each encoder layer (the last with the final LayerNorm).

    Preprocessing: torchvision's declared eval transform of the weights (shorter side resized,
    centre crop, ImageNet statistics).
    """

    def __init__(
        self,
        name: str = "vit_b_16",
        weights: str | None = None,
        class_token: str = "drop",
        trainable: bool = False,
        trainable_layers: int | None = None,
        finetune_after_epoch: int | None = None,
        finetune_lr: float | None = None,
    ):
        super().__init__()
        if not name.startswith("vit_"):
            raise ValueError(f"TorchvisionViTEncoder: {name!r} is not a torchvision ViT "
                             "(CNNs, ConvNeXt and Swin: model/encoder=resnet18 with name=...)")
        self.model = _torchvision_model(name, weights)
        self.model.heads = nn.Identity()  # the classifier: not part of the features
        self.name, self.weights = name, weights
        self.out_dim = self.model.hidden_dim
        t = _declared_transform(name, weights)
        size = self.model.image_size
        self.preprocess = make_preprocess(
            size, t.mean, t.std, interpolation=_interpolation(t), resize="shorter",
            resize_size=t.resize_size[0] * size // t.crop_size[0])
        layer = re.compile(r"^encoder\.layers\.encoder_layer_(\d+)\.")
        units = {}
        for n, _ in self.model.named_parameters():
            m = layer.match(n)
            units[n] = int(m.group(1)) + 1 if m else (FINAL if n.startswith("encoder.ln.") else 0)
        self._setup(units, class_token, True, trainable, trainable_layers, finetune_after_epoch,
                    finetune_lr)

    def tokens(self, images: Tensor) -> tuple[Tensor, int]:
        x = self.model._process_input(images)  # (B, h*w, C); checks the input size
        cls = self.model.class_token.expand(x.shape[0], -1, -1)
        return self.model.encoder(torch.cat([cls, x], dim=1)), 1  # (B, 1 + h*w, C), LayerNorm'd

    def identity(self) -> dict:
        return {"class": "TorchvisionViTEncoder", "name": self.name, "weights": self.weights,
                "class_token": self.class_token}
