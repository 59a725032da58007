"""LoRA dropout with a cheaper random mask: the same Bernoulli(1 - p) keep mask, drawn 4x faster on CPU.

Why: PEFT applies `nn.Dropout(p)` to the input of every LoRA layer (7 per transformer block for all-linear
LoRA), and on CPU drawing those masks with `bernoulli_` took 9-12% of an SFT step of the 58M benchmark
model (torch.profiler, bench/RESULTS.md). Here each 64-bit draw of torch's generator gives four 16-bit
uniforms, and an element is kept when its uniform is at or above round(p * 65536): p is honoured to within
1/65536 (0.05 -> 0.050003) and the kept values are scaled by 1 / (1 - that p), so the expectation is exact.
Seeded like everything else (torch's global generator), so runs and resumes stay reproducible.
"""
from __future__ import annotations

import torch
from torch import nn


class FastDropout(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.threshold = round(p * 65536)           # drop when the 16-bit uniform is below this
        self.scale = 65536 / (65536 - self.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        n = x.numel()
        bits = torch.randint(-2**63, 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
        # int16 view: uniform on [-32768, 32767]; shift the threshold into that range
        u = bits.view(torch.int16)[:n].view(x.shape)
        return torch.where(u >= self.threshold - 32768, x * self.scale, torch.zeros((), dtype=x.dtype, device=x.device))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_dropout(model) -> int:
    """Swap every LoRA input dropout of a PEFT model for FastDropout; returns how many were swapped."""
    swapped = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if isinstance(drops, nn.ModuleDict):
            for name, d in list(drops.items()):
                if isinstance(d, nn.Dropout) and d.p > 0:
                    drops[name] = FastDropout(d.p)
                    swapped += 1
    return swapped
