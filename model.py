"""
The unified models, in plain PyTorch, loading the real checkpoints exactly.

Janus / Janus-Pro (deepseek-ai): one LLaMA decoder reads two kinds of image input.
    understanding:  pixels -> SigLIP ViT -> MLP aligner -> LLM embeddings
    generation:     code c -> gen_aligner(gen_embed[c]) -> LLM -> gen_head(h) = logits over the VQ codebook
    VQ-16 (LlamaGen) turns codes back into pixels: x = Decoder(post_quant_conv(normalize(E)[codes])), or the
    image tokenizer a config.json names as "module:Class" (the toy world's palette, toy.py).

Show-o (showlab) lives further down: one Phi-1.5 decoder over [text vocab | specials | image codes | mask],
with MAGVIT-v2 (LFQ) as its image tokenizer.

Loading is strict: every tensor of the checkpoint must find a home with the right shape, and every
parameter must be filled; anything else raises one CheckpointError that lists all offenders.
"""
import glob
import json
import math
import os
import re
import sys
import weakref
from dataclasses import dataclass, field, fields, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from PIL import Image
from tokenizers import AddedToken, Tokenizer

# -----------------------------------------------------------------------------------------------------------
# Checkpoint reading and strict loading (shared by both model families)


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: the message names every offending file or tensor."""


def read_json(path):
    """A json object file of a model folder (config, processor config, tokenizer side file). Malformed or not an
    object: ValueError naming the file (a bare JSONDecodeError names neither file nor folder)."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: malformed json ({e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a json object, not {type(obj).__name__}")
    return obj


def check_types(path, section, values, defaults):
    """Refuse, naming the file and field, a json value whose type is not its default's: "2048" or 2.5 for a size,
    true for a number, "false" for a boolean. Let through, they crash later in a bare TypeError, are truncated,
    or read as true. An int passes for a float, a list for a tuple (item by item); null means absent."""
    def fits(value, like):
        if isinstance(like, (tuple, list)):
            return isinstance(value, (tuple, list)) and all(fits(v, like[0]) for v in value)
        if isinstance(like, bool) or isinstance(value, bool):  # bool is an int to Python, not to a config
            return isinstance(like, bool) and isinstance(value, bool)
        return isinstance(value, (int, float) if isinstance(like, float) else type(like))

    def kind(like):
        if isinstance(like, (tuple, list)):
            return "a list of " + ("numbers" if isinstance(like[0], float) else "integers")
        names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
        return names.get(type(like), "an object")
    if not isinstance(values, dict):
        raise ValueError(f"{path}: {section.rstrip('.')} must be an object, not {values!r}")
    for key, like in defaults.items():
        if values.get(key) is not None and not fits(values[key], like):
            raise ValueError(f"{path}: {section}{key} must be {kind(like)}, not {values[key]!r}")


def read_tokenizer(path):
    """A tokenizer.json; unreadable: ValueError naming it (tokenizers raises a bare Exception naming no file)."""
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from e


def read_tensor_file(path):
    """One .safetensors or .bin file -> {name: tensor} on CPU, with a clear error for broken files."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path, device="cpu")
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors/pickle raise many types; all mean "unreadable"
        raise CheckpointError(f"{path}: not a readable checkpoint file (truncated or corrupt?): {e}") from e
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: expected a flat {{name: tensor}} dict, got {type(sd).__name__}")
    return sd


def read_checkpoint(ckpt_dir, names=("model", "pytorch_model")):
    """All tensors of a checkpoint folder: a sharded index json, or one <name>.safetensors / <name>.bin."""
    if os.path.isfile(ckpt_dir):
        return read_tensor_file(ckpt_dir)
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"checkpoint folder not found: {ckpt_dir}")
    for name in names:
        for ext in (".safetensors", ".bin"):
            index = os.path.join(ckpt_dir, f"{name}{ext}.index.json")
            if os.path.isfile(index):
                try:
                    weight_map = json.load(open(index))["weight_map"]
                except Exception as e:
                    raise CheckpointError(f"{index}: malformed shard index ({e})") from e
                sd = {}
                for shard in sorted(set(weight_map.values())):
                    sd.update(read_tensor_file(os.path.join(ckpt_dir, shard)))
                missing = sorted(set(weight_map) - set(sd))
                if missing:
                    raise CheckpointError(f"{index} lists tensors no shard holds: {missing}")
                return sd
            single = os.path.join(ckpt_dir, name + ext)
            if os.path.isfile(single):
                return read_tensor_file(single)
    found = sorted(os.listdir(ckpt_dir))
    raise CheckpointError(f"no weights in {ckpt_dir}: looked for {', '.join(n + '.{safetensors,bin}[.index.json]' for n in names)}; found {found}")


def load_strict(model, sd, optional=(), dtype=None, device=None, where="checkpoint"):
    """Fill `model` (usually built on the meta device) from `sd`, or raise one error listing every problem.

    optional: names the checkpoint may or may not hold (the model keeps its own value when absent).
    Floating tensors are cast to `dtype`; integer buffers keep theirs.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd and k not in optional]
    unexpected = [k for k in sd if k not in expected]
    misshaped = [f"{k}: checkpoint {list(sd[k].shape)} vs model {list(v.shape)}"
                 for k, v in expected.items() if k in sd and sd[k].shape != v.shape]
    if missing or unexpected or misshaped:
        lines = [f"{where} does not match {type(model).__name__}:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                lines.append(f"  {len(items)} {title}: " + ", ".join(items[:50]) + (" ..." if len(items) > 50 else ""))
        raise CheckpointError("\n".join(lines))
    poisoned = [k for k, t in sd.items() if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all())]
    if poisoned:  # a diverged run's weights would answer "!!!!" with exit 0; refuse them at the door
        raise CheckpointError(f"{where}: {len(poisoned)} tensor(s) hold NaN or inf values: "
                              + ", ".join(poisoned[:20]) + (" ..." if len(poisoned) > 20 else ""))
    full = {}
    for k, v in expected.items():
        t = sd[k] if k in sd else v
        if t.is_meta:  # an optional tensor left out of the checkpoint: materialise the module's default
            t = torch.zeros(v.shape, dtype=v.dtype)
        if t.is_floating_point() and dtype is not None:
            t = t.to(dtype)
        full[k] = t.to(device) if device is not None else t
    model.load_state_dict(full, strict=True, assign=True)
    return model


def build_on_meta(cls, cfg):
    """Construct without allocating or initialising weights: from_pretrained overwrites every one of them."""
    with torch.device("meta"):
        return cls(cfg)


# -----------------------------------------------------------------------------------------------------------
# Janus configuration: the original config.json, with size fields that real checkpoints leave implicit

# The official code hard-codes these sizes (SigLIP by model_name, VQ by its preset); config.json may override
# any field explicitly (the parity fixtures do, to stay tiny).
SIGLIP_PRESETS = {
    "siglip_large_patch16_384": dict(image_size=384, patch_size=16, width=1024, layers=24, heads=16, mlp_ratio=4.0),
}
VQ_PRESETS = {
    "VQ-16": dict(codebook_size=16384, codebook_embed_dim=8, codebook_l2_norm=True, codebook_show_usage=True,
                  z_channels=256, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, dropout_p=0.0,
                  image_size=384, patch_size=16),
}


LLAMA_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings")


