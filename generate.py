"""
Text-to-image sampling.

Janus: autoregressive over the VQ code grid with classifier-free guidance. Each image has a conditional row
(the prompt) and an unconditional row (the prompt with every token but BOS and <begin_of_image> replaced by pad);
at every step
    l = l_uncond + w * (l_cond - l_uncond),    code ~ softmax(l / temperature)
and the chosen code is fed to both rows as gen_aligner(gen_embed[code]). The sampler keeps a preallocated KV cache,
computes the text prefix once, and can return log pi(code_t | prefix) of every sampled code (GRPO needs them).

Show-o: MaskGIT. All N image tokens start masked; each of T steps predicts every masked token at once, samples
it, and re-masks the floor(N * cos(pi/2 * (s+1)/T)) least confident, with guidance (1 + g) l_cond - g l_uncond.

sample() is the one entry for both families. Beside each sampler lives its training twin, the log-probs of given
codes with grad: Janus teacher-forced (exact), Show-o the masked-token estimator or a replay of the recorded steps.

Usage:
    python generate.py --model DIR --prompt "a photo of two cats" --n 16 --cfg 5 --seed 0 --out out/
"""
import argparse
import math
import os

import torch
from tqdm import tqdm

from model import KVCache, attention_bias, load_model, reusable_cache, to_uint8


def left_pad(seqs, pad_id):
    """list of id lists -> ids [B, L] right-aligned, valid [B, L] (False on the left padding)."""
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    valid = torch.zeros(len(seqs), L, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, L - len(s):] = torch.tensor(s)
        valid[i, L - len(s):] = True
    return ids, valid


def unconditional_ids(ids, pad_id):
    """The official unconditional prompt: keep BOS and <begin_of_image>, every token between becomes pad.

    These pads are prompt *content* and are attended to; only extra left padding is masked.
    """
    return [ids[0]] + [pad_id] * (len(ids) - 2) + [ids[-1]]


def filter_logits(logits, top_k=0, top_p=1.0):
    """Optional top-k / nucleus truncation (off by default: the official sampler uses neither)."""
    if top_k:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        drop_sorted = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
    return logits


def pick_codes(logits, greedy=False, noise=None, generator=None):
    """One code per row from (already tempered and filtered) logits [B, K].

    greedy: argmax. noise [B, K] of Exp(1) draws: the exponential race argmax(p / E), an exact sample with no host
    sync and no torch.multinomial, so it can live inside a compiled CUDA graph. Otherwise one torch.multinomial
    call over the rows in image order, which reproduces the official sampler's RNG consumption.
    """
    if greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float(), dim=-1)
    if noise is not None:
        return (probs / noise).argmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def guided_step(model, hidden, cfg_weight, temperature, top_k, top_p, greedy, noise, generator=None):
    """Last hidden states of [cond; uncond] rows [2B, H] -> (codes [B], log-probs [B], guided logits [B, K])."""
    logits = model.image_logits(hidden)  # [2B, K]
    B = logits.shape[0] // 2
    guided = logits[B:] + cfg_weight * (logits[:B] - logits[B:])  # in the logits dtype, as the official loop
    policy = filter_logits(guided / temperature, top_k, top_p)
    codes = pick_codes(policy, greedy, noise, generator)
    logprobs = torch.log_softmax(policy.float(), -1).gather(1, codes[:, None])[:, 0]
    return codes, logprobs, guided


def decode_step(model, codes, positions, slot, key_valid, cache, cfg_weight, temperature, top_k, top_p, greedy,
                noise, generator=None):
    """Feed the codes of step t (both rows of each image), return step t+1's codes: the hot loop body.

    Every changing value (positions [2B, 1], cache slot [1], noise) is a tensor, so a compiled version of this
    function is traced once and replayed for all 575 steps.
    """
    x = model.gen_embeds(torch.cat([codes, codes]))[:, None]  # [2B, 1, H]
    bias = None if key_valid is None else attention_bias(key_valid, slot, x.dtype)  # None: every slot is visible
    hidden = model(x, positions, bias, cache, slot)[:, -1]
    return guided_step(model, hidden, cfg_weight, temperature, top_k, top_p, greedy, noise, generator)


_compiled_steps = {}


