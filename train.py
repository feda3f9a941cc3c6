"""
UniRL post-training: the model draws images for constructed prompts, answers questions about its own images, and
learns from its own answers - by SFT on what it judged correct, or by GRPO over the images of each prompt.

    per rank, per step:  tasks -> rollout (images, self-check answers, rewards; no grad) -> loss -> backward
                         -> all-reduce -> AdamW
    GRPO:  L = sum over segments s in {image codes, answer tokens} of grpo.grpo_loss(log pi_theta(s), rewards):
           A_i = (r_i - mean_group r) / std_group r,  per-token -A_i rho_it (clipped) + beta k3-KL(pi_theta || pi_ref)
           + lambda L_MMU(reference answers on the images the judge verified)  (--verified-answer-loss lambda)
           + gamma k3-KL(pi_theta || pi_ref) on the judge's answer tokens, every image          (--answer-kl gamma)
    SFT:   L = L_T2I(images judged correct) + L_MMU(reference answers)                          (sft.sft_loss)

What lives on each GPU: the policy in fp32 (master weights, gradients, AdamW's two moments) - whole under DDP,
one shard of every block under FSDP2 (--fsdp); with --dtype bf16 (or under FSDP) a bf16 sampler copy of the
whole model that draws the rollouts and is refreshed in place after every optimizer step (in fp32 without FSDP
the policy samples itself); and, for GRPO with beta > 0 or --frozen-judge, a frozen copy of the initial
weights in the sampling dtype: the KL reference and/or the judge (a reference alone is sharded under FSDP2).
With --lora-rank: the base in the sampling dtype, only the adapters (and their Adam state) in fp32, no reference
copy (the adapters switched off), and the policy samples itself (under FSDP the sampler copy stays).

One hand-written loop. Each rank owns whole prompt groups, so advantages never cross ranks. Rollouts are seeded
per task (seed, step, global task slot), which makes a run independent of how it is split over ranks; the global
RNG is re-seeded every step from (seed, step, rank), so a resumed run repeats the interrupted one exactly without
storing any RNG state.

Launch:
    python train.py --algo grpo                                # the toy world: the shipped tiny model, 10 min on CPU
    python train.py --algo grpo --model /ckpt/Janus-Pro-1B                                  # one GPU (or CPU)
    torchrun --standalone --nproc_per_node=8 train.py --algo grpo --model /ckpt/Janus-Pro-1B  # 8 GPUs, DDP
    torchrun --nnodes=2 --node_rank=$R --master_addr=$IP --master_port=29500 --nproc_per_node=8 \\
        train.py --algo grpo --model /ckpt/Janus-Pro-7B --fsdp                               # 16 GPUs, FSDP2
Defaults: the paper's, as --help shows them; a checkpoint folder may carry train_defaults.json ({"flag": value},
plus "sft" / "grpo" sections), which replaces them for that model (the toy world's does); flags given win.
Plug-ins, named module:function and imported by name: --task-source (training prompts), --reward (an external
reward instead of the self-check's), --eval (the evaluation hook).
Precision (--dtype, the same code on every device; a CPU run with --dtype bf16 takes the path a GPU takes):
    fp32: one fp32 model trains and samples (eval mode while sampling, train mode in the loss).
    bf16: fp32 master weights for AdamW, losses under bf16 autocast; rollouts run without autocast on the bf16
          sampler copy (KV caches in bf16, reused).
Checkpoints go to OUT/step_XXXXXXX/: the training state through torch.distributed.checkpoint (each rank its own
shards) and an export that load_model reads (model.safetensors, or a LoRA adapter); `--resume` continues from the
newest one exactly. One jsonl line per step goes to OUT/log.jsonl.
"""
import argparse
import contextlib
import copy
import datetime
import errno
import glob
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException
from tqdm import tqdm

import grpo
import lora
import plot
import reward
import sft
from cli import COUNT, FRACTION, NONNEG, NONNEG_F, POSITIVE
from generate import sample
from model import import_named, load_model, write_model_folder
from rollout import Rollout, replay_subset, rollout, sequence_logprobs

ROOT = os.path.dirname(os.path.abspath(__file__))
GENEVAL_METADATA = os.path.join(ROOT, "data", "geneval", "evaluation_metadata.jsonl")
TOY_CHECKPOINT = os.path.join(ROOT, "assets", "toy")
DEFAULTS_FILE = "train_defaults.json"  # a checkpoint's own defaults for this script


class Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default after its help."""


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    ap.add_argument("--algo", choices=["sft", "grpo"], default="grpo", help="the objective (see above)")
    ap.add_argument("--model", default=TOY_CHECKPOINT,
                    help="checkpoint folder (Janus / Janus-Pro or Show-o); default: the shipped toy-world model")
    ap.add_argument("--vq", help="Show-o only: the MAGVIT-v2 folder, if not inside --model")
    ap.add_argument("--roles", choices=["janus-pro", "janus-1.3b"],
                    help="Janus chat roles, for a folder without janus_roles.json (train.py writes one into every "
                         "checkpoint); without either they are guessed from the path, with a warning")
    ap.add_argument("--dtype", choices=["bf16", "fp32"],
                    help="bf16: fp32 master weights, bf16 autocast losses and a bf16 sampler copy (default on CUDA); "
                         "fp32: everything in fp32 (default on CPU)")
    ap.add_argument("--out", default="runs/unirl", help="checkpoints and log.jsonl")
    # data
    ap.add_argument("--tasks", type=COUNT, default=5000, help="size of the constructed training set")
    ap.add_argument("--task-source", default="geneval",
                    help="geneval: GenEval's templates over its 80 COCO classes (reward.make_tasks); or a plug-in "
                         "module:function, (n, seed) -> n task dicts in reward.py's schema")
    ap.add_argument("--exclude", default=GENEVAL_METADATA,
                    help="GenEval metadata whose prompts never become training prompts ('none' = no dedup, which "
                         "can train on GenEval's test prompts)")
    ap.add_argument("--prompts-per-rank", type=COUNT, default=1, help="prompt groups per rank per micro-step")
    ap.add_argument("--group-size", type=NONNEG, default=0, help="images per prompt (0 = UniRL's: 8 Janus, 3 Show-o)")
    # optimisation
    ap.add_argument("--steps", type=COUNT, default=1000, help="optimizer steps (the cosine schedule's length)")
    ap.add_argument("--minutes", type=NONNEG_F, default=0.0, help="also stop after this much wall time (0 = no limit)")
    ap.add_argument("--lr", type=POSITIVE, default=1e-5, help="peak learning rate")
    ap.add_argument("--warmup", type=NONNEG, default=50, help="linear warmup steps")
    ap.add_argument("--min-lr-ratio", type=FRACTION, default=0.1, help="cosine decays to lr * this")
    ap.add_argument("--weight-decay", type=NONNEG_F, default=0.01, help="decoupled (AdamW) weight decay")
    ap.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw",
                    help="sgd: an update linear in the gradient, for checking runs against each other (Adam's first "
                         "steps turn float noise in near-zero gradients into +-lr updates)")
    ap.add_argument("--grad-clip", type=NONNEG_F, default=1.0, help="max gradient norm (0 = no clipping)")
    ap.add_argument("--grad-accum", type=COUNT, default=1, help="rollouts (micro-steps) per optimizer step")
    ap.add_argument("--updates-per-rollout", type=COUNT, default=1,
                    help="optimizer steps on each rollout (GRPO: > 1 freezes an old policy and clips the ratio)")
    ap.add_argument("--activation-checkpointing", action="store_true",
                    help="recompute each transformer block in backward (memory for compute)")
    ap.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard per block); for Janus-Pro-7B")
    ap.add_argument("--lora-rank", type=NONNEG, default=0,
                    help="train LoRA adapters of this rank on the transformer blocks' linear layers instead of the "
                         "weights (0 = full fine-tuning). The base stays in the sampling dtype; GRPO's reference is "
                         "the base with the adapters off, and the policy samples itself")
    ap.add_argument("--lora-alpha", type=POSITIVE, default=16.0, help="LoRA scale alpha (the update is alpha / r B A)")
    ap.add_argument("--lora-targets", default=lora.BLOCK_LINEARS,
                    help="regex over the linear layers' names within a block (e.g. 'q_proj|v_proj')")
    add_sampling_and_loss_args(ap)
    # bookkeeping
    ap.add_argument("--seed", type=int, default=0, help="decides every random draw of the run")
    ap.add_argument("--save-every", type=COUNT, default=100, help="checkpoint every N steps (and at the end)")
    ap.add_argument("--keep", type=COUNT, default=3, help="newest checkpoints kept (>= 1)")
    ap.add_argument("--eval", default="selfcheck",
                    help="evaluation hook: selfcheck (one image per held-out task, judged by the model itself), or "
                         "a plug-in module:function, (model, processor, args, judge_model) -> {name: float}")
    ap.add_argument("--eval-every", type=NONNEG, default=0, help="evaluation hook every N steps (0 = off)")
    ap.add_argument("--eval-tasks", type=COUNT, default=48, help="held-out tasks of the evaluation hook")
    ap.add_argument("--sample-every", type=NONNEG, default=100,
                    help="every N steps (and at step 0 and the end) OUT/samples/step_N.png and samples.jsonl: the "
                         "images of --sample-groups groups with their answers and rewards; plus OUT/before_after.png "
                         "at the end (0 = none of these)")
    ap.add_argument("--sample-groups", type=COUNT, default=4, help="prompt groups per sample sheet")
    ap.add_argument("--verdict", default="none",
                    help="a plug-in module:function, (tasks, tokens, images) -> [bool]: an exact verdict shown under "
                         "each sampled image (the toy world's evaluator); none = no verdict")
    ap.add_argument("--resume", action="store_true", help="continue the newest checkpoint in --out")
    ap.add_argument("--overwrite", action="store_true",
                    help="start afresh in an --out that holds a run (its checkpoints and log are deleted)")
    ap.add_argument("--stop-after", type=NONNEG, default=0, help="end this process after N steps (for testing resume)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    ap.add_argument("--dist-timeout", type=POSITIVE, default=30.0,
                    help="torchrun: minutes a rank waits in a collective for the others before the run stops (a "
                         "plug-in --eval hook runs on rank 0 alone and must finish within it)")
    return ap


def add_sampling_and_loss_args(ap):
    ap.add_argument("--cfg", type=NONNEG_F, default=5.0, help="guidance while sampling")
    ap.add_argument("--temperature", type=POSITIVE,
                    help="Janus: image-token sampling temperature (default 1). Show-o samples its codes untempered "
                         "(official sampler); its knob is --remask-temperature")
    ap.add_argument("--remask-temperature", type=NONNEG_F, default=1.0,
                    help="Show-o: scale of the Gumbel noise that picks the tokens re-masked each MaskGIT step, "
                         "annealed to 0 over the steps (official default 1)")
    ap.add_argument("--showo-steps", type=COUNT, default=50, help="Show-o MaskGIT steps per image")
    ap.add_argument("--max-answer-tokens", type=COUNT, default=100,
                    help="self-check answer budget (also dr_grpo's answer denominator)")
    # GRPO
    ap.add_argument("--beta", type=NONNEG_F, default=0.2, help="k3 KL coefficient (0 skips the reference model)")
    ap.add_argument("--logp", choices=["cond", "cfg"], default="cond",
                    help="Janus image log-probs: the conditional row or the guided sampler's (GRPO's ratio and KL; "
                         "SFT's T2I target)")
    ap.add_argument("--showo-logp", choices=["masked", "trajectory"], default="masked",
                    help="Show-o image log-prob estimator: one masked pass, or a replay of the sampling steps")
    ap.add_argument("--showo-replay-steps", type=NONNEG, default=0,
                    help="trajectory replay: re-run this many randomly chosen sampling steps per update (their "
                         "tokens carry the loss; 0 = all). Each replayed step keeps one forward's graph until "
                         "backward, so this bounds memory")
    ap.add_argument("--optimize", choices=["t2i", "mmu", "both"], default="both", help="which tokens GRPO trains")
    ap.add_argument("--reward", default="self",
                    help="self: the model's own answers, scored slot by slot (UniRL); or a plug-in module:function, "
                         "(tasks, tokens, images) -> rewards [B] or (rewards, correct [B]), e.g. toy:exact_reward")
    ap.add_argument("--frozen-judge", action=argparse.BooleanOptionalAction, default=False,
                    help="answer with a frozen copy of the initial model instead of the one being trained")
    ap.add_argument("--verified-answer-loss", type=NONNEG_F, default=0.0,
                    help="GRPO: add this weight x the reference answers' cross-entropy on the images the self-check "
                         "verified (sft.verified_answer_loss), so understanding learns from the model's own images "
                         "too; with --no-frozen-judge the judge is the model being trained (the mutual mode)")
    ap.add_argument("--answer-kl", type=NONNEG_F, default=0.0,
                    help="GRPO with --no-frozen-judge: add this weight x k3(pi_theta, pi_ref) on the judge's answer "
                         "tokens, on every image, so that the judge may learn but not wander. The answers are greedy, "
                         "not samples of pi_theta, so this is a log-prob anchor to the initial model, not an "
                         "unbiased KL estimate")
    ap.add_argument("--clip-low", type=FRACTION, help="PPO clip: the ratio's floor is 1 - this (default 0.2); "
                    "binds only with --updates-per-rollout > 1")
    ap.add_argument("--clip-high", type=NONNEG_F, help="PPO clip: the ratio's ceiling is 1 + this (default 0.2; "
                    "DAPO's clip-higher: 0.28); binds only with --updates-per-rollout > 1")
    ap.add_argument("--skip-flat-groups", action=argparse.BooleanOptionalAction, default=False,
                    help="groups with equal rewards leave the GRPO loss (KL included)")
    ap.add_argument("--agg", choices=grpo.AGGREGATIONS, default="grpo", help="token aggregation (grpo.aggregate)")
    ap.add_argument("--no-adv-std", action="store_true", help="Dr. GRPO advantages r - mean")
    ap.add_argument("--reward-normalize", action=argparse.BooleanOptionalAction, default=False,
                    help="reward = matched slots / slots (else the count of matched slots)")
    # SFT
    ap.add_argument("--sft-mmu-filter", choices=["all", "verified"], default="all",
                    help="SFT answer loss on every image, or on the self-verified ones only")
    ap.add_argument("--cond-dropout", type=FRACTION, default=0.1,
                    help="SFT: share of T2I rows that see the unconditional prompt (keeps CFG working)")
    ap.add_argument("--end-to-end", action="store_true",
                    help="straight-through Gumbel SFT: the answer loss also trains generation (Janus: through the VQ "
                         "decoder and SigLIP; Show-o: one-hot image embeddings)")
    ap.add_argument("--tau", type=POSITIVE, default=1.0, help="Gumbel-softmax temperature of --end-to-end")


def checkpoint_defaults(ap, model_dir, algo):
    """The checkpoint folder's train_defaults.json as {dest: value} (top level, then its `algo` section), each
    value checked as the flag would check it. A key that is no flag, or a bad value, is an error naming both."""
    path = os.path.join(model_dir, DEFAULTS_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            raw = json.load(f)
        assert isinstance(raw, dict) and all(isinstance(raw.get(a, {}), dict) for a in ("sft", "grpo"))
    except (json.JSONDecodeError, AssertionError) as e:
        ap.error(f"{path}: expected a json object of flag: value (and \"sft\"/\"grpo\" objects) ({e})")
    values = {k: v for k, v in raw.items() if k not in ("sft", "grpo") and not k.startswith("_")}  # _x: notes
    values.update(raw.get(algo, {}))
    actions = {a.dest: a for a in ap._actions if a.dest not in ("help", "model")}
    for key, value in values.items():
        action = actions.get(key)
        if action is None:
            ap.error(f"{path}: {key!r} is not a train.py flag")
        try:
            if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):  # an on/off flag
                assert isinstance(value, bool)
            elif action.type is not None:
                value = action.type(str(value))
            assert action.choices is None or value in action.choices
        except (argparse.ArgumentTypeError, AssertionError, ValueError):
            ap.error(f"{path}: {key} = {value!r} is not a valid value of --{key.replace('_', '-')}")
        values[key] = value
    return values


def parse_args(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    if not os.path.isdir(args.model):
        ap.error(f"--model {args.model!r} is not a folder" + (" (the toy checkpoint is made by `python toy.py "
                 "pretrain --out assets/toy`)" if args.model == TOY_CHECKPOINT else ""))
    defaults = checkpoint_defaults(ap, args.model, args.algo)
    if defaults:  # the folder's defaults replace the paper's; flags on the command line still win
        ap.set_defaults(**defaults)
        args = ap.parse_args(argv)
    args.defaults_file = os.path.join(args.model, DEFAULTS_FILE) if defaults else None
    if args.dtype is None:
        args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    if args.exclude.lower() == "none":
        args.exclude = None
    elif not os.path.isfile(args.exclude):
        ap.error(f"--exclude {args.exclude!r} is not a file: without it GenEval's test prompts can become training "
                 "prompts. Point it at evaluation_metadata.jsonl (data/geneval/ ships one), or say --exclude none")
    for flag, builtin in (("task_source", "geneval"), ("reward", "self"), ("eval", "selfcheck"), ("verdict", "none")):
        value = getattr(args, flag)
        if value != builtin:  # a plug-in: load it now, so that a typo fails before any model is loaded
            try:
                import_named(value)
            except ValueError as e:
                ap.error(f"--{flag.replace('_', '-')} {value!r}: {e}")
    if args.eval != "selfcheck" and not args.eval_every:
        ap.error(f"--eval {args.eval} would never run: --eval-every is 0 (off); give it a period")
    if args.verified_answer_loss and args.algo != "grpo":
        ap.error("--verified-answer-loss is GRPO's; SFT's answer loss is always on (--sft-mmu-filter verified "
                 "keeps the verified images only)")
    if args.answer_kl and (args.algo != "grpo" or args.frozen_judge):
        ap.error("--answer-kl holds the answers of a judge that trains (GRPO with --no-frozen-judge) near the "
                 "initial model's; a frozen judge is the initial model already")
    if (args.clip_low is not None or args.clip_high is not None) and (args.algo != "grpo"
                                                                     or args.updates_per_rollout == 1):
        ap.error("--clip-low/--clip-high bound GRPO's ratio to pi_old, which exists only with --updates-per-rollout "
                 "> 1 (one update per rollout has ratio 1, which no clip changes)")
    if args.group_size == 1 and args.algo == "grpo":
        ap.error("--group-size 1: GRPO's advantages compare the images of one prompt; a group of one has none")
    return args


# -----------------------------------------------------------------------------------------------------------
# distribution and the objective


def setup_distributed(device, timeout_minutes):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is a single process. timeout_minutes: how long
    a collective waits for the other ranks (NCCL's own default, 10 minutes, is shorter than rank 0's longest lone
    work: a plug-in --eval hook, or gathering a 7B export)."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local), timeout=timeout)
        return rank, world, torch.device("cuda", local)
    dist.init_process_group("gloo", timeout=timeout)
    return rank, world, torch.device("cpu")


def gather_means(stats, tags, rewards):
    """Logging: loss terms averaged over ranks (a rank may lack a term, e.g. no verified image), and the reward
    mean/std overall and per tag over every image of the step."""
    local = dict(stats=stats, tags=tags, rewards=rewards)
    parts = [local]
    if dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, local)
    out = {}
    for key in sorted({k for p in parts for k in p["stats"]}):
        vals = [p["stats"][key] for p in parts if key in p["stats"]]
        out[key] = sum(vals) / len(vals)
    rewards = torch.tensor([r for p in parts for r in p["rewards"]])
    tags = [t for p in parts for t in p["tags"]]
    out["reward"], out["reward_std"] = float(rewards.mean()), float(rewards.std()) if len(rewards) > 1 else 0.0
    for tag in sorted(set(tags)):
        out[f"reward_{tag}"] = float(rewards[[i for i, t in enumerate(tags) if t == tag]].mean())
    return out


class Objective(nn.Module):
    """The loss as a module, so that DDP / FSDP see one forward per step (their hooks live on forward)."""

    def __init__(self, model, processor, args, ref_model=None):
        super().__init__()
        self.model, self.processor, self.args = model, processor, args
        # a tuple, so that the reference is no submodule: not saved, not in the policy's shards
        self.frozen = (Reference(ref_model, self.logprobs) if ref_model is not None else None,)

    def logprobs(self, model, ro, replay_steps=None):
        """The segments GRPO trains (--optimize), and the answers --answer-kl holds, under `model`:
        {"img": (logp, mask), "ans": (logp, mask)}."""
        a = self.args
        return sequence_logprobs(model, self.processor, ro, image=a.optimize != "mmu",
                                 answers=a.optimize != "t2i" or a.answer_kl > 0,
                                 cfg_weight=a.cfg, temperature=a.temperature, janus_mode=a.logp,
                                 replay_steps=replay_steps)

    def forward(self, ro, old_policy=False):
        """-> (loss, stats); with old_policy, pi_old's log-probs {part: [B, T]} of the rollout instead (no grad),
        which the caller keeps (it runs through this forward so that FSDP's root gathers the shards, as for the
        loss). A forward never writes to its inputs: FSDP2 may hand it a copy of the rollout.

        The rule that keeps ranks in step: every forward that FSDP2 gathers blocks for runs the same number of
        times on every rank, whatever its data (rows not kept are weighted 0, never skipped; a term is left out on
        every rank alike or on none), and every value that decides which tokens count stays fp32."""
        a = self.args
        if old_policy:
            with torch.no_grad():
                return {part: lp for part, (lp, _) in self.logprobs(self.model, ro).items()}
        if a.algo == "grpo":
            loss, stats = self.grpo(ro)
        else:
            loss, stats = sft.sft_loss(self.model, self.processor, ro, mmu_filter=a.sft_mmu_filter,
                                       cond_dropout=a.cond_dropout, generator=ro.generator, end_to_end=a.end_to_end,
                                       tau=a.tau, t2i_cfg_weight=a.cfg if a.logp == "cfg" else None)
        if not a.fsdp:  # DDP reduces every trainable parameter: let each join the graph (with weight 0), also
            # the ones a run leaves unused (e.g. lm_head with --optimize t2i). FSDP2 copes with unused ones itself.
            loss = loss + 0.0 * sum(p.reshape(-1)[0] for p in self.model.parameters() if p.requires_grad)
        return loss, stats

    def grpo(self, ro):
        """grpo.grpo_loss of the image codes plus that of the answer tokens (each its own mean, so ~10 answer
        tokens are not drowned by 576 image tokens). The reference sees the same replayed steps and masks."""
        a, ref_model = self.args, self.frozen[0]
        steps = replay_subset(ro, a.showo_replay_steps)
        policy = self.logprobs(self.model, ro, steps)
        ref = {}
        if (a.beta > 0 or a.answer_kl > 0) and (ref_model is not None or a.lora_rank):
            with torch.no_grad(), lora.adapters_off(self.model):  # a no-op without LoRA
                ref = ref_model(ro, steps) if ref_model is not None else self.logprobs(self.model, ro, steps)
                ref = {part: lp for part, (lp, _) in ref.items()}
        old = ro.logp_old or {}
        loss, stats = 0.0, {}
        for part, (lp, mask) in policy.items():
            if part == "ans" and a.optimize == "t2i":  # read for --answer-kl only
                continue
            budget = mask.shape[1] if part == "img" else a.max_answer_tokens  # dr_grpo's constant denominator
            value, s = grpo.grpo_loss(lp, mask, ro.rewards, ro.group_size, old.get(part), ref.get(part), a.beta,
                                      a.agg, not a.no_adv_std, a.skip_flat_groups, budget, a.clip_low, a.clip_high)
            stats.update(flat_groups=s.pop("flat_groups"), adv_abs=s.pop("adv_abs"), **{f"loss_{part}": value.item()})
            stats.update({f"{part}_{k}": v for k, v in s.items()})
            loss = loss + value
        if a.answer_kl:  # every image, flat groups included: the anchor does not depend on the advantage
            lp, mask = policy["ans"]
            value = grpo.aggregate(grpo.k3_kl(lp, ref["ans"]), mask, a.agg, a.max_answer_tokens)
            stats["answer_kl"] = value.item()
            loss = loss + a.answer_kl * value
        if a.verified_answer_loss:
            value, stats["verified"] = sft.verified_answer_loss(self.model, self.processor, ro)
            stats["loss_verified_answers"] = value.item()
            loss = loss + a.verified_answer_loss * value
        return loss, stats


class Reference(nn.Module):
    """The frozen reference policy whose forward gives its log-probs of a rollout, so that under FSDP2 it can be
    sharded like the policy: its shards are gathered in forward, block by block."""

    def __init__(self, model, logprobs):
        super().__init__()
        self.model, self.logprobs = model, logprobs

    def forward(self, ro, replay_steps=None):
        return self.logprobs(self.model, ro, replay_steps)


def lr_at(step, args):
    """Linear warmup, then cosine from lr to lr * min_lr_ratio over the remaining steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def set_trainable(model):
    """Janus: train the LLM and the generation embedding/heads; keep the VQ tokenizer, SigLIP and the aligner frozen
    (method.md section 8 defaults; understanding features are detached in GRPO anyway). Show-o: the whole
    transformer (its MAGVIT-v2 lives in the processor and is never trained)."""
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(("gen_vision_model.", "vision_model.", "aligner.")))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def task_generator(args, step, slot, device):
    """The RNG of one prompt group: a function of (seed, step, slot) only, never of the rank layout. It lives on
    the device, so samplers draw from it without host round trips."""
    return torch.Generator(device).manual_seed(args.seed * 1_000_003 + step * 10_007 + slot)