@dataclass
class JanusConfig:
    # LLaMA decoder (absent fields take LlamaConfig's defaults, as the official loader does)
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 0  # 0 -> same as num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    # SigLIP understanding encoder
    vit_image_size: int = 384
    vit_patch_size: int = 16
    vit_width: int = 1024
    vit_layers: int = 24  # blocks actually built: layers + select_layer + 1
    vit_heads: int = 16
    vit_mlp_ratio: float = 4.0
    aligner_depth: int = 2
    # VQ-16 image tokenizer (generation side)
    vq_codebook_size: int = 16384
    vq_embed_dim: int = 8
    vq_l2_norm: bool = True
    vq_show_usage: bool = True  # the checkpoint then carries quantize.codebook_used [65536]
    vq_z_channels: int = 256
    vq_ch: int = 128
    vq_ch_mult: tuple = (1, 1, 2, 2, 4)
    vq_num_res_blocks: int = 2
    gen_image_size: int = 384
    gen_patch_size: int = 16
    # "VQ-16", or "module:Class" for another image tokenizer (see image_tokenizer), built from gen_vision_params
    gen_vision_cls: str = "VQ-16"
    gen_vision_params: dict = field(default_factory=dict)
    # generation heads
    gen_vocab_size: int = 16384  # rows of gen_embed / outputs of gen_head
    gen_embed_dim: int = 8
    gen_aligner_depth: int = 2
    # chat roles differ between Janus-1.3B ("User") and Janus-Pro ("<|User|>")
    user_role: str = "<|User|>"
    assistant_role: str = "<|Assistant|>"

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @property
    def n_kv_heads(self):
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def num_und_tokens(self):  # understanding tokens per image (576 for the real models)
        return (self.vit_image_size // self.vit_patch_size) ** 2

    @property
    def gen_grid(self):  # side of the generated code grid (24 for the real models)
        return self.gen_image_size // self.gen_patch_size

    @classmethod
    def from_json(cls, cfg, path="config.json"):
        """Parse an original `multi_modality` config.json dict (or a transformers `janus` one); `path` names the
        file in errors."""
        if cfg.get("model_type") == "janus":
            return cls._from_hf_json(cfg, path)
        try:
            lang = cfg["language_config"]
            vis = cfg["vision_config"]["params"]
            gen_vis = cfg["gen_vision_config"]
            gen_head = cfg["gen_head_config"]["params"]
            aligner = cfg["aligner_config"]["params"]
            gen_aligner = cfg["gen_aligner_config"]["params"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a Janus multi_modality config: missing {e}") from e
        check_types(path, "language_config.", lang, {f: getattr(cls, f) for f in LLAMA_FIELDS})
        check_types(path, "vision_config.params.", vis,
                    {**SIGLIP_PRESETS["siglip_large_patch16_384"], "model_name": "", "select_layer": -1})
        check_types(path, "gen_vision_config.", gen_vis, {"cls": "", "params": {}})
        check_types(path, "gen_vision_config.params.", gen_vis.get("params", {}),
                    {**VQ_PRESETS["VQ-16"], "image_token_size": 1, "n_embed": 1})
        for section, params in (("aligner_config", aligner), ("gen_aligner_config", gen_aligner),
                                ("gen_head_config", gen_head)):
            check_types(path, section + ".params.", params, dict(depth=1, n_embed=1, input_dim=1, image_token_size=1))
        if vis.get("model_name", "siglip_large_patch16_384") not in SIGLIP_PRESETS:
            raise ValueError(f"{path}: unknown vision model_name {vis.get('model_name')!r}; "
                             f"known: {list(SIGLIP_PRESETS)}")
        siglip = {**SIGLIP_PRESETS[vis.get("model_name", "siglip_large_patch16_384")], **vis}
        gen_cls = gen_vis.get("cls", "VQ-16")
        if ":" in gen_cls:  # a named image tokenizer: it needs only its sizes here, and takes its own params
            missing = [k for k in ("image_size", "patch_size", "image_token_size", "n_embed")
                       if k not in gen_vis.get("params", {})]
            if missing:
                raise ValueError(f"{path}: gen_vision_config {gen_cls!r} needs params {missing}")
            vq = {**VQ_PRESETS["VQ-16"], **gen_vis["params"]}
        elif gen_cls not in VQ_PRESETS:
            raise ValueError(f"{path}: unknown gen_vision cls {gen_cls!r}; known: {list(VQ_PRESETS)} or 'module:Class'")
        else:
            vq = {**VQ_PRESETS[gen_cls], **gen_vis.get("params", {})}
        select_layer = vis.get("select_layer", -1)
        c = cls()
        for f in LLAMA_FIELDS:
            if lang.get(f) is not None:
                setattr(c, f, type(getattr(c, f))(lang[f]))
        c = replace(
            c,
            vit_image_size=siglip["image_size"], vit_patch_size=siglip["patch_size"], vit_width=siglip["width"],
            vit_layers=siglip["layers"] + select_layer + 1 if select_layer <= 0 else select_layer,
            vit_heads=siglip["heads"], vit_mlp_ratio=float(siglip["mlp_ratio"]), aligner_depth=aligner.get("depth", 2),
            vq_codebook_size=vq["codebook_size"], vq_embed_dim=vq["codebook_embed_dim"],
            vq_l2_norm=vq["codebook_l2_norm"], vq_show_usage=vq["codebook_show_usage"],
            vq_z_channels=vq["z_channels"], vq_ch=vq["ch"], vq_ch_mult=tuple(vq["ch_mult"]),
            vq_num_res_blocks=vq["num_res_blocks"], gen_image_size=vq["image_size"], gen_patch_size=vq["patch_size"],
            gen_vocab_size=vq.get("image_token_size", vq["codebook_size"]), gen_embed_dim=vq.get("n_embed", 8),
            gen_aligner_depth=gen_aligner.get("depth", 2),
            gen_vision_cls=gen_cls, gen_vision_params=dict(gen_vis.get("params", {})) if ":" in gen_cls else {},
        )
        # the aligners and gen_head are sized by their own params; they must agree with the LLM and the ViT
        for name, got, want in (("aligner_config.n_embed", aligner.get("n_embed"), c.hidden_size),
                                ("aligner_config.input_dim", aligner.get("input_dim"), c.vit_width),
                                ("gen_aligner_config.n_embed", gen_aligner.get("n_embed"), c.hidden_size),
                                ("gen_aligner_config.input_dim", gen_aligner.get("input_dim"), c.gen_embed_dim),
                                ("gen_head_config.n_embed", gen_head.get("n_embed"), c.hidden_size),
                                ("gen_head_config.image_token_size", gen_head.get("image_token_size"), c.gen_vocab_size)):
            if got is not None and got != want:
                raise ValueError(f"{path}: {name} = {got}, but the model needs {want}")
        return c

    @classmethod
    def _from_hf_json(cls, cfg, path="config.json"):
        # transformers' JanusConfig field names (inferred from transformers.models.janus; the spec lists only
        # the converter's correspondences): text_config = LlamaConfig, vision_config, vq_config.
        text, vis, vq = cfg.get("text_config", {}), cfg.get("vision_config", {}), cfg.get("vq_config", {})
        check_types(path, "text_config.", text, {f: getattr(cls, f) for f in LLAMA_FIELDS})
        check_types(path, "vision_config.", vis, dict(image_size=1, patch_size=1, hidden_size=1, num_hidden_layers=1,
                                                      num_attention_heads=1, mlp_ratio=1.0, depth=1))
        check_types(path, "vq_config.", vq, dict(num_embeddings=1, embed_dim=1, latent_channels=1, base_channels=1,
                                                 channel_multiplier=(1,), num_res_blocks=1, image_size=1, depth=1))
        c = cls()
        for f in LLAMA_FIELDS:
            if text.get(f) is not None:
                setattr(c, f, type(getattr(c, f))(text[f]))
        return replace(
            c,
            vit_image_size=vis.get("image_size", 384), vit_patch_size=vis.get("patch_size", 16),
            vit_width=vis.get("hidden_size", 1024), vit_layers=vis.get("num_hidden_layers", 24),
            vit_heads=vis.get("num_attention_heads", 16), vit_mlp_ratio=float(vis.get("mlp_ratio", 4.0)),
            aligner_depth=vis.get("depth", 2),
            vq_codebook_size=vq.get("num_embeddings", 16384), vq_embed_dim=vq.get("embed_dim", 8),
            vq_z_channels=vq.get("latent_channels", 256), vq_ch=vq.get("base_channels", 128),
            vq_ch_mult=tuple(vq.get("channel_multiplier", (1, 1, 2, 2, 4))),
            vq_num_res_blocks=vq.get("num_res_blocks", 2),
            gen_image_size=vq.get("image_size", 384),
            gen_patch_size=2 ** (len(vq.get("channel_multiplier", (1, 1, 2, 2, 4))) - 1),
            gen_vocab_size=vq.get("num_embeddings", 16384), gen_embed_dim=vq.get("embed_dim", 8),
            gen_aligner_depth=vq.get("depth", 2),
        )


def _janus_json(hidden=None, intermediate=None, heads=None, layers=30):
    """The original config.json of a real Janus checkpoint (only the fields it carries)."""
    lang = {"num_hidden_layers": layers, "max_position_embeddings": 16384, "vocab_size": 102400,
            "torch_dtype": "bfloat16", "model_type": "llama"}
    if hidden:  # the 1B configs list their sizes; the 7B relies on LlamaConfig's defaults
        lang.update(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                    num_key_value_heads=heads)
    n = hidden or 4096
    return {
        "model_type": "multi_modality",
        "vision_config": {"cls": "CLIPVisionTower", "params": {"image_size": 384, "model_name": "siglip_large_patch16_384",
                                                               "select_feature": "same", "select_layer": -1}},
        "aligner_config": {"cls": "MlpProjector", "params": {"depth": 2, "input_dim": 1024, "n_embed": n,
                                                             "projector_type": "mlp_gelu"}},
        "gen_vision_config": {"cls": "VQ-16", "params": {"image_token_size": 16384, "n_embed": 8}},
        "gen_aligner_config": {"cls": "MlpProjector", "params": {"depth": 2, "input_dim": 8, "n_embed": n,
                                                                 "projector_type": "mlp_gelu"}},
        "gen_head_config": {"cls": "vision_head", "params": {"image_token_embed": n, "image_token_size": 16384,
                                                             "n_embed": n}},
        "language_config": lang,
    }


JANUS_CONFIGS = {
    "janus-pro-1b": JanusConfig.from_json(_janus_json(2048, 5632, 16, 24)),
    "janus-pro-7b": JanusConfig.from_json(_janus_json()),
    "janus-1.3b": replace(JanusConfig.from_json(_janus_json(2048, 5632, 16, 24)), user_role="User", assistant_role="Assistant"),
}


# -----------------------------------------------------------------------------------------------------------
# LLaMA decoder: RMSNorm, RoPE, SwiGLU, multi-head attention with grouped KV heads and a static KV cache


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32, cast back BEFORE the weight multiply (LLaMA's order; bf16 parity depends on it)
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_cos_sin(positions, head_dim, theta, dtype):
    """positions [B, L] -> cos, sin [B, 1, L, head_dim]: angles p * theta^(-2i/d), duplicated as [a, a]."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[..., None] * inv_freq  # [B, L, d/2], fp32 like the reference
    emb = torch.cat([angles, angles], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # non-interleaved half rotation
    return x * cos + rotated * sin


# The additive-mask minimum of every dtype we compute in: bfloat16's, which is exact in float32 too. float32's own
# minimum (-3.40e38) rounds to -inf when a mask is cast to bfloat16 (autocast does that), and a fully masked
# left-pad row then turns its softmax into NaN. Added to any real score it is still absorbed: exp() gives 0.
MASK_MIN = torch.finfo(torch.bfloat16).min


def attention_bias(key_valid, query_slots, dtype):
    """Additive mask [B, 1, Lq, S]: query at cache slot q sees slots s <= q that hold a real (non-pad) key.

    A finite minimum, not -inf: a left-pad query sees no valid key, and -inf would turn its softmax into NaN.
    """
    S = key_valid.shape[1]
    causal = torch.arange(S, device=key_valid.device)[None, :] <= query_slots[:, None]  # [Lq, S]
    allowed = causal[None] & key_valid[:, None, :].bool()  # [B, Lq, S]
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, MASK_MIN)[:, None]


class KVCache:
    """Preallocated keys and values for every layer, [layers, B, kv_heads, max_len, head_dim].

    Static shapes let the decode step be compiled once and replayed as a CUDA graph; slots are written in place.
    """

    def __init__(self, cfg, batch, max_len, dtype, device):
        shape = (cfg.num_hidden_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def prefix(self, n):
        """The first n slots as views (writes land in this cache): eager decoding then attends over the filled
        part only, where a compiled step keeps the full static shape."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = self.k[..., :n, :], self.v[..., :n, :]
        return view

    @property
    def max_len(self):
        return self.k.shape[3]


_caches = weakref.WeakKeyDictionary()  # model -> {(purpose, rows): KVCache}; freed with the model
CACHE_GRANULE = 256  # caches grow in steps of this many slots, so that prompt lengths share one compiled shape


def reusable_cache(model, purpose, cfg, batch, min_len, dtype, device):
    """The model's KVCache for (`purpose`, `batch` rows), allocated once and reused by every later call with the
    same rows, dtype and device; it grows (rounded up to CACHE_GRANULE) only when min_len does not fit.
    Reuse keeps the tensors' addresses, so a CUDA graph that captured them replays instead of re-recording: keyed
    by the rows too, the training rollouts, the evaluation's and the before/after drawing's each keep their own
    (one graph each), instead of freeing one another's. Only the compiled image decode needs this; eager decodes
    take a fresh KVCache, which goes back to the allocator when they end. Unfilled slots are always masked by the
    caller, so stale keys from an earlier call are never seen."""
    pool = _caches.setdefault(model, {})
    cache = pool.get((purpose, batch))
    if cache is None or cache.max_len < min_len or cache.k.dtype != dtype or cache.k.device != torch.device(device):
        pool.pop((purpose, batch), None)  # free the old one before allocating the new one
        cache = pool[purpose, batch] = KVCache(cfg, batch, -(-min_len // CACHE_GRANULE) * CACHE_GRANULE, dtype,
                                               device)
    return cache


class LlamaAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, bias=None, kv=None, slots=None):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # [B, nh, L, hd]
        k = self.k_proj(x).view(B, L, self.n_kv, self.head_dim).transpose(1, 2)  # [B, nkv, L, hd]
        v = self.v_proj(x).view(B, L, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:  # write this step's keys into their cache slots, attend over the whole cache
            kv[0].index_copy_(2, slots, k)
            kv[1].index_copy_(2, slots, v)
            k, v = kv
        # no bias: causal without a cache; with a cache, every slot given is visible (the caller sliced it)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=bias is None and kv is None,
                                           enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, -1))


class LlamaMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.self_attn = LlamaAttention(cfg)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, bias=None, kv=None, slots=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, bias, kv, slots)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaDecoder(nn.Module):
    """Token embeddings, the blocks and the final norm: returns normed hidden states [B, L, H]."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.checkpointing = False  # activation checkpointing per block (train.py --activation-checkpointing)

    def forward(self, inputs_embeds, positions, bias=None, cache=None, slots=None):
        """inputs_embeds [B, L, H]; positions [B, L] (RoPE); bias from attention_bias(), or None = causal (no cache)
        or every cache slot visible (cache); cache + slots [L]: write keys/values at these slots, attend over them."""
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, inputs_embeds.dtype)
        h = inputs_embeds
        for i, layer in enumerate(self.layers):
            if self.checkpointing and self.training and cache is None:  # recompute activations in backward
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, bias, use_reentrant=False)
                continue
            kv = None if cache is None else (cache.k[i], cache.v[i])
            h = layer(h, cos, sin, bias, kv, slots)
        return self.norm(h)


class LlamaLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.model = LlamaDecoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)  # never tied in Janus


# -----------------------------------------------------------------------------------------------------------
# SigLIP ViT (understanding encoder) and the MLP aligners


class VitAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)  # rows [q; k; v], heads contiguous inside each
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


class VitMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact erf GELU: the tanh approximation breaks parity


class VitBlock(nn.Module):
    def __init__(self, dim, heads, mlp_hidden):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = VitAttention(dim, heads)
        self.mlp = VitMlp(dim, mlp_hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class AttentionPoolHead(nn.Module):
    """SigLIP's MAP pooling head: in every checkpoint, never used by Janus; kept so real weights load strictly."""

    def __init__(self, dim, mlp_hidden):
        super().__init__()
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = VitMlp(dim, mlp_hidden)


class SigLIPViT(nn.Module):
    """pixels [B, 3, S, S] in [-1, 1] -> patch tokens [B, (S/p)^2, width], raster order, final LayerNorm applied."""

    def __init__(self, cfg):
        super().__init__()
        w, n = cfg.vit_width, (cfg.vit_image_size // cfg.vit_patch_size) ** 2
        mlp_hidden = int(w * cfg.vit_mlp_ratio)
        self.pos_embed = nn.Parameter(torch.zeros(1, n, w))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, w, cfg.vit_patch_size, cfg.vit_patch_size)
        self.blocks = nn.ModuleList(VitBlock(w, cfg.vit_heads, mlp_hidden) for _ in range(cfg.vit_layers))
        self.norm = nn.LayerNorm(w, eps=1e-6)
        self.attn_pool = AttentionPoolHead(w, mlp_hidden)

    def forward(self, pixels):
        x = self.patch_embed.proj(pixels).flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class MlpProjector(nn.Module):
    """Linear -> (GELU -> Linear) x (depth - 1), in nn.Sequential so the names are layers.0, layers.2, ..."""

    def __init__(self, in_dim, out_dim, depth):
        super().__init__()
        layers = [nn.Linear(in_dim, out_dim)]
        for _ in range(1, depth):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


class GenHead(nn.Module):
    """LLM hidden state -> logits over the image codebook: vision_head(GELU(output_mlp_projector(h)))."""

    def __init__(self, hidden, vocab):
        super().__init__()
        self.output_mlp_projector = nn.Linear(hidden, hidden)
        self.vision_head = nn.Linear(hidden, vocab)

    def forward(self, h):
        return self.vision_head(F.gelu(self.output_mlp_projector(h)))


# -----------------------------------------------------------------------------------------------------------
# VQ-16 image tokenizer (LlamaGen): conv encoder/decoder around an L2-normalised codebook


def group_norm(channels):
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


def swish(x):
    return x * torch.sigmoid(x)  # written out as upstream: F.silu differs in the last bit for ~23% of elements


class ResnetBlock(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))  # dropout is 0 in every released tokenizer
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with 1x1 convolutions as projections."""

    def __init__(self, c):
        super().__init__()
        self.norm = group_norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(B, C, H * W).transpose(1, 2)  # [B, HW, C]
        k, v = self.k(h).reshape(B, C, H * W), self.v(h).reshape(B, C, H * W)
        w = torch.softmax(torch.bmm(q, k) * C ** -0.5, dim=2)  # product first, then scale (taming order)
        return x + self.proj_out(torch.bmm(v, w.transpose(1, 2)).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric zero pad: right and bottom only


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        # the official code interpolates in fp32 then casts to bf16 whatever came in; for fp32 and bf16 inputs
        # that equals casting back to the input dtype, which also keeps fp16 working
        return self.conv(F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(x.dtype))


def conv_level(c_in, c_out, n_res, with_attn, res_name="res"):
    """One resolution level: n_res residual blocks (the first maps c_in -> c_out), an attention after each if any.
    The residual list is `res` in LlamaGen's VQ and `block` in MAGVIT-v2."""
    level = nn.Module()
    level.res_name = res_name
    setattr(level, res_name, nn.ModuleList(ResnetBlock(c_in if j == 0 else c_out, c_out) for j in range(n_res)))
    level.attn = nn.ModuleList(AttnBlock(c_out) for _ in range(n_res if with_attn else 0))
    return level


