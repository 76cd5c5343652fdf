"""ReversibleBlock against plain autograd through the same coupling, and its memory on meta tensors."""
import copy

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from tests.nets import PlainCoupling
from memplan.reversible import ReversibleBlock, coupling_param_count, is_reversible_leaf, make_conv_bn_relu_coupling




def _rev_and_plain_chains(n_blocks, channels, *, free_input, dtype=torch.float64, dropout=0.0):
    """Two chains with equal F/G weights (deep copies, so BN statistics evolve independently)."""
    rev, plain = [], []
    for _ in range(n_blocks):
        f, g = make_conv_bn_relu_coupling(3, channels, 3, 1)
        if dropout:
            f.append(nn.Dropout(dropout))
            g.append(nn.Dropout(dropout))
        f, g = f.to(dtype), g.to(dtype)
        rev.append(ReversibleBlock(f, g, free_input=free_input))
        plain.append(PlainCoupling(copy.deepcopy(f), copy.deepcopy(g)))
    return nn.Sequential(*rev), nn.Sequential(*plain)


def _step(chain, x0, weight):
    """One forward/backward; returns the loss. ``x0 * 2`` makes the first block's input a non-leaf."""
    loss = (chain(x0 * 2.0) * weight).sum()
    loss.backward()
    return loss


def _assert_same_grads(rev, plain, rtol=1e-10, atol=1e-12):
    for (name, p_rev), p_plain in zip(rev.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p_rev.grad, p_plain.grad, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("free_input", [True, False])
def test_gradients_equal_plain_autograd_float64(free_input):
    torch.manual_seed(0)
    rev, plain = _rev_and_plain_chains(3, 4, free_input=free_input)
    x_rev = torch.randn(2, 4, 6, 6, 6, dtype=torch.float64, requires_grad=True)
    x_plain = x_rev.detach().clone().requires_grad_(True)
    weight = torch.randn(2, 4, 6, 6, 6, dtype=torch.float64)
    loss_rev, loss_plain = _step(rev, x_rev, weight), _step(plain, x_plain, weight)
    torch.testing.assert_close(loss_rev, loss_plain, rtol=1e-12, atol=0)
    torch.testing.assert_close(x_rev.grad, x_plain.grad, rtol=1e-10, atol=1e-12)
    _assert_same_grads(rev, plain)


def test_batchnorm_statistics_updated_once_per_step():
    torch.manual_seed(1)
    rev, plain = _rev_and_plain_chains(2, 4, free_input=True)
    x = torch.randn(3, 4, 5, 5, 5, dtype=torch.float64)
    weight = torch.randn(3, 4, 5, 5, 5, dtype=torch.float64)
    _step(rev, x.clone().requires_grad_(True), weight)
    _step(plain, x.clone().requires_grad_(True), weight)
    rev_bns = [m for m in rev.modules() if isinstance(m, nn.BatchNorm3d)]
    plain_bns = [m for m in plain.modules() if isinstance(m, nn.BatchNorm3d)]
    assert len(rev_bns) == 4
    for a, b in zip(rev_bns, plain_bns):
        assert int(a.num_batches_tracked) == 1
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-12, atol=1e-14)


