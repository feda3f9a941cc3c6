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

This file is plain tensor maths (it imports torch only): the log-probs come from rollout.sequence_logprobs, and
train.py adds the image and answer segments' losses.
"""
import torch

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


def grpo_loss(logp, mask, rewards, group_size, logp_old=None, logp_ref=None, beta=0.0, agg="grpo", adv_std=True,
              skip_flat_groups=False, max_len=None, clip_low=0.2, clip_high=0.2):
    """GRPO loss of one token segment (image codes, or answer tokens) of B = groups x group_size sequences,
    group-major (a group's sequences adjacent). Returns (loss, stats).

    logp [B, T] with grad; mask [B, T] the tokens that count; rewards [B]; logp_old / logp_ref [B, T] or None
    (no old policy: ratio 1; no reference or beta 0: no KL). skip_flat_groups: the groups whose rewards are all
    equal (zero advantage) leave the loss, KL included - their rows stay, weighted 0, so that every rank runs
    the same forwards, and grpo's denominator still counts them (see aggregate). max_len: dr_grpo's budget.
    """
    rewards = rewards.to(logp.device).float().view(-1, group_size)
    adv = group_advantages(rewards, adv_std).view(-1)
    flat = rewards.std(1) == 0 if group_size > 1 else torch.ones(len(rewards), dtype=torch.bool, device=logp.device)
    keep = mask.to(logp.device)
    if skip_flat_groups:
        keep = keep & ~flat.repeat_interleave(group_size)[:, None]
    loss, stats = policy_loss(logp, adv, keep, logp_old, logp_ref, beta, clip_low, clip_high, agg, max_len)
    stats.update(flat_groups=float(flat.float().mean()), adv_abs=float(adv.abs().mean()))
    return loss, stats
