"""
Sampling speed: the official-style Janus loop against ours, and both against the memory roofline.

    plain  = the official generation_inference.py structure: interleaved cond/uncond rows, a KV cache grown by
             concatenation every step, no compile, torch.multinomial
    ours   = generate.janus_generate: static KV cache, [cond; uncond] halves, exponential race, and on CUDA the
             decode step compiled with CUDA graphs
    roofline per step = (weight bytes + KV bytes) / measured copy bandwidth   (spec/performance.md section 3)

Usage:
    python bench.py --cpu        # tiny random models, eager, < 2 minutes on 2 cores
    python bench.py              # GPU: Janus-Pro-1B/-7B (16 images x 576 tokens) and Show-o-512 (16 images x 16
                                 # steps) shapes, random bf16 weights

Show-o: plain = Showo.t2i_generate's structure (a full forward and full-vocabulary logits at every position, every
step); ours = generate.showo_maskgit (logits at image positions over codebook columns, text-block keys cached).
"""
import argparse
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

import generate
from model import JANUS_CONFIGS, Janus, ShowO, ShowOConfig, apply_rope, omni_attention_mask, rope_cos_sin


class FixedPrompt:
    """Stands in for the processor: every prompt is the same P random text ids (speed does not read them)."""

    def __init__(self, vocab, length, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.prompt = torch.randint(10, vocab, (length,), generator=g).tolist()
        self.ids = dict(pad=0)

    def t2i_prompt_ids(self, _):
        return self.prompt


def random_model(cls, cfg, device, dtype):
    """A model of this shape with random weights, without ever materialising them on the CPU."""
    with torch.device("meta"):
        m = cls(cfg)
    m = m.to_empty(device=device)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if "norm" in name else 0.0)
            else:
                p.normal_(0, 0.02)
        for b in m.buffers():
            b.zero_()
    return m.to(dtype).eval()