def run_level(level, h):
    for j, res in enumerate(getattr(level, level.res_name)):
        h = res(h)
        if len(level.attn):
            h = level.attn[j](h)
    return h


class VQEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch, mult = cfg.vq_ch, cfg.vq_ch_mult
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        c_in = ch
        for l, m in enumerate(mult):  # attention only at the last (lowest-resolution) level
            level = conv_level(c_in, ch * m, cfg.vq_num_res_blocks, l == len(mult) - 1)
            if l < len(mult) - 1:
                level.downsample = Downsample(ch * m)
            self.conv_blocks.append(level)
            c_in = ch * m
        self.mid = nn.ModuleList([ResnetBlock(c_in, c_in), AttnBlock(c_in), ResnetBlock(c_in, c_in)])
        self.norm_out = group_norm(c_in)
        self.conv_out = nn.Conv2d(c_in, cfg.vq_z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(swish(self.norm_out(h)))


class VQDecoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch, mult = cfg.vq_ch, cfg.vq_ch_mult
        c_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.vq_z_channels, c_in, 3, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(c_in, c_in), AttnBlock(c_in), ResnetBlock(c_in, c_in)])
        self.conv_blocks = nn.ModuleList()
        for k, m in enumerate(reversed(mult)):  # k = 0 is the lowest resolution; one more res block than encoder
            level = conv_level(c_in, ch * m, cfg.vq_num_res_blocks + 1, k == 0)
            if k < len(mult) - 1:
                level.upsample = Upsample(ch * m)
            self.conv_blocks.append(level)
            c_in = ch * m
        self.norm_out = group_norm(c_in)
        self.conv_out = nn.Conv2d(c_in, 3, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class VQQuantizer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.l2_norm = cfg.vq_l2_norm
        self.embedding = nn.Embedding(cfg.vq_codebook_size, cfg.vq_embed_dim)
        if cfg.vq_show_usage:  # training statistics only; present in real checkpoints
            self.register_buffer("codebook_used", torch.zeros(65536))

    def codebook(self):
        w = self.embedding.weight
        return F.normalize(w, p=2, dim=-1) if self.l2_norm else w  # eps 1e-12, in the model dtype


class VQModel(nn.Module):
    """codes [B, g*g] <-> pixels [B, 3, 16g, 16g] in [-1, 1]; codes are raster order (t -> row t//g, col t%g)."""

    def __init__(self, cfg):
        super().__init__()
        self.encoder = VQEncoder(cfg)
        self.decoder = VQDecoder(cfg)
        self.quantize = VQQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.vq_z_channels, cfg.vq_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.vq_embed_dim, cfg.vq_z_channels, 1)

    def decode_code(self, codes):
        B, T = codes.shape
        g = math.isqrt(T)
        z = self.quantize.codebook()[codes].view(B, g, g, -1).permute(0, 3, 1, 2)  # [B, D, g, g]
        return self.decoder(self.post_quant_conv(z))

    def encode(self, pixels):
        """pixels -> (codes [B, g*g], quantised latent [B, D, g, g] with a straight-through gradient)."""
        z = self.quant_conv(self.encoder(pixels)).permute(0, 2, 3, 1)  # [B, g, g, D]
        E = self.quantize.codebook()
        if self.quantize.l2_norm:  # the official encode normalises z as well (transformers' port does not)
            z = F.normalize(z, p=2, dim=-1)
        flat = z.reshape(-1, z.shape[-1])
        dist = flat.pow(2).sum(1, keepdim=True) + E.pow(2).sum(1) - 2 * flat @ E.t()
        codes = dist.argmin(1)
        z_q = z + (E[codes].view(z.shape) - z).detach()
        return codes.view(z.shape[0], -1), z_q.permute(0, 3, 1, 2)


