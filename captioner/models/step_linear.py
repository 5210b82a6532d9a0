"""A weight read by every step of a recurrence, whose gradient is summed once over all steps.

    linear = DeferredLinear(weight)      # (out, in)
    y_t = linear(x_t)                    # x_t (n_t, in) -> (n_t, out), at every step t

Backward through T plain ``x_t @ w.T`` does T rank-n_t updates of the whole weight gradient, each
a memory-bound pass over it (16 MB a step for 2048-channel features). Here each step's backward
only records (dL/dy_t, x_t), and the weight gradient of all steps is one (out, P) @ (P, in)
matmul, P = sum of n_t. Same gradient up to float rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor


class StepLinear(torch.autograd.Function):
    """y = x @ w.T for one step, whose weight gradient is left to ``AllSteps``: its backward only
    records (dL/dy, x)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, store: list) -> Tensor:
        x = x.to(w.dtype)
        ctx.save_for_backward(x, w)
        ctx.store = store
        return x @ w.t()

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, w = ctx.saved_tensors
        ctx.store.append((grad, x))
        return grad @ w, None, None


class AllSteps(torch.autograd.Function):
    """Identity on a weight that every step reads through ``StepLinear``. Autograd runs its
    backward after all the steps' (they consume its output), and there the recorded steps
    become one matmul."""

    @staticmethod
    def forward(ctx, w: Tensor, store: list) -> Tensor:
        ctx.store = store
        ctx.set_materialize_grads(False)
        return w.view_as(w)

    @staticmethod
    def backward(ctx, _unused):
        grads, inputs = zip(*ctx.store)
        ctx.store.clear()
        return torch.cat(grads).t() @ torch.cat(inputs), None


class DeferredLinear:
    """``x -> x @ weight.T`` for the steps of one forward pass (build a new one per pass)."""

    def __init__(self, weight: Tensor):
        self.store: list = []  # (dL/dy_t, x_t) of every step, filled in backward
        self.weight = AllSteps.apply(weight, self.store)

    def __call__(self, x: Tensor) -> Tensor:
        return StepLinear.apply(x, self.weight, self.store)
