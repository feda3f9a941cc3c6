"""Between ranks: a distributed run equals one process by invariant, and no data can make the ranks disagree on
their collectives.

- FSDP2's root hands its forward a copy of the rollout: pi_old must still reach the loss (returned, never written
  onto the input), and nothing that decides which tokens count or how much (rewards, Show-o's mask noise, pi_old's
  log-probs) may be cast to bf16 on the way.
- With pi_old and a learning rate at which the PPO clip binds, 2 ranks (DDP, FSDP2) equal one process, and the
  same run WITHOUT pi_old is thousands of times the tolerance away: the comparison can see a lost pi_old.
- FSDP2 + Show-o + the mutual mode with uneven verified counts per rank finishes (it hung: one forward per
  verified row) and equals DDP.
- The compiled decode's KV cache is allocated once per row count and kept through training, evaluation and the
  before/after drawing (a re-allocation re-records its CUDA graph).

One-process and one-rank tests run in CI; the torchrun ones are `slow` (python -m pytest -q -m slow).
"""
import glob
import json
import os

import pytest
import torch

import grpo
import model
import rollout
import train
from data_paths import fixture_dirs
from distributed import torchrun

JANUS, SHOWO = fixture_dirs("janus")[0], fixture_dirs("showo")[0]
MODELS = [JANUS, SHOWO]
name = os.path.basename


def tiny(model_dir, out, dtype="fp32", steps=2, extra=(), reward="plugins:first_image_wins"):
    """A miniature GRPO launch line: 2 images per prompt, 4 answer tokens, 4 MaskGIT steps, SGD (an update
    linear in the gradient, so that layouts agree to float noise), rewards from a plug-in that never gives a flat
    group (1 for the first image of each prompt), so that the policy gradient is never zero."""
    return ["--model", model_dir, "--algo", "grpo", "--out", str(out), "--steps", str(steps), "--tasks", "16",
            "--group-size", "2", "--max-answer-tokens", "4", "--warmup", "1", "--save-every", "1", "--cfg", "2",
            "--beta", "0.1", "--showo-steps", "4", "--device", "cpu", "--dtype", dtype, "--optimizer", "sgd",
            "--lr", "0.5", "--sample-every", "0", "--reward", reward, *extra]


def final_weights(out):
    newest = sorted(glob.glob(os.path.join(out, "step_*[0-9]")))[-1]
    return model.read_checkpoint(newest, names=model.WEIGHT_NAMES)


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture
def one_rank(monkeypatch):
    """The environment torchrun gives a world of one: train.py then initialises a real (gloo) process group, so
    FSDP2 wraps the model in this very process, where the loss's inputs can be watched."""
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(29500 + os.getpid() % 2000)).items():
        monkeypatch.setenv(key, value)


REAL_LOSS, REAL_MASKS = grpo.grpo_loss, rollout.showo_group_masks


def watch_the_loss(monkeypatch):
    """Record what every grpo.grpo_loss call receives (rewards, whether pi_old came) and every mask of Show-o's
    masked estimator."""
    seen = dict(rewards=[], old=[], masks=[])
    real_loss, real_masks = REAL_LOSS, REAL_MASKS

    def loss(logp, mask, rewards, group_size, logp_old=None, *args, **kwargs):
        seen["rewards"].append(rewards.detach().clone())
        seen["old"].append(None if logp_old is None else logp_old.dtype)
        return real_loss(logp, mask, rewards, group_size, logp_old, *args, **kwargs)

    def masks(ro):
        seen["masks"].append(real_masks(ro).clone())
        return seen["masks"][-1]
    monkeypatch.setattr(grpo, "grpo_loss", loss)
    monkeypatch.setattr(rollout, "showo_group_masks", masks)
    return seen


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("model_dir", MODELS, ids=name)
def test_fsdp_hands_the_loss_the_rollout_as_it_was(model_dir, dtype, tmp_path, one_rank, monkeypatch):
    """One FSDP2 rank against one plain process, one step of 2 updates on the same rollout (drawn by the same
    initial weights): every update sees pi_old (fp32), and the rewards and Show-o's masks are exactly the plain
    run's. Fails on a forward that writes pi_old onto its input (FSDP2's root passes a copy: pi_old was lost, ratio
    1 for every update) and on a root that casts the rollout to bf16 (rewards 1/3 became 0.333984)."""
    runs = {}
    for sharded in (False, True):
        seen = watch_the_loss(monkeypatch)
        if not sharded:
            monkeypatch.delenv("RANK")  # a plain process, no process group
        else:
            monkeypatch.setenv("RANK", "0")
        train.main(tiny(model_dir, tmp_path / str(sharded), dtype, steps=1,
                        extra=["--updates-per-rollout", "2", "--reward-normalize", "--prompts-per-rank", "2"]
                        + (["--fsdp"] if sharded else [])))
        runs[sharded] = seen
    plain, fsdp = runs[False], runs[True]
    assert fsdp["old"] and fsdp["old"] == plain["old"] == [torch.float32] * len(plain["old"])
    assert all(r.dtype == torch.float32 for r in fsdp["rewards"])
    assert all(torch.equal(a, b) for a, b in zip(fsdp["rewards"], plain["rewards"]))
    assert len(fsdp["masks"]) == len(plain["masks"]) and all(torch.equal(a, b) for a, b in zip(fsdp["masks"],
                                                                                             plain["masks"]))