def compiled_decode_step(backend):
    """decode_step compiled once per backend: CUDA graphs ("reduce-overhead") on GPU; tests pass "eager" or a
    counting backend to check that tracing works without graph breaks or per-step recompiles."""
    if backend not in _compiled_steps:
        kw = dict(mode="reduce-overhead") if backend == "inductor" else dict(backend=backend)
        _compiled_steps[backend] = torch.compile(decode_step, fullgraph=True, **kw)
    return _compiled_steps[backend]


@torch.no_grad()
def janus_generate(model, processor, prompts, n_per_prompt=1, cfg_weight=5.0, temperature=1.0, top_k=0, top_p=1.0,
                   greedy=False, generator=None, sampler=None, compile=None, return_logprobs=False,
                   return_logits=False, decode=True, progress=False):
    """Sample n_per_prompt images for every prompt.

    Returns a dict: tokens [B, T] (B = len(prompts) * n_per_prompt, prompt-major), images [B, S, S, 3] uint8
    (if decode), logprobs [B, T] (log-prob of each sampled code under the guided, tempered, filtered policy),
    logits [B, T, K] guided logits (if return_logits).

    sampler="multinomial" reproduces the official sampler draw for draw (one torch.multinomial per step);
    sampler="race" is the exponential race (same distribution, different RNG use, no host sync).
    Default: "race" when compiled, "multinomial" when eager.
    compile: None = on for CUDA; True; False; or a torch.compile backend (e.g. "eager" in CPU tests).
    torch.multinomial cannot be captured in a graph, so sampler="multinomial" always decodes eagerly.
    """
    cfg, device = model.cfg, model.gen_embed.weight.device
    dtype = model.gen_embed.weight.dtype
    if compile is None:
        compile = device.type == "cuda"
    sampler = sampler or ("race" if compile else "multinomial")
    if sampler not in ("race", "multinomial"):
        raise ValueError(f"sampler must be 'race' or 'multinomial', not {sampler!r}")
    eager = not compile or (sampler == "multinomial" and not greedy)
    step = decode_step if eager else compiled_decode_step("inductor" if compile is True else compile)
    pad_id, T = processor.ids["pad"], cfg.gen_grid ** 2
    cond = [processor.t2i_prompt_ids(p) for p in prompts for _ in range(n_per_prompt)]
    B = len(cond)
    # rows [cond_0 .. cond_{B-1}; uncond_0 .. uncond_{B-1}]: the halves layout gives the same probabilities as
    # the official interleaved one, and lets the guidance be two slices
    ids, valid = left_pad(cond + [unconditional_ids(s, pad_id) for s in cond], pad_id)
    ids, valid = ids.to(device), valid.to(device)
    L = ids.shape[1]
    # one cache per model, reused across calls (and so across rollouts): a compiled step keeps its graph. Its S
    # slots may exceed L + T; the slots past L + T stay masked.
    cache = reusable_cache(model, "t2i", cfg, 2 * B, L + T, dtype, device)
    S = cache.max_len
    key_valid = torch.cat([valid, torch.ones(2 * B, T, dtype=torch.bool, device=device),
                           torch.zeros(2 * B, S - L - T, dtype=torch.bool, device=device)], dim=1)  # [2B, S]
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)  # [2B, L]; left pads get 0, they are masked anyway
    unpadded = bool(valid.all())
    if not eager and device.type == "cuda":  # in-place cache writes inside a CUDA graph need fixed addresses
        torch._dynamo.mark_static_address(cache.k)
        torch._dynamo.mark_static_address(cache.v)

    def exp_noise():  # drawn outside the graph so that `generator` seeds the race sampler too
        if greedy or sampler != "race":
            return None
        return torch.empty(B, cfg.gen_vocab_size, device=device).exponential_(generator=generator)

    # prefill runs eagerly: its shape differs from the one-token decode step, which would recompile
    slots = torch.arange(L, device=device)
    hidden = model(model.embed_tokens(ids), positions, attention_bias(key_valid, slots, dtype), cache, slots)[:, -1]
    codes, logprob, guided = guided_step(model, hidden, cfg_weight, temperature, top_k, top_p, greedy, exp_noise(),
                                         generator)
    tokens = torch.empty(B, T, dtype=torch.long, device=device)
    logprobs = torch.empty(B, T, dtype=torch.float32, device=device)
    all_logits = [guided] if return_logits else None
    tokens[:, 0], logprobs[:, 0] = codes, logprob
    next_pos = positions[:, -1:] + 1  # [2B, 1]
    for t in tqdm(range(1, T), disable=not progress, desc="image tokens", leave=False):
        slot = torch.full((1,), L + t - 1, device=device, dtype=torch.long)
        if eager:  # attend over the filled slots only (no mask at all without left padding); the compiled step
            # keeps one static shape and masks the unfilled slots
            codes, logprob, guided = step(model, codes, next_pos + t - 1, slot, None if unpadded else
                                          key_valid[:, :L + t], cache.prefix(L + t), cfg_weight, temperature, top_k,
                                          top_p, greedy, exp_noise(), generator)
        else:
            codes, logprob, guided = step(model, codes, next_pos + t - 1, slot, key_valid, cache, cfg_weight,
                                          temperature, top_k, top_p, greedy, exp_noise())
        codes = codes.clone()  # a CUDA-graph output is overwritten by the next replay
        tokens[:, t], logprobs[:, t] = codes, logprob
        if return_logits:
            all_logits.append(guided.clone())
    out = dict(tokens=tokens)
    if return_logprobs:
        out["logprobs"] = logprobs
    if return_logits:
        out["logits"] = torch.stack(all_logits, dim=1)
    if decode:
        out["images"] = to_uint8(model.decode_codes(tokens))
    return out


