"""A small byte-level transformer language model on text that ships with Python.

The corpus is the standard library's own ``.py`` sources (``sysconfig``'s ``stdlib``
folder, files sorted by path, read until :data:`CORPUS_BYTES`): no download, the same
bytes on every machine with the same Python. Each example is a window of
:data:`CONTEXT` bytes and the next byte at every position (teacher forcing); 512 held-out
windows measure next-byte accuracy, the rest train.

The model (:func:`build_lm`) is a GPT-style decoder: byte and position embeddings,
``LAYERS`` pre-LayerNorm blocks of causal self-attention and a 4x MLP, a final LayerNorm
and a linear head over the 256 bytes. About 3.3M parameters, so DDP's gradient buckets
hold embedding, attention, MLP and LayerNorm gradients, unlike the MLP benchmarks.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch
from torch import nn

CORPUS_BYTES = 2_000_000
CONTEXT = 64
#: Held-out windows that measure next-byte accuracy (32k bytes: an evaluation costs about
#: as much as 16 training steps on one core).
TEST_WINDOWS = 512
WIDTH = 256
LAYERS = 4
HEADS = 4


def stdlib_corpus(limit: int = CORPUS_BYTES) -> bytes:
    """The first ``limit`` bytes of the standard library's ``.py`` files, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, n = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        out.append(data)
        n += len(data)
        if n >= limit:
            break
    if not out:
        raise RuntimeError(f"no .py files under {root}: cannot build the lm corpus")
    return b"".join(out)[:limit]


def lm_windows(seed: int, limit: int = CORPUS_BYTES, context: int = CONTEXT
               ) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test): int64 ``(N, context)`` byte windows and their
    next bytes, non-overlapping, split by a seeded shuffle: :data:`TEST_WINDOWS` held out,
    the rest train."""
    data = torch.frombuffer(bytearray(stdlib_corpus(limit)), dtype=torch.uint8).long()
    n = (data.numel() - 1) // context
    x = data[:n * context].view(n, context)
    y = data[1:n * context + 1].view(n, context)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    te, tr = perm[:TEST_WINDOWS], perm[TEST_WINDOWS:]
    return x[tr], y[tr], x[te], y[te]


class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention, then a 4x GELU MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class ByteLM(nn.Module):
    """GPT-style byte-level language model; ``forward`` returns ``(N, T, 256)`` logits."""

    def __init__(self, width: int = WIDTH, layers: int = LAYERS, heads: int = HEADS,
                 context: int = CONTEXT) -> None:
        super().__init__()
        self.tok = nn.Embedding(256, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256)
        mask = torch.triu(torch.full((context, context), float("-inf")), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.tok(x) + self.pos(torch.arange(t, device=x.device))
        for b in self.blocks:
            h = b(h, self.mask[:t, :t])
        return self.head(self.ln(h))


def build_lm() -> ByteLM:
    return ByteLM()
