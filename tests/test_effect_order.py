"""Effects no data edge orders: random draws share the generator and two calls of one BatchNorm share
its statistics, so a plan keeps them in the network's order (found on MONAI VNet, whose skip
dropouts a plan ran before the coarse path's dropouts: another mask, silently)."""
import dataclasses

import pytest
import torch
from torch import nn

import memplan
from memplan.errors import PlanMismatchError
from memplan.plan import check_plan
from tests import idioms
from tests.bitwise import compile_and_compare


def _nodes_of(g, net, kind):
    """The graph's nodes that call a submodule of type ``kind``, in fx order (from the fx graph itself)."""
    return tuple(n.name for n in g.gm.graph.nodes
                 if n.op == "call_module" and isinstance(net.get_submodule(n.target), kind))


def test_skip_dropout_trains_bitwise_like_the_original():
    # without the order constraint the least-memory plan runs skip_drop before the coarse path's dropouts
    x = torch.randn(2, 1, 8, 8, 8, dtype=torch.float64)
    plan = compile_and_compare(lambda: idioms.SkipDropout(), x, steps=3)
    seg_of = {n: s.index for s in plan.segments for n in s.nodes}
    g = memplan.trace(idioms.SkipDropout(), x.float())
    draws = _nodes_of(g, idioms.SkipDropout(), nn.Dropout3d)
    assert [seg_of[n] for n in draws] == sorted(seg_of[n] for n in draws)


def test_the_graph_orders_every_random_draw_and_each_shared_buffers_writers():
    x = torch.empty(2, 1, 8, 8, 8, device="meta")
    net = idioms.SkipDropout()
    g = memplan.trace(net, x)
    draws = _nodes_of(g, net, nn.Dropout3d)
    assert len(draws) == 3 and draws in g.ordered
    assert all(g.info(n).draws_random == (n in draws) for n in g.order)
    net = idioms.SharedNormBranches()
    g = memplan.trace(net, x)
    norms = _nodes_of(g, net, nn.BatchNorm3d)
    assert len(norms) == 2 and g.ordered == (norms,)      # one module, called twice: one buffer group


def test_random_ops_found_by_their_aten_ops_not_by_name():
    class Noise(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv3d(1, 2, 3, padding=1), nn.Conv3d(1, 2, 3, padding=1)

        def forward(self, x):
            h = self.a(x)
            h = h * torch.empty_like(h).uniform_(0.9, 1.1)        # no "dropout"/"rand" in the fx target
            return h + self.b(x) * torch.randn_like(h)

    g = memplan.trace(Noise(), torch.empty(1, 1, 4, 4, 4, device="meta"))
    drawing = [n for n in g.order if g.info(n).draws_random]
    assert len(drawing) == 2 and g.ordered == (tuple(drawing),)


def test_a_plan_that_runs_a_later_draw_first_is_refused():
    x = torch.empty(2, 1, 8, 8, 8, device="meta")
    net = idioms.SkipDropout()
    plan = memplan.plan(net, x, scratch="none")
    g = memplan.trace(net, x)
    check_plan(plan, g)
    # move skip_drop (it reads only the stem) into the first segment holding the stem: dependencies hold
    segs = list(plan.segments)
    first = next(i for i, s in enumerate(segs) if "stem_3" in s.nodes)
    segs = [dataclasses.replace(s, nodes=tuple(n for n in s.nodes if n != "skip_drop")) for s in segs]
    segs[first] = dataclasses.replace(segs[first], nodes=segs[first].nodes + ("skip_drop",))
    segs = [s for s in segs if s.nodes]
    segs = [dataclasses.replace(s, index=i, kept=tuple(k for k in s.kept if k in s.nodes)) for i, s in enumerate(segs)]
    with pytest.raises(PlanMismatchError, match=r"'skip_drop' \(segment \d+\) draws random numbers after"):
        check_plan(dataclasses.replace(plan, segments=tuple(segs)), g)
