"""What every encoder shares: the (B, R, C) contract, freezing by unit, the optimizer groups of
its tunable weights, the preprocessing it declares, and an inference copy for feature caching.

Every encoder maps a batch of preprocessed images (B, 3, H, W) to ``features`` (B, R, C): R
regions of C channels (grid cells of a CNN's last feature map, or a vision transformer's patch
tokens), and shares the fine-tuning interface used by the training module:

    encoder.set_trainable(n)        # None: every unit, 0: frozen, n: the last n units
    encoder.trainable_layers        # n to unfreeze (after ``finetune_after_epoch`` if set)
    encoder.finetune_after_epoch    # None: train from the start (when trainable)
    encoder.finetune_lr             # None: the optimizer's learning rate
    encoder_param_groups(encoder)   # the optimizer group(s) of the encoder's tunable weights
    encoder.identity()              # plain data naming the weights + architecture (cache keys)
    encoder.preprocess              # the input it expects (``Preprocess`` below)
    encoder.out_dim                 # C

Nothing is downloaded at run time: every family reads its weights from local files, and a missing
file is one ``EncoderWeightsError`` line naming the model and where the file belongs.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy

import torch
from torch import Tensor, nn

from captioner.utils.errors import InputError

# The statistics torchvision's ImageNet weights were trained with (and so the input contract of
# the torchvision CNNs and of EfficientNet-Lite, which re-normalises inside, see there).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


class EncoderWeightsError(InputError, RuntimeError):
    """Weights (or a library) an encoder needs are not on this machine; the message names the
    model and where the file belongs. An ``InputError``: the CLIs print it as one line."""


def make_preprocess(size, mean, std, interpolation: str = "bilinear", resize: str = "squash",
                    resize_size=None, any_size: bool = False) -> dict:
    """The input an encoder expects, as plain data (stored in checkpoints, so captioning feeds
    exactly what training fed; ``data/images.py`` builds the transform from it):

    - ``size`` [H, W]: the images the encoder takes.
    - ``resize``: ``squash`` (resize straight to ``resize_size``, aspect not kept) or ``shorter``
      (the shorter side to ``resize_size``, aspect kept); then a centre crop to ``size`` when the
      resized image is larger. ``resize_size`` None: ``size``.
    - ``mean`` / ``std``: per-channel normalisation of pixels scaled to [0, 1].
    - ``interpolation``: of the resize (``INTERPOLATIONS``).
    - ``any_size``: the encoder takes other sizes too (CNNs), so ``data.image_size`` may choose
      one; False for vision transformers with learned position embeddings of one size.
    """
    size = [int(size), int(size)] if isinstance(size, (int, float)) else [int(s) for s in size]
    if resize not in ("squash", "shorter"):
        raise ValueError(f"resize must be squash or shorter, got {resize!r}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if resize_size is None:
        resize_size = size if resize == "squash" else min(size)
    elif isinstance(resize_size, (list, tuple)):
        resize_size = [int(s) for s in resize_size]
    else:
        resize_size = int(resize_size) if resize == "shorter" else [int(resize_size)] * 2
    return {"size": size, "resize": resize, "resize_size": resize_size,
            "interpolation": interpolation, "mean": [float(m) for m in mean],
            "std": [float(s) for s in std], "any_size": bool(any_size)}


# --- building from a checkpoint ----------------------------------------------------------------
# A checkpoint holds every weight of the encoder, so rebuilding it must not need the pretrained
# files (or, for Hugging Face and open_clip, even the folder the architecture came from): while
# ``from_checkpoint(info)`` is active, encoders build their architecture from ``info`` (what
# their ``architecture()`` returned at training time) with random weights that the checkpoint's
# state dict then replaces.
_STORED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("encoder_stored", default=None)


@contextlib.contextmanager
def from_checkpoint(info: dict | None):
    token = _STORED.set(dict(info) if isinstance(info, dict) else {})
    try:
        yield
    finally:
        _STORED.reset(token)


def stored_architecture() -> dict | None:
    """The checkpoint's ``architecture()`` record while one is being loaded, else None."""
    return _STORED.get()


