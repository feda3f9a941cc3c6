"""
SFT on self-generated data: the model draws, judges its own drawings (rollout.py), and learns from what it judged
correct. This file holds the losses; sft_loss is its one entry for both families.

    L_T2I = -(1/N) sum_t log p(x_t | prompt, x_<t)           Janus: next-code NLL of the N image codes, under the
                                                              conditional row or the guided sampler (cfg_weight)
                                                              Show-o: its masked-token loss (official training)
    L_MMU = -(1/M) sum_t log p(a*_t | image, q, a*_<t)        answer-token cross-entropy (reference answer + EOS)
    L     = lambda_t2i L_T2I + lambda_mmu L_MMU

Non-end-to-end (default): images are discrete samples, no gradient crosses from understanding into generation.
T2I trains on the images whose self-check answer matched every slot; MMU trains on (image, question, reference
answer) for all images, or only the verified ones (mmu_filter="verified").

End-to-end: a straight-through Gumbel-softmax over the image-code logits z lets L_MMU reach generation:
    y_soft = softmax((z + g) / tau),  y = onehot(x) + y_soft - stopgrad(y_soft)
Janus understands pixels, so y goes through the VQ decoder and SigLIP: pixels = Dec(y @ normalize(E)), clamped to
[-1, 1] (our choice of route; the paper's is unpublished; cost: one VQ decode + ViT forward/backward per image on
top of the MMU pass, and the generation replay forward). Show-o reads tokens, so y enters as y @ E[image codes].
sft_loss runs it in one autograd graph (*_end_to_end_mmu_loss); janus_end_to_end_backward is the memory-light
two-phase form (spec/method.md 5.3): (1) MMU backward to the one-hot leaf gives G = dL/dy, (2) the generation
replay backward of sum <G, y_soft>, which is exactly the straight-through gradient (tests/test_sft.py).
"""
import torch
import torch.nn.functional as F

from generate import cosine_schedule, janus_image_logits, janus_image_logprobs
from model import IGNORE_ID, omni_attention_mask, t2i_prompt, t2i_train_prompt
from understand import janus_answer_logprobs, janus_pixels, showo_answer_logprobs


def janus_t2i_loss(model, processor, prompts, tokens, cond_dropout=0.0, generator=None, cfg_weight=None,
                   uniforms=None):
    """Next-code NLL of the images, conditional branch; with prob cond_dropout a row sees the unconditional prompt
    so that the model keeps its classifier-free-guidance ability (our choice, method.md marks it [SPEC]).

    cfg_weight: the NLL of the guided distribution u + w (c - u) that drew the images instead. Why: fitting the
    conditional branch alone to guided samples makes the next guided draw sharper still (c -> c^w / u^(w-1) on
    every round), a runaway that in the toy world filled the canvas with colour within 100 steps even when only
    exactly-correct images were kept; fitting the sampler itself has the kept images as its fixed point."""
    if cfg_weight is not None:
        return -janus_image_logprobs(model, processor, prompts, tokens, cfg_weight, mode="cfg").mean()
    uncond = None
    if cond_dropout > 0:  # uniforms: one per row, drawn at rollout time (else drawn here)
        device = generator.device if generator is not None else tokens.device
        if uniforms is None:
            uniforms = torch.rand(len(prompts), generator=generator, device=device)
        uncond = uniforms < cond_dropout
    return -janus_image_logprobs(model, processor, prompts, tokens, mode="cond", uncond=uncond).mean()