def import_named(spec):
    """"module:attr" -> that attribute, imported by name (a module beside this file, or installed). Nothing from a
    checkpoint folder is executed: a config can only name code that this Python already has."""
    import importlib
    module_name, sep, attr = spec.partition(":")
    if not (sep and module_name and attr):
        raise ValueError(f"{spec!r}: expected module:name")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load {spec!r}: {e}") from e


def image_tokenizer(cfg):
    """The generation-side image tokenizer: VQ-16, or the class a config names as "module:Class" (built as
    Class(**gen_vision_params); it provides decode_code(codes [B, T]) -> pixels [B, 3, S, S] in [-1, 1] and no
    trained weights). The toy world's fixed colour palette is one (toy.py)."""
    if ":" not in cfg.gen_vision_cls:
        return VQModel(cfg)
    return import_named(cfg.gen_vision_cls)(**cfg.gen_vision_params)


# -----------------------------------------------------------------------------------------------------------
# Janus: the unified model


# present in real checkpoints, never used: loading accepts them present or absent
JANUS_UNUSED = ("vision_model.vision_tower.attn_pool.", "gen_vision_model.quantize.codebook_used")


class Janus(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden_size
        self.vision_model = nn.Module()
        self.vision_model.vision_tower = SigLIPViT(cfg)
        self.aligner = MlpProjector(cfg.vit_width, H, cfg.aligner_depth)
        self.gen_vision_model = image_tokenizer(cfg)
        self.gen_aligner = MlpProjector(cfg.gen_embed_dim, H, cfg.gen_aligner_depth)
        self.gen_head = GenHead(H, cfg.gen_vocab_size)
        self.gen_embed = nn.Embedding(cfg.gen_vocab_size, cfg.gen_embed_dim)
        self.language_model = LlamaLM(cfg)

    # understanding side
    def image_features(self, pixels):
        """pixels [B, 3, S, S] -> LLM input rows [B, (S/p)^2, H]."""
        return self.aligner(self.vision_model.vision_tower(pixels))

    def embed_tokens(self, ids):
        return self.language_model.model.embed_tokens(ids)

    # generation side
    def gen_embeds(self, codes):
        """image codes [B, T] -> LLM input rows [B, T, H] (gen_embed is its own table, not the VQ codebook)."""
        return self.gen_aligner(self.gen_embed(codes))

    def decode_codes(self, codes):
        return self.gen_vision_model.decode_code(codes)

    def forward(self, inputs_embeds, positions=None, bias=None, cache=None, slots=None):
        """-> normed hidden states [B, L, H]; apply text_logits() or image_logits() to them."""
        if positions is None:
            positions = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).expand(inputs_embeds.shape[:2])
        return self.language_model.model(inputs_embeds, positions, bias, cache, slots)

    def text_logits(self, hidden):
        return self.language_model.lm_head(hidden)

    def image_logits(self, hidden):
        return self.gen_head(hidden)

    @property
    def blocks(self):
        """The transformer blocks (FSDP shards each one, activation checkpointing wraps each one)."""
        return self.language_model.model.layers

    @property
    def checkpointing(self):
        return self.language_model.model.checkpointing

    @checkpointing.setter
    def checkpointing(self, on):  # the decoder's forward reads it
        self.language_model.model.checkpointing = on

    @classmethod
    def from_pretrained(cls, ckpt_dir, device=None, dtype=None, roles=None):
        """Load an original (deepseek-ai) or transformers-converted (deepseek-community) checkpoint folder."""
        cfg, sd = read_janus_checkpoint(ckpt_dir, roles)
        model = build_on_meta(cls, cfg)
        optional = [k for k in model.state_dict() if k.startswith(JANUS_UNUSED)]
        return load_strict(model, sd, optional, dtype, device, where=ckpt_dir).eval()


# The chat roles are not in any file of the released checkpoints (janus.md 4.1): Janus-1.3B's code says "User",
# Janus-Pro's "<|User|>". train.py writes ROLES_FILE into every checkpoint folder it saves, so a trained model
# keeps its template wherever the folder goes.
JANUS_ROLES = {"janus-pro": ("<|User|>", "<|Assistant|>"), "janus-1.3b": ("User", "Assistant")}
ROLES_FILE = "janus_roles.json"