def resolve_defaults(args, model):
    """The family-dependent settings (the one place train.py tells Janus from Show-o), and the flags that
    would do nothing for this family, refused."""
    showo = hasattr(model, "showo")
    if showo and args.temperature is not None:
        raise SystemExit("--temperature is Janus' image-token temperature; Show-o samples its codes untempered "
                         "(use --remask-temperature for its re-masking noise)")
    if showo and args.logp == "cfg":
        raise SystemExit("--logp is Janus' image log-prob; Show-o's estimator is --showo-logp")
    if not showo and args.showo_logp != "masked":
        raise SystemExit("--showo-logp is for Show-o checkpoints")
    if args.temperature is None:
        args.temperature = 1.0
    # the sampler's temperature argument: Janus' token temperature, Show-o's re-masking temperature
    args.sample_temperature = args.remask_temperature if showo else args.temperature
    args.group_size = args.group_size or (3 if showo else 8)
    args.clip_low = 0.2 if args.clip_low is None else args.clip_low  # spec/method.md 6.3
    args.clip_high = 0.2 if args.clip_high is None else args.clip_high
    args.trajectory = args.algo == "grpo" and args.showo_logp == "trajectory"  # record Show-o's sampling steps


def build_training(args, model, processor, device, world):
    """-> (train_module, objective, sampler, judge, params, optimizer). The sampler is the model itself in fp32 without
    FSDP; otherwise an inference copy in the sampling dtype (FSDP: its shards gathered into it after each step)."""
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    frozen = None
    # LoRA: the adapters switched off are the reference
    wants_ref = args.algo == "grpo" and (args.beta > 0 or args.answer_kl > 0) and not args.lora_rank
    shard_ref = args.fsdp and wants_ref and not args.frozen_judge  # a judge samples: it stays whole
    if wants_ref or args.frozen_judge:  # a frozen copy of the initial weights (sharded: fully_shard moves it)
        frozen = copy.deepcopy(model).to(device="cpu" if shard_ref else device, dtype=dtype)
        frozen.eval().requires_grad_(False)
        for layer in lora.lora_layers(frozen).values():  # the initial weights are the base's
            layer.enabled = False
    ref_model = frozen if wants_ref else None
    judge = frozen if args.frozen_judge else None
    sampler = model
    if args.fsdp or (dtype != torch.float32 and not args.lora_rank):  # copied before sharding: whole tensors
        sampler = copy.deepcopy(model).to(device=device, dtype=dtype).eval().requires_grad_(False)
    objective = Objective(model, processor, args, ref_model)
    if args.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        # the roots take the rollout itself: cast to bf16 (FSDP2's default) its rewards, Show-o's mask noise and
        # pi_old's log-probs would change which tokens count and by how much. The blocks still cast their inputs
        root_mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
        for block in model.blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(objective, mp_policy=root_mp)
        if shard_ref:  # the reference only reads: its shards are gathered block by block as the policy's
            for block in frozen.blocks:
                fully_shard(block, mp_policy=mp)
            # a root stays gathered after forward unless told (the policy's backward needs its root; this has none)
            fully_shard(objective.frozen[0], mp_policy=root_mp, reshard_after_forward=True)
        train_module = objective
    elif world > 1:
        # gradient_as_bucket_view: the gradients are views into DDP's all-reduce buckets, not a second copy
        train_module = nn.parallel.DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda"
                                                           else None, gradient_as_bucket_view=True)
    else:
        train_module = objective
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=args.lr, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay)
    return train_module, objective, sampler, judge, params, optimizer


