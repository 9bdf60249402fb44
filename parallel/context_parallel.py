"""Context parallel's sequence split: which tokens of every sequence a rank of the cp group holds.

Each sequence is cut into 2 x cp equal chunks and rank r holds chunks r and 2cp-1-r (head-tail).
Under a causal mask a query attends to the keys before it, so an early chunk costs little and a
late one much; pairing them gives every rank the same attention work, where a contiguous split
would leave the last rank with (2cp-1)/cp times the mean. Labels are the inputs shifted over the
whole sequence before the split, so no label is lost at a chunk edge; position ids are the global
ones, so rotary embeddings and document masks see where each token really is.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.nn.attention.bias import causal_lower_right


# How a rank gets the other ranks' keys and values (parallel/cp_attention.py).
ROTATIONS = ("allgather", "ring")


def head_tail_index(seq_len: int, cp: int, rank: int) -> torch.Tensor:
    """The global positions of the tokens rank `rank` of `cp` holds, in the order it holds them."""
    assert seq_len % (2 * cp) == 0, (seq_len, cp)
    chunk = seq_len // (2 * cp)
    return torch.cat([torch.arange(rank * chunk, (rank + 1) * chunk),
                      torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk)])


@dataclass
class SequenceShard:
    """This rank's share of sequences of `seq_len` tokens over the context-parallel `group`."""
    group: dist.ProcessGroup
    seq_len: int
    rotation: str = "allgather"  # one of ROTATIONS
    # Per forward (`documents`): the global document positions of the batch, when documents are masked.
    document_positions: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        assert self.rotation in ROTATIONS, self.rotation
        self.size, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        self.group_name = self.group.group_name
        self.local_index = head_tail_index(self.seq_len, self.size, self.rank)
        self.chunk = self.seq_len // (2 * self.size)
        # The first global position of each local chunk, as ints: the attention's chunk loop reads
        # them under fake tensors too (the budget's step), where a tensor's values are unknown.
        self.chunk_starts = [self.rank * self.chunk, (2 * self.size - 1 - self.rank) * self.chunk]
        # The global position of each row of an all-gather over the group (rank-major), and the
        # rows of the gather in sequence order.
        self.gathered_index = torch.cat([head_tail_index(self.seq_len, self.size, r) for r in range(self.size)])
        self.sequence_order = torch.argsort(self.gathered_index)
        # Each local chunk's causal attention over the sequence up to its end, aligned bottom-right.
        # Made here, outside any checkpointed region: a CausalBias created in activation
        # checkpointing's recompute wraps a tensor SAC handed back, which torch refuses.
        self.causal_biases = [causal_lower_right(self.chunk, start + self.chunk)
                              for start in self.chunk_starts]

    def split(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's tokens of `tensor` [rows, seq_len, ...]."""
        assert tensor.shape[1] == self.seq_len, (tensor.shape, self.seq_len)
        return tensor[:, self.local_index.to(tensor.device)]

    def model_inputs(self, rows: int, document_positions: torch.Tensor | None,
                     device: torch.device) -> dict[str, torch.Tensor]:
        """What the model takes besides this rank's input ids: the global positions of its tokens,
        and an all-true padding mask. The mask is what keeps HF from reading the head-tail jump in
        the position ids as a document boundary (it looks for packed sequences only without one);
        the attention mask of the local queries over all keys is built from the whole sequence
        (parallel/cp_attention.py)."""
        positions = (self.split(document_positions) if document_positions is not None
                     else self.local_index.expand(rows, -1))
        local = self.local_index.numel()
        return {"position_ids": positions.to(device),
                "attention_mask": torch.ones(rows, local, dtype=torch.long, device=device)}

    @contextmanager
    def documents(self, document_positions: torch.Tensor | None) -> Iterator[None]:
        """The forward of a batch whose global document positions are `document_positions` (None: one
        sequence per row), for the attention mask."""
        self.document_positions = document_positions
        try:
            yield
        finally:
            self.document_positions = None


def forward_arguments(shard: SequenceShard | None, rows: int, document_positions: torch.Tensor | None,
                      device: torch.device) -> tuple[dict[str, torch.Tensor], AbstractContextManager]:
    """The model's keyword inputs besides input ids for a forward of `rows` rows, and the context
    to run it in. Without context parallel: the document positions, when documents are masked."""
    if shard is not None:
        return shard.model_inputs(rows, document_positions, device), shard.documents(document_positions)
    return ({"position_ids": document_positions} if document_positions is not None else {}), nullcontext()
