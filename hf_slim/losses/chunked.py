"""The chunked head loss: project a chunk of hidden states at a time, gradient computed in the forward pass.

A loss over one shared head is a list of [`_Segment`]s: a block of hidden-state rows with its per-chunk loss function
([`_ChunkLossFn`]), which may compute several terms at once (e.g. the LM and KD terms of one depth), and the weight of
each term in the returned total. [`_ChunkedHeadLoss`] owns the projection, the chunk loop and the gradients wrt the
hidden states, head weight and head bias; every segment accumulates into ONE head-weight gradient buffer, so a
multi-term objective holds a single `[vocab, hidden]` buffer between forward and backward instead of one per term.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


# A chunk's loss function: (first row, end row, a thunk returning the chunk's float32/64 student logits [rows, vocab],
# the weight of each term in the total or None) -> (the chunk's summed loss of each term [terms], and, when weights are
# given, the gradient of `Σ_j weights[j] · loss[j]` wrt the logits, else None). The thunk hands the only reference to
# the logits to the loss function, so it can free them as soon as it has used them.
_ChunkLossFn = Callable[
    [int, int, Callable[[], torch.Tensor], torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]
]


@dataclass(frozen=True)
class _Segment:
    """Rows of hidden states sharing a chunk loss function.

    `coefs` (`[terms]`, the loss dtype) weighs the chunk function's terms in the total; `grad` is False when no term
    of the segment is wanted in the gradient (every weight is zero): its terms are then computed for the logs only.
    """

    chunk_loss: _ChunkLossFn
    coefs: torch.Tensor
    grad: bool = True


def _loss_dtype(weight: torch.Tensor) -> torch.dtype:
    """Float32, or float64 for float64 heads (so float64 references can be matched tightly)."""
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _project(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Logits `[rows, vocab]` of a chunk of hidden states, computed in the head's dtype like the model does, then
    upcast to at least float32 for the softmax."""
    hidden = hidden.to(weight.dtype)
    logits = torch.mm(hidden, weight.t()) if bias is None else torch.addmm(bias.to(weight.dtype), hidden, weight.t())
    return logits.to(_loss_dtype(weight))


