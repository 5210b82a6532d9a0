"""Caption metrics: fast in-process BLEU / CIDEr-D and the pycocoevalcap report.

No Lightning / Hydra imports here (used by data, training and CLI code alike).
"""

from captioner.metrics.bleu import bleu
from captioner.metrics.cider import CiderD, cider_d
from captioner.metrics.coco_eval import EvalReport, JavaMetricError, evaluate_captions
from captioner.metrics.text import tokenize

__all__ = ["CiderD", "EvalReport", "JavaMetricError", "bleu", "cider_d", "evaluate_captions",
           "tokenize"]
