"""The LLM's cross-entropy read only where there are labels.

Stages 2 and 3 label the answer alone: a caption of a few dozen tokens after 32 or more media and prompt
positions. The output layer and the loss therefore run on the positions whose next token is labelled: their
hidden states are gathered, and the [N, V] logits are formed a chunk of rows at a time inside one autograd
function that also forms the gradient there, so neither the [B, L, V] logits of the whole batch nor the [N, V]
logits of the answers are ever kept for backward. The result is the mean over the labelled tokens, as a
full-logits ``cross_entropy(..., ignore_index=IGNORE_INDEX)`` gives it, and each row's summed loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xllm.models.llm.base import LLMOutput
from xllm.processors.batch import IGNORE_INDEX

LOGIT_CHUNK_ELEMENTS = 1 << 23  # logits formed at once: 32 MiB in fp32 (170 rows of a 49,152-word vocabulary)


def shifted_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, columns, targets): every position whose next token is labelled, row-major, and that token."""
    following = labels[:, 1:]
    rows, columns = (following != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows, columns, following[rows, columns]


def answer_loss(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None = None) -> LLMOutput:
    """The loss of the output layer ``hidden @ weight.T + bias`` ([B, L, H] final hidden states) at ``labels``."""
    rows, columns, targets = shifted_targets(labels)
    total, per_token = linear_cross_entropy(hidden[rows, columns], weight, bias, targets)
    return summarise(total, per_token, rows, labels.shape[0])


def loss_from_logits(logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, batch: int) -> LLMOutput:
    """The loss from logits [N, V] already formed at the ``shifted_targets`` positions."""
    per_token = F.cross_entropy(logits.float(), targets, reduction="none")
    return summarise(per_token.sum(), per_token.detach(), rows, batch)


def summarise(total: torch.Tensor, per_token: torch.Tensor, rows: torch.Tensor, batch: int) -> LLMOutput:
    """The mean over labelled tokens (NaN for none, as ``cross_entropy`` gives) and per-row sums and counts."""
    row_units = torch.bincount(rows, minlength=batch)
    row_loss = torch.zeros(batch, dtype=per_token.dtype, device=per_token.device).index_add_(0, rows, per_token)
    return LLMOutput(loss=total / row_units.sum(), row_loss=row_loss, row_units=row_units)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, per-token losses without gradient) of ``cross_entropy(hidden @ weight.T + bias, targets)``.

    The matmuls run in the dtype the ordinary path would use (autocast's, else the weight's) and the softmax in
    fp32, as ``cross_entropy(logits.float())`` does."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    wanted = tuple(torch.is_grad_enabled() and t is not None and t.requires_grad for t in (hidden, weight, bias))
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, dtype, wanted)


class _LinearCrossEntropy(torch.autograd.Function):
    """Written out because torch offers no chunked linear + cross-entropy on CPU: autograd through chunks would
    keep every chunk's logits for backward. The output layer is frozen in stages 2 and 3, so what backward needs
    is d loss / d hidden, [N, H]: it is formed here, chunk by chunk, from each chunk's softmax. A trained output
    layer (the tiny ChatGLM's pre-training ties it to the embedding) accumulates its gradient the same way."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, dtype, wanted):
        with torch.autocast(hidden.device.type, enabled=False):
            matrix = weight.to(dtype)
            offset = None if bias is None else bias.to(dtype)
            exact = torch.promote_types(dtype, torch.float32)  # the softmax's dtype: fp32, or fp64 for fp64
            per_token = torch.empty(hidden.shape[0], dtype=exact, device=hidden.device)
            grad_hidden, grad_weight, grad_bias = (
                torch.zeros(t.shape, dtype=exact, device=t.device) if want else None
                for t, want in zip((hidden, weight, bias), wanted))
            step = max(1, LOGIT_CHUNK_ELEMENTS // weight.shape[0])
            for start in range(0, hidden.shape[0], step):
                chunk = hidden[start:start + step].to(dtype)
                aim = targets[start:start + step]
                logits = F.linear(chunk, matrix, offset).to(exact)
                norm = torch.logsumexp(logits, dim=-1)
                per_token[start:start + step] = norm - logits.gather(1, aim[:, None]).squeeze(1)
                if not any(wanted):
                    continue
                # d loss_i / d logits_i = softmax(logits_i) - onehot(target_i), formed in place of the logits.
                slope = logits.sub_(norm[:, None]).exp_()
                slope[torch.arange(len(aim), device=aim.device), aim] -= 1.0
                slope = slope.to(dtype)
                if grad_hidden is not None:
                    grad_hidden[start:start + step] = slope @ matrix
                if grad_weight is not None:
                    grad_weight += slope.T @ chunk
                if grad_bias is not None:
                    grad_bias += slope.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(per_token)
        return per_token.sum(), per_token

    @staticmethod
    def backward(ctx, grad_total, _grad_per_token):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        grads = [None if grad is None else (grad * grad_total).to(dtype)
                 for grad, dtype in zip((grad_hidden, grad_weight, grad_bias), ctx.dtypes)]
        return (*grads, None, None, None)
