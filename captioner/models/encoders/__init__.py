"""Image encoders: images (B, 3, H, W) -> features (B, R, C), R regions of C channels.

One module per family; the libraries of the optional ones (timm, open_clip) are imported only
when such an encoder is built. ``ENCODER_CLASSES`` is what ``models/build.py`` allows."""

from captioner.models.encoders.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderWeightsError,
    GridEncoder,
    TokenEncoder,
    encoder_param_groups,
    from_checkpoint,
    inference_copy,
    make_preprocess,
)
from captioner.models.encoders.efficientnet_lite import (
    LITE_MEAN,
    LITE_STD,
    LITE_VARIANTS,
    EfficientNetLiteEncoder,
    efficientnet_lite,
)
from captioner.models.encoders.huggingface import HFEncoder
from captioner.models.encoders.open_clip import OpenCLIPEncoder
from captioner.models.encoders.timm import TimmEncoder
from captioner.models.encoders.torchvision import CNNEncoder, TorchvisionViTEncoder

ENCODER_CLASSES = (CNNEncoder, TorchvisionViTEncoder, EfficientNetLiteEncoder, TimmEncoder,
                   HFEncoder, OpenCLIPEncoder)

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "LITE_MEAN", "LITE_STD", "LITE_VARIANTS", "ENCODER_CLASSES",
    "CNNEncoder", "EfficientNetLiteEncoder", "EncoderWeightsError", "GridEncoder", "HFEncoder",
    "OpenCLIPEncoder", "TimmEncoder", "TokenEncoder", "TorchvisionViTEncoder",
    "efficientnet_lite", "encoder_param_groups", "from_checkpoint",
    "inference_copy", "make_preprocess",
]
