"""A paged KV cache: fixed-size pages from one memory budget, page tables per sequence,
and reuse of pages whose tokens another sequence already computed.

    cache = PagedKVCache(model.config, budget_bytes=64 * 2**20, page_size=16)
    seq = CachedSequence(tokens=prompt)
    reused = cache.match(seq, len(prompt) - 1)    # full pages of a cached prefix, ref'd for seq
    seq.pages += cache.allocate(cache.pages_for(len(prompt) + 32) - len(seq.pages))
    batch = cache.batch([(seq, len(prompt) - seq.length)])   # feed the rest of the prompt
    logits = model(ids, batch)                    # the model appends K/V to seq's pages
    cache.publish(seq); cache.release(seq)        # share its full pages, give back the rest

Each layer holds K and V pools of shape [num_pages, kv_heads, page_size, head_dim]; a
sequence's token at position p lives in page `seq.pages[p // page_size]`, slot
`p % page_size`. Pages are reference-counted. A full page is named by a hash of its tokens
and of every token before it (the hash of the previous page chains in), so equal names
mean equal keys and values. When no sequence holds a named page any more it stays in the
pools as *cached* (least recently used first out) until an allocation needs the room.
Shared pages are never written: a sequence only appends after its own last token.

A `PagedBatch` is one forward step over several sequences, packed into one row: decoding
sequences (one query each) attend together through one padded gather of their pages;
each sequence that feeds several tokens (prefill) attends on its own, causally. A layer with
a sliding window (ModelConfig.window) masks out keys older than its window. Where every layer
slides (Mistral, Phi-3), a page that lies wholly before the window of a sequence's next query
is given back when a batch is built (`CachedSequence.dropped` counts them; the page table keeps
their numbers, read only with weight zero, so positions still index it). With any full-attention
layer (Gemma 3) every page stays: a page number holds one slot of every layer's pools, so
freeing one for the sliding layers alone would take a page table per kind of layer.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property

import torch

from parley.engine.hugepages import huge_zeros
from parley.model.transformer import ModelConfig, attention, visible


class CacheError(ValueError):
    """A cache that cannot be built, or a request for more pages than exist."""


@dataclass
class CachedSequence:
    """One sequence in the cache: its tokens so far, how many have K/V in the cache
    (`length`), its page table, and the names of its full pages. The `salt` goes into the
    name of its first page (and so of all): only sequences of one salt share pages."""

    tokens: list[int]
    length: int = 0
    pages: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)
    salt: bytes = b""
    dropped: int = 0  # pages[:dropped] given back: behind every layer's sliding window


class PagedKVCache:
    def __init__(self, cfg: ModelConfig, budget_bytes: int, page_size: int = 16,
                 dtype: torch.dtype = torch.float32, device="cpu"):
        if page_size < 1:
            raise CacheError(f"page_size must be >= 1 (got {page_size})")
        self.page_size, self.cfg = page_size, cfg
        element = torch.empty(0, dtype=dtype).element_size()
        self.page_bytes = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * page_size * cfg.head_dim * element
        self.num_pages = budget_bytes // self.page_bytes
        if self.num_pages < 1:
            raise CacheError(f"a KV budget of {budget_bytes} bytes holds no page of {self.page_bytes} bytes: "
                             "raise the budget or lower page_size")
        shape = (self.num_pages, cfg.num_key_value_heads, page_size, cfg.head_dim)
        # on the CPU, in huge pages: a step reads keys and values of pages all over the pool
        zeros = huge_zeros if torch.device(device).type == "cpu" else \
            (lambda size, kind: torch.zeros(size, dtype=kind, device=device))
        self.k = [zeros(shape, dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [zeros(shape, dtype) for _ in range(cfg.num_hidden_layers)]
        self.device = device
        self.refs = [0] * self.num_pages
        self.free: list[int] = list(range(self.num_pages - 1, -1, -1))  # pop() hands out page 0 first
        self.cached: OrderedDict[int, None] = OrderedDict()  # named pages nobody holds, oldest first
        self.name_of: dict[int, bytes] = {}
        self.page_named: dict[bytes, int] = {}
        # positions a query sees where every layer slides (then older pages are given back); else None
        windows = [cfg.window(i) for i in range(cfg.num_hidden_layers)]
        self.window = max(windows) if all(windows) else None

    # -- counters
    @property
    def pages_free(self) -> int:
        """Pages an allocation can take now: never used, or cached and unreferenced."""
        return len(self.free) + len(self.cached)

    @property
    def pages_used(self) -> int:
        return self.num_pages - self.pages_free

    @property
    def pages_cached(self) -> int:
        return len(self.cached)

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def drop_cached(self) -> None:
        """Forget every cached page nobody holds (a benchmark that must prefill from scratch)."""
        for page in self.cached:
            del self.page_named[self.name_of.pop(page)]
            self.free.append(page)
        self.cached.clear()

    # -- allocation
    def allocate(self, n: int) -> list[int]:
        """n pages for one sequence (fresh ones first, then the least recently used cached)."""
        if n > self.pages_free:
            raise CacheError(f"{n} pages wanted but only {self.pages_free} of {self.num_pages} are free")
        pages = []
        for _ in range(n):
            if self.free:
                page = self.free.pop()
            else:
                page, _ = self.cached.popitem(last=False)
                del self.page_named[self.name_of.pop(page)]
            self.refs[page] = 1
            pages.append(page)
        return pages

    def release(self, seq: CachedSequence) -> None:
        """Drop seq's hold on its pages: named ones become cached, the others free."""
        self._give_back(seq.pages[seq.dropped:])
        seq.pages, seq.dropped = [], 0

    def _give_back(self, pages: list[int]) -> None:
        for page in pages:
            self.refs[page] -= 1
            if self.refs[page] == 0:
                if page in self.name_of:
                    self.cached[page] = None
                else:
                    self.free.append(page)

    def drop_behind_window(self, seq: CachedSequence) -> None:
        """Give back seq's pages that lie wholly before what its next query (at seq.length) sees,
        where every layer slides. Their numbers stay in seq.pages: the C kernels may read a few
        such positions with weight zero (weigh_tiles starts at a multiple of 32), and a page
        reused meanwhile holds another sequence's finite values."""
        if self.window is None:
            return
        behind = max(0, seq.length - self.window + 1) // self.page_size
        if behind > seq.dropped:
            self._give_back(seq.pages[seq.dropped:behind])
            seq.dropped = behind

    # -- prefix reuse
    def _name(self, previous: bytes, tokens: list[int]) -> bytes:
        return hashlib.blake2b(previous + b"".join(t.to_bytes(4, "little") for t in tokens), digest_size=16).digest()

    def match(self, seq: CachedSequence, limit: int) -> int:
        """Give an empty sequence the cached pages of its longest named prefix of at most
        `limit` tokens; returns how many tokens that covers (its new `length`)."""
        ps, previous = self.page_size, seq.salt
        while (len(seq.pages) + 1) * ps <= limit:
            start = len(seq.pages) * ps
            name = self._name(previous, seq.tokens[start:start + ps])
            page = self.page_named.get(name)
            if page is None:
                break
            self.cached.pop(page, None)
            self.refs[page] += 1
            seq.pages.append(page)
            seq.hashes.append(name)
            previous = name
        seq.length = len(seq.pages) * ps
        return seq.length

    def publish(self, seq: CachedSequence) -> None:
        """Name seq's pages that have filled since the last call, so later sequences can
        reuse them. A page whose name another page has already taken stays unnamed."""
        ps = self.page_size
        while (len(seq.hashes) + 1) * ps <= seq.length:
            i = len(seq.hashes)
            name = self._name(seq.hashes[-1] if seq.hashes else seq.salt, seq.tokens[i * ps:(i + 1) * ps])
            seq.hashes.append(name)
            page = seq.pages[i]
            if i >= seq.dropped and name not in self.page_named and page not in self.name_of:
                self.page_named[name], self.name_of[page] = page, name

    # -- one forward step
    def batch(self, feeds: list[tuple[CachedSequence, int]]) -> "PagedBatch":
        """A step feeding each sequence its next n uncached tokens (n=1: decoding)."""
        return PagedBatch(self, feeds)


