"""Ulysses sequence parallelism for the DiT: the N ranks of a sequence group run one sample, each on
1/N of its video tokens, and meet only inside self-attention.

    WanModel._forward        x [B, S, D] -> shard -> [B, S_pad/N, D] (this rank's tokens, RoPE at their
                             global grid positions), blocks, head, gather -> [B, S, C]
    self-attention           q, k, v [B, S_pad/N, H, d] -> an all-to-all each -> [B, S, H/N, d] (every
                             real token, this rank's heads; the padding dropped, so no mask),
                             attention, padded again -> one all-to-all back -> [B, S_pad/N, H, d] -> o
    cross-attention, FFN,    local: they act on each token alone
    modulation, head

The token count is padded to a multiple of N with zero rows; padded rows never reach attention nor
the output. Heads must divide by N. Every rank of the group holds the same inputs (latents, noise,
timestep, text) and the same weights; the gathered output, and so the loss, is the same on each.

Gradients: the gather's backward hands each rank the gradient of its own tokens, so each rank's
parameter gradients are its tokens' share of the sample's gradient: the group's shares sum to it.
Engines average gradients over every rank, so the training loop multiplies the loss by N (the shares
then average to the per-sample gradient over data-parallel ranks); see train.main.

The one module of wan/ that imports torch.distributed: the model files take a SequenceParallel, or
None, and import nothing distributed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F


class Traffic:
    """Bytes this rank handed to all-to-all exchanges, forward and backward; (N-1)/N of them leave it."""

    def __init__(self):
        self.sent_bytes = 0


def all_to_all(
    x: torch.Tensor, group: dist.ProcessGroup, split_dim: int, cat_dim: int, traffic: Traffic | None = None
) -> torch.Tensor:
    """Split `x` into N chunks along split_dim, send chunk j to rank j of `group`, concatenate what
    arrives (in rank order) along cat_dim. Differentiable: the backward is the reverse exchange."""
    return _AllToAll.apply(x, group, dist.get_world_size(group), split_dim, cat_dim, traffic)


def _exchange(x: torch.Tensor, group, n: int, split_dim: int, cat_dim: int, traffic: Traffic | None) -> torch.Tensor:
    send = torch.stack(x.chunk(n, dim=split_dim))  # [N, ...]: chunk j for rank j, contiguous
    # The functional collective: torch.compile traces it into the block's graph (c10d's in-place one breaks it).
    received = funcol.wait_tensor(funcol.all_to_all_single(send, None, None, group))
    if traffic is not None and not torch.compiler.is_compiling():
        traffic.sent_bytes += send.numel() * send.element_size()
    return torch.cat(received.unbind(0), dim=cat_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group: dist.ProcessGroup, n: int, split_dim: int, cat_dim: int, traffic: Traffic | None):
        ctx.group, ctx.n, ctx.split_dim, ctx.cat_dim, ctx.traffic = group, n, split_dim, cat_dim, traffic
        return _exchange(x, group, n, split_dim, cat_dim, traffic)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back = _exchange(grad.contiguous(), ctx.group, ctx.n, ctx.cat_dim, ctx.split_dim, ctx.traffic)
        return back, None, None, None, None, None


class _GatherTokens(torch.autograd.Function):
    """[B, S_pad/N, C] per rank -> [B, S_pad, C] on every rank. The output feeds a loss every rank
    computes alike, so the backward keeps this rank's slice of the gradient (no sum)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, rank: int) -> torch.Tensor:
        ctx.rank, ctx.local = rank, x.shape[1]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        start = ctx.rank * ctx.local
        return grad[:, start : start + ctx.local], None, None


class SequenceParallel:
    """One rank's place in its sequence group, and the exchanges WanModel makes through it. Stateless
    between calls: the sample's token count travels with the RoPE tables (see shard), so a checkpointed
    block's recompute, or a compiled block, finds it there (a tensor's size: dynamic under compile)."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.traffic = Traffic()

    def padded(self, num_tokens: int) -> int:
        return -(-num_tokens // self.size) * self.size

    def shard(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """x [B, S, D] and the RoPE tables [S, 1, d/2] -> this rank's rows of both, padded to S_pad
        first, and the tables followed by an empty [S, 0] tensor: the token count, for the exchanges.
        Plain slicing: in backward the rows of other ranks get a zero gradient here, theirs there."""
        num_tokens = x.shape[1]
        pad = self.padded(num_tokens) - num_tokens
        local = self.padded(num_tokens) // self.size
        rows = slice(self.rank * local, (self.rank + 1) * local)
        count = x.new_empty(num_tokens, 0)
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
            rope = tuple(F.pad(t, (0, 0, 0, 0, 0, pad)) for t in rope)
        # Copies, not views (contiguous() would not copy a batch of one): a view would keep the whole
        # [B, S, D] alive as long as the first block's saved input (1.5 GB a sample at 720p on the 14B).
        return x[:, rows].clone(), (rope[0][rows].clone(), rope[1][rows].clone(), count)

    def shard_rows(self, t: torch.Tensor) -> torch.Tensor:
        """A per-token tensor [B, S, ...] (Wan2.2's per-token timesteps) -> this rank's rows
        [B, S_pad/N, ...], the padding rows zero: the rows `shard` keeps of x."""
        num_tokens = t.shape[1]
        local = self.padded(num_tokens) // self.size
        pad = self.padded(num_tokens) - num_tokens
        if pad:
            t = torch.cat([t, t.new_zeros(t.shape[0], pad, *t.shape[2:])], dim=1)
        return t[:, self.rank * local : (self.rank + 1) * local].clone()

    def to_heads(self, t: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """[B, S_pad/N, H, d] -> [B, S, H/N, d]: every real token, this rank's heads."""
        return all_to_all(t, self.group, split_dim=2, cat_dim=1, traffic=self.traffic)[:, :num_tokens]

    def to_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """[B, S, H/N, d] -> [B, S_pad/N, H, d]: this rank's tokens, every head."""
        pad = self.padded(t.shape[1]) - t.shape[1]
        if pad:
            t = F.pad(t, (0, 0, 0, 0, 0, pad))
        return all_to_all(t, self.group, split_dim=1, cat_dim=2, traffic=self.traffic)

    def gather(self, x: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """[B, S_pad/N, C] -> [B, S, C]: every rank's tokens, the padding dropped."""
        return _GatherTokens.apply(x, self.group, self.rank)[:, :num_tokens]

    def check_heads(self, num_heads: int) -> None:
        if num_heads % self.size:
            raise ValueError(f"sequence parallel over {self.size} ranks needs heads divisible by it, not {num_heads}")


def all_to_all_bytes(
    batch: int, num_tokens: int, dim: int, num_layers: int, sp: int, low_precision: bool, recomputed_layers: int = 0
) -> int:
    """Bytes one rank hands to all-to-all in one training forward and backward (Traffic counts the
    same): per self-attention forward, q, k, v and the output of B x S_pad/sp x dim elements each (q and
    k float32 after RoPE; v and the output in the compute dtype), the same again in its backward, and a
    recomputed block's forward once more. (sp-1)/sp of them leave the rank."""
    padded = -(-num_tokens // sp) * sp
    low = 2 if low_precision else 4
    per_forward = batch * padded // sp * dim * (4 + 4 + low + low)
    return per_forward * (2 * num_layers + recomputed_layers)
