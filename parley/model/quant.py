"""Quantized weights that stay quantized: Parley's q8 and q4 formats, and GGUF files read into them.

    from parley.model.quant import quantize_model
    quantize_model(model, "q4")                  # every linear layer to q4, in place (an HF import)
    weights.keep_gguf_blocks(model, path)        # a GGUF's quantized tensors kept as q8 / q4 (GGUF_KEPT)
    QuantLinear.quantize(w, "q8").dequantize()   # the float weights the kernels compute with

Both formats cut each weight row into blocks of 32 inputs and keep, per block, 16-bit
(IEEE half) scales beside small integers, as llama.cpp's Q8_0 and Q4_1 do:

- **q8**: `q` int8 [out, in], `d` [out, in/32]: weight = d * q (q in -127..127). 8.5 bits a weight.
- **q4**: `q` uint8 [out, in/2], `d` and `m` [out, in/32]: weight = d * q + m (q in 0..15), i.e. a
  scale and a minimum a block. Block k of a row is the 16 bytes q[16k : 16k + 16]: byte j holds
  input 32k + j in its low nibble and input 32k + 16 + j in its high one (GGUF's order). 5 bits a weight.

Scales are kept as the raw bits of their half floats in int16 tensors, so that `model.to(bf16)`
(which casts every floating tensor) leaves them alone. The C kernels (engine/kernels.c) read these
tensors as they are, with activations rounded to int8 per block of 32 (`quantize_activations`
shows how); `QuantLinear.forward` is the PyTorch reference, which dequantizes the weights (slow, exact).

GGUF tensor types (`from_gguf_blocks`; GGUF_KEPT lists them), none through floats unless said:
- Q8_0 -> q8 and Q4_1 -> q4 byte for byte; Q4_0 (d * (q - 8)) -> q4 with m = -8 d; Q5_0
  (d * (q - 16), q in 0..31) -> q8 with the same d and q - 16: all exact.
- Q4_K (super-blocks of 256: half d and dmin, 6-bit scale sc and min mn per 32, 4-bit q; weight =
  d sc q - dmin mn) -> q4 per 32: the file's integers exactly (repacked to q4's nibble order),
  scale = d sc and minimum = -dmin mn rounded to the nearest half (their products are exact in
  fp32). A weight then moves by at most 2^-11 (15 |d sc| + |dmin mn|): under 0.8% of its step.
- Q6_K (16-value sub-blocks, int8 scales, 6-bit q) has no exact q8 / q4 form: its exact values are
  rounded to q8 (as Q5_1 and Q5_K are), the scale a block rounded up to a half so no integer
  clips: each weight within half a q8 step, which is at most 32 / 254 (1 + 2^-10) < 0.127 of the
  larger Q6_K step d |sc| of the block's two sub-blocks. (A Q6_K kernel was not worth its code:
  Gemma 3 270M's Q6_K tensors are 9.7 MB of the ~275 MB a step reads; as q8 12.4 MB.)
Any other type is refused (QuantError); weights.keep_gguf_blocks then names the tensor.
"""

from __future__ import annotations

import gguf
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from parley.model.transformer import Transformer

BLOCK = 32
FORMATS = ("q8", "q4")
GGML = gguf.GGMLQuantizationType
# GGUF tensor types kept quantized (module docstring: how each maps) -> their Parley format
GGUF_KEPT = {GGML.Q8_0: "q8", GGML.Q4_0: "q4", GGML.Q4_1: "q4", GGML.Q5_0: "q8", GGML.Q4_K: "q4",
             GGML.Q6_K: "q8", GGML.Q5_1: "q8", GGML.Q5_K: "q8"}


class QuantError(ValueError):
    """Weights that cannot be quantized or kept quantized as asked."""


def _half_bits(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).view(torch.int16)


def _half(bits: torch.Tensor) -> torch.Tensor:
    return bits.view(torch.float16).float()