def make_task_sets(args):
    """(training tasks, held-out eval-hook tasks, report). GenEval's prompts (--exclude) are excluded from both.
    The built-in tasks of the eval hook also exclude every training prompt, so 'held out' means it; a plug-in's
    come from another seed (a small world, like the toy's, may have no prompt left to hold out)."""
    report = {}
    exclude = reward.geneval_prompts(args.exclude) if args.exclude else set()
    if args.task_source == "geneval":
        tasks = reward.make_tasks(args.tasks, args.seed, exclude_prompts=exclude, report=report)
        eval_tasks = reward.make_tasks(args.eval_tasks, args.seed + 1,
                                       exclude_prompts=exclude | {t["prompt"] for t in tasks})
        return tasks, eval_tasks, report
    make = import_named(args.task_source)  # a plug-in: its held-out tasks come from another seed
    banned = {reward.prompt_key(p) for p in exclude}
    tasks = [t for t in make(args.tasks, args.seed) if reward.prompt_key(t["prompt"]) not in banned]
    if not tasks:
        raise SystemExit(f"--task-source {args.task_source}: no training task is left after --exclude")
    report["excluded"] = args.tasks - len(tasks)
    eval_tasks = [t for t in make(args.eval_tasks, 10_000 + args.seed) if reward.prompt_key(t["prompt"]) not in banned]
    return tasks, eval_tasks, report


