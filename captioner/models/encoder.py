"""Where the encoders lived before ``captioner/models/encoders/``: kept so that configs and
checkpoints whose ``_target_`` says ``captioner.models.encoder.CNNEncoder`` (or
``...EfficientNetLiteEncoder``) still build, and old imports still work."""

from captioner.models.encoders import *  # noqa: F401,F403
from captioner.models.encoders import __all__  # noqa: F401
from captioner.models.encoders.torchvision import _backbone_blocks, _local_weights  # noqa: F401
