"""
The rollout, UniRL's data: the model draws, then judges its own drawings.

    for each prompt: G images x_1..x_G ~ pi(. | prompt)                    (generate.sample)
                     a_i = the judge's greedy answer to the task's question about x_i   (understand.answer)
                     r_i = matched slots of a_i / slots (or the count)     (reward.slots; or a plug-in reward)

A Rollout holds one step's B = groups x G images, group-major (the G images of a prompt are adjacent), with
everything the losses need: tokens, images, answers, rewards, and the random draws of the losses, made here from
the group's own generator so that a run does not depend on how its groups are split over ranks. Rollout.cat
joins rollouts and is the one owner of the row order. sequence_logprobs gives log pi(tokens) of a rollout's image
codes and answers under any model: the policy, the reference, the old policy - the input of grpo.py's loss.
"""
import time
from dataclasses import dataclass, field

import torch

import reward
from generate import janus_image_logprobs, sample, showo_masked_logprobs, showo_masks_from_uniforms, \
    showo_trajectory_logprobs
from understand import answer, janus_answer_logprobs, janus_pixels, showo_answer_logprobs


@dataclass
class Rollout:
    tasks: list                     # B task dicts (reward.py's schema: prompt, question, answer, tag, include)
    tokens: torch.Tensor            # [B, N] image codes
    images: torch.Tensor            # [B, S, S, 3] uint8
    sample_logprobs: torch.Tensor   # [B, N] log-prob of each code under the sampler
    answers: list                   # B answer strings of the judge
    answer_ids: list                # B id lists, the end token included when it was reached
    rewards: torch.Tensor           # [B] float
    correct: torch.Tensor           # [B] bool: every slot matched (SFT keeps these)
    group_size: int
    noise_drop: torch.Tensor        # [B] uniforms: SFT's classifier-free-guidance dropout
    noise_t: torch.Tensor           # [B] uniforms: Show-o's masking ratio (a group uses its first)
    noise_u: torch.Tensor           # [B, N] uniforms: Show-o's masked positions
    # Show-o's sampling trajectory, for GRPO's trajectory replay (else empty): per MaskGIT step the model input
    # ids with rows [cond of all B images; uncond of all B images], and the positions it revealed [B, N]
    trajectory_ids: list = field(default_factory=list)
    trajectory_revealed: list = field(default_factory=list)
    attention_mask: torch.Tensor = None  # of the trajectory rows, in the same row layout
    sample_s: float = 0.0           # seconds spent drawing and judging
    score_s: float = 0.0
    generator: torch.Generator = None  # the losses' RNG for draws not made at rollout time (replayed steps)
    logp_old: dict = None           # pi_old's log-probs {"img", "ans"}, when several updates share this rollout

    def __len__(self):
        return len(self.tasks)

    @staticmethod
    def cat(rollouts):
        """One rollout of all images, in the given order. Trajectory rows keep the [all cond; all uncond] layout
        over the joined images, because the replay splits its rows at B."""
        first = rollouts[0]
        n = [len(r) for r in rollouts]

        def rows(parts):  # [cond_r; uncond_r] of each rollout r -> [all cond; all uncond]
            if all(len(p) == k for p, k in zip(parts, n)):  # no guidance rows
                return torch.cat(parts)
            return torch.cat([p[:k] for p, k in zip(parts, n)] + [p[k:] for p, k in zip(parts, n)])

        tensors = ("tokens", "images", "sample_logprobs", "rewards", "correct", "noise_drop", "noise_t", "noise_u")
        lists = ("tasks", "answers", "answer_ids")
        steps = range(len(first.trajectory_ids))
        return Rollout(
            **{k: torch.cat([getattr(r, k) for r in rollouts]) for k in tensors},
            **{k: [x for r in rollouts for x in getattr(r, k)] for k in lists},
            group_size=first.group_size,
            trajectory_ids=[rows([r.trajectory_ids[s] for r in rollouts]) for s in steps],
            trajectory_revealed=[torch.cat([r.trajectory_revealed[s] for r in rollouts]) for s in steps],
            attention_mask=rows([r.attention_mask for r in rollouts]) if first.attention_mask is not None else None,
            sample_s=sum(r.sample_s for r in rollouts), score_s=sum(r.score_s for r in rollouts),
            generator=first.generator)


def self_check(judge, processor, tasks, images=None, tokens=None, max_new_tokens=100, normalize=False):
    """UniRL's reward: the judge answers each task's question about its image, the answer is scored slot by slot.
    Greedy answers, as the official evaluation. images / tokens as understand.answer takes them.
    -> dict(answers, answer_ids, rewards [B] float (matched slots, or their fraction if normalize), correct [B])."""
    out = answer(judge, processor, [t["question"] for t in tasks], images, tokens, max_new_tokens)
    matched = [reward.slots(a, t) for a, t in zip(out["answers"], tasks)]
    rewards = torch.tensor([m / n if normalize else float(m) for m, n in matched])
    correct = torch.tensor([m == n for m, n in matched])
    return dict(answers=out["answers"], answer_ids=out["ids"], rewards=rewards, correct=correct)