def _fitting_half_bits(x: torch.Tensor, what: str) -> torch.Tensor:
    """The bits of the nearest half floats to `x`; QuantError naming `what` if one overflows."""
    bits = _half_bits(x)
    if torch.isinf(_half(bits)).any():
        raise QuantError(f"{what} ({x.abs().max().item():.3g}) does not fit a half float")
    return bits


def _half_bits_up(x: torch.Tensor) -> torch.Tensor:
    """The bits of the smallest half float >= x (x >= 0): a scale that no integer of its block
    needs clipping for."""
    bits = _fitting_half_bits(x, "a block's scale")
    return torch.where(_half(bits) < x, bits + 1, bits)  # positive halves order as their bits


class QuantLinear(nn.Module):
    """A bias-free linear layer over q8 or q4 weights (see the module docstring for the layout)."""

    def __init__(self, fmt: str, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None):
        super().__init__()
        if fmt not in FORMATS:
            raise QuantError(f"unknown quantized format {fmt!r} (choose one of {', '.join(FORMATS)})")
        self.fmt = fmt
        self.out_features, self.in_features = d.shape[0], d.shape[1] * BLOCK
        want = (self.out_features, self.in_features // (2 if fmt == "q4" else 1))
        if tuple(q.shape) != want or (fmt == "q4") != (m is not None):
            raise QuantError(f"{fmt} weights of shape {tuple(q.shape)} do not match scales {tuple(d.shape)}")
        self.register_buffer("q", q.contiguous())
        self.register_buffer("d", d.contiguous())
        if m is not None:
            self.register_buffer("m", m.contiguous())
        else:
            self.m = None

    @classmethod
    def empty(cls, fmt: str, out_features: int, in_features: int) -> "QuantLinear":
        """Storage to load a checkpoint into."""
        n = in_features // BLOCK
        if fmt == "q8":
            return cls(fmt, torch.empty(out_features, in_features, dtype=torch.int8),
                       torch.empty(out_features, n, dtype=torch.int16))
        return cls(fmt, torch.empty(out_features, in_features // 2, dtype=torch.uint8),
                   torch.empty(out_features, n, dtype=torch.int16), torch.empty(out_features, n, dtype=torch.int16))

    @classmethod
    def quantize(cls, w: torch.Tensor, fmt: str) -> "QuantLinear":
        """Round float weights [out, in] (in a multiple of 32) to `fmt`: per block, q8 scales by the
        largest magnitude / 127 (rounded up to a half: within half a step of every weight); q4
        spans the block's minimum to maximum in 15 steps."""
        if w.dim() != 2 or w.shape[1] % BLOCK:
            raise QuantError(f"cannot quantize a weight of shape {tuple(w.shape)}: the input size must be "
                             f"a multiple of {BLOCK}")
        blocks = w.detach().float().reshape(w.shape[0], -1, BLOCK)
        if fmt == "q8":
            d = _half_bits_up(blocks.abs().amax(-1) / 127)
            scale = _half(d)[..., None]
            q = torch.where(scale > 0, blocks / scale, 0).round().clamp(-127, 127).to(torch.int8)
            return cls(fmt, q.reshape(w.shape), d)
        if fmt != "q4":
            raise QuantError(f"unknown quantized format {fmt!r} (choose one of {', '.join(FORMATS)})")
        lo, hi = blocks.amin(-1), blocks.amax(-1)
        d, m = _half_bits((hi - lo) / 15), _half_bits(lo)
        scale, low = _half(d)[..., None], _half(m)[..., None]
        q = torch.where(scale > 0, (blocks - low) / scale, 0).round().clamp(0, 15).to(torch.uint8)
        packed = q[..., :16] | (q[..., 16:] << 4)  # GGUF's nibble order
        return cls(fmt, packed.reshape(w.shape[0], -1), d, m)

    def integers(self) -> torch.Tensor:
        """The integer weights [out, in] (q8: -127..127; q4: 0..15)."""
        if self.fmt == "q8":
            return self.q
        blocks = self.q.reshape(self.out_features, -1, 16)
        return torch.cat([blocks & 15, blocks >> 4], dim=-1).reshape(self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weights [out, in] as floats: exact in fp32 (a half times a small integer, plus a half)."""
        w = self.integers().float().reshape(self.out_features, -1, BLOCK) * _half(self.d)[..., None]
        if self.m is not None:
            w = w + _half(self.m)[..., None]
        return w.reshape(self.out_features, self.in_features).to(dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of weights a matrix-vector product reads."""
        return sum(t.numel() * t.element_size() for t in (self.q, self.d, self.m) if t is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.fmt}, in_features={self.in_features}, out_features={self.out_features}"


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the kernels do to a projection's input x [rows, in] (fp32) before the int8 products:
    per block of 32, scale = max |x| / 127 and xq = round(x / scale) (half to even); also
    scale * sum(xq) per block, which q4's minimum multiplies. Returns (xq int8, scale, sums)."""
    blocks = x.float().reshape(*x.shape[:-1], -1, BLOCK)
    amax = blocks.abs().amax(-1)
    inverse = torch.where(amax > 0, 127 / amax, 0)
    xq = (blocks * inverse[..., None]).round().to(torch.int8)
    scale = amax / 127
    return xq.reshape(x.shape), scale, scale * xq.float().sum(-1)


def reference_product(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """y = x W^T as the kernels compute it (activations rounded as `quantize_activations` does),
    in float64: the reference the kernels are tested against."""
    xq, scale, sums = quantize_activations(x)
    rows, n = x.shape[0], layer.in_features // BLOCK
    ints = layer.integers().double().reshape(layer.out_features, n, BLOCK)
    dots = torch.einsum("rnk,onk->ron", xq.double().reshape(rows, n, BLOCK), ints)  # [rows, out, blocks]
    y = (dots * _half(layer.d).double()[None] * scale.double()[:, None, :]).sum(-1)
    if layer.m is not None:
        y = y + (_half(layer.m).double()[None] * sums.double()[:, None, :]).sum(-1)
    return y


ROWS16 = 16  # rows a group of the interleaved layout holds
RECORD = {"q4": 320, "q8": 544}  # bytes of one block of a group: 16 rows' weights and scales


def interleave16(layer: QuantLinear) -> torch.Tensor:
    """The layer's weights in the layout of the kernels' VNNI and AVX2 paths (engine/kernels.c, "the
    16-row layout"): rows in groups of 16 (out_features must be a multiple), each group its
    blocks in order, each block one record of the 16 rows' integers, 4 inputs of each row after
    another, then their scales (q4: d, m; q8: d). q4 keeps two weights a byte (inputs j and 16 + j
    of the block); q8's weights are stored + 128, unsigned. uint8 [groups, blocks, RECORD]."""
    if layer.out_features % ROWS16:
        raise QuantError(f"{layer.out_features} rows do not interleave in groups of {ROWS16}")
    groups, n = layer.out_features // ROWS16, layer.in_features // BLOCK
    ints = layer.integers()
    if layer.fmt == "q4":  # [group, row, block, half, j, t] -> [group, block, j, row, t, half]
        w = ints.reshape(groups, ROWS16, n, 2, 4, 4).permute(0, 2, 4, 1, 5, 3)
        w = (w[..., 0] | w[..., 1] << 4).reshape(groups, n, 256)
    else:  # [group, row, block, j, t] -> [group, block, j, row, t], + 128
        w = (ints.to(torch.int16) + 128).to(torch.uint8).reshape(groups, ROWS16, n, 8, 4).permute(0, 2, 3, 1, 4)
        w = w.reshape(groups, n, 512)
    scales = [s.reshape(groups, ROWS16, n).permute(0, 2, 1).contiguous().view(torch.uint8)
              for s in (layer.d, layer.m) if s is not None]
    return torch.cat([w, *scales], dim=-1).contiguous()


# ---------------------------------------------------------------- whole models

def quantized_layers(model: Transformer) -> dict[str, QuantLinear]:
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, QuantLinear)}


def formats(model: Transformer) -> dict[str, str]:
    """{module name: format} of the model's quantized layers ({} for a float model): what a
    checkpoint's config.json records so that loading can rebuild them."""
    return {name: mod.fmt for name, mod in quantized_layers(model).items()}


def linear_names(model: Transformer) -> list[str]:
    """The dense model's projections and output layer (the embedding stays float: a step reads
    only its rows)."""
    if model.config.is_moe:
        raise QuantError("quantized mixture-of-experts models are not supported yet: import without --quantize")
    if any(isinstance(mod, nn.Linear) and mod.bias is not None for mod in model.modules()):
        raise QuantError("quantized layers keep no biases, and this model's projections have them (Qwen2): "
                         "import without --quantize")
    return [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]


def swap_layer(model: Transformer, name: str, layer: QuantLinear) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, layer)


def quantize_model(model: Transformer, fmt: str) -> Transformer:
    """Every linear layer of `model` (projections and output layer) to `fmt`, in place."""
    for name in linear_names(model):
        swap_layer(model, name, QuantLinear.quantize(model.get_submodule(name).weight, fmt))
    return model


def dequantize_model(model: Transformer, dtype: torch.dtype = torch.float32) -> Transformer:
    """Every quantized layer back to an nn.Linear of its exact float values, in place (the
    reference a quantized model is compared with; an export)."""
    for name, layer in quantized_layers(model).items():
        linear = nn.Linear(layer.in_features, layer.out_features, bias=False, dtype=dtype)
        linear.weight.data = layer.dequantize(dtype)
        swap_layer(model, name, linear)
    return model


def prepare_for_loading(model: Transformer, layers: dict[str, str]) -> Transformer:
    """Swap the named linear layers of a blank model for empty quantized ones (loading a checkpoint)."""
    known = set(linear_names(model))
    for name, fmt in layers.items():
        if name not in known:
            raise QuantError(f"the checkpoint lists a quantized layer {name!r} that the model does not have")
        linear = model.get_submodule(name)
        swap_layer(model, name, QuantLinear.empty(fmt, linear.out_features, linear.in_features))
    return model


def weight_bytes(model: Transformer) -> int:
    """Bytes of weights one decode step reads: every projection and the output layer (as stored),
    and one embedding row."""
    total = 0
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            total += mod.nbytes
        elif isinstance(mod, nn.Linear):
            total += mod.weight.numel() * mod.weight.element_size()
    embed = model.model.embed_tokens.weight
    return total + embed.shape[1] * embed.element_size()


# ---------------------------------------------------------------- GGUF

def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's / Q5_K's eight 6-bit scales and eight 6-bit minimums from their 12 bytes [..., 12]:
    bytes 0-3 hold scales 0-3 and bytes 4-7 minimums 0-3 in their low 6 bits, their top 2 bits
    the high bits of scales / minimums 4-7, whose low 4 bits are bytes 8-11's low / high nibbles."""
    a, b, c = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = np.concatenate([a & 63, (c & 15) | (a >> 6) << 4], axis=-1)
    minimums = np.concatenate([b & 63, (c >> 4) | (b >> 6) << 4], axis=-1)
    return scales, minimums


def _q4_from_q4_k(blocks: np.ndarray) -> QuantLinear:
    """Q4_K super-blocks [rows, n, 144] (d, dmin, 12 bytes of scales, 128 of 4-bit integers, whose
    32-byte group j holds sub-block 2j in its low nibbles and 2j + 1 in its high ones) as q4."""
    rows, n = blocks.shape[:2]
    d, dmin = (blocks[..., at:at + 2].copy().view(np.float16).astype(np.float32) for at in (0, 2))
    scales, minimums = _k_scales(blocks[..., 4:16])
    groups = blocks[..., 16:].reshape(rows, n, 4, 1, 32)
    ints = np.concatenate([groups & 15, groups >> 4], axis=3).reshape(rows, n * 8, 32)
    packed = ints[..., :16] | ints[..., 16:] << 4  # q4's nibble order
    # d sc and dmin mn are exact in fp32 (11 bits x 6 bits), then rounded to the nearest half
    scale = _fitting_half_bits(torch.from_numpy((d * scales).reshape(rows, -1)), "a Q4_K block's scale")
    minimum = _fitting_half_bits(torch.from_numpy((-dmin * minimums).reshape(rows, -1)), "a Q4_K block's minimum")
    return QuantLinear("q4", torch.from_numpy(packed.reshape(rows, -1)), scale, minimum)


def _q8_from_q5_0(blocks: np.ndarray) -> QuantLinear:
    """Q5_0 blocks [rows, n, 22] (half d, 32 high bits, 16 bytes of low nibbles in GGUF's order)
    as q8: weight = d (q - 16), and q - 16 is an int8."""
    rows = blocks.shape[0]
    high = np.unpackbits(blocks[..., 2:6], axis=-1, bitorder="little")  # bit i: input i's fifth bit
    low = np.concatenate([blocks[..., 6:22] & 15, blocks[..., 6:22] >> 4], axis=-1)
    q = (low | high << 4).astype(np.int8) - 16
    d = blocks[..., 0:2].copy().view(np.int16)[..., 0]
    return QuantLinear("q8", torch.from_numpy(q.reshape(rows, -1)), torch.from_numpy(d))


def from_gguf_blocks(data: np.ndarray, kind: gguf.GGMLQuantizationType) -> QuantLinear:
    """A QuantLinear over a GGUF tensor's raw blocks (rows x bytes, as gguf's reader gives them);
    how each type maps is in the module docstring."""
    if kind not in GGUF_KEPT:
        raise QuantError(f"GGUF {kind.name} tensors are not kept quantized (kept: "
                         f"{', '.join(k.name for k in GGUF_KEPT)})")
    _, size = gguf.GGML_QUANT_SIZES[kind]
    raw = np.array(data, dtype=np.uint8)  # a copy: the reader maps the file read-only
    if raw.ndim != 2 or raw.shape[1] % size:
        raise QuantError(f"a {kind.name} tensor of {raw.shape} bytes is not whole blocks of {size}")
    blocks = raw.reshape(raw.shape[0], -1, size)
    if kind == GGML.Q4_K:
        return _q4_from_q4_k(blocks)
    if kind == GGML.Q5_0:
        return _q8_from_q5_0(blocks)
    if kind not in (GGML.Q8_0, GGML.Q4_0, GGML.Q4_1):  # no exact form: the exact values rounded to q8
        return QuantLinear.quantize(torch.from_numpy(gguf.quants.dequantize(raw, kind)), "q8")
    blocks = torch.from_numpy(blocks)
    d = blocks[..., 0:2].contiguous().view(torch.int16)[..., 0]
    if kind == GGML.Q8_0:
        return QuantLinear("q8", blocks[..., 2:].contiguous().view(torch.int8).reshape(raw.shape[0], -1), d)
    if kind == GGML.Q4_1:
        m = blocks[..., 2:4].contiguous().view(torch.int16)[..., 0]
        return QuantLinear("q4", blocks[..., 4:].reshape(raw.shape[0], -1), d, m)
    scale = _half(d)  # Q4_0: d * (q - 8) = d * q + (-8 d); -8 d is exact in half unless it overflows
    if (scale.abs() * 8 > 65504).any():
        raise QuantError("a Q4_0 block scale is too large to keep as q4: import without keeping the file's blocks")
    return QuantLinear("q4", blocks[..., 2:].reshape(raw.shape[0], -1), d, _half_bits(-8 * scale))
