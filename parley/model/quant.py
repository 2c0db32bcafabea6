"""Quantized weights that stay quantized: Parley's q8 and q4 formats, and GGUF files read into them.

    from parley.model.quant import quantize_model
    quantize_model(model, "q4")                  # every linear layer to q4, in place (an HF import)
    weights.keep_gguf_blocks(model, path)        # a GGUF's Q8_0 / Q4_0 / Q4_1 tensors kept as they are
    QuantLinear.quantize(w, "q8").dequantize()   # the float weights the kernels compute with

Both formats cut each weight row into blocks of 32 inputs and keep, per block, 16-bit
(IEEE half) scales beside small integers, as llama.cpp's Q8_0 and Q4_1 do:

- **q8**: `q` int8 [out, in], `d` [out, in/32]: weight = d * q (q in -127..127). 8.5 bits a weight.
- **q4**: `q` uint8 [out, in/2], `d` and `m` [out, in/32]: weight = d * q + m (q in 0..15), i.e. a
  scale and a minimum a block. Block k of a row is the 16 bytes q[16k : 16k + 16]: byte j holds
  input 32k + j in its low nibble and input 32k + 16 + j in its high one (GGUF's order). 5 bits a weight.

Scales are kept as the raw bits of their half floats in int16 tensors, so that `model.to(bf16)`
(which casts every floating tensor) leaves them alone. GGUF Q8_0 maps to q8 and Q4_1 to q4 byte
for byte; Q4_0 (weight = d * (q - 8)) is q4 with m = -8 d, exact too. Nothing goes through floats.
The C kernels (engine/kernels.c) read these tensors as they are, with activations rounded to int8
per block of 32 (`quantize_activations` shows how); `QuantLinear.forward` is the PyTorch
reference, which dequantizes the weights (slow, exact).
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
# GGUF tensor types kept quantized: type -> (Parley format, bytes a block)
GGUF_KEPT = {gguf.GGMLQuantizationType.Q8_0: ("q8", 34), gguf.GGMLQuantizationType.Q4_0: ("q4", 18),
              gguf.GGMLQuantizationType.Q4_1: ("q4", 20)}


class QuantError(ValueError):
    """Weights that cannot be quantized or kept quantized as asked."""


def _half_bits(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).view(torch.int16)


def _half(bits: torch.Tensor) -> torch.Tensor:
    return bits.view(torch.float16).float()


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
        largest magnitude / 127; q4 spans the block's minimum to maximum in 15 steps."""
        if w.dim() != 2 or w.shape[1] % BLOCK:
            raise QuantError(f"cannot quantize a weight of shape {tuple(w.shape)}: the input size must be "
                             f"a multiple of {BLOCK}")
        blocks = w.detach().float().reshape(w.shape[0], -1, BLOCK)
        if fmt == "q8":
            d = _half_bits(blocks.abs().amax(-1) / 127)
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

def from_gguf_blocks(data: np.ndarray, kind: gguf.GGMLQuantizationType) -> QuantLinear:
    """A QuantLinear over a GGUF tensor's raw blocks (rows x bytes, as gguf's reader gives them)."""
    fmt, size = GGUF_KEPT[kind]
    raw = torch.from_numpy(np.array(data, dtype=np.uint8))  # a copy: the reader maps the file read-only
    if raw.dim() != 2 or raw.shape[1] % size:
        raise QuantError(f"a {kind.name} tensor of {tuple(raw.shape)} bytes is not whole blocks of {size}")
    blocks = raw.reshape(raw.shape[0], -1, size)
    d = blocks[..., 0:2].contiguous().view(torch.int16)[..., 0]
    if kind == gguf.GGMLQuantizationType.Q8_0:
        return QuantLinear("q8", blocks[..., 2:].contiguous().view(torch.int8).reshape(raw.shape[0], -1), d)
    if kind == gguf.GGMLQuantizationType.Q4_1:
        m = blocks[..., 2:4].contiguous().view(torch.int16)[..., 0]
        return QuantLinear("q4", blocks[..., 4:].reshape(raw.shape[0], -1), d, m)
    scale = _half(d)  # Q4_0: d * (q - 8) = d * q + (-8 d); -8 d is exact in half unless it overflows
    if (scale.abs() * 8 > 65504).any():
        raise QuantError("a Q4_0 block scale is too large to keep as q4: import without keeping the file's blocks")
    return QuantLinear("q4", blocks[..., 2:].reshape(raw.shape[0], -1), d, _half_bits(-8 * scale))
