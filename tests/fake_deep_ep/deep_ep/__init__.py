"""A strict CPU emulation of `deep_ep` for the tests (never shipped): `Buffer` (DeepEP main,
normal intranode kernels) and `HybridEPBuffer` (hybrid-ep branch) over a gloo group.

It follows the documented upstream semantics: the layout tuple of `get_dispatch_layout`; the
tuples `dispatch` and `combine` return; top-k ids made local with -1 (weight 0) for experts of
other ranks; combine as an unweighted sum accumulated in fp32; cached-handle dispatch;
HybridEP's dispatched probabilities over every expert of the NVLink domain (the columns of
other ranks hold garbage: NaN here) and its cached dispatch that needs the expert count. Like
the kernels it asserts bf16 rows, fp32 weights, `topk_idx_t` ids, 16-byte rows and contiguity.
Each kernel call is counted in the class's `calls`.

Where upstream fails, so does the emulation: `Buffer` asserts one host (its intranode IPC
buffers) and, on a GPU whose name says PCIE, at most 2 ranks (deep_ep's
check_nvlink_connections; the NVLink query between the pair is not emulated).
`HybridEPBuffer` asserts the same token count on every rank and, unless built with
HYBRID_EP_MULTINODE=1 (read from the environment when a buffer is built: the emulation's build),
a group within one NVLink domain: NUM_OF_HYBRID_EP_RANKS_PER_NVLINK_DOMAIN ranks when set, else
those of one host (upstream's IPC detection). Its combine leaves the rows of tokens no rank
received unwritten, as upstream's `torch::empty` output does: NaN here.
"""

from __future__ import annotations

import os
import socket
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist

topk_idx_t = torch.int64
_INTRANODE_RANKS = (2, 4, 8)


class EventOverlap:
    def __init__(self, event: Any = None) -> None:
        self.event = event

    def current_stream_wait(self) -> None:
        assert self.event is not None, "waiting on the event of a call made without async_finish"


class Config:
    def __init__(self, num_sms: int, *chunk_sizes: int) -> None:
        self.num_sms, self.chunk_sizes = num_sms, chunk_sizes

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        return hidden_bytes * num_ranks * 1024

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        return 0  # intranode only


def _exchange(per_dest: list[torch.Tensor], group: dist.ProcessGroup) -> list[torch.Tensor]:
    """Rows `per_dest[r]` to rank r; returns the rows received from each source rank."""
    row_shape, dtype = per_dest[0].shape[1:], per_dest[0].dtype
    row_numel = row_shape.numel()
    as_bytes = [t.contiguous().reshape(t.shape[0], row_numel).view(torch.uint8) for t in per_dest]
    row_bytes = row_numel * per_dest[0].element_size()
    send_counts = torch.tensor([t.shape[0] for t in per_dest], dtype=torch.int64)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    out = torch.empty(int(recv_counts.sum()), row_bytes, dtype=torch.uint8)
    dist.all_to_all_single(out, torch.cat(as_bytes), output_split_sizes=recv_counts.tolist(),
                           input_split_sizes=send_counts.tolist(), group=group)
    return [chunk.view(dtype).reshape(-1, *row_shape) for chunk in out.split(recv_counts.tolist())]


def _all_gather_rows(t: torch.Tensor, group: dist.ProcessGroup) -> list[torch.Tensor]:
    return _exchange([t] * dist.get_world_size(group), group)


def _hosts(group: dist.ProcessGroup) -> list[str]:
    hosts: list = [None] * group.size()
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    return hosts


def _check_nvlink_connections(group: dist.ProcessGroup) -> None:
    if "PCIE" in torch.cuda.get_device_name():
        assert group.size() <= 2, "PCIe GPUs only have pairwise NVLink connections"
        import pynvml  # noqa: F401  (upstream queries NVLink between the pair with it)


def _check_rows(name: str, t: torch.Tensor, dtype: torch.dtype, rows: int | None = None) -> None:
    assert t.dim() == 2 and t.is_contiguous(), f"{name}: expected a contiguous 2-D tensor"
    assert t.dtype == dtype, f"{name}: expected {dtype}, got {t.dtype}"
    assert rows is None or t.shape[0] == rows, f"{name}: expected {rows} rows, got {t.shape[0]}"


