"""Parallel dimensions and the device meshes that serve them.

World = pp x dp_replicate x dp_shard x cp x tp. Expert parallel is not a factor of the world:
it borrows ranks from dp_shard x cp, and experts are FSDP-sharded over the rest ("efsdp").
One world mesh (pp, dp_replicate, fsdp, tp) is built, fsdp = dp_shard x cp (the ranks of a cp
group hold different tokens of the same samples, so they are data parallel for the weights) and
tp innermost so that a tensor-parallel group is a run of neighbouring ranks (one node); the
context-parallel meshes unflatten its fsdp axis into (dp_shard, cp), the expert meshes into
(efsdp, ep), cp and ep innermost. The views:

    dp     dp_replicate x dp_shard   data loading (the ranks of a cp or tp group read the same samples)
    dp_cp  dp_replicate x fsdp       the loss: its token count and sums (the ranks of a tp group share a batch)
    dp_cp_tp dp_replicate x fsdp x tp   MoE routing counts (sequence parallel: each tp rank routes its slice)
    fsdp   fsdp, or (dp_replicate, fsdp) for HSDP     FSDP2 of dense parameters
    cp     cp                        context parallel: the sequence split
    tp     tp                        tensor and sequence parallel
    ep     ep                      expert parallel
    efsdp  efsdp, or (dp_replicate, efsdp) for HSDP   FSDP2 of expert parameters
    ep_tp  (ep, tp), 2-D             the experts' weights: sharded over ep, replicated over tp

An ep group is the ranks of equal tp index, so under tensor parallel each tp rank dispatches the
tokens of its own slice of the sequence within its ep group, and the tp ranks of a group hold the
same experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass(frozen=True)
class ParallelDims:
    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = -1
    cp: int = 1
    tp: int = 1
    ep: int = 1
    world_size: int = 1

    def __post_init__(self) -> None:
        for name in ("pp", "dp_replicate", "cp", "tp", "ep", "world_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name}={getattr(self, name)}: must be >= 1")
        if self.dp_shard == -1:
            rest = self.pp * self.dp_replicate * self.cp * self.tp
            if self.world_size % rest:
                raise ValueError(f"parallel.dp_shard=-1: world size {self.world_size} is not divisible by "
                                 f"pp*dp_replicate*cp*tp={rest}; change the world size or those axes")
            object.__setattr__(self, "dp_shard", self.world_size // rest)
        if self.dp_shard < 1:
            raise ValueError(f"parallel.dp_shard={self.dp_shard}: must be >= 1, or -1 to fill the world")
        product = self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp
        if product != self.world_size:
            raise ValueError(f"parallel: pp*dp_replicate*dp_shard*cp*tp = {self.pp}*{self.dp_replicate}*"
                             f"{self.dp_shard}*{self.cp}*{self.tp} = {product}, but the world size is "
                             f"{self.world_size}; make them equal (dp_shard=-1 fills the rest)")
        borrowable = self.dp_shard * self.cp
        if borrowable % self.ep:
            raise ValueError(f"parallel.ep={self.ep}: must divide dp_shard*cp={borrowable} "
                             f"(expert parallel borrows those ranks)")

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def dp_cp(self) -> int:
        return self.dp * self.cp

    @property
    def efsdp(self) -> int:
        return self.dp_shard * self.cp // self.ep

    def build_meshes(self, device_type: str) -> "ParallelMeshes":
        world = init_device_mesh(device_type, (self.pp, self.dp_replicate, self.dp_shard * self.cp, self.tp),
                                 mesh_dim_names=("pp", "dp_replicate", "fsdp", "tp"))
        hsdp = self.dp_replicate > 1
        # The axis by index: torch 2.11 rejects a name that is present (inverted check,
        # https://github.com/pytorch/pytorch/issues/176443).
        experts = world._unflatten(2, (self.efsdp, self.ep), ("efsdp", "ep"))
        shards = world._unflatten(2, (self.dp_shard, self.cp), ("dp_shard", "cp"))
        return ParallelMeshes(
            world=world,
            pp=world["pp"],
            dp=shards["dp_replicate", "dp_shard"]._flatten("dp"),
            dp_cp=world["dp_replicate", "fsdp"]._flatten("dp_cp"),
            dp_cp_tp=world["dp_replicate", "fsdp", "tp"]._flatten("dp_cp_tp"),
            fsdp=world["dp_replicate", "fsdp"] if hsdp else world["fsdp"],
            cp=shards["cp"],
            tp=world["tp"],
            ep=experts["ep"],
            efsdp=experts["dp_replicate", "efsdp"] if hsdp else experts["efsdp"],
            ep_tp=experts["ep", "tp"],
        )

    def rank_groups(self) -> dict[str, list[list[int]]]:
        """The ranks of every group of each view, as build_meshes lays them out."""
        grid = torch.arange(self.world_size).reshape(self.pp, self.dp_replicate, self.efsdp, self.ep, self.tp)

        def along(grid: torch.Tensor, *dims: int) -> list[list[int]]:
            rest = [d for d in range(grid.ndim) if d not in dims]
            return grid.permute(*rest, *dims).reshape(-1, math.prod(grid.shape[d] for d in dims)).tolist()

        experts = along(grid, 0), along(grid, 2, 3), along(grid, 4), along(grid, 3), along(grid, 2)
        shards = torch.arange(self.world_size).reshape(self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp)
        return {"pp": experts[0], "dp": along(shards, 1, 2), "dp_cp": along(shards, 1, 2, 3),
                "dp_cp_tp": along(shards, 1, 2, 3, 4), "fsdp": experts[1],
                "cp": along(shards, 3), "tp": experts[2], "ep": experts[3], "efsdp": experts[4]}

    def describe(self) -> str:
        names = ("pp", "dp_replicate", "dp_shard", "cp", "tp", "ep")
        shown = [name for name in names if name not in ("cp", "tp") or getattr(self, name) > 1]
        axes = [f"{name}={getattr(self, name)}" for name in shown]
        return " x ".join(axes) + f" (world {self.world_size}, efsdp={self.efsdp})"


@dataclass(frozen=True)
class ParallelMeshes:
    world: DeviceMesh
    pp: DeviceMesh
    dp: DeviceMesh
    dp_cp: DeviceMesh
    dp_cp_tp: DeviceMesh
    fsdp: DeviceMesh
    cp: DeviceMesh
    tp: DeviceMesh
    ep: DeviceMesh
    efsdp: DeviceMesh
    ep_tp: DeviceMesh