class TrainableMixin:
    """Fine-tuning state shared by every family: ``trainable``, ``trainable_layers`` counted in
    units from the end, ``finetune_after_epoch``, ``finetune_lr``."""

    def _check_trainable(self, num_units: int, trainable: bool, trainable_layers: int | None,
                         finetune_after_epoch: int | None, finetune_lr: float | None) -> None:
        if finetune_after_epoch is not None and not trainable:
            raise ValueError("model.encoder.finetune_after_epoch needs model.encoder.trainable=true")
        if trainable_layers is not None and not 0 <= trainable_layers <= num_units:
            raise ValueError(f"model.encoder.trainable_layers={trainable_layers}: this encoder has "
                             f"{num_units} blocks")
        self.trainable, self.trainable_layers = trainable, trainable_layers
        self.finetune_after_epoch, self.finetune_lr = finetune_after_epoch, finetune_lr

    def _initially_trainable(self) -> int:
        # Fine-tuning later starts frozen; trainable now means the chosen last units train.
        now = self.trainable and self.finetune_after_epoch is None
        return self.trainable_layers if now else 0

    def architecture(self) -> dict | None:
        """What a checkpoint needs, beside the config, to rebuild this encoder offline."""
        return None


class GridEncoder(TrainableMixin, nn.Module):
    """A CNN as ``self.blocks`` (an nn.Sequential of stages): freezing by block, frozen BatchNorm
    statistics in frozen blocks, optional input re-normalisation and grid pooling."""

    def _setup(self, blocks: list[nn.Module], grid_size: int | None, trainable: bool,
               trainable_layers: int | None, finetune_after_epoch: int | None,
               finetune_lr: float | None) -> None:
        self._check_trainable(len(blocks), trainable, trainable_layers, finetune_after_epoch,
                              finetune_lr)
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(grid_size) if grid_size else nn.Identity()
        with torch.no_grad():  # in eval mode: a dummy batch must not touch BatchNorm statistics
            self.out_dim = self.blocks.eval()(torch.zeros(1, 3, 64, 64)).shape[1]
        self.set_trainable(self._initially_trainable())

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
        return x.flatten(2).transpose(1, 2)  # features (B, R, C)

    # --- the frozen trunk: what a fine-tuning run may cache ---------------------------------
    @property
    def trunk_blocks(self) -> int:
        """How many leading blocks never train in this run (all when not trainable)."""
        if not self.trainable:
            return self.num_blocks
        return self.num_blocks - (self.num_blocks if self.trainable_layers is None
                                  else self.trainable_layers)

    def frozen_trunk(self) -> nn.Module | None:
        """The leading blocks that never train, as a module mapping images (B, 3, H, W) to their
        map ((B, C', h, w) for most CNNs, (B, h, w, C') for Swin): fixed for the whole run, so a
        data module may cache it while the last ``trainable_layers`` blocks fine-tune on top
        (``from_trunk``). None when every block trains (nothing to cache) or none does (cache
        the whole encoder instead)."""
        k = self.trunk_blocks
        return FrozenTrunk(self, k) if 0 < k < self.num_blocks else None

    def from_trunk(self, x: Tensor) -> Tensor:
        """The rest of ``forward`` after ``frozen_trunk``: (B, C', h, w) -> features (B, R, C)."""
        x = self.pool(self.blocks[self.trunk_blocks:](x))  # (B, C, h, w)
        return x.flatten(2).transpose(1, 2)


class FrozenTrunk(nn.Module):
    """The first ``k`` blocks of a ``GridEncoder`` (sharing its modules), always in eval mode:
    frozen blocks keep their BatchNorm statistics and drop nothing, so their output is a pure
    function of the image and its cache stays valid while the blocks after them train."""

    def __init__(self, encoder: GridEncoder, k: int):
        super().__init__()
        # The encoder's own input buffers (EfficientNet-Lite's re-normalisation), as this
        # module's: copies and device moves of the trunk take them along, not the whole encoder.
        for name, buf in encoder.named_buffers(recurse=False):
            self.register_buffer(name, buf, persistent=False)
        self._normalise = type(encoder).normalise  # reads only those buffers
        self.blocks = encoder.blocks[:k]
        self._identity = {**encoder.identity(), "trunk_blocks": k}
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    def identity(self) -> dict:  # the cache key: the encoder's, and where the trunk ends
        return self._identity

    def forward(self, images: Tensor) -> Tensor:
        return self.blocks(self._normalise(self, images))  # the block's map, e.g. (B, C', h, w)


CLASS_TOKEN = ("drop", "keep")
FINAL = 10**6  # unit of a final norm: trains with the last block (``TokenEncoder._setup``)


