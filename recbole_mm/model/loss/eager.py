"""Autograd functions of a scalar loss that compute their gradients in the forward pass.

MambaRec's MMD and InfoNCE walk ``[N, N]`` kernel and logit matrices block by block; a backward pass
of its own would walk them again, recomputing every block's product and ``exp``. Training always
back-propagates these losses, so their forward passes compute the value and, from the same blocks,
the gradients of the inputs that need one; the backward only scales those by the gradient that
arrives (:class:`GradientInForward`)."""

from typing import List, Optional, Sequence

import torch


class GradientInForward(torch.autograd.Function):
    """Base of an autograd function with a scalar output whose ``forward`` computes the gradients.

    ``forward(ctx, *inputs, grad_enabled)`` asks :meth:`wanted` which of its first inputs need a
    gradient, computes those (None for the others), hands them to :meth:`keep` and returns the value;
    the inherited ``backward`` returns each kept gradient times the arriving one (None for the other
    arguments). ``grad_enabled`` is ``torch.is_grad_enabled()`` at the call: inside ``forward`` autograd
    is off, and ``ctx.needs_input_grad`` says what requires a gradient even under ``no_grad``, where
    nothing will ask for it."""

    @staticmethod
    def wanted(ctx, grad_enabled: bool, count: int) -> List[bool]:
        """Whether each of the first ``count`` inputs gets a gradient."""
        return [bool(need) and grad_enabled for need in ctx.needs_input_grad[:count]]

    @staticmethod
    def keep(ctx, gradients: Sequence[Optional[torch.Tensor]], inputs: Sequence[torch.Tensor]) -> None:
        """Keeps the gradients of the first inputs for ``backward`` (an empty tensor for a None)."""
        ctx.save_for_backward(*(g if g is not None else x.new_zeros(()) for g, x in zip(gradients, inputs)))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        kept = ctx.saved_tensors
        wanted = ctx.needs_input_grad
        return (*(grad * g if need else None for g, need in zip(kept, wanted)), *[None] * (len(wanted) - len(kept)))