def janus_image_logits(model, processor, prompts, tokens, cfg_weight=5.0, mode="cond", uncond=None):
    """Teacher-forced next-code logits [B, T, K] for given image codes tokens [B, T], in one forward.

    The training-side twin of janus_generate: same prompt rows, left padding and positions, so the logits equal
    the ones the sampler saw. prompts: one string per row. mode "cond": the conditional row alone (one row per
    image); "cfg": both rows, guided u + w (c - u). uncond [B] bool (cond mode): rows that see the unconditional
    prompt instead (classifier-free-guidance dropout in SFT).
    """
    if mode not in ("cond", "cfg"):
        raise ValueError(f"mode must be 'cond' or 'cfg', not {mode!r}")
    device, pad_id = tokens.device, processor.ids["pad"]
    cond = [processor.t2i_prompt_ids(p) for p in prompts]
    if uncond is not None:
        cond = [unconditional_ids(s, pad_id) if drop else s for s, drop in zip(cond, uncond.tolist())]
    rows = cond + ([unconditional_ids(s, pad_id) for s in cond] if mode == "cfg" else [])
    ids, valid = left_pad(rows, pad_id)
    ids, valid = ids.to(device), valid.to(device)
    codes = tokens if mode == "cond" else torch.cat([tokens, tokens])
    B, T = tokens.shape
    L = ids.shape[1]
    embeds = torch.cat([model.embed_tokens(ids), model.gen_embeds(codes[:, :-1])], dim=1)  # [R, L+T-1, H]
    key_valid = torch.cat([valid, torch.ones(len(rows), T - 1, dtype=torch.bool, device=device)], dim=1)
    positions = (key_valid.long().cumsum(1) - 1).clamp(min=0)
    bias = None if bool(valid.all()) else attention_bias(key_valid, torch.arange(L + T - 1, device=device),
                                                         embeds.dtype)
    logits = model.image_logits(model(embeds, positions, bias)[:, L - 1:])  # [R, T, K]
    return logits[B:] + cfg_weight * (logits[:B] - logits[B:]) if mode == "cfg" else logits


def janus_image_logprobs(model, processor, prompts, tokens, cfg_weight=5.0, temperature=1.0, mode="cond",
                         uncond=None):
    """log pi(x_t | prompt, x_<t) [B, T] (float32) of given codes: log_softmax(logits / temperature) at x_t.

    mode "cfg" reproduces the sampler's log-probs exactly; "cond" is the cheaper conditional-only estimator
    (one row per image, off-policy with respect to a CFG sampler).
    """
    logits = janus_image_logits(model, processor, prompts, tokens, cfg_weight, mode, uncond)
    return torch.log_softmax(logits.float() / temperature, -1).gather(2, tokens[..., None])[..., 0]


