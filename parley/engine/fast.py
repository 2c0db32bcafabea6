"""Fast decoding and prompt layers on CPU with the C kernels in kernels.c.

    decoder = FastDecoder.create(model)        # None where the kernels cannot serve this model
    logits = decoder.step_paged(batch)         # one new token per row over the paged cache (engine/cache.py)
    logits = decoder.step_rows(batch)          # prompt chunks (+ one-token rows) over a paged cache
    tokens = decoder.argmax(logits, rows)      # greedy picks of those rows

The Transformer's own forward stays the reference. This path computes the same step with
fp32 activations over the model's bf16 or fp32 weights, used in place (or packed once, below),
for every family the Transformer has (q/k/v biases, q/k norms, Gemma 3's norms, GeGLU and scales, soft-capping,
per-layer sliding windows with their own rotary tables, mixtures of experts; RoPE scaling is
in the rotary tables already). On a CPU with AMX
and bf16 weights whose sizes are whole tiles (`decoder.amx`), the projections run on the
tile unit with their inputs rounded to bf16, and keys and values are kept in bf16
(`decoder.kv_dtype`; so are those of the packed AVX-512 paths over bf16 weights, below); every
row's arithmetic is the same whatever it is batched with.
`step_rows` runs prompt chunks layer by layer through the same C code, their causal
attention too (keys . queries and weights . values on tiles, 16 queries at a time; a row's
bits do not depend on where its prompt is cut); the engine uses it on the tile path.
`create(model, tiles=False)` keeps off the tile unit (the engine's `kernels=avx512`). Off the
tiles, float weights' projections run on register-blocked products (kernels.c's "float weights
off the tile unit"): AVX512-BF16 dot products on CPUs that have them and no AMX (inputs rounded
to bf16, as on the tiles), else fp32 FMAs on AVX-512 or AVX2, else portable C; `decoder.path`
names the one chosen once at start (`create(model, path="avx2")` caps it). On the AVX-512 paths
the layers and the output layer read a copy of their weights packed at load (`pack_float`,
`decoder.packed`: the float weights' bytes a second time), multiplied as outer products. Prompt chunks of
bf16 weights run through `step_rows` off the tiles too (`decoder.all_rows`).
A model whose projections and output layer are quantized (model/quant.py: q8, q4) runs on the
int8 kernels instead, its activations rounded to int8 per block of 32; `decoder.path` names the
instruction set chosen once at start (AVX512-VNNI, AVX2, or portable C; `create(model,
path="avx2")` caps it).
The VNNI and AVX2 paths read a copy of the weights interleaved 16 rows at a time
(quant.interleave16, made at load in huge pages: the quantized weights' bytes a second time).
The kernels compile once with the system C compiler
into the user's cache folder; if that fails, decoding falls back to the reference forward.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile
import weakref
from functools import cache
from pathlib import Path

import torch

from parley.engine.cache import PagedBatch, PagedKVCache
from parley.engine.hugepages import huge_empty, move_to_huge_pages
from parley.model.quant import ROWS16, QuantLinear, interleave16, quantized_layers
from parley.model.transformer import Transformer

SOURCE = Path(__file__).with_name("kernels.c")
P = ctypes.c_void_p


class Layer(ctypes.Structure):
    """One layer as kernels.c's Layer reads it; the fields after `index` are the families' variations
    (None / 0: a plain Llama layer has none)."""
    _fields_ = [(n, P) for n in ("q", "k", "v", "o", "gate", "up", "down", "ln1", "ln2", "K", "V")] + \
               [("index", ctypes.c_long)] + \
               [(n, P) for n in ("bq", "bk", "bv", "bo", "q_norm", "k_norm", "post_attn", "post_ff", "cos", "sin")] + \
               [("window", ctypes.c_long)] + [(n, P) for n in ("router", "experts", "shared", "shared_router")] + \
               [(n, ctypes.c_long) for n in ("n_experts", "top_k", "expert_inter", "shared_inter", "renorm")]


class Lora(ctypes.Structure):
    """One adapter's matrices in one layer (kernels.c's Lora): A [r, in] and Bt [r, out] of the
    targets q, k, v, o, gate, up, down (None where the adapter leaves one alone); for bf16 models
    also B [out, r] (the tile path's)."""
    _fields_ = [("A", P * 7), ("Bt", P * 7), ("r", ctypes.c_long), ("scale", ctypes.c_float), ("bf16", ctypes.c_long),
                ("B", P * 7)]


class Buffers(ctypes.Structure):
    _fields_ = [(n, P) for n in ("x", "h", "qkv", "att", "gu", "act", "scores", "logits", "xp", "xp_act", "xq", "xs",
                                 "lora", "lora_plan", "lora_blocks", "lora_segs", "lora_u", "route", "moe_x",
                                 "moe_y", "moe_rows")]


class Shape(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in ("B", "H", "nh", "nkv", "hd", "n_layers", "w_bf16", "amx", "kv_bf16")] + \
               [(n, ctypes.c_long) for n in ("inter", "vocab", "max_len")] + [("eps", ctypes.c_float)] + \
               [(n, ctypes.c_int) for n in ("quant", "isa")] + \
               [(n, ctypes.c_float) for n in ("scale", "attn_cap")] + \
               [(n, ctypes.c_int) for n in ("gelu", "fisa", "packed", "split_attn")]


class QWeight(ctypes.Structure):
    """A q8 / q4 weight (model/quant.py) as the C side reads it."""
    _fields_ = [("q", P), ("d", P), ("m", P), ("fmt", ctypes.c_int), ("rows16", P)]

    @classmethod
    def of(cls, layer: QuantLinear, rows16: torch.Tensor | None = None) -> "QWeight":
        """`rows16`: the same weights interleaved (quant.interleave16), which the VNNI path reads instead."""
        return cls(layer.q.data_ptr(), layer.d.data_ptr(), layer.m.data_ptr() if layer.m is not None else None,
                   8 if layer.fmt == "q8" else 4, rows16.data_ptr() if rows16 is not None else None)


MAX_RANK = 64  # the highest adapter rank the kernels serve (kernels.c's LORA_MAX_RANK)

# the int8 paths of quantized weights (kernels.c's ISA_*), best last; `kernels=` names a ceiling
ISAS = ("scalar", "avx2", "vnni")
ISA_CEILING = {"scalar": 0, "avx2": 1}  # any other setting: the best this CPU has
# the paths of float weights off the tiles (kernels.c's F_*), best last; the same ceilings, and two
# for tests and benchmarks: avx512-fma (fp32 products on a CPU with AVX512-BF16) and avx512-bf16
# (bf16 dot products on a CPU with AMX too, which else keeps to fp32 ones: float_isa)
FLOAT_ISAS = ("scalar", "avx2", "avx512", "avx512-bf16")
FLOAT_CEILING = {**ISA_CEILING, "avx512-fma": 2, "avx512-bf16": 3}


PANEL = 16  # outputs a panel of packed float weights holds (kernels.c's PANEL)


def pack_float(w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """A float weight [O, I] in the layout kernels.c's linear_packed_for reads (the AVX-512 paths off
    the tiles): panels of 16 outputs, each input's 16 weights side by side, for bf16 each pair of
    inputs' 32; outputs past O and the input past an odd I zero. Written into `out` (that many
    elements of the dtype) where given."""
    O, I = w.shape
    pairs = 2 if w.dtype == torch.bfloat16 else 1
    Ip = -(-I // pairs) * pairs
    panels = -(-O // PANEL)
    padded = torch.zeros(panels * PANEL, Ip, dtype=w.dtype)
    padded[:O, :I] = w
    packed = padded.view(panels, PANEL, Ip // pairs, pairs).transpose(1, 2)
    if out is None:
        return packed.contiguous()
    out.view(packed.shape).copy_(packed)
    return out


def packed_numel(w: torch.Tensor) -> int:
    """The elements of pack_float(w)."""
    O, I = w.shape
    return -(-O // PANEL) * PANEL * (I + I % 2 if w.dtype == torch.bfloat16 else I)


def norm_weight(norm: torch.nn.Module) -> torch.Tensor:
    """An RMSNorm's weights in fp32 as kernels.c multiplies by them: Gemma's (offset) are 1 + weight."""
    w = norm.weight.detach().float()
    return (1.0 + w if norm.offset else w).contiguous()


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "parley"


@cache
def kernels() -> ctypes.CDLL | None:
    """Compile (once per source version) and load the kernels; None if no compiler works."""
    source = SOURCE.read_bytes()
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
    tag = hashlib.sha256(source + " ".join(flags).encode()).hexdigest()[:16]
    lib = cache_dir() / f"kernels-{tag}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
        os.close(fd)
        try:
            subprocess.run([os.environ.get("CC", "cc"), *flags, str(SOURCE), "-o", tmp, "-lm"],
                           check=True, capture_output=True, text=True)
            os.replace(tmp, lib)  # atomic: a half-written library is never loaded
        except (OSError, subprocess.CalledProcessError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            print(f"parley: fast CPU kernels unavailable ({detail.strip()[:200]}); "
                  "using the slower PyTorch path", file=sys.stderr)
            return None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    so = ctypes.CDLL(str(lib))
    so.decode_step_paged.argtypes = [ctypes.POINTER(Layer), P, P, ctypes.POINTER(Buffers), ctypes.POINTER(Shape),
                                     P, P, P, P, ctypes.c_long, ctypes.c_long]
    so.decode_step_paged.restype = None
    so.amx_enable.argtypes, so.amx_enable.restype = [], ctypes.c_int
    so.prompt_qkv.argtypes = [ctypes.POINTER(Layer), ctypes.POINTER(Buffers), ctypes.POINTER(Shape), P, P, P, P,
                              ctypes.c_long, ctypes.c_long]
    so.prompt_mlp.argtypes = [ctypes.POINTER(Layer), ctypes.POINTER(Buffers), ctypes.POINTER(Shape)]
    so.prompt_logits.argtypes = [P, P, ctypes.POINTER(Buffers), ctypes.POINTER(Shape), P, ctypes.c_int]
    so.rows_attend.argtypes = [ctypes.POINTER(Layer), ctypes.POINTER(Buffers), ctypes.POINTER(Shape), P, P,
                               ctypes.c_long, ctypes.c_long]
    so.chunks_attend.argtypes = [ctypes.POINTER(Layer), ctypes.POINTER(Buffers), ctypes.POINTER(Shape), P, P,
                                 ctypes.c_long, ctypes.c_long, P, P, ctypes.c_int, ctypes.c_int]
    so.argmax_rows.argtypes = [P, ctypes.c_long, P, ctypes.c_int, P]
    so.quant_isa.argtypes, so.quant_isa.restype = [ctypes.c_int], ctypes.c_int
    so.float_isa.argtypes, so.float_isa.restype = [ctypes.c_int], ctypes.c_int
    so.float_linear.argtypes = [P, ctypes.c_int, ctypes.c_int, ctypes.c_int, P, P, P, ctypes.c_int, ctypes.c_long,
                                ctypes.c_long, ctypes.c_int]
    so.float_linear.restype = None
    so.quant_linear.argtypes = [ctypes.POINTER(QWeight), ctypes.c_int, P, P, P, P, ctypes.c_int, ctypes.c_long,
                                ctypes.c_long]
    so.quant_linear.restype = None
    for f in (so.prompt_qkv, so.prompt_mlp, so.prompt_logits, so.rows_attend, so.chunks_attend, so.argmax_rows):
        f.restype = None
    return so


class FastDecoder:
    def __init__(self, model: Transformer, lib: ctypes.CDLL, tiles: bool = True, path: str = "auto",
                 kv: str = "auto"):
        self.lib, self.model, self.cfg = lib, model, model.config
        m = model.model
        # quantized weights (all projections and the output layer, create checks) are read through
        # QWeight structs, kept here; the int8 path is the best this CPU has under `path`
        self.quant = bool(quantized_layers(model))
        self.isa = lib.quant_isa(ISA_CEILING.get(path, len(ISAS)))
        self.fisa = lib.float_isa(FLOAT_CEILING.get(path, len(FLOAT_ISAS)))
        self.qweights: list[QWeight] = []
        self.rows16 = self._interleaved() if self.quant and ISAS[self.isa] in ("vnni", "avx2") else {}
        # norms and biases are tiny: fp32 copies, kept here; big weights are used in place (but for the
        # packed copies of the AVX-512 paths: _pack)
        self.keep: list[torch.Tensor] = []
        self.arrays: list[ctypes.Array] = []  # pointer arrays the layers point into (experts)
        self.cos, self.sin = model.rope_cos.contiguous(), model.rope_sin.contiguous()
        # Gemma 3's sliding layers rotate with tables of their own base, shared by those layers
        self.local = (model.rope_local_cos.contiguous(), model.rope_local_sin.contiguous()) \
            if self.cfg.rope_local_base_freq is not None else None
        self.layers = (Layer * len(m.layers))()
        for index, (layer, block) in enumerate(zip(self.layers, m.layers)):
            layer.index = index
            a, f = block.self_attn, getattr(block, "mlp", None)
            for name, w in (("q", a.q_proj), ("k", a.k_proj), ("v", a.v_proj), ("o", a.o_proj)) + \
                    ((("gate", f.gate_proj), ("up", f.up_proj), ("down", f.down_proj)) if f else ()):
                setattr(layer, name, self._pointer(w))
            self._variations(layer, block, index)
            if f is None:
                self._experts(layer, block.block_sparse_moe)
        self.norm = norm_weight(m.norm)
        self.embed = m.embed_tokens.weight
        # Gemma scales embeddings by sqrt(hidden), the factor rounded to the weights' dtype first
        self.embed_scale = torch.tensor(self.cfg.hidden_size ** 0.5, dtype=self.embed.dtype).item() \
            if self.cfg.gemma else None
        self.head = self._pointer(model.lm_head)
        self.amx = tiles and not self.quant and self._tiles_fit() and bool(lib.amx_enable())
        # off the tiles on AVX-512 the layers and the output layer read packed copies (pack_float)
        self.packed = not self.amx and not self.quant and self.fisa >= FLOAT_ISAS.index("avx512")
        if self.packed:
            self._pack()
        # the tile path and the packed AVX-512 paths over bf16 weights keep keys and values in bf16 (half
        # the bytes each step's attention reads; scored 16 keys at a time, widened exactly); else fp32,
        # unless `kv` asks for bf16 (the engine's kv_dtype: every path reads either)
        bf16_kv = self.amx or (self.packed and self.embed.dtype == torch.bfloat16) or kv == "bfloat16"
        self.kv_dtype = torch.bfloat16 if bf16_kv else torch.float32
        self.buffers: dict = {}
        self._views: dict = {}  # _buffers' views for decode steps, by batch size (at most max_batch of them)
        self._pointed: weakref.ref | None = None  # the cache whose pools the layers point at
        # threads that may share chunks_attend, each with its own 16 rows of scores (the C side
        # caps its team at this)
        self.slots = max(torch.get_num_threads(), os.cpu_count() or 1)
        # decode rows' attention in three phases shared by all the threads (kernels.c's attend_for): -1 where
        # rows x kv heads leave threads idle and a row sees 512 positions or more, 1 always, 0 never; the
        # same bits either way
        self.split_attn = -1

    def _fp32(self, t: torch.Tensor | None) -> int | None:
        """The address of an fp32 copy of a small tensor, kept alive here (None for None)."""
        if t is None:
            return None
        self.keep.append(t.detach().float().contiguous())
        return self.keep[-1].data_ptr()

    def _variations(self, layer: Layer, block: torch.nn.Module, index: int) -> None:
        """The family's terms of one layer (kernels.c's Layer after `index`): norms, biases,
        q/k norms, Gemma's sublayer output norms, the sliding window and its rotary tables."""
        a, cfg = block.self_attn, self.cfg
        if cfg.gemma:  # HF's names: post_attention_layernorm normalizes the attention's output
            ln2, layer.post_attn = block.pre_feedforward_layernorm, self._fp32(norm_weight(block.post_attention_layernorm))
            layer.post_ff = self._fp32(norm_weight(block.post_feedforward_layernorm))
        else:
            ln2 = block.post_attention_layernorm
        layer.ln1, layer.ln2 = self._fp32(norm_weight(block.input_layernorm)), self._fp32(norm_weight(ln2))
        layer.bq, layer.bk, layer.bv, layer.bo = (self._fp32(getattr(p, "bias", None)) for p in
                                                  (a.q_proj, a.k_proj, a.v_proj, a.o_proj))
        if cfg.qk_norm:
            layer.q_norm, layer.k_norm = self._fp32(norm_weight(a.q_norm)), self._fp32(norm_weight(a.k_norm))
        layer.window = cfg.window(index) or 0
        if layer.window and self.local:
            layer.cos, layer.sin = (table.data_ptr() for table in self.local)

    def _experts(self, layer: Layer, moe: torch.nn.Module) -> None:
        """A sparse layer's router and experts (kernels.c's moe_for; model/transformer.py's SparseMoE)."""
        cfg = self.cfg
        layer.router, layer.n_experts, layer.top_k = moe.gate.weight.data_ptr(), cfg.num_local_experts, moe.top_k
        layer.expert_inter, layer.renorm = cfg.moe_intermediate_size or cfg.intermediate_size, int(moe.renormalize)
        pointers = (P * (3 * cfg.num_local_experts))(*(w.weight.data_ptr() for e in moe.experts for w in (e.w1, e.w3, e.w2)))
        self.arrays.append(pointers)
        layer.experts = ctypes.addressof(pointers)
        if hasattr(moe, "shared_expert"):
            s = moe.shared_expert
            shared = (P * 3)(*(w.weight.data_ptr() for w in (s.gate_proj, s.up_proj, s.down_proj)))
            self.arrays.append(shared)
            layer.shared, layer.shared_router = ctypes.addressof(shared), moe.shared_expert_gate.weight.data_ptr()
            layer.shared_inter = cfg.shared_expert_intermediate_size

    def _interleaved(self) -> dict[int, torch.Tensor]:
        """Each quantized layer's weights in the layout of the VNNI and AVX2 paths (quant.interleave16), by id of the
        layer, all in one huge-page area (engine/hugepages.py); {} if some layer's rows are not whole
        groups of 16 (that path then reads the file's layout). A second copy of the weights: the
        model keeps its own for the reference forward and the other paths."""
        layers = list(quantized_layers(self.model).values())
        if any(layer.out_features % ROWS16 for layer in layers):
            return {}
        packed = [interleave16(layer) for layer in layers]
        sizes = [-(-t.numel() // 64) * 64 for t in packed]  # every matrix on a cache line
        area, at, out = huge_empty(sum(sizes)), 0, {}
        for layer, t, size in zip(layers, packed, sizes):
            out[id(layer)] = area[at:at + t.numel()]
            out[id(layer)].copy_(t.reshape(-1))
            at += size
        return out

    def _pack(self) -> None:
        """Point the layers and the output layer at packed copies of their weights (pack_float), all in
        one huge-page area: the float weights' bytes a second time (the model keeps its own for the
        reference forward and the experts of a mixture, read as they are)."""
        m = self.model.model
        names = ("q", "k", "v", "o", "gate", "up", "down")
        weights = [(layer, name, getattr(getattr(block, part), f"{name}_proj").weight)
                   for layer, block in zip(self.layers, m.layers)
                   for part, group in (("self_attn", names[:4]), ("mlp", names[4:])) if hasattr(block, part)
                   for name in group]
        weights.append((self, "head", self.model.lm_head.weight))
        sizes = [-(-packed_numel(w) // 32) * 32 for *_, w in weights]  # every matrix on a cache line
        dtype = self.embed.dtype
        self.packed_area = huge_empty(sum(sizes) * dtype.itemsize).view(dtype)
        at = 0
        for (owner, name, w), size in zip(weights, sizes):
            setattr(owner, name, pack_float(w, self.packed_area[at:at + packed_numel(w)]).data_ptr())
            at += size

    def _pointer(self, linear: torch.nn.Module) -> int:
        """What the C side takes for a layer's weights: the float matrix, or a QWeight."""
        if not isinstance(linear, QuantLinear):
            return linear.weight.data_ptr()
        self.qweights.append(QWeight.of(linear, self.rows16.get(id(linear))))
        return ctypes.addressof(self.qweights[-1])

    @property
    def path(self) -> str:
        """The CPU path the projections run on, as the startup line shows it."""
        if self.quant:
            return f"{ISAS[self.isa]} int8 ({'/'.join(sorted({l.fmt for l in quantized_layers(self.model).values()}))})"
        if self.amx:
            return "amx"
        name = FLOAT_ISAS[self.fisa]
        return "avx512" if name == "avx512-bf16" and self.embed.dtype != torch.bfloat16 else name

    @property
    def all_rows(self) -> bool:
        """Whether prompt chunks too should run here (step_rows): on AMX tiles, with bf16 weights
        off them (register-blocked products, on a par with oneDNN's AVX512-BF16 GEMM and far
        ahead of PyTorch's bf16 on AVX2) and with quantized weights (which PyTorch would dequantize
        every step); a row's numbers do not depend on where its prompt is cut on any of them.
        Prompts of fp32 weights stay on PyTorch: MKL's fp32 GEMM ran 2.2-2.8x these products on
        512-row chunks (benchmarks/RESULTS.md, "Float weights without AMX")."""
        return self.amx or self.quant or self.embed.dtype == torch.bfloat16

    def _tiles_fit(self) -> bool:
        """Whether the projections can run on AMX tiles: bf16 weights, every input size a
        multiple of 32 and every output size a multiple of 16 (see kernels.c)."""
        c = self.cfg
        q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        return self.embed.dtype == torch.bfloat16 and \
            all(n % 32 == 0 for n in (c.hidden_size, q, *self._mlp_widths())) and \
            all(n % 16 == 0 for n in (q, kv, c.hidden_size, *self._mlp_widths(), c.vocab_size))

    def _mlp_widths(self) -> list[int]:
        """The widths of the model's MLPs: dense, experts', shared expert's."""
        c = self.cfg
        widths = [c.intermediate_size]
        if c.is_moe:
            widths += [c.moe_intermediate_size or c.intermediate_size] + \
                      [c.shared_expert_intermediate_size] * bool(c.shared_expert_intermediate_size)
        return widths

    @staticmethod
    def unsupported(model: Transformer) -> str | None:
        """What of this model the C kernels do not compute (None: nothing); the engine then runs
        it on the model's PyTorch forward and says so. They compute every dense family of
        model/transformer.py: biases, q/k norms, Gemma 3's norms, GeGLU, scales, soft-capping,
        sliding windows and RoPE scaling (folded into the rotary tables they read)."""
        cfg = model.config
        lacking = [what for what, present in (
            ("more than 64 experts a token", cfg.is_moe and cfg.num_experts_per_tok > 64),) if present]
        return ", ".join(lacking) or None

    @classmethod
    def create(cls, model: Transformer, tiles: bool = True, path: str = "auto",
               kv: str = "auto") -> "FastDecoder | None":
        """A fast decoder if this model and machine allow one: a model of any family
        (`unsupported` names what the kernels lack), bf16 or fp32 weights on the CPU (or q8 / q4 ones: every
        projection and the output layer), and a working C compiler; on AMX tiles where they fit,
        unless `tiles` is False. `path` (the engine's `kernels` setting, engine/config.py) caps the
        int8 path of quantized weights: avx2, scalar. `kv` (the engine's kv_dtype): "bfloat16" keeps
        keys and values in bf16 on every path, "auto" where the path does (kv_dtype). Moves the model's
        float weights into huge pages (engine/hugepages.py) the first time."""
        cfg, w = model.config, model.model.embed_tokens.weight
        if cls.unsupported(model) or w.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16):
            return None
        quantized = quantized_layers(model)
        if quantized and len(quantized) != 7 * cfg.num_hidden_layers + 1:
            return None  # some layers float, some not: the C step takes one kind
        if any(not p.is_contiguous() or p.dtype != w.dtype for p in model.parameters() if p.dim() == 2):
            return None
        lib = kernels()
        if lib is None:
            return None
        move_to_huge_pages(model)  # weights in 2 MiB pages, once: see engine/hugepages.py
        return cls(model, lib, tiles, path, kv)

    def _buffers(self, kind: str, rows: int, span: int = 0, logit_rows: int | None = None) -> tuple[dict, Buffers]:
        """Scratch tensors (views of `rows` rows, and of `logit_rows` rows of logits) and their
        pointers for the C side. One set per kind of call ("step", "prompt"), grown when a
        call needs more and otherwise reused, so that steps do not allocate."""
        c = self.cfg
        logit_rows = rows if logit_rows is None else logit_rows
        have = self.buffers.get(kind)
        if have is None or have[0] < rows or have[1] < span or have[2] < logit_rows:
            R, S, L = (max(rows, have[0] if have else 0), max(span, have[1] if have else 0),
                       max(logit_rows, have[2] if have else 0))
            qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
            inter = max(self._mlp_widths())
            widest = max(c.hidden_size, inter, c.num_attention_heads * c.head_dim)
            experts = max(c.num_local_experts, 1)
            tensors = dict(
                x=torch.empty(R, c.hidden_size), h=torch.empty(R, c.hidden_size), qkv=torch.empty(R, qkv),
                att=torch.empty(R, c.num_attention_heads * c.head_dim), gu=torch.empty(R, 2 * inter),
                act=torch.empty(R, inter),
                scores=torch.empty(max(R * c.num_attention_heads, 16 * self.slots) * S),
                logits=torch.empty(L, c.vocab_size),
                **{name: torch.empty(widest // 2 * -(-R // 16) * 16, dtype=torch.int32) for name in ("xp", "xp_act")},
                xq=torch.empty(R * widest, dtype=torch.int8), xs=torch.empty(R * 3 * widest // 32),
                route=torch.empty(R, experts), moe_x=torch.empty(R, c.hidden_size), moe_y=torch.empty(R, c.hidden_size),
                moe_rows=torch.empty(experts + 1 + R * c.num_experts_per_tok, dtype=torch.int64))
            self.buffers[kind] = (R, S, L, tensors, Buffers(**{n: t.data_ptr() for n, t in tensors.items()}))
            self._views.clear()
        *_, tensors, pointers = self.buffers[kind]
        views = self._views.get(rows) if kind == "step" else None
        if views is None:
            views = {n: t[:logit_rows] if n == "logits" else t[:rows] if t.dim() == 2 else t for n, t in tensors.items()}
            if kind == "step":  # a decode step's, kept by batch size (its Python is a part of a batch-1 step's time)
                self._views[rows] = views
        return views, pointers

    def _shape(self, B: int, max_len: int = 0) -> Shape:
        """What the C side needs to know of the model, for a call over B rows (scratch of
        max_len scores a row and head)."""
        c = self.cfg
        return Shape(B=B, H=c.hidden_size, nh=c.num_attention_heads, nkv=c.num_key_value_heads, hd=c.head_dim,
                     n_layers=c.num_hidden_layers, w_bf16=int(self.embed.dtype == torch.bfloat16), amx=int(self.amx),
                     kv_bf16=int(self.kv_dtype == torch.bfloat16), inter=c.intermediate_size, vocab=c.vocab_size,
                     max_len=max_len,
                     eps=c.rms_norm_eps, quant=int(self.quant), isa=self.isa, fisa=self.fisa, packed=int(self.packed),
                     scale=c.attention_scale if c.query_pre_attn_scalar else 0.0,
                     attn_cap=c.attn_logit_softcapping or 0.0, gelu=int(c.hidden_act != "silu"),
                     split_attn=self.split_attn)

    def _embed(self, x: torch.Tensor, ids: list[int]) -> None:
        """x = the embeddings of ids (Gemma's scaled)."""
        x.copy_(self.embed[torch.tensor(ids)])
        if self.embed_scale is not None:
            x.mul_(self.embed_scale)

    def _capped(self, logits: torch.Tensor) -> torch.Tensor:
        """The final logits soft-capped in place where the model does (Gemma 3): cap tanh(logits / cap)."""
        cap = self.cfg.final_logit_softcapping
        return logits.div_(cap).tanh_().mul_(cap) if cap else logits

    def _point_at(self, cache: PagedKVCache) -> None:
        """Give every layer its page pools of the cache (a cache's pools stay where they are: done again
        only for another cache)."""
        if self._pointed is not None and self._pointed() is cache:
            return
        self._pointed = weakref.ref(cache)
        for layer, k, v in zip(self.layers, cache.k, cache.v):
            layer.K, layer.V = k.data_ptr(), v.data_ptr()

    @staticmethod
    def _span(pages: int, page_size: int) -> int:
        """Score scratch for rows of up to `pages` pages, rounded up so that growing sequences
        do not reallocate it every step."""
        return -(-pages * page_size // 256) * 256

    def _rows_lora(self, lora: torch.Tensor | None, buffers: Buffers, rows: int) -> None:
        """Tell kernels.c where it reads each row's adapter from (Buffers.lora, None without
        adapters), and its plan. On AMX tiles: the segments, the rows of each block of 16 that
        share an adapter, with scratch for their u (Buffers.lora_blocks, lora_segs, lora_u); else
        the rows with one, in units of up to 16 rows of one adapter (Buffers.lora_plan)."""
        buffers.lora = buffers.lora_plan = buffers.lora_blocks = buffers.lora_segs = buffers.lora_u = None
        if lora is None:
            return
        assert lora.dtype == torch.int64 and lora.shape == (rows,) and lora.is_contiguous(), "one adapter a row"
        addresses = lora.tolist()
        if self.amx:
            blocks, segments = [0], []
            for b0 in range(0, rows, 16):
                masks: dict[int, int] = {}
                for n, address in enumerate(addresses[b0:b0 + 16]):
                    if address:
                        masks[address] = masks.get(address, 0) | 1 << n
                segments += [(address, b0 // 16, mask) for address, mask in masks.items()]
                blocks.append(len(segments))
            keep = (torch.tensor(blocks, dtype=torch.int64), torch.tensor(segments or [(0, 0, 0)], dtype=torch.int64),
                    torch.empty(max(len(segments), 1) * 3 * (MAX_RANK // 32) * 256, dtype=torch.int32))
            buffers.lora_blocks, buffers.lora_segs, buffers.lora_u = (t.data_ptr() for t in keep)
        else:
            groups: dict[int, list[int]] = {}
            for row, address in enumerate(addresses):
                if address:
                    groups.setdefault(address, []).append(row)
            units = [mine[i:i + 16] for mine in groups.values() for i in range(0, len(mine), 16)]
            plan = torch.zeros(1 + 17 * len(units), dtype=torch.int64)
            plan[0] = len(units)
            for i, unit in enumerate(units):
                plan[1 + 17 * i] = len(unit)
                plan[2 + 17 * i:2 + 17 * i + len(unit)] = torch.tensor(unit)
            keep = (plan,)
            buffers.lora_plan = plan.data_ptr()
        self._plan = keep  # alive until the next call
        buffers.lora = lora.data_ptr()

    def argmax(self, logits: torch.Tensor, rows: list[int]) -> list[int]:
        """`logits[rows].argmax(-1).tolist()` for fp32 logits (a step's buffer) in one C call, both
        threads sharing the rows (torch's argmax takes ~1.7 ms for 32 rows of SmolLM2's vocabulary)."""
        assert logits.dtype == torch.float32 and logits.dim() == 2 and logits.is_contiguous()
        index = torch.tensor(rows, dtype=torch.long)
        assert all(0 <= r < logits.shape[0] for r in rows), "a row outside the logits"
        out = torch.empty(len(rows), dtype=torch.long)
        self.lib.argmax_rows(logits.data_ptr(), logits.shape[1], index.data_ptr(), len(rows), out.data_ptr())
        return out.tolist()

    @torch.inference_mode()
    def step_paged(self, batch: PagedBatch, lora: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, vocab) for a batch of one-token feeds over a paged cache of kv_dtype;
        the keys and values go to the rows' pages. `lora`: each row's adapter
        (engine/adapters.py's row_pointers), or None. The returned tensor is a reused buffer."""
        cache = batch.cache
        assert cache.k[0].dtype == self.kv_dtype and not batch.prefill, f"{self.kv_dtype} pages, one token a row"
        B = len(batch.decode)
        table = batch.decode_table.contiguous()
        span = self._span(table.shape[1], cache.page_size)
        tensors, buffers = self._buffers("step", B, span)
        positions = batch.positions[0].contiguous()
        self._embed(tensors["x"], batch.ids)
        self._point_at(cache)
        shape = self._shape(B, span)
        self._rows_lora(lora, buffers, B)
        self.lib.decode_step_paged(self.layers, self.norm.data_ptr(), self.head,
                                   ctypes.byref(buffers), ctypes.byref(shape), positions.data_ptr(),
                                   self.cos.data_ptr(), self.sin.data_ptr(), table.data_ptr(),
                                   table.shape[1], cache.page_size)
        return self._capped(tensors["logits"])

    @torch.inference_mode()
    def step_rows(self, batch: PagedBatch, lora: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (one row per feed, in feed order) of a batch of prompt chunks over the paged
        cache, with one-token feeds riding along (they must come first). Layer by layer:
        norms, projections and MLP of every row run in C (on AMX tiles where the step does),
        so a decode row adds little to a chunk; attention too: a one-token row's alone, a
        chunk's rows in blocks that share each key (16 / group rows of one kv head; PyTorch's
        flash attention took three times as long for a 130-token chunk, mostly in dispatch
        and the gather of pages). `lora`: each packed row's adapter, or None. The returned
        tensor is a reused buffer."""
        cache = batch.cache
        D = len(batch.decode)
        assert cache.k[0].dtype == self.kv_dtype and batch.prefill, f"{self.kv_dtype} pages and a prompt chunk"
        assert batch.decode == list(range(D)), "one-token feeds come before the prompt chunks"
        N, n_out = len(batch.ids), len(batch.outputs)
        ps = cache.page_size
        decode_table = batch.decode_table.contiguous() if D else None
        widths = [len(pages) for *_, pages in batch.prefill] + ([decode_table.shape[1]] if D else [])
        span = self._span(max(widths), ps)  # scores of any row's positions
        tensors, buffers = self._buffers("rows", N, span, n_out)
        self._embed(tensors["x"], batch.ids)
        positions = batch.positions[0].contiguous()
        table = torch.zeros(N, max(widths), dtype=torch.long)  # every row gets its sequence's pages
        if D:
            table[:D, :decode_table.shape[1]] = decode_table
        for at, T, _, pages in batch.prefill:
            table[at:at + T, :len(pages)] = pages
        chunks = torch.tensor([[at, T] for at, T, *_ in batch.prefill], dtype=torch.long).t().contiguous()
        shape, attend_shape = self._shape(N), self._shape(D, span)
        self._point_at(cache)
        self._rows_lora(lora, buffers, N)
        for layer in self.layers:
            self.lib.prompt_qkv(ctypes.byref(layer), ctypes.byref(buffers), ctypes.byref(shape), positions.data_ptr(),
                                self.cos.data_ptr(), self.sin.data_ptr(), table.data_ptr(), table.shape[1], ps)
            if D:
                self.lib.rows_attend(ctypes.byref(layer), ctypes.byref(buffers), ctypes.byref(attend_shape),
                                     positions.data_ptr(), decode_table.data_ptr(), decode_table.shape[1], ps)
            self.lib.chunks_attend(ctypes.byref(layer), ctypes.byref(buffers), ctypes.byref(attend_shape),
                                   positions.data_ptr(), table.data_ptr(), table.shape[1], ps, chunks[0].data_ptr(),
                                   chunks[1].data_ptr(), chunks.shape[1], self.slots)
            self.lib.prompt_mlp(ctypes.byref(layer), ctypes.byref(buffers), ctypes.byref(shape))
        rows = batch.outputs.contiguous()
        self.lib.prompt_logits(self.norm.data_ptr(), self.head, ctypes.byref(buffers),
                               ctypes.byref(shape), rows.data_ptr(), n_out)
        return self._capped(tensors["logits"])
