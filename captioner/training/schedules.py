"""Schedules of training techniques: the scheduled-sampling probability per epoch, and the
completion of learning-rate schedule factories that need the run's total number of steps."""

from __future__ import annotations

import inspect
from collections.abc import Callable


def scheduled_sampling_prob(epoch: int, start: float = 0.0, increase: float = 0.05,
                            every: int = 5, max_prob: float = 0.25) -> float:
    """Probability of feeding the model its own prediction instead of the ground-truth token:
    ``start``, raised by ``increase`` every ``every`` epochs up to ``max_prob`` (the ramp of
    Bengio et al. 2015 as used by the self-critical captioners)."""
    return min(max_prob, start + increase * (epoch // every))


def build_scheduler(factory: Callable, optimizer, num_training_steps: int):
    """Call a scheduler factory (Hydra ``_partial_``), giving it ``num_training_steps`` when it
    takes that argument and the config left it open (``transformers`` warm-up schedules)."""
    params = inspect.signature(factory).parameters
    if "num_training_steps" in params and params["num_training_steps"].default is inspect.Parameter.empty:
        return factory(optimizer=optimizer, num_training_steps=num_training_steps)
    return factory(optimizer=optimizer)