# -----------------------------------------------------------------------------------------------------------
# Show-o: MaskGIT decoding. Every step predicts all masked image tokens at once, samples them, and re-masks
# the least confident floor(N * schedule((s+1)/T)); guidance is (1 + g) cond - g uncond.


def cosine_schedule(t):
    """Fraction of image tokens still masked at time t in [0, 1]: cos(t pi / 2). Stays float32 on purpose."""
    return torch.cos(t * math.pi * 0.5)


def sigmoid_schedule(t, start=-3, end=3, tau=1.0, clip_min=1e-6):
    v_start, v_end = torch.sigmoid(torch.tensor(start / tau)), torch.sigmoid(torch.tensor(end / tau))
    return torch.clip((v_end - torch.sigmoid((t * (end - start) + start) / tau)) / (v_end - v_start), clip_min, 1.0)


def get_mask_schedule(name):
    """"cosine" (every demo and UniRL), "linear", "powX" (e.g. "pow2") or "sigmoid", as models/sampling.py."""
    if name.startswith("pow"):
        return lambda t: (1.0 - t ** float(name[3:])).clamp(min=1e-6, max=1.0)
    return dict(cosine=cosine_schedule, sigmoid=sigmoid_schedule,
                linear=lambda t: (1 - t).clamp(min=1e-6, max=1.0))[name]


def schedule_step(step, timesteps, num_tokens, schedule=cosine_schedule):
    """(t, mask_ratio, raw mask length) of MaskGIT step `step`, all float32 as in t2i_generate.

    float32 matters: for N = 256, T = 18, step 11 the official floor gives 127 where float64 gives 128, and the
    last step gives cos(pi/2) = -4.4e-8, so the raw length is -1 (clamped to 1 later).
    """
    t = torch.tensor((step + 1) / timesteps)  # 0-d float32
    mask_ratio = schedule(t)
    return t, mask_ratio, (num_tokens * mask_ratio).floor()


def _log(t):
    return torch.log(t.clamp(min=1e-20))


def mask_by_random_topk(mask_len, probs, temperature, generator=None):
    """True for the mask_len [B, 1] least confident tokens, confidence = log p + temperature * Gumbel."""
    u = torch.zeros_like(probs).uniform_(0, 1, generator=generator)
    confidence = _log(probs) + temperature * -_log(-_log(u))
    cutoff = torch.gather(torch.sort(confidence, dim=-1).values, 1, mask_len.long())
    return confidence < cutoff