class TokenEncoder(TrainableMixin, nn.Module):
    """A wrapped library model (timm, Hugging Face, open_clip, torchvision ViT) as ``self.model``.

    Fine-tuning units come from parameter names (``_units``: name -> unit index, or None for
    weights the features never use, e.g. a pooling head, which stay frozen): for vision
    transformers the stem (patch embedding, class token, position embeddings), then each
    transformer block, the final norm (``FINAL``) with the last, so ``trainable_layers=N`` is the
    last N blocks. A frozen unit's modules stay in eval mode (no dropout, no
    BatchNorm statistics updates).

    Subclasses set ``self.model``, ``self.out_dim``, ``self.preprocess`` and call ``_setup``;
    ``tokens(images)`` returns the model's output sequence (B, N, C) with ``num_prefix`` leading
    non-patch tokens (class token first, then any register tokens), or a map (B, C, h, w).
    """

    def _setup(self, units: dict[str, int | None], class_token: str, has_class_token: bool,
               trainable: bool, trainable_layers: int | None, finetune_after_epoch: int | None,
               finetune_lr: float | None) -> None:
        if class_token not in CLASS_TOKEN:
            raise ValueError(f"model.encoder.class_token={class_token!r}: one of {CLASS_TOKEN}")
        if class_token == "keep" and not has_class_token:
            raise ValueError("model.encoder.class_token=keep: this model has no class token "
                             "(use class_token=drop)")
        self.class_token = class_token
        blocks = [u for u in units.values() if u is not None and u != FINAL]
        last = max(blocks, default=0)  # the final norm is part of the last block's unit
        units = {k: (last if u == FINAL else u) for k, u in units.items()}
        used = sorted({u for u in units.values() if u is not None})
        renumber = {u: i for i, u in enumerate(used)}  # contiguous 0..n-1, order kept
        self._units = {k: (None if u is None else renumber[u]) for k, u in units.items()}
        self._num_units = len(used)
        self._check_trainable(self._num_units, trainable, trainable_layers, finetune_after_epoch,
                              finetune_lr)
        self.set_trainable(self._initially_trainable())

    @property
    def num_blocks(self) -> int:
        return self._num_units

    def _trainable_units(self, n: int | None) -> range:
        n = self._num_units if n is None else n
        return range(self._num_units - n, self._num_units)

    def set_trainable(self, n: int | None) -> None:
        """Make the last ``n`` units trainable (None: all, 0: none) and freeze the rest."""
        on = self._trainable_units(n)
        self.num_trainable = len(on)
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._units.get(name) in on)
        self.train(self.training)

    def tunable_parameters(self) -> list[nn.Parameter]:
        if not self.trainable:
            return []
        on = self._trainable_units(self.trainable_layers)
        return [p for name, p in self.model.named_parameters() if self._units.get(name) in on]

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:  # a module whose weights are all frozen (or, without weights, whose nearest
            # parent's are) runs in eval mode: no dropout, no BatchNorm statistics updates
            frozen = {}
            for name, m in self.model.named_modules():
                params = list(m.parameters(recurse=False))
                if params:
                    frozen[name] = not any(p.requires_grad for p in params)
                else:
                    parent = name.rpartition(".")[0] if name else None
                    while parent is not None and parent not in frozen:
                        parent = parent.rpartition(".")[0] if parent else None
                    frozen[name] = frozen.get(parent, False) if parent is not None else False
                if frozen[name] and not list(m.children()):
                    m.eval()
        return self

    def tokens(self, images: Tensor) -> tuple[Tensor, int]:
        raise NotImplementedError

    def forward(self, images: Tensor) -> Tensor:
        x, num_prefix = self.tokens(images)
        if x.dim() == 4:  # a CNN's map (B, C, h, w)
            return x.flatten(2).transpose(1, 2)  # features (B, R, C)
        patches = x[:, num_prefix:]  # (B, h*w, C): register tokens are never regions
        if self.class_token == "keep":  # the class token as one more region, first
            return torch.cat([x[:, :1], patches], dim=1)  # (B, 1 + h*w, C)
        return patches  # features (B, R, C)


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


def lazy_import(module: str, family: str):
    """An optional library, or one line saying how to install it (the base install lacks it)."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise EncoderWeightsError(
            f"model/encoder={family} needs the package {module} "
            f"(pip install 'captioner[encoders]', or pip install {module})") from None


@torch.no_grad()
def inference_copy(encoder: nn.Module) -> nn.Module:
    """An eval-mode copy for feature extraction: every BatchNorm that directly follows a
    convolution is folded into it, in channels-last layout (together 2.2x the fp32 throughput of
    EfficientNet-Lite0 on a 2-core CPU). Same function up to float rounding; callers check one
    batch against the original (``data.feature_cache._extract``) since adjacency in registration
    order is what defines "follows" here."""
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
