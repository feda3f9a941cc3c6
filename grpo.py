"""
GRPO for a unified model: the images of one prompt form a group, the model's own answers about them are the rewards.

    A_i      = (r_i - mean_j r_j) / (std_j r_j + eps)            group-normalised advantage (std off = Dr. GRPO)
    rho_it   = exp(l_it - l_old_it)                               l = log pi_theta(token t of sequence i)
    pg_it    = -min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i)
    kl_it    = exp(l_ref_it - l_it) - (l_ref_it - l_it) - 1       k3 estimator of KL(pi_theta || pi_ref), >= 0
    loss     = Agg_t(pg + beta kl)   with Agg = grpo (mean over the B sequences of their token means) | dapo (token
               mean over the batch) | dr_grpo (token sum / (B * L_budget), L_budget the generation budget)

Without an old policy (UniRL's default, one update per rollout) l_old = stopgrad(l): rho = 1 in value, the clip is
inactive and the gradient is -A_i grad l. Image tokens and answer tokens are aggregated separately and then weighted,
so ~10 answer tokens are not drowned by 576 image tokens (spec/method.md section 6.5). These are the standard GRPO
forms; UniRL's exact ones are unpublished (method.md marks them [SPEC]).
"""
import math

import torch

from generate import janus_image_logprobs
from sft import answer_logprobs

AGGREGATIONS = ("grpo", "dapo", "dr_grpo")


def group_advantages(rewards, std_normalize=True, eps=1e-4):
    """rewards [n_groups, G] -> advantages [n_groups, G]. std is the unbiased std over the group."""
    rewards = rewards.float()
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not std_normalize or rewards.shape[1] < 2:  # a group of one compares with nothing: advantage 0, not NaN
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + eps)


def k3_kl(logp, logp_ref, clamp=10.0):
    """exp(d) - d - 1 with d = l_ref - l: unbiased for KL(pi || pi_ref) under samples of pi, and never negative."""
    delta = (logp_ref - logp).clamp(-clamp, clamp)
    return torch.exp(delta) - delta - 1


def aggregate(per_token, mask, how="grpo", max_len=None):
    """Reduce a [B, T] per-token loss to a scalar over the tokens where mask is True.

    grpo divides by all B sequences, also those without a token (skipped flat groups weigh 0, as a zero-advantage
    sequence does in TRL): the denominator is then the same on every rank, so DDP's mean over ranks equals one
    process on the whole batch. dr_grpo divides by the constant budget max_len (TRL: max_completion_length)."""
    mask = mask.float()
    if how == "grpo":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / mask.shape[0]
    if how == "dapo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    if how == "dr_grpo":
        if max_len is None:
            raise ValueError("dr_grpo needs max_len, the generation budget in tokens (not the longest sequence)")
        return (per_token * mask).sum() / (mask.shape[0] * max_len)
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, not {how!r}")


def policy_loss(logp, advantages, mask=None, logp_old=None, logp_ref=None, beta=0.0, clip_low=0.2, clip_high=0.2,
                agg="grpo", max_len=None):
    """Clipped policy-gradient loss with a k3 KL penalty for one segment (image tokens or answer tokens).

    logp [B, T] with grad; advantages [B]; mask [B, T] (None = all tokens); logp_old / logp_ref [B, T] or None.
    Returns (loss, stats) where stats holds detached means for logging.
    """
    mask = torch.ones_like(logp, dtype=torch.bool) if mask is None else mask
    old = logp.detach() if logp_old is None else logp_old
    ratio = torch.exp(logp - old)
    adv = advantages[:, None].to(logp.dtype)
    pg = -torch.min(ratio * adv, ratio.clamp(1 - clip_low, 1 + clip_high) * adv)
    per_token = pg
    kl = None
    if logp_ref is not None and beta > 0:
        kl = k3_kl(logp, logp_ref)
        per_token = pg + beta * kl
    loss = aggregate(per_token, mask, agg, max_len)
    m = mask.float()
    stats = dict(pg=float((pg.detach() * m).sum() / m.sum().clamp(min=1)),
                 clip_frac=float((((ratio < 1 - clip_low) | (ratio > 1 + clip_high)) & mask).float().sum()
                                 / m.sum().clamp(min=1)))
    if kl is not None:
        stats["kl"] = float((kl.detach() * m).sum() / m.sum().clamp(min=1))
    return loss, stats


# -----------------------------------------------------------------------------------------------------------
# Image-token log-probs. Janus: teacher-forced, exact. Show-o (masked diffusion, no exact likelihood): the one-pass
# masked-token estimator or a replay of the sampler's trajectory (both [SPEC] choices, method.md section 6.6).