def janus_roles(ckpt_dir, roles=None):
    """(user, assistant) role strings: `roles` ("janus-pro" | "janus-1.3b") if given, else the folder's
    janus_roles.json, else - as a last resort, with a warning - a guess from the path ("1.3b" in it: Janus-1.3B)."""
    if roles is not None:
        if roles not in JANUS_ROLES:
            raise ValueError(f"roles must be one of {sorted(JANUS_ROLES)}, not {roles!r}")
        return JANUS_ROLES[roles]
    path = os.path.join(ckpt_dir, ROLES_FILE)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                d = json.load(f)
            user, assistant = d["user_role"], d["assistant_role"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: expected {{\"user_role\": str, \"assistant_role\": str}} ({e!r})") from e
        if not (isinstance(user, str) and isinstance(assistant, str)):
            raise ValueError(f"{path}: user_role and assistant_role must be strings")
        return user, assistant
    guess = "janus-1.3b" if "1.3b" in os.path.abspath(ckpt_dir).lower() else "janus-pro"
    print(f"warning: {ckpt_dir} has no {ROLES_FILE}; chat roles guessed from the path: {guess} "
          f"{JANUS_ROLES[guess]} (pass roles= / --roles to choose)", file=sys.stderr)
    return JANUS_ROLES[guess]


def write_janus_roles(ckpt_dir, cfg):
    with open(os.path.join(ckpt_dir, ROLES_FILE), "w") as f:
        json.dump(dict(user_role=cfg.user_role, assistant_role=cfg.assistant_role), f)


def read_janus_checkpoint(ckpt_dir, roles=None):
    """-> (JanusConfig, state dict in the original layout) of a checkpoint folder. roles: see janus_roles."""
    cfg_path = os.path.join(ckpt_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no config.json in {ckpt_dir}: not a Janus checkpoint folder")
    cfg = JanusConfig.from_json(read_json(cfg_path), cfg_path)
    user, assistant = janus_roles(ckpt_dir, roles)
    cfg = replace(cfg, user_role=user, assistant_role=assistant)
    sd = read_checkpoint(ckpt_dir)
    if any(k.startswith("model.") for k in sd):
        sd = janus_hf_to_original(sd)
    return cfg, sd


# transformers layout -> original layout, applied in order (janus.md section 7, reversed)
JANUS_HF_RENAMES = [
    (r"^model\.vision_model\.embeddings\.patch_embedding\.", "vision_model.vision_tower.patch_embed.proj."),
    (r"^model\.vision_model\.embeddings\.position_embedding\.weight$", "vision_model.vision_tower.pos_embed"),
    (r"^model\.vision_model\.encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"vision_model.vision_tower.blocks.\1.norm\2."),
    (r"^model\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection_layer\.", r"vision_model.vision_tower.blocks.\1.attn.proj."),
    (r"^model\.vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"vision_model.vision_tower.blocks.\1.mlp."),
    (r"^model\.vision_model\.post_layernorm\.", "vision_model.vision_tower.norm."),
    (r"^model\.(aligner|generation_aligner)\.fc1\.", r"\1.layers.0."),
    (r"^model\.generation_head\.proj_out\.", "gen_head.output_mlp_projector."),
    (r"^model\.generation_head\.vision_head\.", "gen_head.vision_head."),
    (r"^model\.generation_embeddings\.", "gen_embed."),
    (r"^model\.vqmodel\.", "gen_vision_model."),
    (r"\.(encoder\.down|decoder\.up)\.(\d+)\.block\.", lambda m: f".{m[1].split('.')[0]}.conv_blocks.{m[2]}.res."),
    (r"\.(encoder\.down|decoder\.up)\.(\d+)\.", lambda m: f".{m[1].split('.')[0]}.conv_blocks.{m[2]}."),
    (r"\.mid\.block_1\.", ".mid.0."), (r"\.mid\.attn_1\.", ".mid.1."), (r"\.mid\.block_2\.", ".mid.2."),
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
]


def janus_hf_to_original(sd):
    """Map a transformers-layout Janus state dict onto the original names (re-fusing the ViT q/k/v)."""
    out, qkv = {}, {}
    for name, t in sd.items():
        m = re.match(r"^model\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", name)
        if m:
            qkv.setdefault((m[1], m[3]), {})[m[2]] = t
            continue
        new = re.sub(r"^model\.(aligner|generation_aligner)\.hidden_layers\.(\d+)\.",
                     lambda m: f"{m[1]}.layers.{2 * int(m[2]) + 2}.", name)
        for pattern, repl in JANUS_HF_RENAMES:
            new = re.sub(pattern, repl, new)
        new = new.replace("generation_aligner.", "gen_aligner.")
        out[new] = t[None] if new == "vision_model.vision_tower.pos_embed" else t
    for (layer, kind), parts in qkv.items():
        name = f"vision_model.vision_tower.blocks.{layer}.attn.qkv.{kind}"
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{name}: the HF checkpoint holds only {sorted(parts)} of q/k/v")
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# -----------------------------------------------------------------------------------------------------------
# Janus tokenizer, prompt templates and image preprocessing (VLChatProcessor semantics)

JANUS_SYSTEM_PROMPT = ("You are a helpful language and vision assistant. You are able to understand the visual "
                       "content that the user provides, and assist the user with a variety of tasks using natural language.")
# special strings; the bars in BOS/EOS/pad are FULLWIDTH (U+FF5C) and the underscores are U+2581
JANUS_SPECIALS = dict(bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>", pad="<｜▁pad▁｜>",
                      image_start="<begin_of_image>", image_end="<end_of_image>", image="<image_placeholder>")


class JanusProcessor:
    """Text <-> ids, the `deepseek` chat template, and pixels in the exact official preprocessing."""

    def __init__(self, ckpt_dir, cfg):
        path = os.path.join(ckpt_dir, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer.json in {ckpt_dir}")
        self.tokenizer = read_tokenizer(path)
        missing = [s for s in JANUS_SPECIALS.values() if self.tokenizer.token_to_id(s) is None]
        if missing:
            raise ValueError(f"{path} lacks the special tokens {missing} that Janus needs")
        self.ids = {k: self.tokenizer.token_to_id(s) for k, s in JANUS_SPECIALS.items()}  # resolved by string
        self.cfg = cfg
        pre_path, proc_path = (os.path.join(ckpt_dir, f) for f in ("preprocessor_config.json", "processor_config.json"))
        pre = read_json(pre_path) if os.path.isfile(pre_path) else {}
        check_types(pre_path, "", pre, dict(image_size=1, min_size=1, background_color=(1,), image_mean=(0.5,),
                                            image_std=(0.5,), do_normalize=True))
        proc = read_json(proc_path) if os.path.isfile(proc_path) else {}
        check_types(proc_path, "", proc, dict(system_prompt=""))
        # real checkpoints always use the built-in system prompt; a toy checkpoint may ship a shorter one
        self.system_prompt = proc.get("system_prompt", JANUS_SYSTEM_PROMPT)
        self.image_size = pre.get("image_size", cfg.vit_image_size)
        self.min_size = pre.get("min_size", 14)
        self.background = tuple(pre.get("background_color", (127, 127, 127)))
        self.mean = pre.get("image_mean", (0.5, 0.5, 0.5)) if pre.get("do_normalize", True) else None
        self.std = pre.get("image_std", (0.5, 0.5, 0.5))

    def to(self, device):
        """The processor holds no tensors (Show-o's does: .to moves its MAGVIT-v2)."""
        return self

    def write_files(self, out):
        """What a checkpoint folder needs beyond its weights and the source's json files: the chat roles."""
        write_janus_roles(out, self.cfg)

    def encode(self, text):
        """BOS + tokens; BOS added here exactly once (the tokenizer's post-processor is bypassed)."""
        return [self.ids["bos"]] + self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids):
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def chat(self, messages, system=""):
        """The `deepseek` template. messages: [(role, content)]; an empty content opens that role's turn."""
        out = system + "\n\n" if system else ""
        for i, (role, content) in enumerate(messages):
            content = content.strip()
            out += f"{role}: {content}" + ("\n\n" if i % 2 == 0 else JANUS_SPECIALS["eos"]) if content else f"{role}:"
        return out.strip()

    def t2i_prompt_ids(self, prompt):
        """'<|User|>: prompt\\n\\n<|Assistant|>:<begin_of_image>' -> ids (BOS first, no EOS)."""
        text = self.chat([(self.cfg.user_role, prompt), (self.cfg.assistant_role, "")]) + JANUS_SPECIALS["image_start"]
        return self.encode(text)

    def question_text(self, question, n_images=1):
        """A single-turn understanding prompt about n images, with the processor's system prompt."""
        user = "".join(JANUS_SPECIALS["image"] for _ in range(n_images)) + "\n" + question
        return self.chat([(self.cfg.user_role, user), (self.cfg.assistant_role, "")], self.system_prompt)

    def expand_images(self, ids):
        """Each <image_placeholder> -> <begin_of_image> + N x <image_placeholder> + <end_of_image>."""
        out = []
        for t in ids:
            if t == self.ids["image"]:
                out += [self.ids["image_start"]] + [self.ids["image"]] * self.cfg.num_und_tokens + [self.ids["image_end"]]
            else:
                out.append(t)
        return out

    def preprocess(self, image):
        """PIL image -> [3, S, S] float32: aspect-preserving bicubic resize, grey pad to square, (x/255-m)/s."""
        image = image.convert("RGB")
        w, h, S = image.width, image.height, self.image_size
        m = max(w, h)
        # int() truncation and this exact expression order, as the official processor (rounding differs)
        size_hw = (max(int(h / m * S), self.min_size), max(int(w / m * S), self.min_size))
        image = image.resize((size_hw[1], size_hw[0]), Image.BICUBIC)
        w, h = image.size
        if w != h:
            canvas = Image.new("RGB", (max(w, h),) * 2, self.background)
            canvas.paste(image, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
            image = canvas
        x = (np.asarray(image).astype(np.float64) * (1 / 255)).astype(np.float32)  # rescale in float64, as HF
        if self.mean is not None:
            x = (x - np.array(self.mean, np.float32)) / np.array(self.std, np.float32)
        return torch.from_numpy(x).permute(2, 0, 1).contiguous()

    def understanding_batch(self, texts, images):
        """Left-padded batch. texts: chat strings with <image_placeholder>s; images: one list of PIL per text.

        -> input_ids [B, L], attention_mask [B, L], images_seq_mask [B, L], pixel_values [B, n, 3, S, S],
           images_emb_mask [B, n, N]
        """
        pixels = [torch.stack([self.preprocess(im) for im in ims]) if ims else None for ims in images]
        return self.batch_from_ids([self.expand_images(self.encode(t)) for t in texts], pixels)

    def batch_from_ids(self, seqs, pixels):
        """As understanding_batch, from expanded id lists and per-row pixel tensors [n_i, 3, S, S] (or None)."""
        B, L, N = len(seqs), max(map(len, seqs)), self.cfg.num_und_tokens
        n = max(1, max(0 if p is None else len(p) for p in pixels))
        input_ids = torch.full((B, L), self.ids["pad"], dtype=torch.long)
        attention_mask = torch.zeros(B, L, dtype=torch.long)
        pixel_values = torch.zeros(B, n, 3, self.image_size, self.image_size)
        images_emb_mask = torch.zeros(B, n, N, dtype=torch.bool)
        for i, (seq, pix) in enumerate(zip(seqs, pixels)):
            input_ids[i, L - len(seq):] = torch.tensor(seq)
            attention_mask[i, L - len(seq):] = 1
            if pix is not None:
                pixel_values[i, :len(pix)] = pix
                images_emb_mask[i, :len(pix)] = True
        images_seq_mask = input_ids == self.ids["image"]
        return dict(input_ids=input_ids, attention_mask=attention_mask, images_seq_mask=images_seq_mask,
                    pixel_values=pixel_values, images_emb_mask=images_emb_mask)


def janus_inputs_embeds(model, input_ids, images_seq_mask, pixel_values, images_emb_mask, detach_image=False):
    """Token embeddings with the image features written over the placeholder rows, in row-major order."""
    B, n = pixel_values.shape[:2]
    dtype = model.language_model.model.embed_tokens.weight.dtype
    feats = model.image_features(pixel_values.flatten(0, 1).to(dtype))  # [B*n, N, H]
    if detach_image:  # the answer policy is over text: no gradient into the ViT and aligner
        feats = feats.detach()
    feats = feats.view(B, n * feats.shape[1], -1)[images_emb_mask.flatten(1)]
    embeds = model.embed_tokens(input_ids.clamp(min=0))  # negative ids (ignore markers) read row 0, as upstream
    return embeds.masked_scatter(images_seq_mask[..., None], feats.to(embeds.dtype))  # out of place: autograd-safe


def to_uint8(pixels):
    """[B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8: clip((x+1)/2*255) in fp32, then TRUNCATE (not round)."""
    x = ((pixels.detach().float().permute(0, 2, 3, 1) + 1) / 2 * 255).clamp(0, 255)
    return x.to(torch.uint8)


def load_janus(ckpt_dir, device=None, dtype=None, roles=None):
    """-> (model, processor) from one checkpoint folder."""
    model = Janus.from_pretrained(ckpt_dir, device=device, dtype=dtype, roles=roles)
    return model, JanusProcessor(ckpt_dir, model.cfg)


# ===========================================================================================================
# Show-o (showlab, v1): one Phi-1.5 decoder over a joint vocabulary
#     [ text (phi-1.5 BPE) | [PAD] + 9 task/boundary tokens | image codes 0..K-1 at image_offset | mask ]
# understanding = next-token prediction over text after a bidirectionally-read image;
# generation    = MaskGIT: predict every masked image token at once, keep the confident ones, repeat.
# Everything below follows showlab/Show-o @ 45a5a2d bit for bit on CPU/fp32 (spec: shared/spec/showo.md).

WEIGHT_NAMES = ("model", "pytorch_model", "diffusion_pytorch_model")  # file stems Show-o/MAGVIT repos use
SHOWO_SPECIALS = ("<|soi|>", "<|eoi|>", "<|sov|>", "<|eov|>", "<|t2i|>", "<|mmu|>", "<|t2v|>", "<|v2v|>", "<|lvg|>")
IGNORE_ID = -100
BLOCKED = float(torch.iinfo(torch.int64).min)  # the mask builders fill with int64-min (-9.22e18), not -inf
PHI_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "partial_rotary_factor", "rope_theta", "max_position_embeddings", "layer_norm_eps")


@dataclass
class ShowOConfig:
    """Show-o's diffusers-style config.json plus the Phi-1.5 sizes the official code fetches from the hub.

    Released config.json files carry only the vocabulary fields; the Phi sizes then default to Phi-1.5's. Test
    fixtures add an explicit `llm_config`, which is honoured. `max_seq_length` (the text budget; the text block is
    one longer) lives in the run YAML officially: 128 in every demo, 64 in UniRL's eval.
    """
    vocab_size: int = 58498            # llm_vocab_size + num_new_special_tokens + codebook_size + 1 (mask)
    llm_vocab_size: int = 50295        # len(phi-1.5 tokenizer)
    num_new_special_tokens: int = 10   # [PAD] + SHOWO_SPECIALS
    codebook_size: int = 8192
    num_vq_tokens: int = 256           # 16x16 at 256 px, 32x32 = 1024 at 512 px
    max_seq_length: int = 128
    w_clip_vit: bool = False
    clip_hidden_size: int = 1024       # CLIP ViT-L/14-336 width, the mm_projector's input
    # Phi-1.5
    hidden_size: int = 2048
    intermediate_size: int = 8192
    num_hidden_layers: int = 24
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    partial_rotary_factor: float = 0.5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5

    @property
    def head_dim(self): return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self): return int(self.partial_rotary_factor * self.head_dim)

    @property
    def image_offset(self): return self.llm_vocab_size + self.num_new_special_tokens  # vocab id of code 0

    @property
    def mask_token_id(self): return self.vocab_size - 1  # the official constructor forces this, whatever the file says

    @property
    def n_kv_heads(self): return self.num_key_value_heads  # (KVCache reads these three)

    @classmethod
    def from_json(cls, path):
        raw = read_json(path)
        defaults = {f.name: f.default for f in fields(cls)}
        known = set(defaults) - set(PHI_FIELDS)
        check_types(path, "", raw, {k: defaults[k] for k in known})
        # unknown keys (_class_name, load_from_showo, ...) are ignored; null means the default
        kw = {k: v for k, v in raw.items() if k in known and v is not None}
        llm = raw.get("llm_config") or {}
        check_types(path, "llm_config.", llm, {k: defaults[k] for k in PHI_FIELDS})
        if llm.get("rope_scaling") or llm.get("hidden_act", "gelu_new") != "gelu_new" or llm.get("tie_word_embeddings"):
            raise ValueError(f"{path}: llm_config asks for rope_scaling/hidden_act/tied embeddings Show-o never uses")
        kw.update({k: llm[k] for k in PHI_FIELDS if llm.get(k) is not None})
        return cls(**kw)


# -----------------------------------------------------------------------------------------------------------
# The Phi-1.5 backbone as Show-o runs it: parallel block, qk-LayerNorm, partial RoPE, gelu_new


def gelu_new(x):
    """GPT-2's tanh GELU, written as HF's NewGELU (the library's tanh-GELU differs in the last bits)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


_rotary_tables = {}


def rotary_cos_sin(cfg, seq_len, device="cpu", dtype=torch.float32):
    """cos/sin tables [L, rotary_dim] for positions 0..L-1 (padding included: positions are not pad-aware).

    Built exactly like Phi's cache (on CPU, fp32, max_position_embeddings rows, then sliced): another device,
    dtype or length changes the last bits. Kept in a plain dict, not a buffer, because a module built on the meta
    device cannot hold tensors the checkpoint does not carry.
    """
    n = max(seq_len, cfg.max_position_embeddings)
    key = (cfg.rotary_dim, cfg.rope_theta, n, str(device), dtype)
    if key not in _rotary_tables:
        dim = cfg.rotary_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        freqs = torch.outer(torch.arange(n, dtype=torch.int64).type_as(inv_freq), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # [n, rotary_dim]
        _rotary_tables[key] = (emb.cos().to(device, dtype), emb.sin().to(device, dtype))
    cos, sin = _rotary_tables[key]
    return cos[:seq_len], sin[:seq_len]


def apply_partial_rope(x, cos, sin):
    """Rotate the first rotary_dim dims of each head (half-rotation form); the rest pass through. x [B, H, L, hd]."""
    r = cos.shape[-1]
    x_rot, x_pass = x[..., :r], x[..., r:]
    rotated = torch.cat((-x_rot[..., r // 2:], x_rot[..., :r // 2]), dim=-1)
    return torch.cat((x_rot * cos + rotated * sin, x_pass), dim=-1)


class PhiAttention(nn.Module):
    """softmax(q k^T / sqrt(hd) + mask) v with q = RoPE(LN(W_q h)), k = RoPE(LN(W_k h)); LN over each head vector."""

    def __init__(self, cfg):
        super().__init__()
        D, hd = cfg.hidden_size, cfg.head_dim
        self.head_dim = hd
        self.q_proj = nn.Linear(D, cfg.num_attention_heads * hd)
        self.k_proj = nn.Linear(D, cfg.num_key_value_heads * hd)
        self.v_proj = nn.Linear(D, cfg.num_key_value_heads * hd)
        self.dense = nn.Linear(cfg.num_attention_heads * hd, D)
        self.q_layernorm = nn.LayerNorm(hd, eps=cfg.layer_norm_eps)  # Show-o forces qk_layernorm on
        self.k_layernorm = nn.LayerNorm(hd, eps=cfg.layer_norm_eps)

    def forward(self, h, cos, sin, mask, kv=None, slots=None):
        B, L, _ = h.shape
        q = self.q_proj(h).view(B, L, -1, self.head_dim).transpose(1, 2)  # [B, H, L, hd]
        k = self.k_proj(h).view(B, L, -1, self.head_dim).transpose(1, 2)  # [B, Hkv, L, hd]
        v = self.v_proj(h).view(B, L, -1, self.head_dim).transpose(1, 2)
        q, k = self.q_layernorm(q), self.k_layernorm(k)  # before RoPE, as in Show-o's phi.py
        q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
        if kv is not None:  # static KV cache: write this call's keys at their slots, attend over the whole cache
            kv[0].index_copy_(2, slots, k)
            kv[1].index_copy_(2, slots, v)
            k, v = kv
        if k.shape[1] != q.shape[1]:  # GQA (unused by Phi-1.5: 32/32 heads)
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and L > 1)
        return self.dense(a.transpose(1, 2).reshape(B, L, -1))


class PhiMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(gelu_new(self.fc1(x)))


class PhiBlock(nn.Module):
    """Parallel block: x' = (Attn(LN(x)) + MLP(LN(x))) + x, one LayerNorm, summed in exactly this order."""

    def __init__(self, cfg):
        super().__init__()
        self.self_attn = PhiAttention(cfg)
        self.mlp = PhiMLP(cfg)
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x, cos, sin, mask, kv=None, slots=None):
        h = self.input_layernorm(x)
        return self.self_attn(h, cos, sin, mask, kv, slots) + self.mlp(h) + x


class ShowO(nn.Module):
    """Show-o: logits = lm_head(LN(Phi(embed(ids)))) in fp32 over the joint vocabulary.

    The attention mask is the additive [B, 1, L, L] (or [L, L]) float mask of the builders below, passed unchanged
    to every layer; with none, attention is causal. Tensor names follow the checkpoint: showo.model.*,
    showo.lm_head.*, and mm_projector.* for show-o-w-clip-vit.
    """

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        D, V = cfg.hidden_size, cfg.vocab_size
        phi = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(V, D),
            layers=nn.ModuleList(PhiBlock(cfg) for _ in range(cfg.num_hidden_layers)),
            final_layernorm=nn.LayerNorm(D, eps=cfg.layer_norm_eps)))
        self.showo = nn.ModuleDict(dict(model=phi, lm_head=nn.Linear(D, V)))  # untied, with bias
        self.checkpointing = False  # activation checkpointing per block (train.py --activation-checkpointing)
        if cfg.w_clip_vit:  # CLIP penultimate-layer features [B, 576, 1024] -> LLM embeddings
            self.mm_projector = nn.Sequential(nn.Linear(cfg.clip_hidden_size, D), nn.GELU(), nn.Linear(D, D))

    def forward(self, input_ids=None, attention_mask=None, input_embeddings=None, cache=None, slots=None):
        """-> fp32 logits [B, L, V] over the joint vocabulary."""
        return self.showo.lm_head(self.hidden_states(input_ids, attention_mask, input_embeddings, cache, slots)).float()

    def hidden_states(self, input_ids=None, attention_mask=None, input_embeddings=None, cache=None, slots=None):
        """Final-LayerNorm hidden states [B, L, D]. With a KVCache, `slots` [L] are the positions (and cache
        slots) of these L tokens and attention_mask covers the whole cache ([B, 1, L, S])."""
        phi = self.showo.model
        x = phi.embed_tokens(input_ids) if input_embeddings is None else input_embeddings  # [B, L, D]
        if slots is None:
            cos, sin = rotary_cos_sin(self.config, x.shape[1], x.device, x.dtype)
        else:
            cos, sin = (t[slots] for t in rotary_cos_sin(self.config, int(slots.max()) + 1, x.device, x.dtype))
        if attention_mask is not None:  # SDPA wants the mask in the compute dtype (-9e18 / -3e38 become -inf in bf16)
            attention_mask = attention_mask.to(x.device, x.dtype)
        for i, layer in enumerate(phi.layers):
            if self.checkpointing and self.training and cache is None:  # recompute activations in backward
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, attention_mask, use_reentrant=False)
                continue
            kv = None if cache is None else (cache.k[i], cache.v[i])
            x = layer(x, cos, sin, attention_mask, kv, slots)
        return phi.final_layernorm(x)

    def image_logits(self, hidden):
        """Logits over the codebook columns only (what MaskGIT samples from): [.., K] in fp32. Skipping the text
        columns saves ~85% of the head at 512 px."""
        c = self.config
        head = self.showo.lm_head
        cols = slice(c.image_offset, c.image_offset + c.codebook_size)
        return F.linear(hidden, head.weight[cols], head.bias[cols]).float()

    @property
    def blocks(self):
        """The transformer blocks (FSDP shards each one, activation checkpointing wraps each one)."""
        return self.showo.model.layers

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None):
        """A Show-o folder: config.json + model/pytorch_model .safetensors/.bin (or a sharded index)."""
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise CheckpointError(f"{path}: no config.json")
        cfg = ShowOConfig.from_json(os.path.join(path, "config.json"))
        sd = read_checkpoint(path, names=WEIGHT_NAMES)
        return load_strict(build_on_meta(cls, cfg), sd, dtype=dtype, device=device, where=path).eval()


