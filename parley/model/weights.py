"""Weights in and out: Hugging Face folders, GGUF files and Parley's own checkpoints.

    from parley.model.weights import load_hf, load_gguf, save_checkpoint, load_checkpoint, export_hf
    model, hf_config = load_hf("models/SmolLM2-135M-Instruct")     # config.json + *.safetensors
    model, metadata = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")  # dequantized to fp32
    save_checkpoint("runs/sft/step-1000", model, meta={"step": 1000})
    model, meta = load_checkpoint("runs/sft/step-1000")
    export_hf(model, "out/hf")  # transformers.AutoModelForCausalLM.from_pretrained("out/hf") loads it

Loaders build the model without random init, check that the file holds exactly the tensors the
config asks for, with the right shapes, and copy them in one at a time, so peak memory stays
near one model. Writers build the folder in a temporary sibling and swap it in, so a crash
never leaves a half-written checkpoint behind; files they do not write themselves (a tokenizer
saved alongside) are carried over into the new folder.

Supported: the families of parley/model/families.py (Llama, Mistral, Mixtral, Qwen2/3 dense and
MoE, Gemma 3, Phi-3), i.e. what `Transformer` computes; that file maps their configs and tensor
names. Anything else is refused with `UnsupportedModelError` rather than loaded wrongly.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace
from typing import Iterable, Iterator

import gguf
import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from parley.files import NotRegularFile, TooLarge, fsync, open_regular, read_regular
from parley.model import quant
from parley.model.families import (SUPPORTED_ARCHITECTURES, UnsupportedModelError, WeightsError,  # noqa: F401
                                   config_from_hf, config_to_hf, hf_to_ours, ours_to_hf)
from parley.model.transformer import ModelConfig, Transformer, rope_buffers
from parley.model.transformer import _inv_freq as inv_freq_of  # the model's own RoPE frequencies

def _corrupt(path, err: Exception) -> WeightsError:
    return WeightsError(f"{path}: file is corrupt or truncated ({err})")


def _require(path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _not_regular(path, what: str) -> WeightsError:
    return WeightsError(f"{what} {path} is not a regular file (a folder, pipe or device)")


def _regular_file(path, what: str) -> Path:
    """`path`, checked to be a regular file (files.open_regular: a FIFO would block the open, a device,
    a link to /dev/zero, never end), for a reader that opens it by name (safetensors)."""
    path = _require(path, what)
    try:
        open_regular(path).close()
    except NotRegularFile:
        raise _not_regular(path, what) from None
    return path


# ---------------------------------------------------------------- filling a model from tensors

def _blank_model(cfg: ModelConfig, dtype: torch.dtype) -> Transformer:
    """A Transformer with uninitialized parameters. Random init would cost more than the
    load itself for big models, so build on the meta device and allocate empty storage."""
    with torch.device("meta"):
        model = Transformer(cfg).to(dtype)
    model.to_empty(device="cpu")
    if cfg.tie_word_embeddings:  # leaving the meta device makes new parameters, which unties them
        model.lm_head.weight = model.model.embed_tokens.weight
    # to_empty leaves buffers empty too; the rope tables are the only ones and stay fp32
    tables = rope_buffers(cfg)
    if {name for name, _ in model.named_buffers()} != set(tables):
        raise RuntimeError("Transformer has buffers that _blank_model does not rebuild")
    for name, table in tables.items():
        setattr(model, name, table)
    return model


def _fill(model: Transformer, names: Iterable[str], tensors: Iterator[tuple[str, torch.Tensor]], where) -> None:
    """Copy `tensors` into `model` after checking that `names` (what the file will yield) are
    exactly the model's parameters. A tied lm_head may be absent (it is the embedding)."""
    params = model.state_dict()
    optional = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    names = {n for n in names if not n.endswith("rotary_emb.inv_freq")}  # old Llama files store rope tables
    problems = []
    missing, unexpected = sorted(set(params) - optional - names), sorted(names - set(params))
    for label, found in (("missing", missing), ("unexpected", unexpected)):
        if found:
            problems.append(f"{label} tensor{'s' if len(found) > 1 else ''} {', '.join(found[:3])}"
                            + (f" and {len(found) - 3} more" if len(found) > 3 else ""))
    if problems:
        raise WeightsError(f"{where}: {'; '.join(problems)} "
                           "(the weights do not match the config: another architecture or size?)")
    with torch.no_grad():
        for name, tensor in tensors:
            if name not in params or name in optional:
                continue  # a skipped inv_freq, or a tied lm_head stored anyway: the embedding wins, as in transformers
            if tensor.shape != params[name].shape:
                raise WeightsError(f"{where}: tensor {name} has shape {tuple(tensor.shape)}, "
                                   f"the config expects {tuple(params[name].shape)}")
            params[name].copy_(tensor)