class Buffer:
    num_sms: int = 20
    calls: Counter = Counter()
    created: int = 0

    def __init__(self, group: dist.ProcessGroup, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 explicitly_destroy: bool = False, enable_shrink: bool = False, comm: Any = None) -> None:
        assert group is not None and not low_latency_mode, "emulated: normal kernels on a process group only"
        self.group, self.rank, self.group_size = group, group.rank(), group.size()
        assert self.group_size in _INTRANODE_RANKS, "emulated: intranode kernels only"
        _check_nvlink_connections(group)
        assert len(set(_hosts(group))) == 1, "intranode IPC buffers cannot be opened on another host"
        assert num_nvl_bytes > 0
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        self.low_latency_mode, self.explicitly_destroy = low_latency_mode, explicitly_destroy
        self.runtime: Any = object()
        Buffer.created += 1
        dist.barrier(group=group)  # upstream exchanges device ids and IPC handles here

    def destroy(self) -> None:
        assert self.explicitly_destroy, "`explicitly_destroy` flag must be set"
        self.runtime = None

    @staticmethod
    def capture() -> EventOverlap:
        return EventOverlap(object())

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        assert num_ranks in (2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 144, 160), f"Unsupported number of EP ranks: {num_ranks}"
        return Config(Buffer.num_sms, 6, 256, 6, 128)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        assert num_ranks in (2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 144, 160), f"Unsupported number of EP ranks: {num_ranks}"
        return Config(Buffer.num_sms, 6, 256, 6, 128)

    def _launch(self, name: str, previous_event: Any, async_finish: bool, allocate_on_comm_stream: bool) -> EventOverlap:
        assert self.runtime is not None, "buffer destroyed"
        if allocate_on_comm_stream:
            assert previous_event is not None and async_finish
        Buffer.calls[name] += 1
        return EventOverlap(object() if async_finish else None)

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, previous_event: Any = None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False) -> tuple:
        event = self._launch("get_dispatch_layout", previous_event, async_finish, allocate_on_comm_stream)
        _check_rows("topk_idx", topk_idx, topk_idx_t)
        assert num_experts % self.group_size == 0
        num_local = num_experts // self.group_size
        dest = torch.where(topk_idx >= 0, topk_idx // num_local, self.group_size)
        in_rank = torch.zeros(topk_idx.shape[0], self.group_size + 1, dtype=torch.bool).scatter_(1, dest, True)
        in_rank = in_rank[:, :self.group_size].contiguous()
        per_expert = torch.bincount(topk_idx[topk_idx >= 0], minlength=num_experts).int()
        return in_rank.sum(0).int(), None, per_expert, in_rank, event

    def dispatch(self, x: torch.Tensor, handle: tuple | None = None, num_tokens_per_rank: torch.Tensor | None = None,
                 num_tokens_per_rdma_rank: torch.Tensor | None = None, is_token_in_rank: torch.Tensor | None = None,
                 num_tokens_per_expert: torch.Tensor | None = None, topk_idx: torch.Tensor | None = None,
                 topk_weights: torch.Tensor | None = None, expert_alignment: int = 1, num_worst_tokens: int = 0,
                 config: Config | None = None, previous_event: Any = None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False) -> tuple:
        event = self._launch("dispatch", previous_event, async_finish, allocate_on_comm_stream)
        assert not isinstance(x, tuple), "emulated: bf16 rows only"
        _check_rows("x", x, torch.bfloat16)
        assert x.shape[1] * x.element_size() % 16 == 0
        assert Config(0).get_nvl_buffer_size_hint(x.shape[1] * x.element_size(), self.group_size) <= self.num_nvl_bytes
        if handle is not None:
            assert topk_idx is None and topk_weights is None
            _, _, _, recv_src_idx, in_rank, _ = handle
            assert in_rank.shape[0] == x.shape[0]
            recv_x = torch.cat(_exchange([x[in_rank[:, r]] for r in range(self.group_size)], self.group))
            assert recv_x.shape[0] == recv_src_idx.shape[0]
            return recv_x, None, None, None, None, event
        assert num_tokens_per_rank is not None and is_token_in_rank is not None and num_tokens_per_expert is not None
        assert num_tokens_per_rdma_rank is None, "emulated: intranode"
        tokens = x.shape[0]
        _check_rows("topk_idx", topk_idx, topk_idx_t, tokens)
        _check_rows("topk_weights", topk_weights, torch.float32, tokens)
        _check_rows("is_token_in_rank", is_token_in_rank, torch.bool, tokens)
        assert torch.equal(num_tokens_per_rank, is_token_in_rank.sum(0).int())
        num_local = num_tokens_per_expert.shape[0] // self.group_size
        sends = []
        for r in range(self.group_size):
            rows = is_token_in_rank[:, r].nonzero().view(-1)
            ids = topk_idx[rows]
            local = (ids >= r * num_local) & (ids < (r + 1) * num_local)
            sends.append((x[rows], torch.where(local, ids - r * num_local, -1), topk_weights[rows].masked_fill(~local, 0),
                          rows.int().view(-1, 1)))
        received = [torch.cat(_exchange(list(kind), self.group)) for kind in zip(*sends)]
        recv_x, recv_idx, recv_weights, recv_src_idx = received
        per_source = torch.cat(_all_gather_rows(num_tokens_per_rank.view(1, -1), self.group))  # [src, dest]
        rank_prefix_matrix = per_source.cumsum(0).int()
        counts = torch.bincount(recv_idx[recv_idx >= 0], minlength=num_local)
        per_expert_list = ((counts + expert_alignment - 1) // expert_alignment * expert_alignment).tolist()
        channels = self.num_sms // 2
        handle = (rank_prefix_matrix, torch.zeros(self.group_size, channels, dtype=torch.int32),
                  torch.zeros(self.group_size, channels, dtype=torch.int32), recv_src_idx.view(-1),
                  is_token_in_rank, torch.zeros(tokens, self.group_size, dtype=torch.int32))
        return recv_x, recv_idx, recv_weights, per_expert_list, handle, event

    def combine(self, x: torch.Tensor, handle: tuple, topk_weights: torch.Tensor | None = None, bias: Any = None,
                config: Config | None = None, previous_event: Any = None, async_finish: bool = False,
                allocate_on_comm_stream: bool = False) -> tuple:
        event = self._launch("combine", previous_event, async_finish, allocate_on_comm_stream)
        assert bias is None, "emulated: no bias"
        rank_prefix_matrix, _, _, recv_src_idx, in_rank, _ = handle
        _check_rows("x", x, torch.bfloat16, recv_src_idx.shape[0])
        if topk_weights is not None:
            _check_rows("topk_weights", topk_weights, torch.float32, recv_src_idx.shape[0])
        ends = rank_prefix_matrix[:, self.rank].tolist()
        starts = [0] + ends[:-1]
        back = _exchange([x[s:e] for s, e in zip(starts, ends)], self.group)
        back_weights = _exchange([topk_weights[s:e] for s, e in zip(starts, ends)], self.group) \
            if topk_weights is not None else None
        combined = torch.zeros(in_rank.shape[0], x.shape[1])
        combined_weights = torch.zeros(in_rank.shape[0], topk_weights.shape[1]) if topk_weights is not None else None
        for r in range(self.group_size):
            rows = in_rank[:, r].nonzero().view(-1)
            combined.index_add_(0, rows, back[r].float())
            if combined_weights is not None:
                combined_weights.index_add_(0, rows, back_weights[r])
        return combined.to(torch.bfloat16), combined_weights, event


class HybridEPBuffer:
    calls: Counter = Counter()
    created: int = 0
    stream_syncs: int = 0

    def __init__(self, group: dist.ProcessGroup, hidden_dim: int, max_num_of_tokens_per_rank: int,
                 num_local_experts: int, use_fp8: bool = False, num_sms_dispatch_api: int | None = None,
                 num_sms_combine_api: int | None = None, num_sms_preprocessing_api: int | None = None,
                 num_blocks_permute: int | None = None, num_blocks_unpermute: int | None = None,
                 load_cached_kernels: bool = False, use_shared_buffer: bool = True,
                 enable_custom_allgather: bool = False, num_of_hybrid_ep_ranks_per_nvlink_domain: int | None = None,
                 use_mnnvl: bool | None = None) -> None:
        assert not use_fp8, "emulated: bf16 only"
        self.group, self.rank, self.group_size = group, group.rank(), group.size()
        env_value = os.getenv("NUM_OF_HYBRID_EP_RANKS_PER_NVLINK_DOMAIN")
        hosts = _hosts(group)
        detected = hosts.count(hosts[self.rank])
        self.num_of_hybrid_ep_ranks_per_nvlink_domain = int(env_value) if env_value is not None else detected
        assert self.group_size % self.num_of_hybrid_ep_ranks_per_nvlink_domain == 0
        self.local_rank = self.rank % self.num_of_hybrid_ep_ranks_per_nvlink_domain
        self.node_rank = self.rank // self.num_of_hybrid_ep_ranks_per_nvlink_domain
        self.num_of_nodes = self.group_size // self.num_of_hybrid_ep_ranks_per_nvlink_domain
        assert self.num_of_nodes == 1 or os.getenv("HYBRID_EP_MULTINODE") == "1", \
            "Inter-node communication is not supported. Please rebuild with HYBRID_EP_MULTINODE flag"
        self.hidden_dim, self.num_local_experts = hidden_dim, num_local_experts
        self.max_num_of_tokens_per_rank = max_num_of_tokens_per_rank
        HybridEPBuffer.created += 1
        dist.barrier(group=group)

    def _domain_width(self) -> int:
        return self.num_local_experts * self.num_of_hybrid_ep_ranks_per_nvlink_domain

    def dispatch(self, hidden: torch.Tensor, scaling_factor: torch.Tensor | None = None,
                 topk_idx: torch.Tensor | None = None, topk_weights: torch.Tensor | None = None,
                 num_of_experts: int | None = None, probs: torch.Tensor | None = None,
                 routing_map: torch.Tensor | None = None, num_dispatched_tokens_tensor: torch.Tensor | None = None,
                 num_dispatched_tokens: int | None = None, handle: tuple | None = None) -> tuple:
        HybridEPBuffer.calls["dispatch"] += 1
        assert scaling_factor is None, "emulated: bf16 only"
        _check_rows("hidden", hidden, torch.bfloat16)
        tokens, hidden_dim = hidden.shape
        assert hidden_dim <= self.hidden_dim
        assert hidden_dim * hidden.element_size() % 16 == 0, "TMA copies 16-byte units"
        if routing_map is not None:
            assert routing_map.dtype == torch.bool
            num_of_experts = routing_map.size(-1)
        else:
            assert num_of_experts is not None, "The number of experts should be provided on index-based routing."
            if topk_idx is not None:
                assert bool((topk_idx >= 0).all()), "scatter: index -1 out of bounds"
                routing_map = torch.zeros(tokens, num_of_experts, dtype=torch.bool).scatter(1, topk_idx.long(), True)
                if topk_weights is not None:
                    probs = torch.zeros(tokens, num_of_experts).scatter(1, topk_idx.long(), topk_weights)
        assert handle is not None or routing_map is not None, "The handle and routing_map should not be both None"
        assert num_of_experts == self.num_local_experts * self.group_size
        if handle is None:
            _check_rows("routing_map", routing_map, torch.bool, tokens)
            handle = self._preprocess(routing_map, tokens)
        s2d, _, _, count_tensor, local_map, handle_tokens, _ = handle
        assert handle_tokens == tokens
        rows = int(count_tensor)
        if num_dispatched_tokens is None:
            HybridEPBuffer.stream_syncs += 1  # upstream synchronizes the stream to read the count
        else:
            assert num_dispatched_tokens == rows
        order = [s2d[:, r].ge(0).nonzero().view(-1) for r in range(self.group_size)]
        recv_x = torch.cat(_exchange([hidden[o] for o in order], self.group))
        assert recv_x.shape[0] == rows
        dispatched_probs = None
        if probs is not None:
            _check_rows("probs", probs, torch.float32, tokens)
            L = self.num_local_experts
            got = torch.cat(_exchange([probs[o, r * L:(r + 1) * L] for r, o in enumerate(order)], self.group))
            dispatched_probs = torch.full((rows, self._domain_width()), float("nan"))
            dispatched_probs[:, self.local_rank * L:(self.local_rank + 1) * L] = got
        return recv_x, dispatched_probs, None, handle

    def _preprocess(self, routing_map: torch.Tensor, tokens: int) -> tuple:
        self.max_num_of_tokens_per_rank = max(self.max_num_of_tokens_per_rank, (tokens + 15) // 16 * 16)
        maps = _all_gather_rows(routing_map, self.group)
        assert all(m.shape[0] == tokens for m in maps), "every rank dispatches the same number of tokens"
        L = self.num_local_experts
        # sparse_to_dense_map[t, r]: the row of my token t among rank r's dispatched rows, or -1.
        s2d = torch.full((tokens, self.group_size), -1, dtype=torch.int32)
        for r in range(self.group_size):
            offset = sum(int(m[:, r * L:(r + 1) * L].any(1).sum()) for m in maps[:self.rank])
            goes = routing_map[:, r * L:(r + 1) * L].any(1)
            s2d[goes, r] = offset + torch.arange(int(goes.sum()), dtype=torch.int32)
        mine = torch.cat(maps)[:, self.rank * L:(self.rank + 1) * L]
        received = mine[mine.any(1)]
        local_map = torch.zeros(self.group_size * self.max_num_of_tokens_per_rank, L, dtype=torch.bool)
        local_map[:received.shape[0]] = received
        count = torch.tensor([received.shape[0]], dtype=torch.int32)
        return (s2d, torch.empty(0), torch.empty(0), count, local_map, tokens, object())

    def combine(self, hidden: torch.Tensor, probs: torch.Tensor | None = None, handle: tuple | None = None) -> tuple:
        HybridEPBuffer.calls["combine"] += 1
        assert handle is not None, "The handle is necessary for combine."
        s2d, _, _, count_tensor, _, tokens, _ = handle
        rows = int(count_tensor)
        _check_rows("hidden", hidden, torch.bfloat16, rows)
        maps_rows = _all_gather_rows(s2d, self.group)  # every source's placement of its tokens
        blocks = [m[:, self.rank].ge(0).sum().item() for m in maps_rows]
        starts = [sum(blocks[:s]) for s in range(self.group_size)]
        back = _exchange([hidden[starts[s]:starts[s] + blocks[s]] for s in range(self.group_size)], self.group)
        combined = torch.zeros(tokens, hidden.shape[1])
        for r in range(self.group_size):
            combined.index_add_(0, s2d[:, r].ge(0).nonzero().view(-1), back[r].float())
        unwritten = s2d.lt(0).all(1)  # tokens no rank received
        combined[unwritten] = float("nan")
        combined_probs = None
        if probs is not None:
            _check_rows("probs", probs, torch.float32, rows)
            assert probs.shape[1] == self._domain_width()
            back_probs = _exchange([probs[starts[s]:starts[s] + blocks[s]] for s in range(self.group_size)], self.group)
            width = self._domain_width()
            combined_probs = torch.zeros(tokens, self.num_local_experts * self.group_size)
            for r in range(self.group_size):
                node = r // self.num_of_hybrid_ep_ranks_per_nvlink_domain
                columns = combined_probs[:, node * width:(node + 1) * width]
                columns.index_add_(0, s2d[:, r].ge(0).nonzero().view(-1), back_probs[r])
            combined_probs[unwritten] = float("nan")
        return combined.to(torch.bfloat16), combined_probs