# -----------------------------------------------------------------------------------------------------------
# Tokenizer, prompts and attention masks (training/prompting_utils.py)


class ShowOTokenizer:
    """phi-1.5's byte-level BPE plus Show-o's [PAD] and nine task/boundary tokens.

    Real phi-1.5 files lack the ten additions; they are appended here in the official order ([PAD] first, so
    pad = len(phi tokenizer)), which is a no-op for files that already hold them. Every id is looked up by string.
    sot = bos and eot = eos are both <|endoftext|> for phi. The tokenizer adds no bos by itself.
    """

    def __init__(self, path):
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        folder = os.path.dirname(file)
        self.tok = read_tokenizer(file)
        additions = ["[PAD]", *SHOWO_SPECIALS]
        held = [t for t in additions if self.tok.token_to_id(t) is not None]
        if held and len(held) < len(additions):  # appending the rest would shift ids the model was trained with
            raise ValueError(f"{file}: holds {len(held)} of Show-o's {len(additions)} added tokens; missing "
                             f"{[t for t in additions if t not in held]} (a file holds all of them or none)")
        self.tok.add_special_tokens([AddedToken("[PAD]", special=True, normalized=False)])
        self.tok.add_tokens(list(SHOWO_SPECIALS))
        names = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>")  # phi-1.5's, when no map says otherwise
        for extra in (os.path.join(folder, f) for f in ("tokenizer_config.json", "special_tokens_map.json")):
            found = read_json(extra) if os.path.isfile(extra) else {}
            for k in names:
                value = found.get(k)
                text = value.get("content") if isinstance(value, dict) else value  # also AddedToken's {"content": s}
                if value and not isinstance(text, str):
                    raise ValueError(f"{extra}: {k} must be a string or {{\"content\": string}}, not {value!r}")
                if value:
                    names[k] = text

        def lookup(token, role):
            i = self.tok.token_to_id(token)
            if i is None:
                raise ValueError(f"{file}: tokenizer has no {token!r} ({role}); Show-o needs it")
            return i

        self.bos_id, self.eos_id = lookup(names["bos_token"], "bos"), lookup(names["eos_token"], "eos")
        self.pad_id = lookup("[PAD]", "pad")
        self.special_ids = {t: lookup(t, "Show-o special") for t in SHOWO_SPECIALS}
        self.special_ids.update({"<|pad|>": self.pad_id, "<|sot|>": self.bos_id, "<|eot|>": self.eos_id})
        self.image_offset = len(self)  # image code c has vocabulary id image_offset + c

    def __len__(self):
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text):
        return self.tok.encode(text).ids

    def decode(self, ids):
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def _with_bos(tok, ids):
    """Show-o's text normalisation: [] -> [bos]; bos prepended unless already first."""
    return [tok.bos_id] if not ids else ids if ids[0] == tok.bos_id else [tok.bos_id] + ids