def _read_safetensors(model: Transformer, files: list[Path], where, hf_names: bool = False) -> None:
    """Fill `model` from safetensors files; with `hf_names`, the files use its family's HF names."""
    cfg = model.config
    pieces = (lambda name: hf_to_ours(cfg, name)) if hf_names else (lambda name: [(name, None)])
    with ExitStack() as stack:
        owner = {}
        for f in files:
            try:
                handle = stack.enter_context(safe_open(f, framework="pt"))
            except SafetensorError as e:
                raise _corrupt(f, e) from e
            owner.update({name: handle for name in handle.keys()})

        def tensors():
            for name, h in owner.items():
                t = h.get_tensor(name)
                yield from ((ours, t if rows is None else t[rows]) for ours, rows in pieces(name))

        _fill(model, [ours for name in owner for ours, _ in pieces(name)], tensors(), where)


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of an HF folder: one file, or the shards its index names."""
    if os.path.lexists(folder / "model.safetensors"):
        return [_regular_file(folder / "model.safetensors", "safetensors file")]
    index = folder / "model.safetensors.index.json"
    if os.path.lexists(index):
        try:
            shards = sorted(set(_read_json(index)["weight_map"].values()))
        except (KeyError, AttributeError, TypeError) as e:
            raise _corrupt(index, e) from e
        for s in shards:  # file names beside the index, never a path out of the folder
            if not isinstance(s, str) or s in ("", ".", "..") or Path(s).name != s:
                raise WeightsError(f"{index}: weight_map names {s!r}, not a safetensors file in {folder}")
        return [_regular_file(folder / s, "safetensors shard") for s in shards]
    if any(folder.glob("pytorch_model*.bin")):
        raise WeightsError(f"{folder} has only pytorch_model*.bin weights, which Parley does not read (pickles "
                           "can run code): convert them to safetensors, e.g. with transformers' from_pretrained "
                           "+ save_pretrained")
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {folder}")


JSON_MAX_BYTES = 64 * 2**20  # a config.json or shard index is kilobytes


def _read_json(path: Path) -> dict:
    try:
        text = read_regular(_require(path, "config file"), JSON_MAX_BYTES)
    except NotRegularFile:
        raise _not_regular(path, "config file") from None
    except TooLarge as e:
        raise WeightsError(f"{path}: {e.size:,} bytes is no config file (at most {JSON_MAX_BYTES:,})") from None
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise _corrupt(path, e) from e
    if not isinstance(data, dict):
        raise WeightsError(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def _check_layers(layers, tensors: int, where) -> None:
    """Refuse a layer count (read from the file's config, before the config is built: building it
    walks the layers) larger than the file's tensor count: every layer has tensors of its own."""
    if isinstance(layers, int) and layers > tensors:
        raise WeightsError(f"{where}: the config says {layers:,} layers but the weights hold {tensors:,} tensors: "
                           "the config does not belong to these weights")


def _check_fits(cfg: ModelConfig, values: int, dtype: torch.dtype, where) -> None:
    """Refuse, before anything is allocated, a config (a config.json or GGUF header: anything) that
    describes far more parameters than its file holds values, or a model bigger than this machine's
    memory. A config only a little off is left to `_fill`, which names the tensor that differs."""
    need = cfg.num_params()
    if need > 2 * values + 2**20:
        raise WeightsError(f"{where}: the config describes {need:,} parameters but the weights hold {values:,} "
                           "values: the config does not belong to these weights")
    rope = 8 * cfg.max_position_embeddings * cfg.head_dim * (2 if cfg.rope_local_base_freq is not None else 1)
    total, memory = need * dtype.itemsize + rope, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if total > memory:
        raise WeightsError(f"{where}: the model needs {total / 2**30:,.1f} GiB ({need:,} parameters, rotary tables "
                           f"for {cfg.max_position_embeddings:,} positions), more than this machine's "
                           f"{memory / 2**30:,.1f} GiB of memory")