class PagedBatch:
    """The packed tokens of one step, in the order of `feeds`; implements the paged
    protocol of `Transformer.forward` (positions, outputs, attend). Building it advances
    every sequence's `length`."""

    def __init__(self, cache: PagedKVCache, feeds: list[tuple[CachedSequence, int]]):
        ps, dev = cache.page_size, cache.device
        self.cache = cache
        self.ids: list[int] = []
        positions, pages, slots, outputs = [], [], [], []
        self.decode: list[int] = []  # packed index of each one-token feed
        self.prefill: list[tuple[int, int, int, torch.Tensor]] = []  # (packed start, T, first position, pages)
        decode_tables, decode_lengths = [], []
        for seq, n in feeds:
            if n < 1 or seq.length + n > len(seq.tokens) or seq.length + n > len(seq.pages) * ps:
                raise CacheError(f"cannot feed {n} tokens to a sequence of {len(seq.tokens)} tokens, "
                                 f"{seq.length} cached, {len(seq.pages)} pages")
            cache.drop_behind_window(seq)
            at, start = len(self.ids), seq.length
            span = range(start, start + n)
            self.ids += seq.tokens[start:start + n]
            positions += span
            pages += [seq.pages[p // ps] for p in span]
            slots += [p % ps for p in span]
            outputs.append(at + n - 1)
            if n == 1:
                self.decode.append(at)
                decode_tables.append(seq.pages[:cache.pages_for(start + 1)])
                decode_lengths.append(start + 1)
            else:
                used = torch.tensor(seq.pages[:cache.pages_for(start + n)], device=dev)
                self.prefill.append((at, n, start, used))
            seq.length += n
        self.positions = torch.tensor([positions], device=dev)
        self._outputs, self._pages, self._slots = outputs, pages, slots
        if self.decode:
            width = max(len(t) for t in decode_tables)
            self.decode_table = torch.tensor([t + [0] * (width - len(t)) for t in decode_tables], device=dev)
            self._decode_lengths = decode_lengths

    # what the model's own forward reads (attend below, Transformer.forward), built on first use: the C
    # step reads none of it, and at batch 1 building it was a third of the engine's Python a step
    @cached_property
    def outputs(self) -> torch.Tensor:
        return torch.tensor(self._outputs, device=self.cache.device)

    @cached_property
    def write_pages(self) -> torch.Tensor:
        return torch.tensor(self._pages, device=self.cache.device)

    @cached_property
    def write_slots(self) -> torch.Tensor:
        return torch.tensor(self._slots, device=self.cache.device)

    @cached_property
    def decode_index(self) -> torch.Tensor:
        return torch.tensor(self.decode, device=self.cache.device)

    @cached_property
    def _keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.cache.device
        keys = torch.arange(self.decode_table.shape[1] * self.cache.page_size, device=dev)
        return keys, torch.tensor(self._decode_lengths, device=dev)[:, None]

    @cached_property
    def decode_mask(self) -> torch.Tensor:
        keys, lengths = self._keys
        return (keys[None] < lengths)[:, None, None]

    @cached_property
    def decode_window_mask(self) -> dict[int, torch.Tensor]:
        """Per window size of the model's layers: decode_mask less the keys the window has left behind."""
        keys, lengths = self._keys
        cfg = self.cache.cfg
        windows = {cfg.window(i) for i in range(cfg.num_hidden_layers)} - {None}
        return {w: (self.decode_mask[:, 0, 0] & (keys[None] >= lengths - w))[:, None, None] for w in windows}

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (1, heads, N, hd), k and v (1, kv_heads, N, hd) of the packed tokens: store k
        and v in their pages, then return each token's attention output (1, heads, N, hd)."""
        K, V = self.cache.k[layer], self.cache.v[layer]
        K[self.write_pages, :, self.write_slots] = k[0].transpose(0, 1).to(K.dtype)
        V[self.write_pages, :, self.write_slots] = v[0].transpose(0, 1).to(V.dtype)
        y = torch.empty_like(q)
        if self.decode:
            D, width = self.decode_table.shape
            gather = lambda pool: pool[self.decode_table].transpose(1, 2).reshape(
                D, pool.shape[1], width * pool.shape[2], pool.shape[3]).to(q.dtype)
            qd = q[0, :, self.decode_index].transpose(0, 1)[:, :, None]  # (D, heads, 1, hd)
            window = self.cache.cfg.window(layer)
            mask = self.decode_window_mask[window] if window else self.decode_mask
            out = attention(qd, gather(K), gather(V), mask, self.cache.cfg)
            y[0, :, self.decode_index] = out[:, :, 0].transpose(0, 1)
        for at, T, start, pages in self.prefill:
            y[:, :, at:at + T] = self.attend_chunk(layer, q[:, :, at:at + T], start, pages)
        return y

    def attend_chunk(self, layer: int, q: torch.Tensor, start: int, pages: torch.Tensor) -> torch.Tensor:
        """Causal attention of a prompt chunk's queries q (1, heads, T, hd), at positions
        start.., over its sequence's keys and values up to them (stored in `pages` already):
        (1, heads, T, hd) in q's dtype."""
        K, V = self.cache.k[layer], self.cache.v[layer]
        T = q.shape[2]
        S = start + T
        gather = lambda pool: pool[pages].transpose(0, 1).reshape(
            pool.shape[1], -1, pool.shape[3])[None, :, :S].to(q.dtype)
        window = self.cache.cfg.window(layer)
        if start == 0 and not (window and window < S):
            return attention(q, gather(K), gather(V), None, self.cache.cfg, causal=True)
        mask = visible(torch.arange(start, S, device=q.device), torch.arange(S, device=q.device), window)
        return attention(q, gather(K), gather(V), mask, self.cache.cfg)
