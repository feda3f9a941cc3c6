"""
The unified models, in plain PyTorch, loading the real checkpoints exactly.

Janus / Janus-Pro (deepseek-ai): one LLaMA decoder reads two kinds of image input.
    understanding:  pixels -> SigLIP ViT -> MLP aligner -> LLM embeddings
    generation:     code c -> gen_aligner(gen_embed[c]) -> LLM -> gen_head(h) = logits over the VQ codebook
    VQ-16 (LlamaGen) turns codes back into pixels: x = Decoder(post_quant_conv(normalize(E)[codes])).

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
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# -----------------------------------------------------------------------------------------------------------
# Checkpoint reading and strict loading (shared by both model families)


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: the message names every offending file or tensor."""


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
    # not a real Janus tokenizer: the toy world's (toy.py) fixed palette, one code = one cell's colour
    "palette": dict(codebook_size=0, codebook_embed_dim=0, codebook_l2_norm=False, codebook_show_usage=False,
                    z_channels=0, ch=0, ch_mult=(), num_res_blocks=0, dropout_p=0.0, image_size=8, patch_size=1),
}


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
    palette: tuple = ()  # RGB rows: the image tokenizer is this fixed palette instead of VQ-16 (toy world only)
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
    def from_json(cls, cfg):
        """Parse an original `multi_modality` config.json dict (or a transformers `janus` one)."""
        if cfg.get("model_type") == "janus":
            return cls._from_hf_json(cfg)
        try:
            lang = cfg["language_config"]
            vis = cfg["vision_config"]["params"]
            gen_vis = cfg["gen_vision_config"]
            gen_head = cfg["gen_head_config"]["params"]
            aligner = cfg["aligner_config"]["params"]
            gen_aligner = cfg["gen_aligner_config"]["params"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"config.json is not a Janus multi_modality config: missing {e}") from e
        if vis.get("model_name", "siglip_large_patch16_384") not in SIGLIP_PRESETS:
            raise ValueError(f"unknown vision model_name {vis.get('model_name')!r}; known: {list(SIGLIP_PRESETS)}")
        siglip = {**SIGLIP_PRESETS[vis.get("model_name", "siglip_large_patch16_384")], **vis}
        if gen_vis.get("cls", "VQ-16") not in VQ_PRESETS:
            raise ValueError(f"unknown gen_vision cls {gen_vis.get('cls')!r}; known: {list(VQ_PRESETS)}")
        vq = {**VQ_PRESETS[gen_vis.get("cls", "VQ-16")], **gen_vis.get("params", {})}
        select_layer = vis.get("select_layer", -1)
        c = cls()
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings"):
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
            palette=tuple(tuple(rgb) for rgb in vq.get("palette", ())),
        )
        if gen_vis.get("cls") == "palette" and not c.palette:
            raise ValueError("config.json: a 'palette' gen_vision_config needs params.palette (RGB rows)")
        # the aligners and gen_head are sized by their own params; they must agree with the LLM and the ViT
        for name, got, want in (("aligner_config.n_embed", aligner.get("n_embed"), c.hidden_size),
                                ("aligner_config.input_dim", aligner.get("input_dim"), c.vit_width),
                                ("gen_aligner_config.n_embed", gen_aligner.get("n_embed"), c.hidden_size),
                                ("gen_aligner_config.input_dim", gen_aligner.get("input_dim"), c.gen_embed_dim),
                                ("gen_head_config.n_embed", gen_head.get("n_embed"), c.hidden_size),
                                ("gen_head_config.image_token_size", gen_head.get("image_token_size"), c.gen_vocab_size)):
            if got is not None and got != want:
                raise ValueError(f"config.json: {name} = {got}, but the model needs {want}")
        return c

    @classmethod
    def _from_hf_json(cls, cfg):
        # transformers' JanusConfig field names (inferred from transformers.models.janus; the spec lists only
        # the converter's correspondences): text_config = LlamaConfig, vision_config, vq_config.
        text, vis, vq = cfg.get("text_config", {}), cfg.get("vision_config", {}), cfg.get("vq_config", {})
        c = cls()
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings"):
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


def attention_bias(key_valid, query_slots, dtype):
    """Additive mask [B, 1, Lq, S]: query at cache slot q sees slots s <= q that hold a real (non-pad) key.

    A finite minimum, not -inf: a left-pad query sees no valid key, and -inf would turn its softmax into NaN.
    """
    S = key_valid.shape[1]
    causal = torch.arange(S, device=key_valid.device)[None, :] <= query_slots[:, None]  # [Lq, S]
    allowed = causal[None] & key_valid[:, None, :].bool()  # [B, Lq, S]
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)[:, None]


class KVCache:
    """Preallocated keys and values for every layer, [layers, B, kv_heads, max_len, head_dim].

    Static shapes let the decode step be compiled once and replayed as a CUDA graph; slots are written in place.
    """

    def __init__(self, cfg, batch, max_len, dtype, device):
        shape = (cfg.num_hidden_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)


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
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=bias is None,
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
        """inputs_embeds [B, L, H]; positions [B, L] (RoPE); bias from attention_bias() or None = causal;
        cache + slots [L]: write keys/values at these cache slots and attend over the cache."""
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