def collect_rollouts(args, sampler, processor, tasks, judge, reward_fn, step, rank, world, device):
    """grad_accum rollouts of whole prompt groups, each group seeded by its global slot (rank layout invariant)."""
    per_step = args.prompts_per_rank * args.grad_accum
    sampler.eval()
    rollouts = []
    for micro in range(args.grad_accum):
        slots = [(step * world + rank) * per_step + micro * args.prompts_per_rank + j
                 for j in range(args.prompts_per_rank)]
        ro = Rollout.cat([rollout(sampler, processor, [tasks[s % len(tasks)]], args.group_size, args.cfg,
                                  args.sample_temperature, task_generator(args, step, s, device),
                                  args.max_answer_tokens, args.reward_normalize, args.showo_steps, args.trajectory,
                                  judge, reward_fn) for s in slots])
        ro.generator = task_generator(args, step, slots[0], device)  # losses' fallback RNG (rollouts draw first)
        rollouts.append(ro)
    return rollouts


def update(args, train_module, model, optimizer, params, rollouts, autocast, step, last_good):
    """updates_per_rollout optimizer steps on the rollout (1 = UniRL's on-policy default: ratio 1, no clip).
    Returns (stats averaged over micro-rollouts and updates, gradient norm of the last update)."""
    model.train()  # the loss in train mode: activation checkpointing runs only there
    if args.algo == "grpo" and args.updates_per_rollout > 1:  # pi_old: the weights before this step's updates
        with torch.no_grad(), autocast:
            for ro in rollouts:
                ro.logp_old = train_module(ro, old_policy=True)
    stats_acc = {}
    max_norm = args.grad_clip if args.grad_clip > 0 else float("inf")  # 0 = no clipping (never a zero gradient)
    for _ in range(args.updates_per_rollout):
        for micro, ro in enumerate(rollouts):
            if isinstance(train_module, nn.parallel.DistributedDataParallel):  # all-reduce on the last one
                train_module.require_backward_grad_sync = micro == len(rollouts) - 1
            with autocast:
                loss, stats = train_module(ro)
            finite = torch.isfinite(loss.detach()).float()
            if dist.is_initialized():  # every rank stops together: a lone rank stopping would hang the rest
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if not bool(finite):
                raise RuntimeError(f"non-finite loss {loss.item()} at step {step} (stats {stats}); stopping. The "
                                   f"last good checkpoint is {last_good or 'none (none written yet)'}")
            (loss / len(rollouts)).backward()
            for k, v in stats.items():
                stats_acc[k] = stats_acc.get(k, 0.0) + v / len(rollouts) / args.updates_per_rollout
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if not torch.isfinite(grad_norm):
            raise RuntimeError(f"non-finite gradient norm at step {step}; stopping before the update")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if not weights_finite(params):  # e.g. a learning rate that overflows: nothing of this step is saved
            raise RuntimeError(f"non-finite weights after the update of step {step} (lr {optimizer.param_groups[0]['lr']:.3g})"
                               f"; stopping before anything is saved. The last good checkpoint is "
                               f"{last_good or 'none (none written yet)'}")
    return stats_acc, grad_norm


# -----------------------------------------------------------------------------------------------------------
# checkpoints: atomic (write to a temp folder, then rename), the newest `keep` kept


def checkpoint_dirs(out):
    """OUT's complete checkpoints (step_XXXXXXX; a step_XXXXXXX.tmp is one being written), oldest first."""
    return sorted(glob.glob(os.path.join(out, "step_*[0-9]")))


