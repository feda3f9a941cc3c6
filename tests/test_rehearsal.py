"""Every training line of the README, rehearsed in miniature through the CLI on every fixture model (Janus and Show-o):
sft and grpo, one process and torchrun with 2 ranks (DDP, FSDP2), fp32 and bf16. A CPU run with --dtype bf16 takes
the path a GPU takes (bf16 sampler copy, bf16 KV caches, autocast losses), so these tests cover what a GPU runs.

The one-process lines run in CI; the torchrun lines (about 4 minutes on 2 cores) are marked `slow`:
    python -m pytest -q -m slow tests/test_rehearsal.py
"""
import copy
import glob
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

import model
import rollout
import sft
import train
from data_paths import fixture_dirs
from distributed import torchrun as two_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = fixture_dirs("janus") + fixture_dirs("showo")
JANUS, SHOWO = fixture_dirs("janus"), fixture_dirs("showo")
name = os.path.basename


def tiny(model_dir, algo, out, dtype="fp32", steps=2, extra=()):
    """The launch line at miniature sizes: 2 steps, 2 images per prompt, 4 answer tokens, 4 MaskGIT steps."""
    return ["--model", model_dir, "--algo", algo, "--out", str(out), "--steps", str(steps), "--tasks", "16",
            "--group-size", "2", "--max-answer-tokens", "4", "--lr", "1e-3", "--warmup", "1", "--save-every", "1",
            "--cfg", "2", "--beta", "0.1", "--showo-steps", "4", "--device", "cpu", "--dtype", dtype, *extra]


def checkpoints(out):
    return sorted(glob.glob(os.path.join(out, "step_*[0-9]")))


def final_weights(out):
    return load_file(os.path.join(checkpoints(out)[-1], "model.safetensors"))


def assert_trained(out, model_dir, steps=2):
    """Finite numbers in every log line, one line per step, and weights that moved."""
    lines = [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]
    assert [l["step"] for l in lines] == list(range(1, steps + 1))
    for line in lines:
        bad = {k: v for k, v in line.items() if isinstance(v, float) and not math.isfinite(v)}
        assert not bad, f"non-finite log values {bad}"
    base = model.read_checkpoint(model_dir, names=model.WEIGHT_NAMES)
    got = final_weights(out)
    moved = max((got[k].float() - base[k].float()).abs().max().item() for k in got if k in base)
    assert moved > 1e-4, "training did not move the weights"
    return got


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by {worst:.3g}"


# -----------------------------------------------------------------------------------------------------------
# one process: both families x both algorithms x both dtypes, plus the options that change the code path


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("algo", ["sft", "grpo"])
@pytest.mark.parametrize("model_dir", MODELS, ids=name)
def test_one_process(model_dir, algo, dtype, tmp_path):
    train.main(tiny(model_dir, algo, tmp_path, dtype))
    assert_trained(tmp_path, model_dir)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("model_dir", MODELS, ids=name)
def test_mutual_mode(model_dir, dtype, tmp_path):
    """GRPO with the judge being the model trained, its answers trained on its verified images and held near the
    initial model's (the README's mutual-mode line)."""
    train.main(tiny(model_dir, "grpo", tmp_path, dtype, steps=3, extra=["--no-frozen-judge", "--verified-answer-loss",
                                                                        "1", "--answer-kl", "1"]))
    assert_trained(tmp_path, model_dir, steps=3)
    lines = [json.loads(l) for l in open(os.path.join(tmp_path, "log.jsonl"))]
    assert all("loss_verified_answers" in l and 0 <= l["verified"] <= 1 for l in lines)
    # step 1 answers with the initial weights themselves (fp32: the reference is an exact copy; the first step's
    # learning rate is 0, warmup), step 3 with weights one update away
    assert lines[0]["answer_kl"] < (1e-6 if dtype == "fp32" else 1e-2) and lines[2]["answer_kl"] > 0


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("model_dir", MODELS, ids=name)
def test_end_to_end_sft(model_dir, dtype, tmp_path):
    train.main(tiny(model_dir, "sft", tmp_path, dtype, extra=["--end-to-end"]))
    assert_trained(tmp_path, model_dir)