def _t2i_text_block(tok, ids, text_len):
    """[<|t2i|>] ids [eos], left-padded with [PAD] to text_len, or cut to text_len-1 ids plus eos."""
    block = [tok.special_ids["<|t2i|>"]] + ids + [tok.eos_id]
    if len(block) <= text_len:
        return [tok.pad_id] * (text_len - len(block)) + block
    return block[:text_len - 1] + [tok.eos_id]


def _around_image(tok, text_rows, image_ids):
    """text [B, P] + [<|soi|>] + image_ids [B, N] + [<|eoi|>] -> [B, P + N + 2]."""
    text = torch.tensor(text_rows, dtype=torch.long, device=image_ids.device)
    soi = text.new_full((len(text_rows), 1), tok.special_ids["<|soi|>"])
    eoi = text.new_full((len(text_rows), 1), tok.special_ids["<|eoi|>"])
    return torch.cat([text, soi, image_ids, eoi], dim=1)


def t2i_prompt(tok, texts, image_ids, max_seq_length):
    """Generation rows [PAD..][<|t2i|>][bos] text [eos][<|soi|>] image [<|eoi|>], text block P = max_seq_length + 1.

    image_ids [B, N] are vocabulary ids: all mask_token_id to generate. The empty text gives the unconditional row.
    """
    rows = [_t2i_text_block(tok, _with_bos(tok, tok.encode(t)), max_seq_length + 1) for t in texts]
    return _around_image(tok, rows, image_ids)


def t2i_train_prompt(tok, texts, image_ids, image_labels, max_seq_length, cond_dropout_prob=0.1, uniforms=None):
    """Training rows and labels: as t2i_prompt, with classifier-free-guidance dropout of the text.

    A rand(B) is drawn on every call, even at p = 0, as the official code does (it shifts the RNG stream), unless
    the B uniforms are given (train.py draws them per prompt group, so a run does not depend on its rank layout).
    Labels are the row itself with [PAD] -> -100, so <|soi|> and <|eoi|> are their own targets.
    """
    dropped = (torch.rand(len(texts)) if uniforms is None else uniforms.cpu()) < cond_dropout_prob
    rows = [_t2i_text_block(tok, [tok.bos_id] if drop else _with_bos(tok, tok.encode(t)), max_seq_length + 1)
            for t, drop in zip(texts, dropped)]
    ids, labels = _around_image(tok, rows, image_ids), _around_image(tok, rows, image_labels)
    return ids, torch.where(labels == tok.pad_id, IGNORE_ID, labels)


def mmu_prompt(tok, image_codes, question):
    """Understanding rows [<|mmu|>, <|soi|>] codes [<|eoi|>, <|sot|>] "USER: \\n{q} ASSISTANT:" (inference_mmu.py).

    image_codes [B, N] are MAGVIT codes (offset added here). The question is tokenised raw: the explicit <|sot|>
    already plays bos.
    """
    B = image_codes.shape[0]
    before = torch.tensor([tok.special_ids["<|mmu|>"], tok.special_ids["<|soi|>"]], device=image_codes.device)
    after = torch.tensor([tok.special_ids["<|eoi|>"], tok.special_ids["<|sot|>"]]
                         + tok.encode("USER: \n" + question + " ASSISTANT:"), device=image_codes.device)
    return torch.cat([before.expand(B, -1), image_codes + tok.image_offset, after.expand(B, -1)], dim=1)


def _additive(allowed):
    """bool "may attend" -> additive float32 mask: 0 where allowed, int64-min elsewhere (bit-exact to official)."""
    return torch.zeros(allowed.shape, device=allowed.device).masked_fill(~allowed, BLOCKED)


def omni_attention_mask(ids, pad_id, soi_id, eoi_id, rm_pad_in_image=False):
    """Show-o's omni-attention mask [B, 1, L, L] (create_attention_mask_predict_next).

    Text rows are causal; rows of the image span <|soi|> .. <|eoi|> see every column (the text prefix and the whole
    image, bidirectionally). With rm_pad_in_image (t2i training and generation), rows after the last [PAD] p
    cannot see columns 0..p and image rows cannot see [PAD] columns. One <|soi|> per row is assumed.
    """
    B, L = ids.shape
    is_pad = ids == pad_id
    is_soi, is_eoi = ids == soi_id, ids == eoi_id
    in_image = (is_soi.cumsum(1) > is_eoi.cumsum(1)) | is_soi | is_eoi  # [B, L]
    pos = torch.arange(L, device=ids.device)
    allowed = (pos[None, :, None] >= pos[None, None, :]).expand(B, L, L)  # causal [B, L(row), L(col)]
    image_rows_see = torch.ones(B, 1, L, dtype=torch.bool, device=ids.device)
    if rm_pad_in_image:
        last_pad = torch.where(is_pad.any(1), L - 1 - is_pad.flip(1).int().argmax(1), -1)[:, None, None]  # [B, 1, 1]
        allowed = allowed & ~((pos[None, :, None] > last_pad) & (pos[None, None, :] <= last_pad))
        image_rows_see = ~is_pad[:, None, :]
    allowed = torch.where(in_image[:, :, None], image_rows_see, allowed)
    return _additive(allowed)[:, None]


def mmu_attention_mask(ids, eoi_id):
    """[B, 1, L, L]: causal, plus columns 0..e (e = <|eoi|> of row 0, used for all rows) visible to every row."""
    B, L = ids.shape
    allowed = torch.ones(L, L, dtype=torch.bool, device=ids.device).tril()
    allowed[:, :int((ids[0] == eoi_id).nonzero()[0, 0]) + 1] = True
    return _additive(allowed).expand(B, 1, L, L).clone()


# ===========================================================================================================
# MAGVIT-v2 (showlab/magvitv2): a taming-style conv encoder/decoder with a look-up-free quantiser.
# pixels [B, 3, H, W] in [-1, 1] -> latent [B, bits, H/f, W/f] -> sign bits -> code = sum_c 2^(bits-1-c) [z_c > 0]
# f = 2^(levels-1). Fully convolutional apart from one global attention per mid block, so the same weights serve
# 256 px (16x16 codes) and 512 px (32x32).


@dataclass
class VQGANCoderConfig:
    """Constructor arguments of the official VQGANEncoder/VQGANDecoder (defaults: the encoder's)."""
    ch: int = 128
    ch_mult: tuple = (1, 2, 2, 4, 4)
    num_res_blocks: tuple = (4, 3, 4, 3, 4)
    z_channels: int = 13            # = LFQ bits: 2^13 = 8192 codes
    attn_resolutions: tuple = (5,)  # never reached at the real sizes: no attention in the down/up paths
    resolution: int = 256           # only decides where attn_resolutions would apply
    in_ch: int = 3
    out_ch: int = 3


@dataclass
class MagvitConfig:
    """The real magvitv2 config.json names no sizes (MAGVITv2() hard-codes them); test fixtures spell them out."""
    encoder: VQGANCoderConfig = field(default_factory=VQGANCoderConfig)
    decoder: VQGANCoderConfig = field(default_factory=lambda: VQGANCoderConfig(
        ch_mult=(1, 1, 2, 2, 4), num_res_blocks=(4, 4, 3, 4, 3)))

    @property
    def bits(self): return self.encoder.z_channels

    @classmethod
    def from_json(cls, path):
        raw = read_json(path)
        coder_defaults = {f.name: f.default for f in fields(VQGANCoderConfig)}
        for part in ("encoder", "decoder"):
            check_types(path, part + ".", raw.get(part, {}), coder_defaults)
        check_types(path, "quantizer.", raw.get("quantizer", {}), dict(codebook_dim=1, codebook_size=1))
        known = set(coder_defaults)
        coder = lambda d, default: replace(default, **{k: tuple(v) if isinstance(v, list) else v
                                                       for k, v in d.items() if k in known})
        default = cls()
        cfg = cls(coder(raw.get("encoder", {}), default.encoder), coder(raw.get("decoder", {}), default.decoder))
        bits = raw.get("quantizer", {}).get("codebook_dim", cfg.bits)
        if not cfg.decoder.z_channels == bits == cfg.bits or raw.get("encoder", {}).get("double_z"):
            raise ValueError(f"{path}: z_channels and LFQ codebook_dim must agree; double_z is unsupported")
        return cfg


class MidBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)

    def forward(self, h):
        return self.block_2(self.attn_1(self.block_1(h)))