def _safetensors_size(files: list[Path]) -> tuple[int, int]:
    """(tensors, values) in safetensors files, from their headers alone."""
    tensors = values = 0
    for f in files:
        try:
            with safe_open(f, framework="pt") as handle:
                for name in handle.keys():
                    tensors, values = tensors + 1, values + int(np.prod(handle.get_slice(name).get_shape()))
        except SafetensorError as e:
            raise _corrupt(f, e) from e
    return tensors, values


def load_hf(path, dtype: torch.dtype = torch.float32) -> tuple[Transformer, dict]:
    """Load a Hugging Face model folder (config.json + safetensors). Returns (model in eval
    mode, the raw config.json dict)."""
    folder = _require(path, "model folder")
    if not folder.is_dir():
        raise WeightsError(f"{folder} is a file; load_hf wants the folder holding config.json and the safetensors")
    hf_config = _read_json(folder / "config.json")
    files = _weight_files(folder)
    tensors, values = _safetensors_size(files)
    _check_layers(hf_config.get("num_hidden_layers"), tensors, folder)
    try:
        cfg = config_from_hf(hf_config)
    except ValueError as e:  # ModelConfig's checks, config_from_hf's: say which folder
        raise (type(e) if isinstance(e, WeightsError) else WeightsError)(f"{folder}: {e}") from None
    _check_fits(cfg, values, dtype, folder)
    model = _blank_model(cfg, dtype)
    _read_safetensors(model, files, folder, hf_names=True)
    return model.eval(), hf_config


# ---------------------------------------------------------------- GGUF (llama.cpp)

_GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GGUF_BLOCK = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "attn_norm": "input_layernorm",
               "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "ffn_gate_inp": "block_sparse_moe.gate",
               "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
               "attn_qkv": "self_attn.qkv_proj"}  # Phi-3's fused projection, split by families.hf_to_ours
# where an architecture's names mean something else: Gemma's norms around each sublayer, Phi-3's fused gate/up
_GGUF_BLOCK_OF = {"gemma3": {"ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
                             "post_ffw_norm": "post_feedforward_layernorm"},
                  "phi3": {"ffn_up": "mlp.gate_up_proj"}}
_GGUF_EXPERTS = {"ffn_gate_exps": "w1", "ffn_down_exps": "w2", "ffn_up_exps": "w3"}  # one tensor for all experts
# llama.cpp's architecture names -> the family they load as
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe",
                      "gemma3": "gemma3_text", "phi3": "phi3"}