@torch.no_grad()
def rollout(model, processor, tasks, group_size, cfg_weight=None, temperature=1.0, generator=None,
            max_answer_tokens=100, normalize=False, steps=None, trajectory=False, judge=None, reward_fn=None):
    """Sample group_size images for every task and let the judge (default: the model itself) score each.

    reward_fn: a plug-in reward, (tasks, tokens, images) -> rewards [B], or (rewards, correct [B]); without
    correct an image counts as correct when its reward is 1. The self-check still runs (its answers are the
    answer tokens that GRPO trains). steps, trajectory: Show-o's MaskGIT steps, and whether to record them."""
    t0 = time.perf_counter()
    out = sample(model, processor, [t["prompt"] for t in tasks], group_size, cfg_weight, temperature, generator,
                 return_logprobs=True, steps=steps, return_trajectory=trajectory)
    t1 = time.perf_counter()
    flat = [t for t in tasks for _ in range(group_size)]
    check = self_check(judge or model, processor, flat, out["images"], out["tokens"], max_answer_tokens, normalize)
    if reward_fn is not None:
        given = reward_fn(flat, out["tokens"], out["images"])
        rewards, correct = given if isinstance(given, tuple) else (given, None)
        check["rewards"] = torch.as_tensor(rewards, dtype=torch.float32).cpu()
        check["correct"] = check["rewards"] == 1 if correct is None else torch.as_tensor(correct).bool().cpu()
        if check["rewards"].shape != (len(flat),) or check["correct"].shape != (len(flat),):
            raise ValueError(f"the reward plug-in returned {tuple(check['rewards'].shape)} rewards for {len(flat)} "
                             "images")
    B, N = out["tokens"].shape
    device = generator.device if generator is not None else out["tokens"].device
    # drawn after sampling, in this order, from the group's generator
    noise = dict(noise_drop=torch.rand(B, generator=generator, device=device),
                 noise_t=torch.rand(B, generator=generator, device=device),
                 noise_u=torch.rand(B, N, generator=generator, device=device))
    replay = {}
    if trajectory:
        replay = dict(trajectory_ids=[s["input_ids"] for s in out["trajectory"]],
                      trajectory_revealed=[s["revealed"] for s in out["trajectory"]],
                      attention_mask=out["attention_mask"])
    return Rollout(tasks=flat, tokens=out["tokens"], images=out["images"], sample_logprobs=out["logprobs"],
                   answers=check["answers"], answer_ids=check["answer_ids"], rewards=check["rewards"],
                   correct=check["correct"], group_size=group_size, **noise, **replay, sample_s=t1 - t0,
                   score_s=time.perf_counter() - t1)


def showo_group_masks(ro):
    """The masked-token estimator's masks of a rollout, from its own uniforms: one ratio per group (the group's
    first t), so that pi_theta, pi_ref and pi_old see the same masks and a group's images share a ratio."""
    G = ro.group_size
    t = ro.noise_t.view(-1, G)[:, :1].expand(-1, G).reshape(-1)
    return showo_masks_from_uniforms(t, ro.noise_u)


def replay_subset(ro, k):
    """k trajectory steps drawn from the rollout's loss generator (sorted), or None for all of them."""
    if not ro.trajectory_ids or not 0 < k < len(ro.trajectory_ids):
        return None
    device = ro.generator.device if ro.generator is not None else "cpu"
    return sorted(torch.randperm(len(ro.trajectory_ids), generator=ro.generator, device=device)[:k].tolist())


def sequence_logprobs(model, processor, ro, image=True, answers=True, cfg_weight=5.0, temperature=1.0,
                      janus_mode="cond", replay_steps=None):
    """log pi of a rollout's tokens under `model` (with grad unless called under no_grad), for the parts asked:
    {"img": (logp [B, N], mask [B, N]), "ans": (logp [B, M], mask [B, M])}; mask marks the tokens that count.

    Image codes - Janus: teacher-forced, the conditional row ("cond") or the guided sampler ("cfg", exact).
    Show-o: a replay of the recorded sampling steps (replay_steps: those indices only) when the rollout carries a
    trajectory, else the masked-token estimator. Answers: the judge's own answer ids, teacher-forced on the image
    (Janus from pixels, the ViT detached; Show-o from the image codes)."""
    device = next(model.parameters()).device
    tokens = ro.tokens.to(device)
    showo = hasattr(model, "showo")  # the family seam of rollout.py
    out = {}
    if image and showo and ro.trajectory_ids:
        out["img"] = showo_trajectory_logprobs(model, ro.trajectory_ids, ro.trajectory_revealed, ro.attention_mask,
                                               tokens, cfg_weight, replay_steps)
    elif image and showo:
        out["img"] = showo_masked_logprobs(model, processor, [t["prompt"] for t in ro.tasks], tokens,
                                           showo_group_masks(ro))
    elif image:
        lp = janus_image_logprobs(model, processor, [t["prompt"] for t in ro.tasks], tokens, cfg_weight,
                                  temperature, janus_mode)
        out["img"] = (lp, torch.ones_like(lp, dtype=torch.bool))
    if answers:
        questions = [t["question"] for t in ro.tasks]
        out["ans"] = (showo_answer_logprobs(model, processor, tokens, questions, ro.answer_ids) if showo else
                      janus_answer_logprobs(model, processor, janus_pixels(processor, ro.images).to(device),
                                            questions, ro.answer_ids))
    return out