class VQGANEncoder(nn.Module):
    """conv_in -> levels (downsample after all but the last) -> mid -> GN, swish, conv_out -> quant_conv (1x1)."""

    def __init__(self, c):
        super().__init__()
        self.conv_in = nn.Conv2d(c.in_ch, c.ch, 3, padding=1)
        in_mult, res = (1,) + tuple(c.ch_mult), c.resolution
        self.down = nn.ModuleList()
        for lvl, mult in enumerate(c.ch_mult):
            level = conv_level(c.ch * in_mult[lvl], c.ch * mult, c.num_res_blocks[lvl], res in c.attn_resolutions, "block")
            if lvl != len(c.ch_mult) - 1:
                level.downsample, res = Downsample(c.ch * mult), res // 2
            self.down.append(level)
        top = c.ch * c.ch_mult[-1]
        self.mid = MidBlock(top)
        self.norm_out = group_norm(top)
        self.conv_out = nn.Conv2d(top, c.z_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(c.z_channels, c.z_channels, 1)

    def forward(self, x):  # [B, 3, H, W] -> [B, z, H/f, W/f]
        h = self.conv_in(x)
        for level in self.down:
            h = run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.conv_out(swish(self.norm_out(self.mid(h))))
        return self.quant_conv(h)


class VQGANDecoder(nn.Module):
    """post_quant_conv (1x1) -> conv_in -> mid -> levels from coarsest to up.0 (upsample after all but level 0)
    -> GN, swish, conv_out. Stored with up.0 as the full-resolution level."""

    def __init__(self, c):
        super().__init__()
        n, cin = len(c.ch_mult), c.ch * c.ch_mult[-1]
        res = c.resolution // 2 ** (n - 1)
        self.conv_in = nn.Conv2d(c.z_channels, cin, 3, padding=1)
        self.mid = MidBlock(cin)
        up = []
        for lvl in reversed(range(n)):
            cout = c.ch * c.ch_mult[lvl]
            level = conv_level(cin, cout, c.num_res_blocks[lvl], res in c.attn_resolutions, "block")
            cin = cout
            if lvl != 0:
                level.upsample, res = Upsample(cin), res * 2
            up.insert(0, level)
        self.up = nn.ModuleList(up)
        self.norm_out = group_norm(cin)
        self.conv_out = nn.Conv2d(cin, c.out_ch, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(c.z_channels, c.z_channels, 1)

    def forward(self, z):  # [B, z, h, w] -> [B, 3, h*f, w*f]
        h = self.mid(self.conv_in(self.post_quant_conv(z)))
        for level in reversed(self.up):
            h = run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class LFQuantizer(nn.Module):
    """Look-up-free quantisation: z_q = +1 where z > 0 else -1 per channel (straight-through);
    index = sum_c power_vals[c] [z_q[c] > 0], channel 0 the most significant bit. Both buffers are in the checkpoint."""

    def __init__(self, bits):
        super().__init__()
        shifts = torch.arange(bits - 1, -1, -1)
        codes = torch.arange(2 ** bits)
        self.register_buffer("embedding", ((codes[:, None] >> shifts) & 1).float() * 2 - 1)  # [K, bits] of +-1
        self.register_buffer("power_vals", 2 ** shifts)  # [bits] int64: 2^(bits-1) .. 1

    def forward(self, z):  # [B, bits, h, w] -> same, values +-1
        z_q = torch.where(z > 0, torch.ones_like(z), -torch.ones_like(z))
        return z + (z_q - z).detach()

    def indices(self, z_q):  # [B, bits, h, w] -> [B, h*w] raster order (row * w + col)
        return ((z_q > 0).long() * self.power_vals[:, None, None]).sum(1).flatten(1)

    def get_codebook_entry(self, codes, shape=None):  # [B, n] -> [B, bits, h, w]; h = w = sqrt(n) unless given
        h, w = shape if shape is not None else (int(math.sqrt(codes.shape[-1])),) * 2
        return self.embedding[codes.reshape(-1)].view(codes.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()


class MagvitV2(nn.Module):
    """MAGVIT-v2 image tokenizer: encode(pixels) -> codes [B, h*w]; decode_code(codes) -> pixels in ~[-1, 1]."""

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.encoder = VQGANEncoder(cfg.encoder)
        self.decoder = VQGANDecoder(cfg.decoder)
        self.quantize = LFQuantizer(cfg.bits)

    def encode(self, pixels):
        return self.quantize.indices(self.quantize(self.encoder(pixels)))

    def decode_code(self, codes, shape=None):
        return self.decoder(self.quantize.get_codebook_entry(codes, shape))

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, config_name="config.json", weight_names=WEIGHT_NAMES):
        """A MAGVIT-v2 folder: a config json (the real one is sizeless, so defaults apply) and its weights."""
        config_file = os.path.join(path, config_name)
        cfg = MagvitConfig.from_json(config_file) if os.path.isfile(config_file) else MagvitConfig()
        sd = read_checkpoint(path, names=weight_names)
        return load_strict(build_on_meta(cls, cfg), sd, dtype=dtype, device=device, where=path).eval()


def showo_to_uint8(pixels):
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]: Show-o's order clamp((x+1)/2, 0, 1) * 255, then truncation."""
    x = torch.clamp((pixels.detach().float() + 1.0) / 2.0, min=0.0, max=1.0) * 255.0
    return x.permute(0, 2, 3, 1).to(torch.uint8)


# -----------------------------------------------------------------------------------------------------------
# Loading either family


class ShowOProcessor:
    """Show-o's text side (ShowOTokenizer) and image side (MAGVIT-v2), plus the text budget of t2i prompts."""

    def __init__(self, tok, vq, max_seq_length, vq_config=None):
        self.tok, self.vq, self.max_seq_length = tok, vq, max_seq_length
        self.vq_config = vq_config  # the MAGVIT-v2 config json it was loaded with (None: sizeless, defaults)

    def to(self, device):
        """Move MAGVIT-v2 (the processor's only tensors) to `device`."""
        self.vq.to(device)
        return self

    def write_files(self, out):
        """What a checkpoint folder needs beyond its weights and the source's json files: MAGVIT-v2, as
        magvit_config.json + magvit.safetensors, so that the folder loads on its own (also when it came from --vq)."""
        from safetensors.torch import save_file
        config = read_json(self.vq_config) if self.vq_config else {}
        with open(os.path.join(out, "magvit_config.json"), "w") as f:
            json.dump(config, f, indent=1)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.vq.state_dict().items()},
                  os.path.join(out, "magvit.safetensors"))

    @torch.no_grad()
    def decode_images(self, codes):
        """codes [B, N] -> uint8 [B, S, S, 3] (Show-o's post-processing)."""
        return showo_to_uint8(self.vq.decode_code(codes.clamp(0, 2 ** self.vq.config.bits - 1)))

    @torch.no_grad()
    def encode_image(self, image, num_tokens):
        """PIL image -> MAGVIT codes [1, num_tokens]: Show-o's image_transform (bicubic resize of the short side,
        centre crop, (x - 0.5) / 0.5). Written from the official transform; no fixture checks this step."""
        side = math.isqrt(num_tokens) * 2 ** (len(self.vq.config.encoder.ch_mult) - 1)
        image = image.convert("RGB")
        scale = side / min(image.size)
        image = image.resize((max(side, round(image.width * scale)), max(side, round(image.height * scale))),
                             Image.BICUBIC)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        x = torch.from_numpy(np.asarray(image).astype(np.float32) / 255).permute(2, 0, 1)[None]
        weight = next(self.vq.parameters())
        return self.vq.encode(((x - 0.5) / 0.5).to(weight.device, weight.dtype))


def load_showo(ckpt_dir, device=None, dtype=None, vq_dir=None, max_seq_length=None):
    """-> (ShowO, ShowOProcessor). MAGVIT-v2 comes from vq_dir, or from the same folder when it holds
    magvit.safetensors + magvit_config.json (the fixture layout); the real one is its own repo (showlab/magvitv2)."""
    model = ShowO.from_pretrained(ckpt_dir, device=device, dtype=dtype)
    if vq_dir is None and os.path.isfile(os.path.join(ckpt_dir, "magvit_config.json")):
        folder, config, names = ckpt_dir, "magvit_config.json", ("magvit",)
    elif vq_dir is not None:
        folder, config, names = vq_dir, "config.json", WEIGHT_NAMES
    else:
        raise FileNotFoundError(f"{ckpt_dir} holds no MAGVIT-v2 (magvit_config.json + magvit.safetensors); "
                                "pass the MAGVIT-v2 folder (showlab/magvitv2) as vq_dir / --vq")
    vq = MagvitV2.from_pretrained(folder, device=device, config_name=config, weight_names=names)
    config = os.path.join(folder, config)
    return model, ShowOProcessor(ShowOTokenizer(ckpt_dir), vq.eval(), max_seq_length or model.config.max_seq_length,
                                 config if os.path.isfile(config) else None)


def load_model(ckpt_dir, device=None, dtype=None, vq_dir=None, roles=None):
    """(model, processor) of a Janus or Show-o checkpoint folder, told apart by its config.json.
    roles (Janus only): "janus-pro" | "janus-1.3b" overrides the folder's janus_roles.json (see janus_roles)."""
    path = os.path.join(ckpt_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {ckpt_dir}: not a checkpoint folder")
    cfg = read_json(path)
    if cfg.get("model_type") in ("multi_modality", "janus"):
        return load_janus(ckpt_dir, device, dtype, roles)
    if roles is not None:
        raise ValueError(f"roles={roles!r} is for Janus checkpoints; {ckpt_dir} is not one")
    if "num_vq_tokens" in cfg or cfg.get("_class_name") == "Showo":
        return load_showo(ckpt_dir, device, dtype, vq_dir)
    raise ValueError(f"{path}: neither a Janus (model_type multi_modality/janus) nor a Show-o config")


# -----------------------------------------------------------------------------------------------------------
# CLI: rewrite any supported checkpoint folder as one model.safetensors in the original layout


def write_model_folder(out, state, src_dir, processor):
    """A folder that load_model reads on its own: out/model.safetensors from the state dict `state` (written to a
    temporary name, then renamed), src_dir's json files (config, tokenizer, ...) and the processor's own files
    (Janus' chat roles, Show-o's MAGVIT-v2)."""
    import shutil
    from safetensors.torch import save_file
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, "model.safetensors.tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(out, "model.safetensors"))
    for f in glob.glob(os.path.join(src_dir, "*.json")):
        if not f.endswith(".index.json"):
            shutil.copy(f, out)
    processor.write_files(out)


def convert_checkpoint(src, dst):
    """Read src (original or transformers layout; .bin, .safetensors, sharded) and write dst/model.safetensors
    plus every json/tokenizer file of src, after checking that the tensors load strictly into the model."""
    import shutil
    from safetensors.torch import save_file
    cfg, sd = read_janus_checkpoint(src)
    model = build_on_meta(Janus, cfg)  # validate names and shapes before anything is written
    load_strict(model, sd, [k for k in model.state_dict() if k.startswith(JANUS_UNUSED)], device="meta", where=src)
    os.makedirs(dst, exist_ok=True)
    tmp = os.path.join(dst, "model.safetensors.tmp")
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(dst, "model.safetensors"))  # atomic: a crash never leaves half a file
    for f in glob.glob(os.path.join(src, "*.json")) + glob.glob(os.path.join(src, "*.model")):
        if not f.endswith(".index.json"):
            shutil.copy(f, dst)
    write_janus_roles(dst, cfg)  # the roles read (or guessed) now travel with the converted folder
    return dst


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="Convert a Janus checkpoint folder (original or transformers layout, "
                                             ".bin or .safetensors, sharded or not) to one original-layout model.safetensors.")
    ap.add_argument("src")
    ap.add_argument("dst")
    args = ap.parse_args()
    print("wrote", convert_checkpoint(args.src, args.dst))