@pytest.mark.parametrize("algo", ["sft", "grpo"])
@pytest.mark.parametrize("model_dir", MODELS, ids=name)
def test_activation_checkpointing_really_runs(model_dir, algo, tmp_path, monkeypatch):
    calls = []
    real = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    train.main(tiny(model_dir, algo, tmp_path, "bf16", steps=1, extra=["--activation-checkpointing"]))
    assert calls, "--activation-checkpointing made no checkpoint call during the loss"


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("model_dir", MODELS, ids=name)
def test_resume_equals_uninterrupted(model_dir, dtype, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    train.main(tiny(model_dir, "grpo", whole, dtype, steps=3))
    train.main(tiny(model_dir, "grpo", split, dtype, steps=3, extra=["--stop-after", "2"]))
    assert len(checkpoints(split)) == 2
    train.main(tiny(model_dir, "grpo", split, dtype, steps=3, extra=["--resume"]))
    assert_same_weights(final_weights(whole), final_weights(split), atol=0.0)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("model_dir", SHOWO, ids=name)
def test_showo_trajectory_replay_with_two_prompts_per_rank(model_dir, dtype, tmp_path):
    train.main(tiny(model_dir, "grpo", tmp_path, dtype, extra=["--showo-logp", "trajectory", "--prompts-per-rank",
                                                               "2", "--showo-replay-steps", "2"]))
    assert_trained(tmp_path, model_dir)


@pytest.mark.parametrize("model_dir", SHOWO, ids=name)
def test_replayed_logprobs_equal_the_samplers_over_merged_groups(model_dir):
    """Two prompt groups merged as train.py merges them: the replay of every step gives each token the log-prob
    it was drawn with (fp32). The old merge interleaved [cond_1; uncond_1; cond_2; uncond_2] and was 31 nats off."""
    m, p = model.load_model(model_dir, dtype=torch.float32)
    parts = [rollout.rollout(m, p, [task], 2, 2.0, generator=torch.Generator().manual_seed(i), max_answer_tokens=3,
                             steps=4, trajectory=True) for i, task in enumerate(TASKS)]
    merged = rollout.Rollout.cat(parts)
    with torch.no_grad():
        logp, covered = rollout.sequence_logprobs(m, p, merged, answers=False, cfg_weight=2.0)["img"]
    assert covered.all()
    torch.testing.assert_close(logp, merged.sample_logprobs, atol=1e-5, rtol=0)
    with torch.no_grad():  # a subset of steps covers exactly the tokens those steps revealed
        some, covered = rollout.sequence_logprobs(m, p, merged, answers=False, cfg_weight=2.0,
                                                  replay_steps=[1, 3])["img"]
    assert torch.equal(covered, merged.trajectory_revealed[1] | merged.trajectory_revealed[3])
    torch.testing.assert_close(some[covered], merged.sample_logprobs[covered], atol=1e-5, rtol=0)


TASKS = [dict(prompt="a photo of a cat", question="What is the main item in this image?", answer="cat",
              tag="single_object", include=[{"class": "cat", "count": 1}]),
         dict(prompt="a photo of two dogs", question="How many items in this image?", answer="two dogs",
              tag="counting", include=[{"class": "dog", "count": 2}])]


@pytest.mark.parametrize("model_dir", MODELS, ids=name)
def test_losses_do_not_depend_on_the_rank_layout(model_dir):
    """DDP averages the per-rank losses: for every loss, the mean over two groups' batches must equal the loss of
    the merged batch, with images kept and rejected, so that torchrun equals one process whatever the split. The
    random draws of the losses (CFG dropout, Show-o's masks) belong to each group's rollout."""
    m, p = model.load_model(model_dir, dtype=torch.float32)
    m.train()
    args = train.parse_args(["--model", model_dir, "--cfg", "2", "--beta", "0"])
    train.resolve_defaults(args, m)
    objective = train.Objective(m, p, args)
    anchored = train.parse_args(["--model", model_dir, "--cfg", "2", "--beta", "0.1", "--answer-kl", "0.5",
                                 "--no-frozen-judge"])
    train.resolve_defaults(anchored, m)
    ref = copy.deepcopy(m).eval().requires_grad_(False)
    with torch.no_grad():  # a reference that differs, so that both KL terms are non-zero
        for w in ref.parameters():
            w.add_(torch.randn_like(w) * 1e-2)
    anchored_objective = train.Objective(m, p, anchored, ref)
    parts = [rollout.rollout(m, p, [t], 2, 2.0, generator=torch.Generator().manual_seed(i), max_answer_tokens=3,
                             steps=3) for i, t in enumerate(TASKS)]
    parts[0].correct, parts[1].correct = torch.tensor([True, False]), torch.tensor([True, True])
    parts[0].rewards, parts[1].rewards = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 1.0])
    merged = rollout.Rollout.cat(parts)
    losses = dict(
        sft=lambda ro: sft.sft_loss(m, p, ro, cond_dropout=0.5, generator=torch.Generator().manual_seed(7))[0],
        grpo=lambda ro: objective.grpo(ro)[0],
        grpo_kl_and_answer_kl=lambda ro: anchored_objective.grpo(ro)[0],
        verified_answers=lambda ro: sft.verified_answer_loss(m, p, ro)[0])
    for which, loss in losses.items():
        split = (loss(parts[0]) + loss(parts[1])) / 2
        assert float(loss(merged).detach()) == pytest.approx(float(split.detach()), abs=1e-5), which