def _add_coef(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor:
    """`a + b` of two optional coefficients, at least one given."""
    if a is None or b is None:
        return a if b is None else b
    return a + b


class _ChunkedHeadLoss(torch.autograd.Function):
    """`(Σ_segments coefs · chunk-summed terms, the terms)` of `hidden_i @ weight.T + bias`, chunk by chunk.

    No `[rows, vocab]` tensor is kept alive. In the default mode the gradients wrt every segment's hidden rows and
    the shared head weight and bias are accumulated chunk by chunk during the forward pass (one float32 head buffer
    for all segments) and only multiplied by the incoming gradient in `backward` (no second projection of either
    model). With `recompute=True` the forward keeps nothing but its inputs and the backward projects every chunk
    again: nothing `[vocab, hidden]` is held between forward and backward, at about 1.5x the matmuls.

    The second output (the per-term sums, concatenated over segments) is for logging and has no gradient.
    """

    @staticmethod
    def forward(
        ctx,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        segments: Sequence[_Segment],
        chunk_size: int,
        recompute: bool,
        grad_enabled: bool,
        *hiddens: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)
        ctx.segments, ctx.chunk_size, ctx.recompute = segments, chunk_size, recompute
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype, *(h.dtype for h in hiddens))
        ctx.acc_dtype = _loss_dtype(weight)
        # under torch.no_grad() needs_input_grad still reflects requires_grad: skip the gradient work then
        wants = tuple(bool(w) and grad_enabled for w in (*ctx.needs_input_grad[:2], *ctx.needs_input_grad[6:]))
        if recompute or not any(wants):
            values, _ = _ChunkedHeadLoss._run(weight, bias, segments, hiddens, chunk_size, None, wants)
            ctx.save_for_backward(weight, bias, *hiddens)
        else:
            one = torch.ones((), dtype=ctx.acc_dtype, device=weight.device)
            values, grads = _ChunkedHeadLoss._run(weight, bias, segments, hiddens, chunk_size, one, wants)
            ctx.save_for_backward(*grads)
        total = sum((seg.coefs.to(v.dtype) * v).sum() for seg, v in zip(segments, values))
        if not segments:
            total = torch.zeros((), dtype=ctx.acc_dtype, device=weight.device)
        terms = torch.cat(values) if values else torch.zeros(0, dtype=ctx.acc_dtype, device=weight.device)
        ctx.mark_non_differentiable(terms)
        return total, terms

    @staticmethod
    def _run(
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        segments: Sequence[_Segment],
        hiddens: Sequence[torch.Tensor],
        chunk_size: int,
        grad_scale: torch.Tensor | None,
        wants: tuple[bool, ...],
    ) -> tuple[list[torch.Tensor], tuple[torch.Tensor | None, ...]]:
        """Per-segment term sums and, when `grad_scale` is given, `grad_scale` times the gradients of the total wrt
        `(weight, bias, *hiddens)` (None where not wanted)."""
        want_w, want_b, want_hs = wants[0], wants[1], wants[2:]
        acc = _loss_dtype(weight)
        contributes = [
            grad_scale is not None and seg.grad and (want_w or want_b or want_h)
            for seg, want_h in zip(segments, want_hs)
        ]
        # Gradients accumulate in float32 (float64 for float64 heads) whatever the parameter dtype; one head buffer
        # for every segment.
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w and any(contributes) else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if want_b and any(contributes) else None
        values, grad_hs = [], []
        for seg, hidden, want_h, grad_on in zip(segments, hiddens, want_hs, contributes):
            n = hidden.shape[0]
            coefs = seg.coefs.to(device=hidden.device, dtype=acc) * grad_scale if grad_on else None
            total = torch.zeros(seg.coefs.shape, dtype=acc, device=hidden.device)
            grad_h = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if grad_on and want_h else None
            for start in range(0, n, chunk_size):
                end = min(start + chunk_size, n)
                h = hidden[start:end]
                loss, grad_logits = seg.chunk_loss(start, end, lambda h=h: _project(h, weight, bias), coefs)
                total += loss
                if grad_logits is None:
                    continue
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
            values.append(total)
            grad_hs.append(grad_h)
        return values, (grad_w, grad_b, *grad_hs)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor | None, _grad_terms: torch.Tensor | None):  # type: ignore[override]
        n_hiddens = len(ctx.dtypes) - 2
        if grad_out is None:
            return (None,) * (6 + n_hiddens)
        wants = (*ctx.needs_input_grad[:2], *ctx.needs_input_grad[6:])
        if ctx.recompute:
            weight, bias, *hiddens = ctx.saved_tensors
            _, grads = _ChunkedHeadLoss._run(
                weight, bias, ctx.segments, hiddens, ctx.chunk_size, grad_out.to(ctx.acc_dtype), wants
            )
        else:
            grads = ctx.saved_tensors
            g = grad_out.to(ctx.acc_dtype)
            # In place: a second backward through the same graph then fails loudly on the version check instead of
            # needing a second [V, H] buffer here.
            for grad in grads:
                if grad is not None:
                    grad.mul_(g)
        out = [None if t is None or not w else t.to(d) for t, d, w in zip(grads, ctx.dtypes, wants)]
        return (out[0], out[1], None, None, None, None, *out[2:])


def _head_loss(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    segments: Sequence[_Segment],
    hiddens: Sequence[torch.Tensor],
    chunk_size: int,
    recompute: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(total, per-term sums)` of `segments` on `hiddens` (one `[rows, hidden]` tensor each), see [`_ChunkedHeadLoss`]."""
    return _ChunkedHeadLoss.apply(
        weight, bias, tuple(segments), chunk_size, recompute, torch.is_grad_enabled(), *hiddens
    )


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