@torch.no_grad()
def showo_maskgit(model, input_ids, uncond_input_ids=None, attention_mask=None, guidance_scale=0.0, temperature=1.0,
                 timesteps=18, schedule=cosine_schedule, generator=None, record=None, return_logprobs=False,
                 progress=False, cache_prefix=True):
    """MaskGIT decoding of the N image tokens of t2i rows -> sampled codes [B, N] (0..K-1), as Showo.t2i_generate.

    Each step: logits over the codebook at image positions (CFG: (1+g) cond - g uncond from one batched forward;
    uncond rows = uncond text block + the current image state), sample every token from softmax (no temperature),
    keep known tokens, then re-mask the floor(N * schedule((s+1)/T)) least confident (log p + temperature * Gumbel,
    the temperature compounding as T0 prod(1 - ratio)). RNG per step: multinomial [B*N, K], then uniform [B, N].
    input_ids [B, L] is updated IN PLACE (as the official code does); clone it to keep it.
    record: optional list that receives one dict of intermediate values per step (tests; GRPO's trajectory replay).
    return_logprobs: also return log p(code) [B, N] of every token at the step it was committed.
    The head runs only at the N image positions and over the K codebook columns, which the official code slices
    out of the full [B, L, V] logits anyway. cache_prefix: the text block is causal and never sees the image, so
    its keys/values are computed once and only the <|soi|> image <|eoi|> span is re-run each step (same result up
    to float rounding; about 1/3 of the work at 256 px with a 128-token text budget).
    """
    cfg = model.config
    N, M, V0 = cfg.num_vq_tokens, cfg.mask_token_id, cfg.image_offset
    P = input_ids.shape[1] - N - 2  # text block length
    image = slice(P + 1, P + 1 + N)  # positions between <|soi|> and <|eoi|>
    current = input_ids[:, image].clone()
    current = torch.where(current == M, M, current - V0)  # [B, N] local codes, or M where unknown
    logprobs = torch.zeros(current.shape, device=input_ids.device)
    guided = uncond_input_ids is not None and guidance_scale > 0
    rows = torch.cat([input_ids, uncond_input_ids]) if guided else input_ids
    L = rows.shape[1]
    mask = attention_mask.expand(len(rows), 1, L, L)
    cache = None
    if cache_prefix:
        dtype = model.showo.model.embed_tokens.weight.dtype
        cache = KVCache(model.config, len(rows), L, dtype, rows.device)
        model.hidden_states(rows[:, :P], mask[:, :, :P], cache=cache, slots=torch.arange(P, device=rows.device))
    span = torch.arange(P, L, device=rows.device)  # <|soi|> image <|eoi|>
    for step in tqdm(range(timesteps), disable=not progress, desc="maskgit steps", leave=False):
        model_input = torch.cat([input_ids, torch.cat([uncond_input_ids[:, :P], input_ids[:, P:]], 1)]) if guided \
            else input_ids
        if cache_prefix:  # only the span is recomputed; it attends to the cached text keys
            hidden = model.hidden_states(model_input[:, P:], mask[:, :, P:], cache=cache, slots=span)[:, 1:1 + N]
        else:
            hidden = model.hidden_states(model_input, attention_mask=mask)[:, image]
        logits = model.image_logits(hidden)  # [B or 2B, N, K]
        if guided:
            cond_logits, uncond_logits = logits.chunk(2)
            logits = (1 + guidance_scale) * cond_logits - guidance_scale * uncond_logits  # MUSE form
        probs = logits.softmax(dim=-1)  # [B, N, K]
        sampled = torch.multinomial(probs.flatten(0, 1), 1, generator=generator).view(probs.shape[:-1])  # [B, N]
        unknown = current == M
        sampled = torch.where(unknown, sampled, current)
        t, mask_ratio, raw_len = schedule_step(step, timesteps, N, schedule)
        confidence = torch.gather(probs, -1, sampled[..., None]).squeeze(-1)
        confidence = torch.where(unknown, confidence, torch.finfo(confidence.dtype).max)  # never re-mask known tokens
        mask_len = raw_len.unsqueeze(0).to(logits.device)  # [1]
        # keep at least one new token this step, and mask at least one for the next
        mask_len = torch.max(torch.tensor([1], device=logits.device),
                             torch.min(unknown.sum(dim=-1, keepdim=True) - 1, mask_len))  # [B, 1] float
        temperature = temperature * (1.0 - (step + 1) / timesteps)  # compounds across steps (unlike MaskGIT)
        masking = mask_by_random_topk(mask_len, confidence, temperature, generator=generator)
        # tokens revealed at this step keep the log-prob they were drawn with; the returned codes are the last
        # step's draws, so there every still-unknown position counts as revealed
        revealed = unknown if step == timesteps - 1 else unknown & ~masking
        if return_logprobs:
            logprobs = torch.where(revealed, confidence.clamp(min=1e-30).log(), logprobs)
        if record is not None:
            record.append(dict(model_input_ids=model_input.clone(), schedule_t=t, mask_ratio=mask_ratio,
                               mask_len=mask_len, temperature=temperature, masking=masking, revealed=revealed))
        input_ids[:, image] = torch.where(masking, M, sampled + V0)
        current = torch.where(masking, M, sampled)
    return (sampled, logprobs) if return_logprobs else sampled


