"""Moved to :mod:`memplan.rev.block`; this name stays for existing imports."""
from .rev.block import ReversibleBlock, coupling_param_count, is_reversible_leaf, make_conv_bn_relu_coupling

__all__ = ["ReversibleBlock", "coupling_param_count", "is_reversible_leaf", "make_conv_bn_relu_coupling"]