class ResnetBlock(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = group_norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # dropout is 0 in every released VQ
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class VQAttnBlock(nn.Module):
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


def conv_level(c_in, c_out, n_res, with_attn):
    level = nn.Module()
    level.res = nn.ModuleList(ResnetBlock(c_in if j == 0 else c_out, c_out) for j in range(n_res))
    level.attn = nn.ModuleList(VQAttnBlock(c_out) for _ in range(n_res if with_attn else 0))
    return level


def run_level(level, h):
    for j, res in enumerate(level.res):
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
        self.mid = nn.ModuleList([ResnetBlock(c_in, c_in), VQAttnBlock(c_in), ResnetBlock(c_in, c_in)])
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
        return self.conv_out(F.silu(self.norm_out(h)))


class VQDecoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch, mult = cfg.vq_ch, cfg.vq_ch_mult
        c_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.vq_z_channels, c_in, 3, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(c_in, c_in), VQAttnBlock(c_in), ResnetBlock(c_in, c_in)])
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
        return self.conv_out(F.silu(self.norm_out(h)))


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


class PaletteTokenizer(nn.Module):
    """The toy world's image tokenizer: code k = palette colour k, one code per patch x patch cell. No weights.

    decode: codes [B, g*g] -> pixels [B, 3, g*p, g*p] in [-1, 1];  encode: nearest palette colour of each cell.
    """

    def __init__(self, palette, patch):
        super().__init__()
        self.palette, self.patch = palette, patch

    def decode_code(self, codes):
        B, T = codes.shape
        g = math.isqrt(T)
        rgb = torch.tensor(self.palette, dtype=torch.float32, device=codes.device)
        # +0.5 centres each value in its uint8 bin, so to_uint8's truncation returns the palette colour exactly
        x = ((rgb[codes] + 0.5) / 127.5 - 1).view(B, g, g, 3).permute(0, 3, 1, 2)
        return x.repeat_interleave(self.patch, 2).repeat_interleave(self.patch, 3)

    def encode(self, pixels):
        cells = F.avg_pool2d(pixels.float(), self.patch)  # [B, 3, g, g]
        rgb = torch.tensor(self.palette, dtype=torch.float32, device=pixels.device) / 127.5 - 1
        dist = (cells.permute(0, 2, 3, 1)[..., None, :] - rgb).pow(2).sum(-1)  # [B, g, g, K]
        return dist.argmin(-1).flatten(1), None


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
        self.gen_vision_model = PaletteTokenizer(cfg.palette, cfg.gen_patch_size) if cfg.palette else VQModel(cfg)
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

    @classmethod
    def from_pretrained(cls, ckpt_dir, device=None, dtype=None):
        """Load an original (deepseek-ai) or transformers-converted (deepseek-community) checkpoint folder."""
        cfg, sd = read_janus_checkpoint(ckpt_dir)
        model = build_on_meta(cls, cfg)
        optional = [k for k in model.state_dict() if k.startswith(JANUS_UNUSED)]
        return load_strict(model, sd, optional, dtype, device, where=ckpt_dir).eval()


def read_janus_checkpoint(ckpt_dir):
    """-> (JanusConfig, state dict in the original layout) of a checkpoint folder."""
    cfg_path = os.path.join(ckpt_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"no config.json in {ckpt_dir}: not a Janus checkpoint folder")
    try:
        cfg = JanusConfig.from_json(json.load(open(cfg_path)))
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: malformed json ({e})") from e
    if "1.3b" in os.path.basename(os.path.normpath(ckpt_dir)).lower():
        cfg = replace(cfg, user_role="User", assistant_role="Assistant")  # Janus-1.3B's template roles
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
        from tokenizers import Tokenizer
        path = os.path.join(ckpt_dir, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer.json in {ckpt_dir}")
        self.tokenizer = Tokenizer.from_file(path)
        missing = [s for s in JANUS_SPECIALS.values() if self.tokenizer.token_to_id(s) is None]
        if missing:
            raise ValueError(f"{path} lacks the special tokens {missing} that Janus needs")
        self.ids = {k: self.tokenizer.token_to_id(s) for k, s in JANUS_SPECIALS.items()}  # resolved by string
        self.cfg = cfg
        pre = {}
        if os.path.isfile(os.path.join(ckpt_dir, "preprocessor_config.json")):
            pre = json.load(open(os.path.join(ckpt_dir, "preprocessor_config.json")))
        proc = {}
        if os.path.isfile(os.path.join(ckpt_dir, "processor_config.json")):
            proc = json.load(open(os.path.join(ckpt_dir, "processor_config.json")))
        # real checkpoints always use the built-in system prompt; a toy checkpoint may ship a shorter one
        self.system_prompt = proc.get("system_prompt", JANUS_SYSTEM_PROMPT)
        self.image_size = pre.get("image_size", cfg.vit_image_size)
        self.min_size = pre.get("min_size", 14)
        self.background = tuple(pre.get("background_color", (127, 127, 127)))
        self.mean = pre.get("image_mean", (0.5, 0.5, 0.5)) if pre.get("do_normalize", True) else None
        self.std = pre.get("image_std", (0.5, 0.5, 0.5))

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
        import numpy as np
        from PIL import Image
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


def load_janus(ckpt_dir, device=None, dtype=None):
    """-> (model, processor) from one checkpoint folder."""
    model = Janus.from_pretrained(ckpt_dir, device=device, dtype=dtype)
    return model, JanusProcessor(ckpt_dir, model.cfg)


# -----------------------------------------------------------------------------------------------------------
# CLI: rewrite any supported checkpoint folder as one model.safetensors in the original layout


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
    return dst


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="Convert a Janus checkpoint folder (original or transformers layout, "
                                             ".bin or .safetensors, sharded or not) to one original-layout model.safetensors.")
    ap.add_argument("src")
    ap.add_argument("dst")
    args = ap.parse_args()
    print("wrote", convert_checkpoint(args.src, args.dst))