@torch.no_grad()
def showo_generate(model, processor, prompts, n_per_prompt=1, guidance_scale=5.0, timesteps=50, temperature=1.0,
                   generator=None, return_logprobs=False, decode=True, progress=False, return_trajectory=False):
    """Sample n_per_prompt images for every prompt with Show-o's MaskGIT (UniRL's eval: guidance 5, 50 steps).

    Returns dict(tokens [B, N] codes, images [B, S, S, 3] uint8 if decode, logprobs [B, N] if asked, trajectory:
    per step the model input ids ([cond; uncond] rows) and the positions revealed, for GRPO's trajectory replay).
    """
    from model import omni_attention_mask, t2i_prompt
    cfg, tok = model.config, processor.tok
    device = model.showo.lm_head.weight.device
    texts = [p for p in prompts for _ in range(n_per_prompt)]
    masked = torch.full((len(texts), cfg.num_vq_tokens), cfg.mask_token_id, dtype=torch.long, device=device)
    ids = t2i_prompt(tok, texts, masked, processor.max_seq_length)
    uncond = t2i_prompt(tok, [""] * len(texts), masked, processor.max_seq_length) if guidance_scale > 0 else None
    rows = ids if uncond is None else torch.cat([ids, uncond])
    mask = omni_attention_mask(rows, tok.pad_id, tok.special_ids["<|soi|>"], tok.special_ids["<|eoi|>"],
                               rm_pad_in_image=True)
    record = [] if return_trajectory else None
    out = showo_maskgit(model, ids, uncond, mask, guidance_scale, temperature, timesteps, generator=generator,
                        record=record, return_logprobs=return_logprobs, progress=progress)
    tokens, logprobs = out if return_logprobs else (out, None)
    result = dict(tokens=tokens)
    if return_trajectory:
        result["trajectory"] = [dict(input_ids=r["model_input_ids"], revealed=r["revealed"]) for r in record]
        result["attention_mask"] = mask
    if return_logprobs:
        result["logprobs"] = logprobs
    if decode:
        result["images"] = processor.decode_images(tokens)
    return result


def sample(model, processor, prompts, n_per_prompt=1, cfg_weight=None, temperature=1.0, generator=None,
           return_logprobs=False, decode=True, progress=False, steps=None, return_trajectory=False):
    """Either family through one call: Janus (autoregressive + CFG) or Show-o (MaskGIT). cfg_weight None = the
    family's default (Janus 5, Show-o 5); steps and return_trajectory: Show-o's MaskGIT only (Janus has none)."""
    if hasattr(model, "showo"):  # the family seam of generate.py
        return showo_generate(model, processor, prompts, n_per_prompt, 5.0 if cfg_weight is None else cfg_weight,
                              steps or 50, temperature, generator, return_logprobs, decode, progress,
                              return_trajectory)
    return janus_generate(model, processor, prompts, n_per_prompt, 5.0 if cfg_weight is None else cfg_weight,
                          temperature, generator=generator, return_logprobs=return_logprobs, decode=decode,
                          progress=progress)


# -----------------------------------------------------------------------------------------------------------
# Show-o image log-probs for GRPO. A masked diffusion model has no exact likelihood: the one-pass masked-token
# estimator, or a replay of the sampler's own steps (both [SPEC] choices, spec/method.md section 6.6).


def showo_masks_from_uniforms(t, u):
    """t [B], u [B, N] uniforms -> masks [B, N]: the round(N cos(pi t / 2)) >= 1 positions of smallest u."""
    k = (u.shape[1] * torch.cos(t * math.pi / 2)).round().clamp(min=1)
    return u.argsort(1) < k[:, None]


def draw_showo_masks(n_groups, group_size, num_tokens, generator=None):
    """Fresh masks: one ratio t ~ U(0, 1) per group (shared by its images), random positions per image."""
    device = generator.device if generator is not None else "cpu"
    t = torch.rand(n_groups, generator=generator, device=device)
    u = torch.rand(n_groups * group_size, num_tokens, generator=generator, device=device)
    return showo_masks_from_uniforms(t.repeat_interleave(group_size), u)


def showo_masked_logprobs(model, processor, prompts, tokens, masks):
    """log p(x_j | prompt, x with the masked positions hidden) at the masked positions j, over the codebook
    columns (as the sampler), one conditional forward. -> (logp [B, N], masks [B, N])."""
    from model import omni_attention_mask, t2i_prompt
    cfg, tok = model.config, processor.tok
    masks = masks.to(tokens.device)
    image = torch.where(masks, cfg.mask_token_id, tokens + cfg.image_offset)
    ids = t2i_prompt(tok, prompts, image, processor.max_seq_length)
    mask = omni_attention_mask(ids, tok.pad_id, tok.special_ids["<|soi|>"], tok.special_ids["<|eoi|>"],
                               rm_pad_in_image=True)
    P = ids.shape[1] - cfg.num_vq_tokens - 2
    logits = model.image_logits(model.hidden_states(ids, mask)[:, P + 1:P + 1 + cfg.num_vq_tokens])
    return torch.log_softmax(logits, -1).gather(2, tokens[..., None])[..., 0] * masks, masks