def training_state(module, optimizer):
    """What a resume needs, as torch.distributed.checkpoint state dicts (sharded under FSDP2, whole otherwise): the
    trained weights (fp32 masters, or the adapters) and the optimizer's state. Frozen weights come from --model."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    trained = {n for n, p in module.named_parameters() if p.requires_grad}
    return dict(model={k: v for k, v in get_model_state_dict(module).items() if k in trained},
                optim=get_optimizer_state_dict(module, optimizer))


@contextlib.contextmanager
def one_process_is_fine():
    """DCP warns that it 'assumes a single process' whenever no process group exists: here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_checkpoint(args, step, module, optimizer, rank, processor):
    """OUT/step_XXXXXXX/: train_state/ (every rank writes its own shards through torch.distributed.checkpoint,
    nothing is gathered) and train_state.json (step, arguments), plus what load_model reads: model.safetensors,
    gathered tensor by tensor onto rank 0's CPU, with the source's json files and the processor's own (Janus' chat
    roles, Show-o's MAGVIT-v2) - or under LoRA the PEFT adapter folder. module: the model, or under FSDP the
    sharded Objective root (its keys carry a "model." prefix). Written to a temporary folder, then renamed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, StateDictOptions
    final = os.path.join(args.out, f"step_{step:07d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if dist.is_initialized():
        dist.barrier()
    model = module.model if isinstance(module, Objective) else module
    try:  # a collective: a failure on any rank is raised on every rank
        with one_process_is_fine():
            dcp.save(training_state(module, optimizer), checkpoint_id=os.path.join(tmp, "train_state"),
                     no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as e:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise SystemExit(f"saving {final} failed: " + ("disk full" if "No space left" in str(e) else str(e)[:300])
                         + "; its partial folder was removed") from e
    if args.lora_rank:  # the adapters alone (every rank takes part in gathering them); the base is --model
        adapter_sd = lora.adapter_state_dict(model)
    else:
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = {k.removeprefix("model."): v for k, v in get_model_state_dict(module, options=full).items()}
    failure = None
    if rank == 0:
        try:
            write_export(args, step, tmp, final, model, processor, adapter_sd if args.lora_rank else model_sd)
        except OSError as e:  # a full disk, a vanished folder: leave nothing half-written behind
            shutil.rmtree(tmp, ignore_errors=True)
            failure = f"saving {final} failed: " + ("disk full" if e.errno == errno.ENOSPC else str(e))
    ok = torch.tensor(float(failure is None), device=next(model.parameters()).device)
    if dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if not bool(ok):
        raise SystemExit((failure or f"saving {final} failed on rank 0") + "; its partial folder was removed; the "
                         "last good checkpoint is " + (checkpoint_dirs(args.out) or ["none (none written yet)"])[-1])
    if dist.is_initialized():
        dist.barrier()
    return final


def write_export(args, step, tmp, final, model, processor, state):
    """Rank 0's part of a checkpoint: train_state.json and the loadable export (the gathered weights `state`, or
    the adapters), then the rename and the rotation to the newest --keep."""
    with open(os.path.join(tmp, "train_state.json"), "w") as f:
        json.dump(dict(step=step, args=vars(args)), f, indent=1)
    if args.lora_rank:  # PEFT's adapter folder: lora.load_adapter(load_model(base), folder) reads it
        lora.save_adapter(model, tmp, args.lora_target_regex, os.path.abspath(args.model), state)
    else:  # with the chat roles this run used (a reload never guesses them) and Show-o's MAGVIT-v2
        write_model_folder(tmp, state, args.model, processor)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in checkpoint_dirs(args.out)[:-args.keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path, module, optimizer):
    """Every rank reads its own shards of the trained weights and the optimizer state. -> (step, the arguments
    the checkpoint's run was started with)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict, StateDictOptions
    meta = os.path.join(path, "train_state.json")
    if not os.path.isfile(meta):
        raise SystemExit(f"--resume: {path} has no train_state.json (a checkpoint of an older train.py, or not one "
                         "at all): its weights load with load_model, but a resume needs the training state")
    state = training_state(module, optimizer)  # the layout to read into: this run's shards
    try:
        with one_process_is_fine():
            dcp.load(state, checkpoint_id=os.path.join(path, "train_state"), no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as e:  # DCP's own is no Exception; say which checkpoint, and why
        reason = [line for line in str(e).splitlines() if line.strip()][-1:] or [type(e).__name__]
        raise SystemExit(f"--resume: {path}/train_state cannot be read into this run ({reason[0].strip()[:300]}): a "
                         "broken checkpoint, or one of another model, --lora-rank or --lora-targets") from e
    set_model_state_dict(module, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(module, optimizer, state["optim"])
    with open(meta) as f:
        stored = json.load(f)
    return stored["step"], stored["args"]


def resume_newest_loadable(args, ckpts, module, optimizer, device):
    """Load the newest checkpoint that loads on every rank; a broken one (a disk that filled, a copy cut short) is
    skipped, naming it and why. -> (its step, the checkpoints up to it)."""
    for i in range(len(ckpts) - 1, -1, -1):
        try:
            start, stored = load_checkpoint(ckpts[i], module, optimizer)
            problem = None
        except (SystemExit, Exception) as e:  # load_checkpoint's refusals are SystemExit
            start, stored, problem = None, None, str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        ok = torch.tensor(float(problem is None), device=device)
        if dist.is_initialized():  # all ranks take the same checkpoint
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if bool(ok):
            check_resume(args, stored, start, ckpts[i])
            return start, ckpts[:i + 1]
        print(f"--resume: skipping {ckpts[i]}, it does not load" + (f": {problem}" if problem else " on another rank"),
              file=sys.stderr)
    raise SystemExit(f"--resume: no checkpoint in {args.out} loads (tried {len(ckpts)}); see the reasons above")


def check_run_dir(args):
    """Before any rank writes anything: an --out that holds a run is continued (--resume), started afresh
    (--overwrite) or refused - never mixed with a new run (its rotation would delete the new checkpoints)."""
    ckpts = checkpoint_dirs(args.out)
    if args.resume and args.overwrite:
        raise SystemExit("--resume and --overwrite contradict each other")
    if (ckpts or os.path.isfile(os.path.join(args.out, "log.jsonl"))) and not (args.resume or args.overwrite):
        raise SystemExit(f"--out {args.out} already holds a run ({len(ckpts)} checkpoint(s), log.jsonl): pass "
                         "--resume to continue it, --overwrite to start afresh, or another --out")


def clear_run_dir(out):
    for path in glob.glob(os.path.join(out, "step_*")):
        shutil.rmtree(path, ignore_errors=True)
    for name in ("log.jsonl", "config.json"):
        if os.path.isfile(os.path.join(out, name)):
            os.remove(os.path.join(out, name))


def check_resume(args, stored, start, path):
    """A resumed run must be the same run: the algorithm, model and seed decide what every step draws."""
    for key in ("algo", "model", "seed"):
        old, new = stored.get(key), getattr(args, key)
        if key == "model":
            old, new = os.path.abspath(str(old)), os.path.abspath(new)
        if old != new:
            raise SystemExit(f"--resume: {path} was made with --{key} {old}, this run says --{key} {new}; use "
                             "another --out, or --overwrite to replace that run")
    changed = {k: (stored[k], v) for k, v in vars(args).items() if k in stored and stored[k] != v
               and k not in ("resume", "stop_after", "overwrite")}
    if changed:
        print("--resume with changed arguments: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
    if args.steps <= start:
        raise SystemExit(f"--resume: {path} is at step {start} and --steps is {args.steps}: nothing to train")


def cut_log(path, step):
    """Keep the log lines up to the resumed checkpoint's step, so that every step appears once."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


@torch.no_grad()
def weights_finite(params):
    """All ranks agree whether every (local shard of every) trainable parameter is finite."""
    local = torch.stack([torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all() for p in params])
    flag = local.all().float()
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


# -----------------------------------------------------------------------------------------------------------
# evaluation and logging


@torch.no_grad()
def self_check_eval(model, processor, tasks, args, device, rank=0, world=1):
    """The built-in eval hook: one image per held-out task, judged by the model itself; accuracy overall and per
    tag. Each rank takes every world-th task (seeded by its index, so the split changes nothing), and the counts
    are summed on the device."""
    tags = list(dict.fromkeys([t for t in reward.TAGS] + sorted({t["tag"] for t in tasks})))
    counts = torch.zeros(2, len(tags), device=device)  # [correct, seen] per tag
    for i in tqdm(range(rank, len(tasks), world), desc="eval", leave=False, disable=rank != 0):
        ro = rollout(model, processor, [tasks[i]], 1, args.cfg, args.sample_temperature,
                     torch.Generator(device).manual_seed(i), args.max_answer_tokens, steps=args.showo_steps)
        counts[:, tags.index(tasks[i]["tag"])] += torch.tensor([float(ro.correct[0]), 1.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(counts)
    correct, seen = counts.tolist()
    return dict(selfcheck=sum(correct) / max(1, sum(seen)),
                **{f"selfcheck_{t}": c / n for t, c, n in zip(tags, correct, seen) if n})


def make_evaluator(args, sampler, processor, judge, eval_tasks, device, rank, world):
    """() -> {name: float} of the current sampler, on every rank: the built-in self-check runs sharded over the
    ranks; a plug-in hook (--eval) runs on rank 0 alone (the others get {})."""
    hook = None if args.eval == "selfcheck" else import_named(args.eval)

    def evaluate():
        sampler.eval()
        if hook is not None:
            return hook(sampler, processor, args, judge) if rank == 0 else {}
        return self_check_eval(sampler, processor, eval_tasks, args, device, rank, world)
    return evaluate


def write_samples(args, step, ro, verdict_fn):
    """Rank 0: the first --sample-groups prompt groups of a rollout as OUT/samples/step_XXXXXXX.png (the prompt as
    a title, the group's images in a row, under each its answer, reward and verdict) and the same as lines of
    OUT/samples.jsonl. step: how many updates the drawing model had."""
    G = ro.group_size
    n = min(args.sample_groups, len(ro) // G) * G
    verdicts = [bool(v) for v in verdict_fn(ro.tasks[:n], ro.tokens[:n], ro.images[:n])] if verdict_fn else None
    png = os.path.join("samples", f"step_{step:07d}.png")
    sheet, lines = [], []
    for first in range(0, n, G):
        task, rows = ro.tasks[first], range(first, first + G)
        captions = [[ro.answers[i], f"reward {float(ro.rewards[i]):.2f}"]
                    + ([f"exact: {'right' if verdicts[i] else 'wrong'}"] if verdicts else []) for i in rows]
        sheet.append(dict(title=f"{task['prompt']}   Q: {task['question']}", images=[ro.images[i] for i in rows],
                          captions=captions))
        lines.append(dict(step=step, png=png, task=task, answers=[ro.answers[i] for i in rows],
                          rewards=[float(ro.rewards[i]) for i in rows],
                          **({"verdicts": [verdicts[i] for i in rows]} if verdicts else {})))
    plot.sample_sheet(sheet, os.path.join(args.out, png))
    with open(os.path.join(args.out, "samples.jsonl"), "a") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)


@torch.no_grad()
def draw_fixed(args, sampler, processor, tasks, device, n=4):
    """n images for each of the before/after prompts, each prompt seeded by its index: the same draw at the start
    and at the end of a run, so that the two differ only by the training."""
    sampler.eval()
    return [sample(sampler, processor, [t["prompt"]], n, args.cfg, args.sample_temperature,
                   torch.Generator(device).manual_seed(args.seed * 7919 + i), steps=args.showo_steps)["images"]
            for i, t in enumerate(tasks)]


def step_entry(args, step, rollouts, stats, grad_norm, update_s):
    """One log.jsonl line: the step's timings and throughput, its loss terms and rewards averaged over ranks."""
    t_sample, t_score = sum(r.sample_s for r in rollouts), sum(r.score_s for r in rollouts)
    rewards = [x for r in rollouts for x in r.rewards.tolist()]
    entry = dict(step=step + 1, lr=lr_at(step, args), grad_norm=float(grad_norm), rollout_s=t_sample,
                 score_s=t_score, update_s=update_s, images_per_s=len(rewards) / max(t_sample, 1e-9),
                 tokens_per_s=sum(r.tokens.numel() for r in rollouts) / max(t_sample, 1e-9))
    entry.update(gather_means(stats, [t["tag"] for r in rollouts for t in r.tasks], rewards))
    return entry


def start_log(args, rank, start, n_trainable, world, tasks, report):
    """Rank 0: cut log.jsonl back to the resumed step, write OUT/config.json (every effective argument), say what
    runs, and open the log for appending. Other ranks: None."""
    if rank != 0:
        return None
    cut_log(os.path.join(args.out, "log.jsonl"), start if start else -1)
    cut_log(os.path.join(args.out, "samples.jsonl"), start - 1)  # the step-`start` sheet is drawn again
    with open(os.path.join(args.out, "config.json.tmp"), "w") as f:
        json.dump(vars(args), f, indent=1)
    os.replace(os.path.join(args.out, "config.json.tmp"), os.path.join(args.out, "config.json"))
    print(f"{args.algo}: {n_trainable / 1e6:.1f}M trainable parameters, {world} rank(s), {args.dtype}, "
          f"{len(tasks)} tasks ({report.get('excluded', 0)} candidates excluded as GenEval prompts), "
          f"steps {start}..{args.steps}" + (f", defaults from {args.defaults_file}" if args.defaults_file else ""))
    return open(os.path.join(args.out, "log.jsonl"), "a")


INTERRUPTED = []  # the signals received (SIGINT, SIGTERM); the loop saves and stops at the end of the step


@contextlib.contextmanager
def catch_interrupts():
    """Ctrl-C or SIGTERM (a scheduler's kill) ends the run after the current step, with a checkpoint; a second
    one stops at once. The previous handlers come back afterwards."""
    def handler(signum, frame):
        if INTERRUPTED:
            raise KeyboardInterrupt
        INTERRUPTED.append(signum)
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint (again to stop now)",
              file=sys.stderr, flush=True)
    INTERRUPTED.clear()
    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def is_last_step(args, step, start, t_start, device):
    """-> (last, interrupted): --steps reached, --minutes spent (rank 0's clock decides for everyone),
    --stop-after reached, or a signal on any rank (every rank stops at the same step)."""
    # a collective's tensor lives on the training device (NCCL accepts nothing else)
    out_of_time = float(bool(args.minutes) and time.time() - t_start > 60 * args.minutes)
    clock = not dist.is_initialized() or dist.get_rank() == 0
    flags = torch.tensor([out_of_time if clock else 0.0, float(bool(INTERRUPTED))], device=device)
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    timed_out, interrupted = (bool(f) for f in flags.tolist())
    done = step + 1 == args.steps or timed_out or bool(args.stop_after and step + 1 - start >= args.stop_after)
    return done or interrupted, interrupted


def progress_bar(args, start, rank):
    """A run bounded by --minutes counts seconds (its ETA is then true); otherwise steps."""
    timed = bool(args.minutes)
    return tqdm(total=round(60 * args.minutes) if timed else args.steps, initial=0 if timed else start,
                unit="s" if timed else "step", disable=rank != 0, desc=args.algo)


def show_progress(bar, entry, t_start, timed):
    kl = entry.get("img_kl", entry.get("ans_kl"))
    bar.set_postfix(step=entry["step"], reward=f"{entry.get('reward', 0):.3f}",
                    **({} if kl is None else dict(kl=f"{kl:.4f}")))
    bar.update(min(round(time.time() - t_start), bar.total) - bar.n if timed else 1)


# -----------------------------------------------------------------------------------------------------------


def setup(args):
    """Distribution, the run folder, the model and everything built from it."""
    check_run_dir(args)  # every rank, before the rendezvous: nobody has written yet
    rank, world, device = setup_distributed(args.device, args.dist_timeout)
    torch.manual_seed(args.seed)
    if args.overwrite and rank == 0:
        clear_run_dir(args.out)
    if dist.is_initialized():
        dist.barrier()
    os.makedirs(args.out, exist_ok=True)
    # fp32 master weights whatever --dtype says: AdamW's updates of 1e-5 * w vanish in bf16. Under LoRA the base
    # never changes: it stays in the sampling dtype, and the adapters are fp32
    base_dtype = torch.bfloat16 if args.lora_rank and args.dtype == "bf16" else torch.float32
    # FSDP: the whole model lives on the CPU until fully_shard moves it to the GPU block by block, a shard each, so
    # no GPU ever holds all of it (7B in fp32: 28 GB); the processor (Show-o's MAGVIT-v2) goes to the GPU now
    model, processor = load_model(args.model, device="cpu" if args.fsdp else device, dtype=base_dtype, vq_dir=args.vq,
                                  roles=args.roles)
    processor.to(device)
    resolve_defaults(args, model)
    return rank, world, device, model, processor, make_trainable(args, model)


def make_trainable(args, model):
    """The weights this run trains: LoRA adapters (--lora-rank) or set_trainable's part of the model; and
    activation checkpointing as asked. -> the number of trainable weights."""
    if args.lora_rank:
        args.lora_target_regex = lora.target_regex(model, args.lora_targets)
        lora.apply_lora(model, args.lora_rank, args.lora_alpha, args.lora_target_regex)
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    else:
        n_trainable = set_trainable(model)
    model.checkpointing = args.activation_checkpointing
    return n_trainable


def main(argv=None):
    args = parse_args(argv)
    with catch_interrupts():
        return train(args)


def train(args):
    """The run: setup, resume, then per step rollouts -> update -> log, evaluate, sample, checkpoint."""
    rank, world, device, model, processor, n_trainable = setup(args)
    train_module, objective, sampler, judge, params, optimizer = build_training(args, model, processor, device, world)
    root = objective if args.fsdp else model  # what the checkpoints hold
    tasks, eval_tasks, report = make_task_sets(args)
    evaluate = make_evaluator(args, sampler, processor, judge, eval_tasks, device, rank, world)
    reward_fn = None if args.reward == "self" else import_named(args.reward)
    verdict_fn = None if args.verdict == "none" else import_named(args.verdict)
    start, ckpts = 0, checkpoint_dirs(args.out)
    if args.resume and ckpts:
        start, ckpts = resume_newest_loadable(args, ckpts, root, optimizer, device)
        refresh_sampler(sampler, model)
    elif args.resume and rank == 0:
        print(f"--resume: no checkpoint in {args.out} yet; starting at step 0")
    log = start_log(args, rank, start, n_trainable, world, tasks, report)
    before = after = None
    if args.eval_every and start == 0:  # the starting point, logged as step 0
        before = after = dict(step=0, **evaluate())
        if rank == 0:
            log.write(json.dumps(before) + "\n")
    fixed = eval_tasks[:6] if args.sample_every and rank == 0 else []  # the before/after prompts
    drawn_first = draw_fixed(args, sampler, processor, fixed, device)
    t_start, bar = time.time(), progress_bar(args, start, rank)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    for step in range(start, args.steps):
        # every random draw of a step is a function of (seed, step, rank): a resumed run repeats it exactly
        torch.manual_seed(args.seed * 1_000_003 + step * 1009 + rank)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        rollouts = collect_rollouts(args, sampler, processor, tasks, judge, reward_fn, step, rank, world, device)
        t1 = time.perf_counter()
        stats, grad_norm = update(args, train_module, model, optimizer, params, rollouts, autocast, step,
                                  ckpts[-1] if ckpts else None)
        refresh_sampler(sampler, model)
        entry = step_entry(args, step, rollouts, stats, grad_norm, time.perf_counter() - t1)
        last, interrupted = is_last_step(args, step, start, t_start, device)
        if args.eval_every and ((step + 1) % args.eval_every == 0 or last):
            entry.update(evaluate())
            after = entry
        if rank == 0 and args.sample_every and (step % args.sample_every == 0 or last):
            write_samples(args, step, rollouts[0], verdict_fn)
        if rank == 0:
            log.write(json.dumps(entry) + "\n")
            log.flush()
            show_progress(bar, entry, t_start, bool(args.minutes))
        if (step + 1) % args.save_every == 0 or last:
            ckpts.append(save_checkpoint(args, step + 1, root, optimizer, rank, processor))
        if interrupted:
            raise SystemExit(f"interrupted after step {step + 1}: saved {ckpts[-1]}; the same command with --resume "
                             "continues it exactly")
        if last:
            break
    bar.close()
    if rank == 0 and before:
        print_before_after(before, after)
    if fixed:
        path = plot.before_after([t["prompt"] for t in fixed], drawn_first, draw_fixed(args, sampler, processor, fixed,
                                 device), os.path.join(args.out, "before_after.png"), (f"step {start}", f"step {step + 1}"))
        print(f"the same prompts and seeds at step {start} and step {step + 1}: {path}")
    if rank == 0:
        log.close()
    if dist.is_initialized():  # leave together (rank 0 may still be drawing), and free DDP before its group
        dist.barrier()
        del train_module, objective
        dist.destroy_process_group()
    return before, after


def print_before_after(before, after):
    keys = [k for k in before if isinstance(before[k], float)]
    print(f"{'':28s} {'before':>8s} {'after':>8s}")
    for k in keys:
        print(f"{k:28s} {before[k]:8.3f} {after.get(k, float('nan')):8.3f}")


@torch.no_grad()
def refresh_sampler(sampler, model):
    """Copy the trained weights into the sampler copy, in place (CUDA-graph addresses stay valid; copy_ casts to
    the sampler's dtype). Under FSDP each shard is gathered first. Nothing to do when the model samples itself."""
    if sampler is model:
        return
    trained = dict(model.named_parameters())
    for name, p_sampler in sampler.named_parameters():
        p = trained[name]
        if p.requires_grad:  # the frozen towers never change
            p_sampler.copy_(p.full_tensor() if hasattr(p, "full_tensor") else p)


if __name__ == "__main__":
    main()
