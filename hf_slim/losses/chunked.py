"""The chunked head loss: project a chunk of hidden states at a time, gradient computed in the forward pass.

A term gives [`_ChunkedHeadLoss`] its per-chunk loss function ([`_ChunkLossFn`]); the autograd function owns the
projection, the chunk loop and the gradients wrt the hidden states, head weight and head bias.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


# A chunk's loss function: (first row, end row, a thunk returning the chunk's float32/64 student logits [rows, vocab],
# whether the gradient is wanted) -> (summed loss of the chunk, gradient of that sum wrt the logits or None). The thunk
# hands the only reference to the logits to the loss function, so it can free them as soon as it has used them.
_ChunkLossFn = Callable[[int, int, Callable[[], torch.Tensor], bool], tuple[torch.Tensor, torch.Tensor | None]]


def _loss_dtype(weight: torch.Tensor) -> torch.dtype:
    """Float32, or float64 for float64 heads (so float64 references can be matched tightly)."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _project(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Logits `[rows, vocab]` of a chunk of hidden states, computed in the head's dtype like the model does, then
    upcast to at least float32 for the softmax."""
    hidden = hidden.to(weight.dtype)
    logits = torch.mm(hidden, weight.t()) if bias is None else torch.addmm(bias.to(weight.dtype), hidden, weight.t())
    return logits.to(_loss_dtype(weight))


class _ChunkedHeadLoss(torch.autograd.Function):
    """Scalar `scale · Σ_chunks chunk_loss(hidden[chunk] @ weight.T + bias)` without keeping `[rows, vocab]` alive.

    In the default mode the gradients wrt `hidden`, `weight` and `bias` are accumulated chunk by chunk during the
    forward pass and only multiplied by the incoming gradient in `backward` (no second projection of either model).
    With `recompute=True` the forward keeps nothing but its inputs and the backward projects every chunk again:
    less memory held between forward and backward (no `[vocab, hidden]` gradient buffer), about 1.5x the matmuls.
    """

    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        chunk_loss: _ChunkLossFn,
        chunk_size: int,
        scale: torch.Tensor,
        recompute: bool,
    ) -> torch.Tensor:
        ctx.set_materialize_grads(False)
        ctx.chunk_loss, ctx.chunk_size, ctx.recompute = chunk_loss, chunk_size, recompute
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.acc_dtype = _loss_dtype(weight)
        wants = tuple(ctx.needs_input_grad[:3])
        if recompute or not any(wants):
            total = _ChunkedHeadLoss._run(hidden, weight, bias, chunk_loss, chunk_size, None, (False,) * 3)[0]
            ctx.save_for_backward(hidden, weight, bias, scale)
            return total * scale
        total, grads = _ChunkedHeadLoss._run(hidden, weight, bias, chunk_loss, chunk_size, scale, wants)
        ctx.save_for_backward(*grads)
        return total * scale

    @staticmethod
    def _run(
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        chunk_loss: _ChunkLossFn,
        chunk_size: int,
        scale: torch.Tensor | None,
        wants: tuple[bool, bool, bool],
    ) -> tuple[torch.Tensor, tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]]:
        want_h, want_w, want_b = wants
        want_any = want_h or want_w or want_b
        n = hidden.shape[0]
        acc = _loss_dtype(weight)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        # Gradients accumulate in float32 (float64 for float64 heads) whatever the parameter dtype.
        grad_h = torch.empty(hidden.shape, dtype=acc, device=hidden.device) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if want_b else None
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            h = hidden[start:end]
            loss, grad_logits = chunk_loss(start, end, lambda h=h: _project(h, weight, bias), want_any)
            total += loss
            if not want_any:
                continue
            grad_logits.mul_(scale)
            if grad_h is not None:
                if weight.dtype == acc:
                    torch.mm(grad_logits, weight, out=grad_h[start:end])
                else:
                    grad_h[start:end] = torch.mm(grad_logits.to(weight.dtype), weight)
            if grad_w is not None:
                grad_w.addmm_(grad_logits.t(), h.to(acc))
            if grad_b is not None:
                grad_b += grad_logits.sum(0)
            del grad_logits
        return total, (grad_h, grad_w, grad_b)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor | None):  # type: ignore[override]
        if grad_out is None:
            return (None,) * 7
        if ctx.recompute:
            hidden, weight, bias, scale = ctx.saved_tensors
            wants = tuple(ctx.needs_input_grad[:3])
            _, (grad_h, grad_w, grad_b) = _ChunkedHeadLoss._run(
                hidden, weight, bias, ctx.chunk_loss, ctx.chunk_size, scale * grad_out.to(scale.dtype), wants
            )
        else:
            grad_h, grad_w, grad_b = ctx.saved_tensors
            g = grad_out.to(ctx.acc_dtype)
            # In place: a second backward through the same graph then fails loudly on the version check instead of
            # needing a second [V, H] buffer here.
            for grad in (grad_h, grad_w, grad_b):
                if grad is not None:
                    grad.mul_(g)
        out = tuple(None if t is None else t.to(d) for t, d in zip((grad_h, grad_w, grad_b), ctx.dtypes))
        return (*out, None, None, None, None)


def _scale(
    n_counted: torch.Tensor,
    factor: float,
    reduction: str,
    num_items_in_batch: int | torch.Tensor | None,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    if num_items_in_batch is not None:
        denom = torch.as_tensor(num_items_in_batch).to(device=device, dtype=dtype)
    elif reduction == "mean":
        denom = n_counted.to(device=device, dtype=dtype).clamp_min(1.0)
    else:
        denom = torch.ones((), dtype=dtype, device=device)
    return factor / denom
