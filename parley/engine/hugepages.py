"""Weights and KV pages in transparent huge pages (2 MiB) where Linux offers them.

    moved = move_to_huge_pages(model)          # bytes of parameters now in huge pages (0: none)
    pool = huge_zeros((pages, heads, 16, 64), torch.bfloat16)

Decoding reads every weight once per step from memory, and a tile load reads 16 rows that lie
a whole row apart: with 4 KiB pages nearly every such load misses the TLB and waits for a page
walk, and the hardware prefetcher stops at each page boundary. On this machine, weights in 2 MiB
pages make a cold projection 1.6-1.7x faster at every batch size (benchmarks/RESULTS.md). The
memory comes from an anonymous mapping advised MADV_HUGEPAGE, so it works where THP is
"always" or "madvise" (the common default) and is plain memory where it is "never".
"""

from __future__ import annotations

import mmap

import torch

HUGE = 2 << 20  # bytes in a huge page on x86-64 and arm64


def huge_empty(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 tensor of nbytes starting on a 2 MiB boundary, backed by memory
    advised for huge pages. The tensor keeps its mapping alive."""
    area = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        area.madvise(mmap.MADV_HUGEPAGE)
    whole = torch.frombuffer(area, dtype=torch.uint8)
    skip = -whole.data_ptr() % HUGE
    return whole[skip:skip + nbytes]


def huge_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros (fresh anonymous memory is zero) of the given shape and dtype in huge pages."""
    numel = 1
    for n in shape:
        numel *= n
    return huge_empty(numel * dtype.itemsize).view(dtype).view(shape)


@torch.no_grad()
def move_to_huge_pages(model: torch.nn.Module) -> int:
    """Copy the model's CPU parameters of two or more dimensions into one huge-page area and
    point the parameters at it (same values, dtypes and shapes; tied parameters stay tied).
    Returns the bytes moved: 0 when they were moved already (and not replaced since, as
    `model.to(dtype)` does)."""
    params = [p for p in dict.fromkeys(model.parameters()) if p.dim() >= 2 and p.device.type == "cpu"]
    where = tuple(p.data_ptr() for p in params)
    if not params or getattr(model, "_parley_huge_pages", None) == where:
        return 0
    align = 64  # every tensor starts on a cache line
    sizes = [-(-p.numel() * p.element_size() // align) * align for p in params]
    area = huge_empty(sum(sizes))
    at = 0
    for p, size in zip(params, sizes):
        view = area[at:at + p.numel() * p.element_size()].view(p.dtype).view(p.shape)
        view.copy_(p.data)
        p.data = view
        at += size
    model._parley_huge_pages = tuple(p.data_ptr() for p in params)
    return at
