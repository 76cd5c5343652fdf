"""memplan in one minute: plan a FetusMapV2-sized U-Net on meta tensors, then train a small one.

    python examples/quickstart.py
"""
import sys
from pathlib import Path

import torch

import memplan

sys.path.insert(0, str(Path(__file__).parent))
from fetusmapv2_unet import INPUT_SHAPE, UNet3D  # noqa: E402

# 1. Plan the paper-sized network: meta tensors cost no memory and no compute.
net = UNet3D()
x = torch.empty(INPUT_SHAPE, device="meta")
plan = memplan.plan(net, x, scratch="none")       # "none": count tensors as CUDA's allocator would
print(plan.summary())
print(f"simulated step peak: {memplan.format_bytes(plan.simulated_vanilla_peak_bytes)} unplanned -> "
      f"{memplan.format_bytes(plan.simulated_peak_bytes)} planned "
      f"({plan.simulated_peak_bytes / plan.simulated_vanilla_peak_bytes:.2f}x)")

# 2. Train a small one for real: the compiled module shares the model's parameters.
small = UNet3D(widths=(4, 8, 16, 32, 64))
inputs = torch.randn(1, 1, 32, 32, 32)
target = torch.randn(1, 22, 32, 32, 32)
compiled = memplan.compile(small, inputs)
opt = torch.optim.Adam(small.parameters(), lr=1e-3)
for step in range(3):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(compiled(inputs), target)
    loss.backward()
    opt.step()
    print(f"step {step}: loss {loss.item():.4f}")
torch.save(small.state_dict(), "/tmp/memplan_quickstart.pt")   # the original's state_dict is the format