def test_clip_flags_are_refused_where_no_clip_can_bind(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--model", JANUS, "--clip-high", "0.28"])
    assert "--updates-per-rollout" in capsys.readouterr().err
    args = train.parse_args(["--model", JANUS, "--clip-high", "0.28", "--updates-per-rollout", "2"])
    train.resolve_defaults(args, model.load_model(JANUS)[0])
    assert (args.clip_low, args.clip_high) == (0.2, 0.28)


@pytest.mark.slow
@pytest.mark.parametrize("model_dir", MODELS, ids=name)
def test_two_ranks_keep_pi_old_where_the_clip_binds(model_dir, tmp_path, monkeypatch):
    """2 updates per rollout at SGD lr 0.5: after the first update the ratios leave [0.8, 1.2] (clip_frac about
    0.5 in the second update), so pi_old changes the result. One process with pi_old, the same without it, and
    2 ranks under DDP and FSDP2: the ranks equal the first within 1e-5, and the second is more than 1e-3 away
    from it (measured 0.07 Janus, 0.05 Show-o: a margin of thousands), so a lost pi_old cannot pass."""
    extra = ["--updates-per-rollout", "2"]
    train.main(tiny(model_dir, tmp_path / "single", extra=extra + ["--prompts-per-rank", "2"]))
    log = [json.loads(line) for line in open(tmp_path / "single" / "log.jsonl")]
    assert max(e["img_clip_frac"] for e in log) > 0.1  # the clip binds
    real = train.Objective.forward
    monkeypatch.setattr(train.Objective, "forward",
                        lambda self, ro, old_policy=False: None if old_policy else real(self, ro))
    train.main(tiny(model_dir, tmp_path / "no_old", extra=extra + ["--prompts-per-rank", "2"]))
    with_old = final_weights(tmp_path / "single")
    assert max_diff(with_old, final_weights(tmp_path / "no_old")) > 1e-3
    for sharding in ("ddp", "fsdp"):
        out = tmp_path / sharding
        torchrun(tiny(model_dir, out, extra=extra + ["--prompts-per-rank", "1"])
                 + (["--fsdp"] if sharding == "fsdp" else []))
        assert max_diff(with_old, final_weights(out)) <= 1e-5, sharding


@pytest.mark.slow
def test_fsdp_showo_mutual_mode_with_uneven_verified_counts_finishes_and_equals_ddp(tmp_path):
    """Rank 0 verifies 2 images, rank 1 one (tests/plugins.uneven_verified): the verified-answer loss must run the
    same forwards on both ranks. It hung under FSDP2 (one forward per verified row: 2 all-gathers per block on one
    rank, 1 on the other; on NCCL a hang or garbage weights). FSDP2 equals DDP within 1e-5 while training moves
    the weights by more than 1e-2, so a block fed the wrong shards would show."""
    extra = ["--no-frozen-judge", "--verified-answer-loss", "1", "--answer-kl", "1", "--task-source",
             "plugins:two_tasks", "--exclude", "none", "--prompts-per-rank", "1"]
    for sharding in ("ddp", "fsdp"):
        torchrun(tiny(SHOWO, tmp_path / sharding, extra=extra, reward="plugins:uneven_verified")
                 + (["--fsdp"] if sharding == "fsdp" else []), timeout=240)
    ddp, fsdp = final_weights(tmp_path / "ddp"), final_weights(tmp_path / "fsdp")
    base = model.read_checkpoint(SHOWO, names=model.WEIGHT_NAMES)
    assert max_diff({k: ddp[k] for k in base}, base) > 1e-2
    assert max_diff(ddp, fsdp) <= 1e-5
    log = [json.loads(line) for line in open(tmp_path / "fsdp" / "log.jsonl")]
    assert all(e["verified"] == pytest.approx(0.75) for e in log)  # 3 of 4 images: 2 on rank 0, 1 on rank 1


def test_the_compiled_decodes_cache_is_allocated_once_per_row_count(tmp_path, monkeypatch):
    """A training run that evaluates every step and draws the before/after pictures: the pooled KV cache of the
    (on CUDA: compiled, graph-captured) image decode is allocated once per row count - training (2 x 3 images),
    evaluation (2 x 1), before/after (2 x 4) - and never again.
    The pool keyed by purpose alone re-allocated it after every evaluation and drawing (a CUDA-graph re-record)."""
    made = []

    class Counted(model.KVCache):
        def __init__(self, cfg, batch, *args):
            made.append(batch)
            super().__init__(cfg, batch, *args)
    monkeypatch.setattr(model, "KVCache", Counted)
    train.main(["--model", JANUS, "--algo", "grpo", "--out", str(tmp_path), "--steps", "3", "--tasks", "16",
                "--group-size", "3", "--max-answer-tokens", "2", "--cfg", "2", "--device", "cpu", "--eval-every",
                "1", "--eval-tasks", "2", "--sample-every", "2", "--save-every", "10"])
    assert sorted(made) == sorted(set(made)), made  # one allocation per row count
    assert set(made) == {6, 2, 8}, made  # training: 3 images x [cond; uncond]; evaluation: 1 x 2; drawing: 4 x 2
