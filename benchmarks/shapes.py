"""Parameter lists of models that matter, for the benchmarks (no model code, only shapes).

Sizes are scaled to what a 2-core CPU steps in milliseconds; the GPU runner scales them up.
"""
from __future__ import annotations

import torch


def few_large(scale: int = 1) -> list[tuple[int, ...]]:
    """A handful of big tensors: the pure bandwidth case."""
    return [(2048 * scale, 1024)] * 4


def gpt2_like(d: int = 384, layers: int = 6, vocab: int = 8192, ctx: int = 512) -> list[tuple[int, ...]]:
    """The parameter shapes of a GPT-2 style decoder (token/position embeddings, per layer
    two LayerNorms, fused QKV and output projections, a 4x MLP, and a final LayerNorm)."""
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def resnet50_like() -> list[tuple[int, ...]]:
    """Many small convolutions and norm vectors, as in a ResNet-50 (161 tensors)."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]
    stages = [(64, 256, 3), (128, 512, 4), (256, 1024, 6), (512, 2048, 3)]
    in_ch = 64
    for mid, out, blocks in stages:
        for b in range(blocks):
            shapes += [(mid, in_ch, 1, 1), (mid,), (mid,), (mid, mid, 3, 3), (mid,), (mid,), (out, mid, 1, 1), (out,), (out,)]
            if b == 0:
                shapes += [(out, in_ch, 1, 1), (out,), (out,)]
            in_ch = out
    return shapes + [(1000, 2048), (1000,)]


def tiny_many(count: int = 2000, seed: int = 0) -> list[tuple[int, ...]]:
    """Thousands of tiny tensors: where per-tensor host overhead decides."""
    gen = torch.Generator().manual_seed(seed)
    return [(int(n),) for n in torch.randint(1, 257, (count,), generator=gen)]


CASES = {"few_large": few_large, "gpt2_like": gpt2_like, "resnet50_like": resnet50_like, "tiny_2000": tiny_many}


def make(shapes, dtype=torch.float32, device="cpu"):
    """Parameters with gradients already in place, as after a backward pass."""
    gen = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype=dtype, device=device))
        p.grad = torch.randn(shape, generator=gen).to(dtype=dtype, device=device)
        params.append(p)
    return params