def test_leaf_input_is_kept_and_its_grad_counted_once():
    torch.manual_seed(2)
    rev, plain = _rev_and_plain_chains(1, 4, free_input=True)
    x = torch.randn(2, 4, 5, 5, 5, dtype=torch.float64, requires_grad=True)
    x_before = x.detach().clone()
    x_plain = x.detach().clone().requires_grad_(True)
    weight = torch.randn_like(x)
    (rev(x) * weight).sum().backward()
    assert torch.equal(x.detach(), x_before)  # a leaf is never freed, even with free_input=True
    (plain(x_plain) * weight).sum().backward()
    torch.testing.assert_close(x.grad, x_plain.grad, rtol=1e-10, atol=1e-12)
    first = x.grad.clone()
    for m in list(rev.modules()) + list(plain.modules()):
        m.eval()  # same output twice: the second step must add exactly the same gradient again
    x.grad = None
    (rev(x) * weight).sum().backward()
    (rev(x) * weight).sum().backward()
    x_plain.grad = None
    (plain(x_plain) * weight).sum().backward()
    torch.testing.assert_close(x.grad, 2 * x_plain.grad, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(first, x_plain.grad)  # eval-mode BN really differs: the check is not vacuous


def test_autograd_grad_returns_input_and_parameter_gradients():
    torch.manual_seed(3)
    rev, plain = _rev_and_plain_chains(2, 4, free_input=True)
    x = torch.randn(2, 4, 5, 5, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn_like(x)
    got = torch.autograd.grad((rev(x * 3.0) * weight).sum(), [x, *rev.parameters()])
    want = torch.autograd.grad((plain(x * 3.0) * weight).sum(), [x, *plain.parameters()])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in rev.parameters())


def test_retain_graph_backward_twice_doubles_the_gradient():
    torch.manual_seed(4)
    rev, plain = _rev_and_plain_chains(2, 4, free_input=True)
    x = torch.randn(2, 4, 5, 5, 5, dtype=torch.float64, requires_grad=True)
    x_plain = x.detach().clone().requires_grad_(True)
    loss = rev(x * 1.5).sum()
    loss.backward(retain_graph=True)
    loss.backward()
    plain(x_plain * 1.5).sum().backward()
    torch.testing.assert_close(x.grad, 2 * x_plain.grad, rtol=1e-10, atol=1e-12)


def test_dropout_inside_f_and_g_replays_the_same_masks():
    torch.manual_seed(5)
    rev, plain = _rev_and_plain_chains(2, 4, free_input=True, dropout=0.5)
    x = torch.randn(2, 4, 5, 5, 5, dtype=torch.float64)
    weight = torch.randn_like(x)
    torch.manual_seed(123)
    _step(rev, x.clone().requires_grad_(True), weight)
    after_rev = torch.rand(4)
    torch.manual_seed(123)
    _step(plain, x.clone().requires_grad_(True), weight)
    after_plain = torch.rand(4)
    _assert_same_grads(rev, plain)
    assert torch.equal(after_rev, after_plain)  # backward's replay leaves the caller's RNG where it was


def test_without_rng_preservation_dropout_gradients_differ():
    """Negative control: the dropout test above can fail."""
    torch.manual_seed(5)
    rev, plain = _rev_and_plain_chains(1, 4, free_input=True, dropout=0.5)
    for block in rev:
        block.preserve_rng_state = False
    x = torch.randn(2, 4, 5, 5, 5, dtype=torch.float64)
    torch.manual_seed(123)
    _step(rev, x.clone().requires_grad_(True), torch.ones_like(x))
    torch.manual_seed(123)
    _step(plain, x.clone().requires_grad_(True), torch.ones_like(x))
    with pytest.raises(AssertionError):
        _assert_same_grads(rev, plain)


def test_backward_evaluates_f_and_g_once_each():
    torch.manual_seed(6)
    block = ReversibleBlock(*make_conv_bn_relu_coupling(2, 4, 3, 1), free_input=True)
    calls = {"f": 0, "g": 0}
    block.f.register_forward_hook(lambda *_: calls.__setitem__("f", calls["f"] + 1))
    block.g.register_forward_hook(lambda *_: calls.__setitem__("g", calls["g"] + 1))
    y = block(torch.randn(2, 4, 6, 6, requires_grad=True) * 1.0)
    assert calls == {"f": 1, "g": 1}
    y.sum().backward()
    assert calls == {"f": 2, "g": 2}


def test_reconstruction_through_20_blocks_float32():
    torch.manual_seed(7)
    blocks = [ReversibleBlock(*make_conv_bn_relu_coupling(3, 8, 3, 1), free_input=True) for _ in range(20)]
    x0 = torch.randn(2, 8, 8, 8, 8, requires_grad=True)
    h = x0 * 1.0
    values, references = [h], [h.detach().clone()]
    for block in blocks:
        h = block(h)
        values.append(h)
        references.append(h.detach().clone())
    assert [v.untyped_storage().nbytes() for v in values[:-1]] == [0] * 20  # all inputs freed
    h.square().mean().backward()
    for i, (v, ref) in enumerate(zip(values, references)):
        assert v.untyped_storage().nbytes() == ref.numel() * 4, i  # refilled by backward
        assert ((v.detach() - ref).norm() / ref.norm()).item() <= 1e-5, i
    with torch.no_grad():
        y = references[0]
        for block in blocks:
            y = block(y)
        for block in reversed(blocks):
            y = block.inverse(y)
    assert ((y - references[0]).norm() / references[0].norm()).item() <= 1e-5


def test_no_grad_and_eval_mode_are_plain_forwards():
    torch.manual_seed(8)
    rev, plain = _rev_and_plain_chains(2, 4, free_input=True)
    x = torch.randn(2, 4, 5, 5, 5, dtype=torch.float64)
    h = x * 1.0
    with torch.no_grad():
        torch.testing.assert_close(rev(h), plain(h), rtol=1e-12, atol=1e-12)
    assert h.untyped_storage().nbytes() == h.numel() * 8  # nothing freed without a graph
    rev.eval()
    plain.eval()
    x_rev, x_plain = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    weight = torch.randn_like(x)
    _step(rev, x_rev, weight)
    _step(plain, x_plain, weight)
    torch.testing.assert_close(x_rev.grad, x_plain.grad, rtol=1e-10, atol=1e-12)
    _assert_same_grads(rev, plain)


def test_a_view_input_is_not_freed():
    torch.manual_seed(9)
    block = ReversibleBlock(*make_conv_bn_relu_coupling(2, 4, 3, 1), free_input=True)
    base = torch.randn(2, 8, 5, 5, requires_grad=True) * 1.0
    other_half = base[:, 4:].detach().clone()
    block(base[:, :4]).sum().backward()
    assert torch.equal(base[:, 4:].detach(), other_half)


def test_odd_channels_are_rejected_with_the_shape():
    block = ReversibleBlock(nn.Identity(), nn.Identity())
    with pytest.raises(ValueError, match=r"even C.*\(2, 3, 4\)"):
        block(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="channels must be an even int"):
        make_conv_bn_relu_coupling(3, 5, 3, 1)


def test_parameter_count_is_half_of_the_plain_conv():
    for channels, kernel in [(8, 3), (16, 3), (6, 5)]:
        f, g = make_conv_bn_relu_coupling(3, channels, kernel, kernel // 2)
        built = sum(p.numel() for p in [*f.parameters(), *g.parameters()])
        plain_conv = channels * channels * kernel ** 3
        assert built == plain_conv // 2 + 2 * channels == coupling_param_count(channels, (kernel,) * 3)


def test_is_reversible_leaf_keeps_the_block_whole_in_fx():
    class LeafTracer(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return is_reversible_leaf(m) or super().is_leaf_module(m, qualname)

    model = nn.Sequential(nn.Conv2d(2, 4, 1), ReversibleBlock(*make_conv_bn_relu_coupling(2, 4, 3, 1)))
    graph = LeafTracer().trace(model)
    assert [n.target for n in graph.nodes if n.op == "call_module"] == ["0", "1"]
    assert not is_reversible_leaf(model[0])
    gm = torch.fx.symbolic_trace(model)  # the default tracer does not inline it either
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1"]
    x = torch.randn(2, 2, 5, 5)
    model.eval()
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)


class LiveStorages(TorchDispatchMode):
    """Bytes of live storages that dispatched ops produced, except the ``preexisting`` tensors'
    (parameters, buffers updated in place). Weak references: tracking changes no lifetime."""

    def __init__(self, preexisting=()):
        super().__init__()
        self.skip = {t.untyped_storage()._cdata for t in preexisting}
        self.refs = {}
        self.peak_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage._cdata in self.skip:
                    continue
                old = self.refs.get(storage._cdata)
                if old is None or old.expired():
                    self.refs[storage._cdata] = StorageWeakRef(storage)
        self.peak_bytes = max(self.peak_bytes, self.live_bytes())
        return out

    def live_bytes(self):
        total = 0
        for key, ref in list(self.refs.items()):
            if ref.expired():
                del self.refs[key]
            else:
                total += torch.UntypedStorage._new_with_weak_ptr(ref.cdata).nbytes()
        return total


def _meta_chain_memory(n_blocks, *, reversible):
    """(bytes held at the end of forward, backward peak, parameter bytes) of a chain on meta tensors."""
    with torch.device("meta"):
        blocks = [make_conv_bn_relu_coupling(3, 8, 3, 1) for _ in range(n_blocks)]
        chain = nn.Sequential(*[ReversibleBlock(f, g, free_input=True) if reversible else PlainCoupling(f, g)
                                for f, g in blocks])
        x = torch.empty(1, 8, 16, 16, 16, requires_grad=True)
    param_bytes = sum(p.numel() * p.element_size() for p in chain.parameters())
    with LiveStorages([*chain.parameters(), *chain.buffers()]) as tracker:
        out = chain(x * 1.0)
        held = tracker.live_bytes()
        tracker.peak_bytes = 0
        out.sum().backward()
    return held, tracker.peak_bytes, param_bytes


def test_held_memory_is_flat_with_depth_on_meta_tensors():
    activation = 8 * 16 ** 3 * 4
    held3, peak3, params3 = _meta_chain_memory(3, reversible=True)
    held8, peak8, params8 = _meta_chain_memory(8, reversible=True)
    assert held3 == held8 == activation  # only the last output survives forward
    # backward grows by the extra parameter gradients only (middle blocks all peak alike)
    assert 0 < peak8 - peak3 <= params8 - params3
    plain3, _, _ = _meta_chain_memory(3, reversible=False)
    plain8, _, _ = _meta_chain_memory(8, reversible=False)
    assert plain8 - plain3 >= 5 * 2 * activation  # each plain block keeps several activations


def _producer_then_block(free_input, checkpointed, seed=10):
    """Grads of x -> Conv-BN-ReLU (optionally checkpointed) -> ReversibleBlock, float64."""
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(seed)
    producer = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU()).double()
    block = ReversibleBlock(*[m.double() for m in make_conv_bn_relu_coupling(3, 4, 3, 1)], free_input=free_input)
    x = torch.randn(2, 1, 6, 6, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 4, 6, 6, 6, dtype=torch.float64)
    a = checkpoint(producer, x, use_reentrant=False) if checkpointed else producer(x)
    (block(a) * weight).sum().backward()
    assert (a.untyped_storage().nbytes() > 0) or free_input
    return [x.grad, *(p.grad for p in [*producer.parameters(), *block.parameters()])]


def test_freeing_an_input_whose_producer_is_checkpointed_is_exact():
    """The ReLU saved its output, but checkpoint recomputes it: the freed input is not read back."""
    reference = _producer_then_block(free_input=False, checkpointed=False)
    for got, want in zip(_producer_then_block(free_input=True, checkpointed=True), reference):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_freeing_an_input_a_live_relu_saved_corrupts_gradients():
    """Why free_input must stay False here: the ReLU backward reads the rebuilt input, whose exact
    zeros come back as +-1e-17 and flip its mask (the planner's input_kept_by guards this)."""
    reference = _producer_then_block(free_input=False, checkpointed=False)
    got = _producer_then_block(free_input=True, checkpointed=False)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(got[0], reference[0], rtol=1e-3, atol=1e-6)


def test_autocast_precision_is_replayed_in_backward():
    torch.manual_seed(11)
    rev, plain = _rev_and_plain_chains(2, 4, free_input=True, dtype=torch.float32)
    x = torch.randn(2, 4, 5, 5, 5)
    weight = torch.randn_like(x)
    for chain in (rev, plain):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = (chain(x.clone().requires_grad_(True) * 1.0) * weight).sum()
        loss.backward()  # outside autocast, as AMP training does
    for p_rev, p_plain in zip(rev.parameters(), plain.parameters()):
        rel = (p_rev.grad - p_plain.grad).norm() / p_plain.grad.norm()
        assert rel < 1e-3  # measured: 0 with the replay, 5e-3 when backward recomputes in float32


def test_simulate_step_sees_the_flat_chain():
    """memplan's ruler (a whole Adam step on meta tensors) agrees: depth costs parameters only."""
    from memplan import simulate_step

    def peak(n_blocks, reversible):
        blocks = [make_conv_bn_relu_coupling(3, 8, 3, 1) for _ in range(n_blocks)]
        chain = nn.Sequential(nn.Identity(), *[ReversibleBlock(f, g, free_input=True) if reversible
                                               else PlainCoupling(f, g) for f, g in blocks])
        report = simulate_step(chain, torch.empty(1, 8, 16, 16, 16, device="meta"), scratch="none")
        return report.peak_bytes, sum(p.numel() * 4 for p in chain.parameters())

    activation = 8 * 16 ** 3 * 4
    (rev3, params3), (rev8, params8) = peak(3, True), peak(8, True)
    # parameters, gradients and two Adam moments: 4x the parameter bytes (+ BN buffers), plus the two
    # CPU generator states (5,056 B each) every block keeps to replay F and G: < 1 activation
    rng = 2 * 5056 * (8 - 3)
    assert 4 * (params8 - params3) + rng <= rev8 - rev3 < 4 * (params8 - params3) + rng + 1024 < activation
    (plain3, _), (plain8, _) = peak(3, False), peak(8, False)
    assert plain8 - plain3 > 10 * activation