def mmu_loss(logprobs, mask):
    """Mean over answers of the per-answer token-mean NLL (each answer counts once, whatever its length)."""
    return -((logprobs * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


def verified_answer_loss(model, processor, ro):
    """L_MMU on the images whose self-check matched every slot, as sft_loss weighs it: a mean over all B images in
    which the others weigh zero (so DDP's average equals one process). The understanding half of UniRL's mutual
    loop under GRPO: the model's own verified drawings train its answers. -> (loss, share verified)."""
    loss, stats = sft_loss(model, processor, ro, lambda_t2i=0.0, mmu_filter="verified")
    return loss, stats["kept"]


def showo_t2i_loss(model, processor, prompts, codes, cond_dropout=0.1, noise=None):
    """Show-o's masked-token loss as the official training corrupts its rows: one t ~ U(0, 1) per row, mask
    round(N cos(pi t / 2)) random image tokens, predict them (unshifted, full-vocabulary CE, <|soi|>/<|eoi|> as
    their own targets), the text replaced by the empty prompt with probability cond_dropout.

    Reduced per image (mean over its masked tokens), then over images: the official token mean over the local
    batch would weigh an image by how many tokens it masked, so a loss split over ranks would differ from one
    process. noise: dict(t [B], u [B, N], drop [B]) uniforms drawn at rollout time (else fresh draws)."""
    cfg, tok = model.config, processor.tok
    image_ids = codes + cfg.image_offset
    noise = noise or {}
    masked_ids, labels, _ = mask_image_tokens(image_ids, cfg.mask_token_id, t=noise.get("t"), u=noise.get("u"))
    ids, labels = t2i_train_prompt(tok, prompts, masked_ids, labels, processor.max_seq_length, cond_dropout,
                                   uniforms=noise.get("drop"))
    mask = omni_attention_mask(ids, tok.pad_id, tok.special_ids["<|soi|>"], tok.special_ids["<|eoi|>"],
                               rm_pad_in_image=True)
    P = ids.shape[1] - cfg.num_vq_tokens - 2
    logits = model(ids, attention_mask=mask)[:, P:]  # [B, N + 2, V]
    targets = labels[:, P:].to(logits.device)
    ce = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_ID, reduction="none")  # [B, N + 2]
    valid = targets != IGNORE_ID
    return ((ce * valid).sum(1) / valid.sum(1).clamp(min=1)).mean()


def sft_loss(model, processor, ro, lambda_t2i=1.0, lambda_mmu=1.0, mmu_filter="all", cond_dropout=0.0,
             generator=None, end_to_end=False, tau=1.0, t2i_cfg_weight=None):
    """The SFT loss of a rollout (rollout.Rollout), either family. Returns (loss, stats).

    Each term is its mean over the kept images scaled by kept / B, i.e. a mean over ALL B images in which the
    rejected ones weigh zero (filtered behaviour cloning). The loss then depends on the batch as a whole, so
    DDP's gradient average over ranks equals one process on the concatenated batch. Both forwards always run
    (over every image, weighted 0, when none was kept), so all ranks run the same modules, as FSDP requires.
    The random draws (dropout, Show-o's masking) are the rollout's own uniforms, so they belong to the image.
    end_to_end: the MMU term reads the image as straight-through one-hots, so it also trains generation.
    t2i_cfg_weight (Janus): the T2I term on the guided distribution that sampled the images (janus_t2i_loss).
    """
    showo = hasattr(model, "showo")  # the family seam of sft.py
    if showo and t2i_cfg_weight is not None:
        raise ValueError("t2i_cfg_weight is Janus' guided-sampler NLL; Show-o trains its masked-token loss")
    B = len(ro.correct)
    keep = {"t2i": ro.correct, "mmu": ro.correct if mmu_filter == "verified" else torch.ones_like(ro.correct)}
    device = next(model.parameters()).device
    loss, stats = torch.zeros((), device=device), dict(kept=int(keep["t2i"].sum()) / B)
    for term, weight in (("t2i", lambda_t2i), ("mmu", lambda_mmu)):
        if weight == 0:  # a term switched off on every rank alike (GRPO's verified_answer_loss has no T2I term)
            continue
        rows = keep[term].nonzero()[:, 0].tolist() or list(range(B))
        share = int(keep[term].sum()) / B
        prompts, tokens = [ro.tasks[i]["prompt"] for i in rows], ro.tokens[rows].to(device)
        questions, answers = [ro.tasks[i]["question"] for i in rows], [ro.tasks[i]["answer"] for i in rows]
        if term == "t2i" and showo:
            value = showo_t2i_loss(model, processor, prompts, tokens, cond_dropout,
                                   dict(drop=ro.noise_drop[rows], t=ro.noise_t[rows], u=ro.noise_u[rows]))
        elif term == "t2i":
            value = janus_t2i_loss(model, processor, prompts, tokens, cond_dropout, generator, t2i_cfg_weight,
                                   ro.noise_drop[rows])
        elif end_to_end:
            value = (showo_end_to_end_mmu_loss if showo else janus_end_to_end_mmu_loss)(
                model, processor, prompts, tokens, questions, answers, tau)
        elif showo:
            value = mmu_loss(*showo_answer_logprobs(model, processor, tokens, questions, answers))
        else:
            pixels = janus_pixels(processor, ro.images[rows]).to(device)
            value = mmu_loss(*janus_answer_logprobs(model, processor, pixels, questions, answers))
        loss = loss + weight * share * value
        if share:
            stats[f"loss_{term}"] = value.item()
    return loss, stats


# -----------------------------------------------------------------------------------------------------------
# End-to-end: straight-through Gumbel-softmax through the VQ decoder and SigLIP (Janus)


def gumbel_noise(shape, generator=None, device=None):
    u = torch.rand(shape, generator=generator, device=device).clamp(1e-10, 1 - 1e-10)
    return -torch.log(-torch.log(u))


def straight_through(logits, tokens, tau=1.0, noise=None):
    """One-hot(tokens) in value, d softmax((z + g) / tau) in gradient. logits [..., K], tokens [...]."""
    y_soft = torch.softmax((logits.float() + (0 if noise is None else noise)) / tau, dim=-1)
    y_hard = F.one_hot(tokens, logits.shape[-1]).to(y_soft.dtype)
    return y_hard + (y_soft - y_soft.detach())  # exactly one-hot in value: the bracket is exactly zero


def janus_pixels_from_onehot(model, y):
    """y [B, T, K] (one-hot rows, possibly straight-through) -> understanding pixels [B, 3, S, S] in [-1, 1].

    Differentiable stand-in for decode -> uint8 -> preprocess: no truncation, no PIL round trip. When the
    generation and understanding sizes differ (tiny configs only) the picture is resized bicubically."""
    vq, cfg = model.gen_vision_model, model.cfg
    B, T, _ = y.shape
    g = cfg.gen_grid
    z = (y.to(vq.quantize.embedding.weight.dtype) @ vq.quantize.codebook()).view(B, g, g, -1).permute(0, 3, 1, 2)
    pixels = vq.decoder(vq.post_quant_conv(z)).clamp(-1, 1)
    if pixels.shape[-1] != cfg.vit_image_size:
        pixels = F.interpolate(pixels, size=(cfg.vit_image_size,) * 2, mode="bicubic", align_corners=False)
    return pixels


def janus_end_to_end_mmu_loss(model, processor, prompts, tokens, questions, answers, tau=1.0, noise=None):
    """L_MMU with the image as straight-through one-hots of the generation logits z, in one autograd graph:
    z are the teacher-forced conditional logits of the sampled codes (exact for the sampler's prefixes), and the
    one-hots go through the VQ decoder and SigLIP. noise: the rollout's Gumbel noise if recorded, else 0
    (y_hard = the sampled codes)."""
    z = janus_image_logits(model, processor, prompts, tokens, mode="cond")
    y = straight_through(z, tokens, tau, noise)
    return mmu_loss(*janus_answer_logprobs(model, processor, janus_pixels_from_onehot(model, y), questions, answers,
                                           detach_image=False))


def showo_end_to_end_mmu_loss(model, processor, prompts, tokens, questions, answers, tau=1.0, noise=None):
    """As janus_end_to_end_mmu_loss for Show-o: z come from one conditional forward on the prompt with a fully
    masked image (method.md's `one_pass` proxy: cheap, biased), and the one-hots enter as onehot @ E[image codes]."""
    cfg, tok = model.config, processor.tok
    masked = torch.full_like(tokens, cfg.mask_token_id)
    ids = t2i_prompt(tok, prompts, masked, processor.max_seq_length)
    mask = omni_attention_mask(ids, tok.pad_id, tok.special_ids["<|soi|>"], tok.special_ids["<|eoi|>"],
                               rm_pad_in_image=True)
    P = ids.shape[1] - cfg.num_vq_tokens - 2
    z = model.image_logits(model.hidden_states(ids, mask)[:, P + 1:P + 1 + cfg.num_vq_tokens])
    y = straight_through(z, tokens, tau, noise)
    return mmu_loss(*showo_answer_logprobs(model, processor, tokens, questions, answers, image_onehot=y))


def janus_end_to_end_backward(model, processor, prompts, tokens, questions, answers, tau=1.0, noise=None,
                              lambda_mmu=1.0):
    """Two-phase backward of L_MMU through straight-through image codes. Accumulates .grad; returns the loss.

    Phase 1: y = onehot(x) as a leaf; MMU forward/backward gives the MMU parameter grads and G = dL/dy.
    Phase 2: replay the generation logits z with grad; backward of sum <G, softmax((z + g)/tau)>.
    Equal to autograd through janus_end_to_end_mmu_loss's single graph (tests/test_sft.py checks it) while holding only
    one model's activations at a time: the memory-light way for full-size Janus.
    """
    K = model.cfg.gen_vocab_size
    y_hard = F.one_hot(tokens, K).float().requires_grad_(True)
    lp, mask = janus_answer_logprobs(model, processor, janus_pixels_from_onehot(model, y_hard), questions, answers,
                                     detach_image=False)
    loss = lambda_mmu * mmu_loss(lp, mask)
    loss.backward()
    logits = janus_image_logits(model, processor, prompts, tokens, mode="cond")
    y_soft = torch.softmax((logits.float() + (0 if noise is None else noise)) / tau, dim=-1)
    (y_hard.grad * y_soft).sum().backward()
    return loss.detach()


# -----------------------------------------------------------------------------------------------------------
# Show-o: the masked-token training loss, exactly as the official training computes it


def mask_image_tokens(image_ids, mask_token_id, schedule=cosine_schedule, min_masking_rate=0.0, t=None, u=None):
    """Training corruption (mask_or_random_replace_tokens, 'mask' branch) -> (input_ids, labels, mask_prob).

    Per row: t ~ U(0, 1), k = round(N * schedule(t)) >= 1 (half-to-even), and position j is masked iff
    argsort(u)[j] < k for fresh uniforms u. Labels keep the token where masked, -100 elsewhere.
    RNG order: rand(B), then rand(B, N); or t [B] and u [B, N] given (drawn per prompt group at rollout time).
    """
    B, N = image_ids.shape
    t = torch.rand(B, device=image_ids.device) if t is None else t
    mask_prob = schedule(t).clip(min_masking_rate)
    num_masked = (N * mask_prob).round().clamp(min=1)
    u = torch.rand(B, N, device=image_ids.device) if u is None else u
    masked = u.argsort(dim=-1) < num_masked[:, None]
    return (torch.where(masked, mask_token_id, image_ids), torch.where(masked, image_ids, IGNORE_ID), mask_prob)