# -----------------------------------------------------------------------------------------------------------
# what the launch lines promise around the training step


def test_grad_clip_zero_means_no_clipping(tmp_path):
    """--grad-clip 0 used to clip to norm 0, i.e. zero every gradient (Show-o's shipped config has no clipping)."""
    zero, huge = tmp_path / "zero", tmp_path / "huge"
    sgd = ["--optimizer", "sgd", "--lr", "0.5", "--weight-decay", "0"]
    train.main(tiny(JANUS[0], "sft", zero, extra=sgd + ["--grad-clip", "0"]))
    train.main(tiny(JANUS[0], "sft", huge, extra=sgd + ["--grad-clip", "1e9"]))
    assert_trained(zero, JANUS[0])
    assert_same_weights(final_weights(zero), final_weights(huge), atol=1e-6)


def test_showo_temperature_flags_are_separate(tmp_path):
    with pytest.raises(SystemExit, match="remask-temperature"):
        train.main(tiny(SHOWO[0], "grpo", tmp_path, extra=["--temperature", "0.5"]))
    train.main(tiny(SHOWO[0], "grpo", tmp_path, steps=1, extra=["--remask-temperature", "0.5"]))


def test_janus_roles_travel_with_every_checkpoint(tmp_path, capsys):
    """A Janus-1.3B run writes its roles into each checkpoint, which reloads with them, whatever its folder name;
    a folder without the file (e.g. a hub-cache snapshot) is guessed from its whole path, with a warning."""
    train.main(tiny(JANUS[0], "sft", tmp_path / "run", steps=1, extra=["--roles", "janus-1.3b"]))
    ckpt = checkpoints(tmp_path / "run")[-1]
    capsys.readouterr()
    m, p = model.load_model(ckpt)
    assert (m.cfg.user_role, m.cfg.assistant_role) == ("User", "Assistant")
    assert "warning" not in capsys.readouterr().err
    assert p.t2i_prompt_ids("x") == p.encode("User: x\n\nAssistant:<begin_of_image>")
    snapshot = tmp_path / "models--deepseek-ai--Janus-1.3B" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for f in glob.glob(os.path.join(JANUS[0], "*")):
        if not f.endswith(model.ROLES_FILE):
            os.symlink(f, snapshot / os.path.basename(f))
    m, _ = model.load_model(str(snapshot))
    assert m.cfg.user_role == "User"
    assert "warning" in capsys.readouterr().err
    m, _ = model.load_model(str(snapshot), roles="janus-pro")
    assert m.cfg.user_role == "<|User|>"


def test_geneval_prompts_are_excluded_by_default_and_eval_tasks_are_held_out(tmp_path):
    args = train.parse_args(["--model", JANUS[0], "--tasks", "2000", "--eval-tasks", "200"])
    assert os.path.isfile(args.exclude) and args.exclude.startswith(ROOT)  # the copy shipped in the repository
    tasks, eval_tasks, report = train.make_task_sets(args)
    geneval = {t["prompt"] for t in map(json.loads, open(args.exclude))}
    train_prompts = {t["prompt"] for t in tasks}
    assert report["excluded"] > 0 and not train_prompts & geneval
    assert not {t["prompt"] for t in eval_tasks} & (train_prompts | geneval)
    with pytest.raises(SystemExit):  # a missing exclude file is an error, never a silent "0 excluded"
        train.parse_args(["--model", JANUS[0], "--exclude", str(tmp_path / "missing.jsonl")])
    assert train.parse_args(["--model", JANUS[0], "--exclude", "none"]).exclude is None