def _hf_name(gguf_name: str, arch: str = "llama") -> str:
    """HF name for a GGUF tensor name; expert tensors get an `{}` for the expert index.
    Unknown names come back unchanged and are reported as unexpected."""
    parts = gguf_name.split(".")
    if len(parts) == 2 and parts[0] in _GGUF_TOP:
        return f"{_GGUF_TOP[parts[0]]}.{parts[1]}"
    if len(parts) == 4 and parts[0] == "blk":
        _, layer, kind, suffix = parts
        block = {**_GGUF_BLOCK, **_GGUF_BLOCK_OF.get(arch, {})}
        if kind in block:
            return f"model.layers.{layer}.{block[kind]}.{suffix}"
        if kind in _GGUF_EXPERTS:
            return f"model.layers.{layer}.block_sparse_moe.experts.{{}}.{_GGUF_EXPERTS[kind]}.{suffix}"
    return gguf_name


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order. HF rotates the two halves of each head (i, i + d/2);
    llama.cpp rotates adjacent pairs (2i, 2i + 1), so convert_hf_to_gguf interleaves each
    head's halves. Read the rows back as (head, d/2, pair) and put the pair axis first."""
    return w.reshape(n_head, -1, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# RoPE frequency factors some converters store as tensors instead of metadata: read into the config
ROPE_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def _llama3_scaling(factors: np.ndarray, head_dim: int, theta: float, path) -> dict:
    """Llama 3's rope_scaling parameters from the per-frequency divisors llama.cpp's converter stores
    (`rope_freqs`: 1 for short wavelengths, `factor` for long ones, 1 / ((1 - s) / factor + s) between,
    with s = original / wavelength - low, over high - low). Only s's slope and offset shape the
    frequencies, so any (original, low, high) giving them computes the same model: original is kept at
    the converter's 8192 and low/high fitted; refused unless the fit reproduces every factor."""
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factors = factors.astype(np.float64)
    if factors.shape != inv_freq.shape:
        raise WeightsError(f"{path}: rope_freqs has {factors.size} factors, the heads need {inv_freq.size}")
    factor = float(np.float32(factors.max()))
    if factor <= 1.0:
        return {}
    between = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    inv_wavelen = inv_freq / (2 * np.pi)
    original = 8192.0
    if between.sum() >= 2:  # s is linear in 1 / wavelength: fit it through the blended frequencies
        s = (1 / factors[between] - 1 / factor) / (1 - 1 / factor)
        slope, offset = np.polyfit(inv_wavelen[between], s, 1)
        span = original / slope
        low = -offset * span
        params = {"low_freq_factor": float(low), "high_freq_factor": float(low + span)}
    else:  # no blend to fit: the converter's own defaults, if they give these factors
        params = {"low_freq_factor": 1.0, "high_freq_factor": 4.0}
    scaling = {"rope_type": "llama3", "factor": factor, **params, "original_max_position_embeddings": int(original)}
    # checked with the frequencies the model itself will compute from these parameters
    scaled, _ = inv_freq_of(SimpleNamespace(head_dim=head_dim), theta, scaling)
    if not (params["high_freq_factor"] > params["low_freq_factor"]
            and np.allclose(inv_freq / scaled.numpy(), factors, rtol=1e-4, atol=0)):
        raise UnsupportedModelError(f"{path}: rope_freqs does not follow Llama 3's RoPE scaling; "
                                    "import the model's Hugging Face folder instead")
    return scaling


def _config_from_gguf(meta: dict, tensor_names: set[str], n_tokens: int, path,
                      rope_tensors: dict[str, np.ndarray] | None = None) -> ModelConfig:
    required = object()
    arch = meta["general.architecture"]
    family = GGUF_ARCHITECTURES[arch]

    def key(name, default=required):
        value = meta.get(f"{arch}.{name}", default)
        if value is required:
            raise WeightsError(f"{path}: GGUF metadata lacks {arch}.{name}")
        if value is not default and name != "rope.scaling.type" and (  # a number: ModelConfig checks its range
                isinstance(value, bool) or not isinstance(value, (int, float))):
            raise WeightsError(f"{path}: GGUF metadata {arch}.{name} must be a number, not {value!r}")
        return value

    def decimal(value):  # GGUF stores float32: 1e-5 reads back as 9.99999974e-06, so take float32's shortest repr
        return None if value is None else float(str(np.float32(value)))

    n_head, n_layers, hidden = key("attention.head_count"), key("block_count"), key("embedding_length")
    _check_layers(n_layers, len(tensor_names), path)
    if not (isinstance(n_head, int) and n_head > 0):
        raise WeightsError(f"{path}: GGUF metadata {arch}.attention.head_count must be a positive whole number, "
                           f"not {n_head!r}")
    head_dim = key("attention.key_length", hidden // n_head)
    if key("rope.dimension_count", head_dim) != head_dim:
        raise UnsupportedModelError(f"{path}: partial rotary embeddings are not supported")
    scaling = key("rope.scaling.type", "none")
    rope_tensors = rope_tensors or {}
    theta = decimal(key("rope.freq_base", 10000.0))
    rope_scaling = None
    if "rope_freqs.weight" in rope_tensors:  # Llama 3.1's scaled frequencies, stored as a tensor
        rope_scaling = _llama3_scaling(rope_tensors["rope_freqs.weight"], head_dim, theta, path) or None
    elif "rope_factors_long.weight" in rope_tensors:  # Phi-3's LongRoPE factors, stored as tensors
        if "rope_factors_short.weight" not in rope_tensors:
            raise WeightsError(f"{path}: rope_factors_long without rope_factors_short")
        original = key("rope.scaling.original_context_length")
        rope_scaling = {"rope_type": "longrope", "original_max_position_embeddings": int(original),
                        **{f"{kind}_factor": [decimal(v) for v in rope_tensors[f"rope_factors_{kind}.weight"]]
                           for kind in ("short", "long")}}
        if (attention := key("rope.scaling.attn_factor", None)) is not None:
            rope_scaling["attention_factor"] = decimal(attention)
    elif scaling == "linear":
        rope_scaling = {"rope_type": "linear", "factor": decimal(key("rope.scaling.factor"))}
    elif scaling != "none":
        raise UnsupportedModelError(f"{path}: rope scaling ({scaling}) is not supported")
    experts = key("expert_count", 0)
    gemma = family == "gemma3_text"
    window = key("attention.sliding_window", None)
    gemma_extras = {}
    if gemma:  # what llama.cpp fixes for gemma3 rather than storing: 5 sliding layers to 1 global,
        # local RoPE base 1e4, attention scale 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 62-layer 27B)
        gemma_extras = dict(
            hidden_act="gelu_pytorch_tanh", sliding_window=window, rope_local_base_freq=10000.0,
            layer_types=["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(n_layers)],
            query_pre_attn_scalar=float(hidden // n_head if n_layers == 62 else head_dim),
            final_logit_softcapping=decimal(key("final_logit_softcapping", None)))
    elif window and family == "phi3":  # every layer, as Phi-3's config.json says
        gemma_extras = dict(sliding_window=window if window < key("context_length") else None)
    elif window:
        raise UnsupportedModelError(f"{path}: sliding-window attention in a {arch} GGUF is not supported")
    return ModelConfig(
        vocab_size=key("vocab_size", None) or n_tokens, hidden_size=hidden,
        intermediate_size=key("feed_forward_length", None) or key("expert_feed_forward_length") if family == "qwen3_moe" else
        key("expert_feed_forward_length", None) or key("feed_forward_length"),
        num_hidden_layers=n_layers, num_attention_heads=n_head,
        num_key_value_heads=key("attention.head_count_kv", n_head), head_dim=head_dim,
        max_position_embeddings=key("context_length"), rope_theta=theta,
        rms_norm_eps=decimal(key("attention.layer_norm_rms_epsilon")),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_output.bias" in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names and "blk.0.attn_output.bias" not in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        num_local_experts=experts, num_experts_per_tok=key("expert_used_count", 2) if experts else 2,
        moe_intermediate_size=key("expert_feed_forward_length", None) if family == "qwen3_moe" else None,
        model_type=family if family != "llama" else "llama", rope_scaling=rope_scaling, **gemma_extras,
    )


def load_gguf(path, dtype: torch.dtype = torch.float32) -> tuple[Transformer, dict]:
    """Load a GGUF file of one of GGUF_ARCHITECTURES, dequantizing every tensor. Returns (model in
    eval mode, the file's scalar metadata: `ARCH.*`, `general.*`, tokenizer ids, chat template)."""
    path = _require(path, "GGUF file")
    try:  # GGUFReader reports a damaged file through whatever numpy raises while parsing it
        reader = gguf.GGUFReader(path)
        # scalars only: the arrays are the vocabulary, which the tokenizer reads from the file itself
        meta = {name: f.contents() for name, f in reader.fields.items()
                if not name.startswith("GGUF.") and f.types[0] != gguf.GGUFValueType.ARRAY}
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        n_tokens = len(tokens.data) if tokens else 0
    except Exception as e:
        raise _corrupt(path, e) from e
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(f"{path}: unsupported GGUF architecture {arch!r} "
                                    f"(supported: {', '.join(GGUF_ARCHITECTURES)})")
    rope = {t.name: np.array(t.data, dtype=np.float32).reshape(-1) for t in reader.tensors if t.name in ROPE_TENSORS}
    try:
        cfg = _config_from_gguf(meta, {t.name for t in reader.tensors}, n_tokens, path, rope)
    except WeightsError:
        raise
    except ValueError as e:  # ModelConfig's checks: say which file
        raise WeightsError(f"{path}: {e}") from None
    tensors = [(t, _hf_name(t.name, arch)) for t in reader.tensors if t.name not in ROPE_TENSORS]

    def dequantized() -> Iterator[tuple[str, torch.Tensor]]:
        for t, name in tensors:
            try:
                array = gguf.quants.dequantize(t.data, t.tensor_type)
            except NotImplementedError as e:
                raise UnsupportedModelError(f"{path}: cannot dequantize {t.name} ({t.tensor_type.name}): {e}") from e
            # F32 tensors come back as read-only views of the file, which torch warns about
            w = torch.from_numpy(array if array.flags.writeable else np.array(array))
            if arch == "llama":  # only llama.cpp's llama converter reorders q/k rows for its rotary layout
                if name.endswith(("q_proj.weight", "q_proj.bias")):
                    w = _unpermute(w, cfg.num_attention_heads)
                elif name.endswith(("k_proj.weight", "k_proj.bias")):
                    w = _unpermute(w, cfg.num_key_value_heads)  # k has its own (kv) head count
            if cfg.gemma and name.endswith("norm.weight"):
                w = w - 1.0  # llama.cpp stores Gemma's norms as 1 + weight
            if "{}" in name:
                yield from ((name.format(e), w[e]) for e in range(w.shape[0]))
            else:
                yield from ((ours, w if rows is None else w[rows]) for ours, rows in hf_to_ours(cfg, name))

    names = []
    for t, name in tensors:  # GGUF shapes list the innermost dimension first: experts are the last
        names += [name.format(e) for e in range(int(t.shape[-1]))] if "{}" in name else \
            [ours for ours, _ in hf_to_ours(cfg, name)]
    _check_fits(cfg, sum(int(t.n_elements) for t in reader.tensors), dtype, path)
    model = _blank_model(cfg, dtype)
    _fill(model, names, dequantized(), path)
    return model.eval(), meta


# ---------------------------------------------------------------- writing folders atomically

_STALE_WEIGHTS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)  # instant, and the old folder is about to go anyway
    except OSError:
        shutil.copy2(src, dst)


def _write_folder(path, json_files: dict[str, dict], tensors: dict[str, torch.Tensor]) -> None:
    """Write a model folder: build it complete in a temp sibling, then swap it in with renames.
    Files of an existing folder that we do not write (a tokenizer, say) are carried over,
    except old weight files. Only the instant between the two renames is unprotected, and a
    crash there leaves the old folder whole under `.NAME.old-*`."""
    path = Path(path)
    if path.exists() and not (path.is_dir() and ((path / "config.json").exists() or not any(path.iterdir()))):
        raise WeightsError(f"refusing to overwrite {path}: it is not a model folder (no config.json)")
    # serialize first: a meta dict that is not JSON fails before anything is written
    texts = {name: json.dumps(content, indent=2) + "\n" for name, content in json_files.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        for name, text in texts.items():
            (tmp / name).write_text(text)
        if path.exists():
            stale = {p.name for pattern in _STALE_WEIGHTS for p in path.glob(pattern)}
            for entry in path.iterdir():
                if entry.name not in stale and not (tmp / entry.name).exists():
                    if entry.is_dir():
                        shutil.copytree(entry, tmp / entry.name, copy_function=_link_or_copy)
                    else:
                        _link_or_copy(entry, tmp / entry.name)
        for f in tmp.iterdir():
            if f.is_file():
                fsync(f)
        if path.exists():
            old = tmp.with_name(tmp.name.replace(".tmp-", ".old-"))
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        fsync(path.parent)  # make the rename itself durable
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _tensors_to_save(model: Transformer, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the embedding's tensor (safetensors refuses shared storage); a
        # quantized output layer (model/quant.py) is its own copy, saved as lm_head.q, .d, .m
    return {name: t.detach().to("cpu", dtype or t.dtype).contiguous() for name, t in state.items()}


def _param_dtype(model: Transformer) -> torch.dtype:
    return model.model.embed_tokens.weight.dtype


def _rows_of(layer: quant.QuantLinear, rows) -> quant.QuantLinear:
    """The layer's rows picked or reordered by `rows` (a function of a tensor): every row moves with
    its blocks, so this is exact (llama.cpp's q/k row order undone, a fused projection split)."""
    return quant.QuantLinear(layer.fmt, *(rows(t).contiguous() for t in (layer.q, layer.d, layer.m) if t is not None))


def keep_gguf_blocks(model: Transformer, path) -> Transformer:
    """Swap the linear layers of `model` (loaded from the GGUF file `path` by weights.load_gguf)
    for their tensors' blocks as q8 / q4 (quant.GGUF_KEPT: how each type maps), in place. Any
    architecture load_gguf reads whose projections have no biases or experts (quant.linear_names
    refuses those): llama's q/k rows are put back in HF's order, as load_gguf does for floats (only
    llama.cpp's llama converter reorders them; gemma3, qwen3, phi3 keep HF's order), and Phi-3's
    fused projections are split by rows. A projection stored in a type that is not kept (F16, say)
    is refused: the C step runs a model whose projections are all quantized, or none."""
    cfg, reader = model.config, gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()  # load_gguf has checked it
    linears = set(quant.linear_names(model))
    for t in reader.tensors:
        name = _hf_name(t.name, arch)
        if name == "model.embed_tokens.weight" and cfg.tie_word_embeddings:
            name = "lm_head.weight"
        parts = [(ours.removesuffix(".weight"), rows) for ours, rows in hf_to_ours(cfg, name)
                 if ours.endswith(".weight")]
        if not any(ours in linears for ours, _ in parts):
            continue
        try:
            blocks = quant.from_gguf_blocks(t.data, t.tensor_type)
        except quant.QuantError as e:
            raise quant.QuantError(f"{path}: {t.name}: {e}; import it without --quantize keep "
                                   "(dequantized), or with --quantize q8") from None
        for ours, rows in parts:
            layer = blocks if rows is None else _rows_of(blocks, lambda w, rows=rows: w[rows])
            heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}.get(ours.rsplit(".", 1)[-1])
            if arch == "llama" and heads:
                layer = _rows_of(layer, lambda w, heads=heads: _unpermute(w, heads))
            target = model.get_submodule(ours)
            if (layer.out_features, layer.in_features) != tuple(target.weight.shape):
                raise quant.QuantError(f"{path}: {t.name} has shape {(layer.out_features, layer.in_features)}, "
                                       f"the model expects {tuple(target.weight.shape)}")
            quant.swap_layer(model, ours, layer)
    return model


# ---------------------------------------------------------------- Parley checkpoints, HF export

def save_checkpoint(path, model: Transformer, meta: dict | None = None) -> None:
    """Save Parley's format: config.json ({"parley_format": 1, "dtype", "model", "meta"}) and
    model.safetensors, written atomically. `meta` must be JSON-serializable. Quantized layers
    (model/quant.py) are listed under "quant" ({module: format})."""
    layers = quant.formats(model)
    config = {"parley_format": 1, "dtype": str(_param_dtype(model)).removeprefix("torch."),
              "model": model.config.to_dict(), "meta": meta or {}, **({"quant": layers} if layers else {})}
    _write_folder(path, {"config.json": config}, _tensors_to_save(model, None))


def load_checkpoint(path, dtype: torch.dtype | None = None) -> tuple[Transformer, dict]:
    """Load a folder written by save_checkpoint, in its saved dtype unless `dtype` is given.
    Returns (model in eval mode, meta)."""
    folder = _require(path, "checkpoint")
    config = _read_json(folder / "config.json")
    if config.get("parley_format") != 1:
        hint = " (it looks like a Hugging Face folder: use load_hf)" if "architectures" in config else ""
        raise WeightsError(f"{folder} is not a Parley checkpoint{hint}")
    dtype = dtype or getattr(torch, config.get("dtype", "float32"))
    model = _blank_model(ModelConfig.from_dict(config["model"]), dtype)
    if config.get("quant"):
        quant.prepare_for_loading(model, config["quant"])
    _read_safetensors(model, [_regular_file(folder / "model.safetensors", "checkpoint weights")], folder)
    return model.eval(), config.get("meta") or {}


def export_hf(model: Transformer, path, dtype: torch.dtype | None = None,
              bos_token_id: int | None = None, eos_token_id: int | list[int] | None = None) -> None:
    """Write a Hugging Face folder (config.json, model.safetensors, generation_config.json)
    that `transformers.AutoModelForCausalLM.from_pretrained(path)` loads. Written atomically."""
    dtype = dtype or _param_dtype(model)
    files = {"config.json": config_to_hf(model.config, dtype, bos_token_id, eos_token_id)}
    ids = {k: v for k, v in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id)) if v is not None}
    if ids:
        files["generation_config.json"] = ids
    _write_folder(path, files, ours_to_hf(model.config, _tensors_to_save(model, dtype)))