def draw_showo_masks(n_groups, group_size, num_tokens, generator=None):
    """One mask ratio per group (cos(pi t / 2), t ~ U(0, 1), k = max(1, round(N gamma))), k random positions per
    image: [n_groups * group_size, N] bool. Drawn once and shared by pi_theta and pi_ref."""
    device = generator.device if generator is not None else "cpu"
    t = torch.rand(n_groups, generator=generator, device=device)
    u = torch.rand(n_groups * group_size, num_tokens, generator=generator, device=device)
    return showo_masks_from_uniforms(t.repeat_interleave(group_size), u)


def showo_masks_from_uniforms(t, u):
    """t [B] (equal within a group), u [B, N] -> masks [B, N]: the round(N cos(pi t / 2)) >= 1 positions of
    smallest u."""
    k = (u.shape[1] * torch.cos(t * math.pi / 2)).round().clamp(min=1)
    return u.argsort(1) < k[:, None]


def rollout_showo_masks(batch, group_size, num_tokens, generator=None):
    """The masks of a rollout batch: fixed ones if recorded, else from the rollout's own uniforms (per group, so
    that the split over ranks changes nothing; the group's first t serves the whole group), else fresh."""
    if batch.get("showo_masks") is not None:
        return batch["showo_masks"]
    if "noise_u" in batch:
        t = batch["noise_t"].view(-1, group_size)[:, :1].expand(-1, group_size).reshape(-1)
        return showo_masks_from_uniforms(t, batch["noise_u"])
    return draw_showo_masks(len(batch["rewards"]) // group_size, group_size, num_tokens, generator)


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


def showo_trajectory_logprobs(model, batch, guidance_scale=5.0, steps=None):
    """Replay the recorded MaskGIT steps with grad: token j gets log p(x_j) under the guided codebook softmax of the
    step that revealed it ((1 + g) cond - g uncond, untempered, as the sampler). A per-token ratio, where Mask-GRPO
    keeps one per step. steps: replay only these step indices (tokens of the others are left out).
    -> (logp [B, N], covered [B, N])."""
    N = model.config.num_vq_tokens
    tokens = batch["tokens"]
    B = tokens.shape[0]
    logp = torch.zeros(tokens.shape, device=tokens.device)
    covered = torch.zeros(tokens.shape, dtype=torch.bool, device=tokens.device)
    for s, state in enumerate(batch["trajectory"]):
        if steps is not None and s not in steps:
            continue
        ids = state["input_ids"]
        P = ids.shape[1] - N - 2
        logits = model.image_logits(model.hidden_states(ids, batch["attention_mask"])[:, P + 1:P + 1 + N])
        if ids.shape[0] == 2 * B:
            logits = (1 + guidance_scale) * logits[:B] - guidance_scale * logits[B:]
        step_lp = torch.log_softmax(logits, -1).gather(2, tokens[..., None])[..., 0]
        logp = torch.where(state["revealed"], step_lp, logp)
        covered |= state["revealed"]
    return logp * covered, covered


def image_logprobs(model, processor, batch, group_size, cfg_weight=5.0, temperature=1.0, janus_mode="cond",
                   showo_masks=None, replay_steps=None):
    """Log-probs [B, N] and the tokens they cover [B, N] for the images of a rollout batch, either family.
    Show-o: the trajectory replay (of the step indices replay_steps; None = all) when the batch carries a
    trajectory, else the masked-token estimator."""
    prompts = [t["prompt"] for t in batch["tasks"]]
    tokens = batch["tokens"].to(next(model.parameters()).device)
    if hasattr(model, "showo"):
        if "trajectory" in batch:
            return showo_trajectory_logprobs(model, batch, cfg_weight, replay_steps)
        return showo_masked_logprobs(model, processor, prompts, tokens, showo_masks)
    lp = janus_image_logprobs(model, processor, prompts, tokens, cfg_weight, temperature, janus_mode)
    return lp, torch.ones_like(lp, dtype=torch.bool)


# -----------------------------------------------------------------------------------------------------------
# The GRPO step: rollout (sft.rollout) -> advantages -> image and answer policy losses


def grpo_loss(model, processor, batch, group_size, ref_model=None, beta=0.0, cfg_weight=5.0, temperature=1.0,
              janus_logp="cond", optimize="both", agg="grpo", adv_std=True, w_img=1.0, w_ans=1.0, generator=None,
              skip_flat_groups=False, answer_budget=None, replay_steps=0):
    """GRPO loss of a rollout batch (images grouped by prompt, group_size each). Returns (loss, stats).

    janus_logp: "cond" (default: conditional row, one row per image; the CFG sampler makes it slightly off-policy)
    or "cfg" (both rows with grad: exactly the sampling policy, twice the compute). Show-o uses the masked-token
    estimator with one mask ratio per group, the same masks for the reference.
    optimize: "t2i" | "mmu" | "both". Answer tokens get their image's advantage; answers are decoded greedily, so
    that term is advantage-weighted self-training of the answer rather than an on-policy gradient.
    skip_flat_groups: groups whose rewards are all equal (zero advantage) add nothing to the loss, KL included
    (they are still computed, weighted 0, so every rank runs the same forwards; grpo still counts them in its
    denominator of B sequences, see aggregate).
    answer_budget: the answers' generation budget in tokens, dr_grpo's constant denominator (required there).
    replay_steps: Show-o trajectory replay of this many randomly drawn sampling steps (0 = all of them); each
    replayed step holds one forward's graph until backward, so this bounds memory.
    """
    if agg == "dr_grpo" and optimize != "t2i" and answer_budget is None:
        raise ValueError("agg='dr_grpo' needs answer_budget, the answers' max new tokens")
    device = next(model.parameters()).device
    rewards = batch["rewards"].to(device)
    adv = group_advantages(rewards.view(-1, group_size), adv_std).view(-1)
    use_ref = ref_model is not None and beta > 0
    loss = torch.zeros((), device=device)
    flat = rewards.view(-1, group_size).std(1) == 0
    keep = ~flat.repeat_interleave(group_size) if skip_flat_groups else torch.ones_like(rewards, dtype=torch.bool)
    stats = dict(flat_groups=float(flat.float().mean()), adv_abs=float(adv.abs().mean()))
    if optimize in ("t2i", "both"):
        masks = None
        if hasattr(model, "showo") and "trajectory" not in batch:
            masks = rollout_showo_masks(batch, group_size, model.config.num_vq_tokens, generator)
        steps = None
        if "trajectory" in batch and 0 < replay_steps < len(batch["trajectory"]):
            order = torch.randperm(len(batch["trajectory"]), generator=generator,
                                   device=generator.device if generator is not None else "cpu")
            steps = sorted(order[:replay_steps].tolist())
        lp, covered = image_logprobs(model, processor, batch, group_size, cfg_weight, temperature, janus_logp, masks,
                                     steps)
        ref = None
        if use_ref:
            with torch.no_grad():
                ref, _ = image_logprobs(ref_model, processor, batch, group_size, cfg_weight, temperature, janus_logp,
                                        masks)
        l_img, s = policy_loss(lp, adv, covered & keep[:, None], batch.get("logp_old_img"), ref, beta, agg=agg,
                               max_len=covered.shape[1])
        loss = loss + w_img * l_img
        stats.update({f"img_{k}": v for k, v in s.items()}, loss_img=l_img.item())
    if optimize in ("mmu", "both"):
        idx = list(range(len(rewards)))
        lp, mask = answer_logprobs(model, processor, batch, idx, batch["answer_ids"])
        ref = None
        if use_ref:
            with torch.no_grad():
                ref, _ = answer_logprobs(ref_model, processor, batch, idx, batch["answer_ids"])
        l_ans, s = policy_loss(lp, adv, mask & keep[:, None], batch.get("logp_old_ans"), ref, beta, agg=agg,
                               max_len=answer_budget)
        loss = loss + w_ans * l_ans
        stats.update({f"ans_{k}": v for k, v in s.items()}, loss_ans=l_ans.item())
    return loss, stats


@torch.no_grad()
def record_old_logprobs(model, processor, batch, group_size, cfg_weight=5.0, temperature=1.0, janus_logp="cond",
                        generator=None):
    """Before the first of several updates on one rollout: freeze pi_old's log-probs (and Show-o's masks) in the
    batch, so that the later updates see ratios pi_theta / pi_old and the clip becomes active."""
    if hasattr(model, "showo") and "trajectory" not in batch:
        batch["showo_masks"] = rollout_showo_masks(batch, group_size, model.config.num_vq_tokens, generator)
    batch["logp_old_img"], _ = image_logprobs(model, processor, batch, group_size, cfg_weight, temperature,
                                              janus_logp, batch.get("showo_masks"))
    batch["logp_old_ans"], _ = answer_logprobs(model, processor, batch, list(range(len(batch["rewards"]))),
                                               batch["answer_ids"])
