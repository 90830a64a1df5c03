"""Parameter shapes of the models that matter for an optimizer step (no model code, only
shapes), shared by the runner (`python -m fusedopt.bench`) and the pytest-benchmark
suites in benchmarks/.

Four kinds of parameter list decide how a step performs: a few large tensors (pure
bandwidth), a transformer's layer list (large matrices and many small vectors), a
convolutional network's many small convolution and norm tensors, and thousands of tiny
tensors (where per-tensor host overhead decides). `cases` sizes them for a device: full
size on a GPU, scaled so that a 2-core CPU steps each in milliseconds, tiny for a smoke run.
"""
from __future__ import annotations

import torch


def few_large(rows: int = 2048, cols: int = 1024, count: int = 4) -> list[tuple[int, ...]]:
    """A handful of big tensors: the pure bandwidth case."""
    return [(rows, cols)] * count


def gpt2_like(d: int = 384, layers: int = 6, vocab: int = 8192, ctx: int = 512) -> list[tuple[int, ...]]:
    """The parameter shapes of a GPT-2 style decoder (token/position embeddings, per layer
    two LayerNorms, fused QKV and output projections, a 4x MLP, and a final LayerNorm)."""
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def resnet50_like(width: int = 64, classes: int = 1000) -> list[tuple[int, ...]]:
    """Many small convolutions and norm vectors, as in a ResNet-50 (161 tensors).

    `width` is the stem's channel count (64 in ResNet-50); every stage scales with it, so a
    smaller width keeps the tensor count and shrinks the elements by about (width/64)**2.
    """
    shapes = [(width, 3, 7, 7), (width,), (width,)]
    stages = [(width * m, width * m * 4, blocks) for m, blocks in ((1, 3), (2, 4), (4, 6), (8, 3))]
    in_ch = width
    for mid, out, blocks in stages:
        for b in range(blocks):
            shapes += [(mid, in_ch, 1, 1), (mid,), (mid,), (mid, mid, 3, 3), (mid,), (mid,), (out, mid, 1, 1), (out,), (out,)]
            if b == 0:
                shapes += [(out, in_ch, 1, 1), (out,), (out,)]
            in_ch = out
    return shapes + [(classes, in_ch), (classes,)]


def tiny_many(count: int = 2000, seed: int = 0, largest: int = 256) -> list[tuple[int, ...]]:
    """Thousands of tiny tensors (1 to `largest` elements): where per-tensor host overhead decides."""
    gen = torch.Generator().manual_seed(seed)
    return [(int(n),) for n in torch.randint(1, largest + 1, (count,), generator=gen)]


# The same four cases at three sizes. On a GPU: GPT-2 small (124M parameters), ResNet-50
# (25.6M), four 4096x4096 matrices, 2000 tiny tensors. On a CPU each case is about one to
# two million elements (tiny_many stays 2000 tensors: its point is the count), so a full
# run of the runner takes minutes on two shared cores.
_SIZES = {
    "gpu": dict(few_large=dict(rows=4096, cols=4096), gpt2_like=dict(d=768, layers=12, vocab=50257, ctx=1024),
                resnet50_like=dict(width=64), tiny_many=dict(count=2000)),
    "cpu": dict(few_large=dict(rows=512, cols=512), gpt2_like=dict(d=128, layers=4, vocab=4096, ctx=256),
                resnet50_like=dict(width=16), tiny_many=dict(count=2000)),
    "quick": dict(few_large=dict(rows=64, cols=64), gpt2_like=dict(d=32, layers=2, vocab=256, ctx=32),
                  resnet50_like=dict(width=4, classes=10), tiny_many=dict(count=200)),
}
_BUILDERS = {"few_large": few_large, "gpt2_like": gpt2_like, "resnet50_like": resnet50_like, "tiny_many": tiny_many}
CASE_NAMES = tuple(_BUILDERS)


def cases(size: str) -> dict[str, list[tuple[int, ...]]]:
    """The four cases' shape lists at one of the sizes 'gpu', 'cpu' or 'quick'."""
    return {name: build(**_SIZES[size][name]) for name, build in _BUILDERS.items()}


def make(shapes, dtype=torch.float32, device="cpu", seed: int = 0) -> list[torch.nn.Parameter]:
    """Parameters with gradients already in place, as after a backward pass."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype=dtype, device=device))
        p.grad = torch.randn(shape, generator=gen).to(dtype=dtype, device=device)
        params.append(p)
    return params
