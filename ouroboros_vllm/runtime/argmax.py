"""``argmax`` over a vocabulary, exactly as ``torch.argmax`` (the first maximum), fast on CPU.

PyTorch's CPU ``argmax`` along a row is a scalar loop, where ``amax`` is vectorised: on this project's 2-core
CPU, 80 rows of a 49k vocabulary (the target's argmax at a batch-16 step's verified positions) take 1.7-3.4 ms
with ``argmax`` and 0.14 ms with ``amax``. Both the verification read-back and the draft's lm_head read an argmax
every step, so here a row's maximum is found block by block with ``amax``, and only the first block that holds
it is searched with ``argmax``: the first block, then the first index in it, is the first maximum of the row.
"""

from __future__ import annotations

import torch

BLOCK = 512  # vocabulary entries per block: a few hundred blocks a row, one block searched


def argmax_last(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)`` of a 2-D tensor: the same indices, ties and NaN included (NaN rows take torch's)."""
    rows, n = x.shape
    if x.device.type != "cpu" or n < 4 * BLOCK or rows == 0:
        return x.argmax(dim=-1)
    x = x.contiguous()
    full = n // BLOCK
    block_max = x.as_strided((rows, full, BLOCK), (n, BLOCK, 1)).amax(dim=-1)  # a view: no copy of x
    if n % BLOCK:
        block_max = torch.cat([block_max, x[:, full * BLOCK :].amax(dim=-1, keepdim=True)], dim=1)
    row_max = block_max.amax(dim=-1, keepdim=True)
    if bool(row_max.isnan().any()):  # amax propagates NaN, which equals nothing: torch's own rule for those rows
        return x.argmax(dim=-1)
    first_block = (block_max == row_max).to(torch.uint8).argmax(dim=-1)  # a few hundred entries a row
    starts = first_block * BLOCK
    offsets = starts[:, None] + torch.arange(BLOCK, device=x.device)
    block = torch.gather(x, 1, offsets.clamp(max=n - 1)).masked_fill(offsets >= n, float("-inf"))
    return starts + block.argmax(dim=-1)


def runner_up(logits: torch.Tensor, best: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``logits`` (whose argmax is ``best``): the second choice, and ``[rows, 2]`` the softmax
    probabilities of the first and the second, in float32 whatever the logits' dtype. Tensors only (no host sync):
    a captured CUDA graph can run it."""
    second = argmax_last(logits.scatter(-1, best[:, None], float("-inf")))  # a copy of these rows only
    scores = logits.float()
    picked = torch.stack([scores.gather(-1, best[:, None])[:, 0], scores.gather(-1, second[:, None])[:, 0]], dim=-1)
    return second, (picked - torch.logsumexp(scores, dim=-1, keepdim=True)).exp()