def test_collectives_get_tensors_on_the_training_device(tmp_path, monkeypatch):
    """NCCL accepts only device tensors (gloo accepts both): every tensor train.py hands to a collective must live
    on the training device. Checked on a one-rank gloo group; on a GPU machine the same test runs on CUDA."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(29500 + os.getpid() % 1000))
    seen = []
    for fn in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor"):
        real = getattr(torch.distributed, fn)

        def wrapped(tensor, *args, _real=real, _fn=fn, **kwargs):
            seen.append((_fn, tensor.device))
            return _real(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.distributed, fn, wrapped)
    argv = tiny(JANUS[0], "grpo", tmp_path, "bf16", steps=1)
    argv[argv.index("--device") + 1] = device
    train.main(argv)
    assert "all_reduce" in {fn for fn, _ in seen}  # the stop flags, the finite checks, the eval counts
    assert all(d.type == torch.device(device).type for _, d in seen), seen


# -----------------------------------------------------------------------------------------------------------
# torchrun with 2 ranks: DDP and FSDP2 equal one process (fp32, SGD: linear in the gradient); bf16 trains


def torchrun(args, out, sharding):
    """2 ranks of train.py; a hang fails the test after 5 minutes (a launch takes 10-40 s here)."""
    two_ranks(args + (["--fsdp"] if sharding == "fsdp" else []), timeout=300)


SGD = ["--optimizer", "sgd", "--lr", "0.5"]


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("algo", ["sft", "grpo"])
@pytest.mark.parametrize("model_dir", MODELS, ids=name)
def test_torchrun_two_ranks(model_dir, algo, dtype, sharding, tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    torchrun(tiny(model_dir, algo, multi, dtype, extra=SGD + ["--prompts-per-rank", "1"]), multi, sharding)
    got = assert_trained(multi, model_dir)
    if dtype == "fp32":  # bf16 rounding differs with the batch layout, so only fp32 is held to equality
        train.main(tiny(model_dir, algo, single, dtype, extra=SGD + ["--prompts-per-rank", "2"]))
        assert_same_weights(final_weights(single), got, atol=1e-5)


def test_showo_with_magvit_in_another_folder_saves_a_folder_that_loads_alone(tmp_path):
    """README: `train.py --algo sft --model show-o --vq magvitv2`. The checkpoint it writes carries MAGVIT-v2, so
    load_model reads it with no --vq."""
    import shutil
    ckpt, vq = tmp_path / "showo", tmp_path / "magvitv2"
    shutil.copytree(SHOWO[0], ckpt)
    vq.mkdir()
    os.replace(ckpt / "magvit_config.json", vq / "config.json")  # the MAGVIT repo's own names
    os.replace(ckpt / "magvit.safetensors", vq / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="MAGVIT"):
        model.load_model(str(ckpt))
    train.main(tiny(str(ckpt), "sft", tmp_path / "run", steps=1, extra=["--vq", str(vq)]))
    saved = sorted(glob.glob(str(tmp_path / "run" / "step_*[0-9]")))[-1]
    _, p = model.load_model(saved)
    _, reference = model.load_model(str(ckpt), vq_dir=str(vq))
    for (k, a), (_, b) in zip(p.vq.state_dict().items(), reference.vq.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.slow
@pytest.mark.parametrize("model_dir", MODELS, ids=name)
def test_torchrun_fsdp_resume_is_exact_and_every_rank_writes_its_shards(model_dir, tmp_path):
    """FSDP2 on 2 ranks: the training state goes through torch.distributed.checkpoint, one file per rank, and a
    run stopped after 2 steps and resumed ends where an uninterrupted 3-step run ends."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    torchrun(tiny(model_dir, "grpo", whole, steps=3, extra=SGD + ["--prompts-per-rank", "1"]), whole, "fsdp")
    torchrun(tiny(model_dir, "grpo", split, steps=3, extra=SGD + ["--prompts-per-rank", "1", "--stop-after", "2"]),
             split, "fsdp")
    shards = sorted(os.listdir(checkpoints(split)[-1] + "/train_state"))
    assert [f for f in shards if f.endswith(".distcp")] == ["__0_0.distcp", "__1_0.distcp"]
    torchrun(tiny(model_dir, "grpo", split, steps=3, extra=SGD + ["--prompts-per-rank", "1", "--resume"]), split,
             "fsdp")
    assert_same_weights(final_weights(whole), final_weights(split), atol=0.0)
    model.load_model(checkpoints(split)[-1])  # the consolidated export loads strictly