def showo_trajectory_logprobs(model, trajectory_ids, revealed, attention_mask, tokens, guidance_scale=5.0,
                              steps=None):
    """Replay recorded MaskGIT steps with grad: token j gets log p(x_j) under the guided codebook softmax of the
    step that revealed it ((1 + g) cond - g uncond, untempered, as the sampler). A per-token ratio, where Mask-GRPO
    keeps one per step. trajectory_ids: per step the input ids, rows [cond of all B; uncond of all B] (or cond
    only); revealed: per step [B, N]; steps: replay only these step indices (their tokens alone are covered).
    -> (logp [B, N], covered [B, N])."""
    N = model.config.num_vq_tokens
    B = tokens.shape[0]
    logp = torch.zeros(tokens.shape, device=tokens.device)
    covered = torch.zeros(tokens.shape, dtype=torch.bool, device=tokens.device)
    for s, (ids, step_revealed) in enumerate(zip(trajectory_ids, revealed)):
        if steps is not None and s not in steps:
            continue
        P = ids.shape[1] - N - 2
        logits = model.image_logits(model.hidden_states(ids, attention_mask)[:, P + 1:P + 1 + N])
        if ids.shape[0] == 2 * B:
            logits = (1 + guidance_scale) * logits[:B] - guidance_scale * logits[B:]
        step_lp = torch.log_softmax(logits, -1).gather(2, tokens[..., None])[..., 0]
        logp = torch.where(step_revealed, step_lp, logp)
        covered |= step_revealed
    return logp * covered, covered


def save_images(images, out_dir, grid_path=None):
    """uint8 [B, H, W, 3] -> out_dir/00000.png ... and a near-square grid (default out_dir/grid.png); returns the
    file paths. Images smaller than plot.MIN_SIDE (the toy world's 8 x 8) are upscaled, nearest neighbour."""
    from PIL import Image
    from plot import visible
    os.makedirs(out_dir, exist_ok=True)
    pictures = [visible(im) for im in images.cpu().numpy()]
    paths = []
    for i, picture in enumerate(pictures):
        paths.append(os.path.join(out_dir, f"{i:05d}.png"))
        picture.save(paths[-1])
    W, H = pictures[0].size
    cols = max(1, int(len(pictures) ** 0.5 + 0.5))
    grid = Image.new("RGB", (cols * W, -(-len(pictures) // cols) * H))
    for i, picture in enumerate(pictures):
        grid.paste(picture, ((i % cols) * W, (i // cols) * H))
    grid.save(grid_path or os.path.join(out_dir, "grid.png"))
    return paths


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint folder (Janus / Janus-Pro or Show-o)")
    ap.add_argument("--vq", help="Show-o only: the MAGVIT-v2 folder, if not inside --model")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--n", type=int, default=4, help="images to sample")
    ap.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance weight")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--steps", type=int, default=50, help="Show-o MaskGIT steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out/generate")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    if args.n < 1 or args.temperature <= 0 or args.steps < 1:
        ap.error("need --n >= 1, --temperature > 0, --steps >= 1")
    if not os.path.isdir(args.model):
        ap.error(f"--model {args.model!r} is not a folder")
    try:  # before sampling: an unwritable --out must not throw a whole generation away
        os.makedirs(args.out, exist_ok=True)
        assert os.access(args.out, os.W_OK)
    except (OSError, AssertionError):
        ap.error(f"--out {args.out!r} is not a writable folder")
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model, processor = load_model(args.model, device=args.device, dtype=dtype, vq_dir=args.vq)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    out = sample(model, processor, [args.prompt], args.n, args.cfg, args.temperature, generator, progress=True,
                 steps=args.steps)
    paths = save_images(out["images"], args.out)
    print(f"wrote {len(paths)} images and grid.png to {args.out}")


if __name__ == "__main__":
    main()