def layer_forward_growing_cache(layer, h, past, position0, theta):
    """One LLaMA block with a transformers-style dynamic cache: K/V concatenated every step."""
    attn = layer.self_attn
    B, L, _ = h.shape
    x = layer.input_layernorm(h)
    q = attn.q_proj(x).view(B, L, attn.n_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(B, L, attn.n_kv, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(B, L, attn.n_kv, attn.head_dim).transpose(1, 2)
    positions = torch.arange(position0, position0 + L, device=h.device).expand(B, L)
    cos, sin = rope_cos_sin(positions, attn.head_dim, theta, h.dtype)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if past is not None:
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=L > 1)
    h = h + attn.o_proj(y.transpose(1, 2).reshape(B, L, -1))
    return h + layer.mlp(layer.post_attention_layernorm(h)), (k, v)


@torch.no_grad()
def plain_generate(model, prompt, n_images, cfg_weight=5.0, temperature=1.0):
    """The official loop structure (generation_inference.py), kept deliberately plain."""
    T = model.cfg.gen_grid ** 2
    rows = torch.tensor(prompt, device=model.gen_embed.weight.device).repeat(2 * n_images, 1)
    rows[1::2, 1:-1] = 0  # interleaved unconditional rows: pad between BOS and <begin_of_image>
    h, past, position = model.embed_tokens(rows), [None] * len(model.language_model.model.layers), 0
    tokens = torch.zeros(n_images, T, dtype=torch.long, device=rows.device)
    for t in range(T):
        for i, layer in enumerate(model.language_model.model.layers):
            h, past[i] = layer_forward_growing_cache(layer, h, past[i], position, model.cfg.rope_theta)
        position += h.shape[1]
        logits = model.image_logits(model.language_model.model.norm(h[:, -1]))
        guided = logits[1::2] + cfg_weight * (logits[0::2] - logits[1::2])
        code = torch.multinomial(torch.softmax(guided / temperature, dim=-1), 1)[:, 0]
        tokens[:, t] = code
        h = model.gen_embeds(code.repeat_interleave(2))[:, None]
    return tokens


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    fn()  # warm-up: compile, allocator, CUDA-graph capture
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def copy_bandwidth(device):
    """Measured device copy bandwidth in bytes/s (read + write), the practical ceiling for decode."""
    n = 256 << 20  # far beyond any cache
    a, b = torch.empty(n, dtype=torch.uint8, device=device), torch.empty(n, dtype=torch.uint8, device=device)
    seconds = timed(lambda: b.copy_(a), device, 5)
    return 2 * n / seconds


def bytes_per_step(model, rows, prompt_len):
    """Weights read each decode step (LLM blocks + final norm + gen_head) and the static KV cache read."""
    cfg = model.cfg
    elem = model.gen_embed.weight.element_size()
    weights = sum(p.numel() for p in model.language_model.model.layers.parameters())
    weights += sum(p.numel() for p in model.gen_head.parameters()) + cfg.hidden_size
    kv = 2 * cfg.num_hidden_layers * rows * (prompt_len + cfg.gen_grid ** 2) * cfg.n_kv_heads * cfg.head_dim
    return weights * elem, kv * elem


def bench(name, cfg, device, dtype, n_images, prompt_len, repeats):
    model = random_model(Janus, cfg, device, dtype)
    proc = FixedPrompt(cfg.vocab_size, prompt_len)
    T = cfg.gen_grid ** 2
    plain = timed(lambda: plain_generate(model, proc.prompt, n_images), device, repeats)
    ours = timed(lambda: generate.janus_generate(model, proc, ["x"], n_images, decode=False), device, repeats)
    w, kv = bytes_per_step(model, 2 * n_images, prompt_len)
    roof = T * (w + kv) / BANDWIDTH
    print(f"{name:>14} | {n_images} images x {T} tokens | plain {plain:8.3f} s | ours {ours:8.3f} s | "
          f"speed-up {plain / ours:5.2f}x | roofline {roof:7.3f} s (ours at {roof / ours:4.0%}) | "
          f"{(w + kv) / 1e9:.2f} GB/step")
    del model
    return plain, ours, roof


# -----------------------------------------------------------------------------------------------------------
# Show-o: the official t2i_generate structure (full forward and full-vocabulary logits every step) against ours


def showo_rows(cfg, n_images, text_len, device):
    """[cond; uncond] t2i rows with arbitrary text ids: [PAD..][t2i][bos] text [eos][soi] mask x N [eoi]."""
    pad = cfg.llm_vocab_size  # [PAD] then <|soi|> <|eoi|> ... follow the text vocabulary
    soi, eoi, t2i = pad + 1, pad + 2, pad + 5
    g = torch.Generator().manual_seed(0)
    text = torch.randint(10, cfg.llm_vocab_size, (n_images, text_len - 4), generator=g)
    head = torch.tensor([[pad, t2i, 0]]).expand(n_images, -1)
    cond = torch.cat([head, text, torch.full((n_images, 1), 0)], 1)
    uncond = torch.cat([torch.full((n_images, text_len - 3), pad), torch.tensor([[t2i, 0, 0]]).expand(n_images, -1)], 1)
    image = torch.cat([torch.full((n_images, 1), soi), torch.full((n_images, cfg.num_vq_tokens), cfg.mask_token_id),
                       torch.full((n_images, 1), eoi)], 1)
    ids, uncond = torch.cat([cond, image], 1).to(device), torch.cat([uncond, image], 1).to(device)
    return ids, uncond, omni_attention_mask(torch.cat([ids, uncond]), pad, soi, eoi, rm_pad_in_image=True)


@torch.no_grad()
def plain_showo(model, ids, uncond, mask, steps, guidance=5.0):
    """Showo.t2i_generate's structure: every step a full forward with full-vocabulary logits at every position."""
    cfg = model.config
    N, M, V0 = cfg.num_vq_tokens, cfg.mask_token_id, cfg.image_offset
    P = ids.shape[1] - N - 2
    ids = ids.clone()
    for step in range(steps):
        logits = model(torch.cat([ids, torch.cat([uncond[:, :P], ids[:, P:]], 1)]), attention_mask=mask)
        cond, unc = logits.chunk(2)
        probs = ((1 + guidance) * cond - guidance * unc)[:, P + 1:P + 1 + N, V0:M].softmax(-1)
        sampled = torch.multinomial(probs.flatten(0, 1), 1).view(probs.shape[:-1])
        unknown = ids[:, P + 1:P + 1 + N] == M
        _, _, raw = generate.schedule_step(step, steps, N)
        conf = torch.where(unknown, probs.gather(-1, sampled[..., None])[..., 0], torch.finfo(probs.dtype).max)
        mask_len = torch.clamp(torch.min(unknown.sum(-1, keepdim=True) - 1, raw.to(ids.device)), min=1)
        remask = generate.mask_by_random_topk(mask_len, conf, 1.0 - (step + 1) / steps)
        ids[:, P + 1:P + 1 + N] = torch.where(remask, M, sampled + V0)
    return ids


def bench_showo(name, cfg, device, dtype, n_images, text_len, steps, repeats):
    model = random_model(ShowO, cfg, device, dtype)
    ids, uncond, mask = showo_rows(cfg, n_images, text_len, device)
    plain = timed(lambda: plain_showo(model, ids, uncond, mask, steps), device, repeats)
    ours = timed(lambda: generate.showo_maskgit(model, ids.clone(), uncond, mask, 5.0, 1.0, steps), device, repeats)
    L, N, B = ids.shape[1], cfg.num_vq_tokens, 2 * n_images
    flops = steps * (2 * sum(p.numel() for p in model.showo.model.layers.parameters()) * B * L
                     + 4 * cfg.num_hidden_layers * B * L * L * cfg.hidden_size)
    print(f"{name:>14} | {n_images} images x {steps} steps, {N} tokens | plain {plain:8.3f} s | ours {ours:8.3f} s | "
          f"speed-up {plain / ours:5.2f}x | {flops / ours / 1e12:.1f} TFLOP/s achieved by ours")
    del model
    return plain, ours


def main():
    global BANDWIDTH
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="tiny model on the CPU (eager)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    torch.manual_seed(0)
    BANDWIDTH = copy_bandwidth(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}, torch {torch.__version__}, measured copy bandwidth {BANDWIDTH / 1e9:.1f} GB/s", flush=True)
    if device.type == "cpu":
        tiny = replace(JANUS_CONFIGS["janus-pro-1b"], hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, vocab_size=1024, gen_vocab_size=1024, vq_codebook_size=1024,
                       gen_image_size=192, vit_layers=1, vit_width=64, vit_heads=1, vq_ch=32, vq_ch_mult=(1, 1),
                       vq_z_channels=32)
        bench("tiny (CPU)", tiny, device, torch.float32, 16, 32, args.repeats)
        tiny_showo = ShowOConfig(vocab_size=1000 + 10 + 512 + 1, llm_vocab_size=1000, codebook_size=512,
                                 num_vq_tokens=64, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=4)
        bench_showo("tiny (CPU)", tiny_showo, device, torch.float32, 16, 33, 8, args.repeats)
    else:
        for key in ("janus-pro-1b", "janus-pro-7b"):
            bench(key, JANUS_CONFIGS[key], device, torch.bfloat16, 16, 48, args.repeats)
        showo_512 = ShowOConfig(num_vq_tokens=1024)  # Phi-1.5 sizes, MAGVIT-v2 at 512 px
        bench_showo("show-o-512", showo_512, device, torch.bfloat16, 16, 129, 16, args.repeats)


if __name__ == "__main__":
    main()
