"""The compiled module under DistributedDataParallel (gloo, 2 CPU processes) gives the same
gradients as the unplanned model under DDP, bitwise in float64 (as the README claims)."""
import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import memplan
from tests.nets import TinyUNet3D


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        net = TinyUNet3D(width=2).double()
        ref = copy.deepcopy(net)
        x = torch.randn(world, 1, 8, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))[rank:rank + 1]
        compiled = memplan.compile(net, x)
        results = {}
        for name, module, owner in (("planned", compiled, net), ("plain", ref, ref)):
            ddp = DDP(module)
            ddp(x).pow(2).sum().backward()
            results[name] = [p.grad.clone() for p in owner.parameters()]   # same order for both
        results["recomputed_segments"] = len(compiled.memplan_plan.recomputed_segments)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_gradients_equal_unplanned(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for res in ranks:
        assert res["recomputed_segments"] > 0
        assert len(res["planned"]) == len(res["plain"])
        for a, b in zip(res["planned"], res["plain"]):
            assert torch.equal(a, b)                                # bitwise, not merely close
    for a, b in zip(ranks[0]["planned"], ranks[1]["planned"]):   # DDP averaged them across ranks
        assert torch.equal(a, b)
