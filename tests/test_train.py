"""train.py end to end on a tiny model: torchrun with 2 processes (gloo) equals one process on the same global
batch, for both algorithms; an interrupted and resumed run equals an uninterrupted one; a NaN loss stops cleanly."""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import train

from data_paths import fixture_dirs
from distributed import torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JANUS = fixture_dirs("janus")[:1]


def common(out, algo, steps=2):
    return ["--model", JANUS[0], "--algo", algo, "--out", str(out), "--steps", str(steps), "--tasks", "16",
            "--group-size", "3", "--max-answer-tokens", "4", "--lr", "1e-3", "--warmup", "1", "--save-every", "1",
            "--cfg", "2", "--beta", "0.1", "--sft-mmu-filter", "all", "--device", "cpu", "--sample-every", "0"]


def final_weights(out):
    return load_file(os.path.join(sorted(glob.glob(os.path.join(out, "step_*[0-9]")))[-1], "model.safetensors"))


def assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by {worst:.3g}"


@pytest.mark.parametrize("algo,sharding", [("sft", "ddp"), ("grpo", "ddp"), ("sft", "fsdp")])
def test_torchrun_two_ranks_equal_one_process(algo, sharding, tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    sgd = ["--optimizer", "sgd", "--lr", "0.5"]  # an update linear in the gradient: float noise stays float noise
    sgd += ["--eval-every", "2", "--eval-tasks", "5"]  # the built-in eval hook, sharded over the ranks
    train.main(common(single, algo) + ["--prompts-per-rank", "2"] + sgd)
    torchrun(common(ddp, algo) + ["--prompts-per-rank", "1"] + sgd + (["--fsdp"] if sharding == "fsdp" else []))
    base = load_file(os.path.join(JANUS[0], "model.safetensors"))
    a, b = final_weights(single), final_weights(ddp)
    moved = max((a[k] - base[k]).abs().max().item() for k in a if k in base)
    assert moved > 1e-2  # training really moved the weights ...
    assert_same_weights(a, b, atol=1e-5)  # ... and the two layouts agree to float noise
    logs = [[json.loads(line) for line in open(os.path.join(d, "log.jsonl"))] for d in (single, ddp)]
    assert [e["step"] for e in logs[0]] == [e["step"] for e in logs[1]] == [0, 1, 2]
    for one, two in zip(*logs):  # 3 held-out tasks on rank 0, 2 on rank 1: the same accuracies as one process
        evals = {k: v for k, v in one.items() if k.startswith("selfcheck")}
        assert bool(evals) == (one["step"] != 1)  # evaluated at the start and every 2 steps
        assert evals == {k: v for k, v in two.items() if k.startswith("selfcheck")}


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    train.main(common(whole, "sft", steps=3))
    train.main(common(split, "sft", steps=3) + ["--stop-after", "2"])
    assert len(glob.glob(os.path.join(split, "step_*[0-9]"))) == 2
    train.main(common(split, "sft", steps=3) + ["--resume"])
    assert_same_weights(final_weights(whole), final_weights(split), atol=0.0)
    assert len(open(split / "log.jsonl").read().splitlines()) == 3


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    train.main(common(out, "sft", steps=1))
    good = final_weights(out)
    real = train.sft.sft_loss
    monkeypatch.setattr(train.sft, "sft_loss", lambda *a, **k: (real(*a, **k)[0] * float("nan"), {}))
    with pytest.raises(RuntimeError, match="non-finite loss"):
        train.main(common(out, "sft", steps=3) + ["--resume"])
    assert_same_weights(final_weights(out), good, atol=0.0)


# -----------------------------------------------------------------------------------------------------------
# the run folder: never mixed, resumed only as the same run, logged once per step, never saved poisoned


def test_a_used_out_is_refused_unless_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    train.main(common(out, "sft", steps=2))
    with pytest.raises(SystemExit, match="already holds a run"):
        train.main(common(out, "sft", steps=1))
    train.main(common(out, "sft", steps=1) + ["--overwrite"])
    assert [os.path.basename(p) for p in sorted(glob.glob(os.path.join(out, "step_*")))] == ["step_0000001"]
    assert len(open(out / "log.jsonl").read().splitlines()) == 1


def test_resume_refuses_another_run_and_cuts_the_log_back(tmp_path, capsys):
    out = tmp_path / "run"
    train.main(common(out, "sft", steps=3) + ["--save-every", "2"])  # checkpoints at steps 2 and 3
    # a run killed after logging step 3 but before its checkpoint landed: the log is one step ahead
    import shutil
    shutil.rmtree(out / "step_0000003")
    for bad in (["--seed", "1"], ["--algo", "grpo"]):
        with pytest.raises(SystemExit, match="was made with"):
            train.main(common(out, "sft", steps=3) + ["--save-every", "2", "--resume"] + bad)
    with pytest.raises(SystemExit, match="nothing to train"):
        train.main(common(out, "sft", steps=2) + ["--save-every", "2", "--resume"])
    capsys.readouterr()
    train.main(common(out, "sft", steps=3) + ["--save-every", "2", "--resume", "--lr", "2e-3"])
    assert "lr 0.001 -> 0.002" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in open(out / "log.jsonl")]
    assert steps == [1, 2, 3]


def test_config_json_holds_every_effective_argument(tmp_path):
    out = tmp_path / "run"
    argv = [a for a in common(out, "grpo", steps=1) if a not in ("--beta", "0.1")]
    train.main(argv)
    cfg = json.load(open(out / "config.json"))
    assert cfg["beta"] == 0.2 and cfg["group_size"] == 3 and cfg["dtype"] == "fp32"  # paper defaults, resolved


def test_non_finite_weights_stop_the_run_before_they_are_saved(tmp_path, monkeypatch):
    out = tmp_path / "run"
    train.main(common(out, "sft", steps=1))
    good = final_weights(out)
    real = torch.optim.AdamW.step

    def poisoned(self, *a, **k):  # a real update (loading the optimizer state also steps once, on zero grads)
        real_update = any(p.grad is not None and bool(p.grad.any()) for p in self.param_groups[0]["params"])
        result = real(self, *a, **k)
        if real_update:
            self.param_groups[0]["params"][0].data.fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    with pytest.raises(RuntimeError, match="non-finite weights"):
        train.main(common(out, "sft", steps=3) + ["--resume"])
    assert len(glob.glob(os.path.join(out, "step_*[0-9]"))) == 1
    assert_same_weights(final_weights(out), good, atol=0.0)


@pytest.mark.parametrize("flag,value", [("--lr", "inf"), ("--lr", "0"), ("--keep", "-1"), ("--keep", "0"),
                                        ("--grad-accum", "0"), ("--save-every", "0"), ("--tasks", "0"),
                                        ("--prompts-per-rank", "0"), ("--temperature", "0"), ("--temperature", "nan"),
                                        ("--max-answer-tokens", "0"), ("--minutes", "-1"), ("--cfg", "-1"),
                                        ("--cond-dropout", "1.5"), ("--group-size", "1")])
def test_numeric_flags_are_validated_naming_the_flag(flag, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--model", JANUS[0], "--out", str(tmp_path), flag, value])
    assert e.value.code == 2 and flag in capsys.readouterr().err


# -----------------------------------------------------------------------------------------------------------
# the checkpoint's own defaults (train_defaults.json) and the plug-ins (--task-source, --reward, --eval)


def folder_with_defaults(tmp_path, defaults):
    folder = tmp_path / "ckpt"
    shutil.copytree(JANUS[0], folder)
    (folder / "train_defaults.json").write_text(json.dumps(defaults))
    return str(folder)


def test_a_checkpoints_defaults_replace_the_papers_and_flags_still_win(tmp_path):
    folder = folder_with_defaults(tmp_path, {"lr": 0.002, "frozen_judge": True, "_note": "why", "grpo": {"beta": 0.0},
                                             "sft": {"logp": "cfg"}})
    args = train.parse_args(["--model", folder])
    assert (args.lr, args.frozen_judge, args.beta, args.logp) == (0.002, True, 0.0, "cond")
    assert args.defaults_file == os.path.join(folder, "train_defaults.json")
    assert train.parse_args(["--model", folder, "--algo", "sft"]).logp == "cfg"
    assert train.parse_args(["--model", folder, "--lr", "0.5", "--no-frozen-judge"]).lr == 0.5
    assert not train.parse_args(["--model", folder, "--no-frozen-judge"]).frozen_judge
    assert train.parse_args(["--model", JANUS[0]]).lr == 1e-5  # no file: the paper's


@pytest.mark.parametrize("bad", [{"lrr": 1}, {"lr": -1}, {"lr": "fast"}, {"frozen_judge": "yes"}, {"optimize": "all"},
                                 {"model": "elsewhere"}, ["lr", 1]])
def test_a_bad_defaults_file_is_one_error_naming_file_and_key(tmp_path, capsys, bad):
    folder = folder_with_defaults(tmp_path, bad)
    with pytest.raises(SystemExit):
        train.parse_args(["--model", folder])
    assert "train_defaults.json" in capsys.readouterr().err


def test_the_toy_folder_carries_the_toy_worlds_defaults():
    args = train.parse_args([])
    assert args.model == train.TOY_CHECKPOINT and args.defaults_file
    assert (args.lr, args.cfg, args.beta, args.optimize, args.minutes) == (1e-4, 2.0, 0.02, "t2i", 10.0)
    assert (args.task_source, args.eval, args.exclude) == ("toy:training_tasks", "toy:evaluate", None)
    assert args.logp == "cond" and train.parse_args(["--algo", "sft"]).logp == "cfg"


def test_the_verified_answer_loss_is_refused_where_it_would_do_nothing(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--model", JANUS[0], "--algo", "sft", "--verified-answer-loss", "1"])
    assert "--sft-mmu-filter" in capsys.readouterr().err


def test_the_answer_kl_is_refused_where_it_would_do_nothing(capsys):
    for line in (["--algo", "sft"], ["--algo", "grpo", "--frozen-judge"], ["--algo", "grpo"]):  # the toy's judge
        with pytest.raises(SystemExit):  # is frozen by its train_defaults.json
            train.parse_args(line + ["--answer-kl", "1"] + ([] if line == ["--algo", "grpo"] else
                                                            ["--model", JANUS[0]]))
        assert "--no-frozen-judge" in capsys.readouterr().err
    assert train.parse_args(["--answer-kl", "1", "--no-frozen-judge"]).answer_kl == 1


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("peak learning rate (default: 1e-05)", "(default: 0.2)", "(default: geneval)", "(default: selfcheck)",
                  "train_defaults.json"):
        assert shown in text, shown


def test_plugin_reward_eval_and_tasks_reach_the_run(tmp_path):
    """The rewards in the log are the plug-in's (1 for the first image of each group of 3: mean 1/3), the eval
    hook runs at step 0 and every --eval-every steps, and the tasks are the plug-in's."""
    import plugins
    plugins.CALLS.clear()
    train.main(common(tmp_path, "grpo") + ["--reward", "plugins:first_image_wins", "--eval", "plugins:count_calls",
                                           "--eval-every", "1", "--eval-tasks", "5", "--task-source",
                                           "plugins:two_tasks"])
    lines = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [line.get("hook_calls") for line in lines] == [1.0, 2.0, 3.0] and lines[0]["hook_tasks"] == 5.0
    for line in lines[1:]:
        assert line["reward"] == pytest.approx(1 / 3)
        assert set(k for k in line if k.startswith("reward_") and k != "reward_std") <= {"reward_single_object",
                                                                                        "reward_counting"}


@pytest.mark.parametrize("flag", ["--reward", "--eval", "--task-source"])
def test_an_unknown_plugin_fails_before_any_model_is_loaded(flag, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(common(tmp_path, "grpo") + [flag, "plugins:no_such_function"])
    assert "no_such_function" in capsys.readouterr().err and not os.path.exists(tmp_path / "log.jsonl")


def test_an_eval_hook_that_would_never_run_is_refused(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--model", JANUS[0], "--eval", "plugins:count_calls"])
    assert "--eval-every" in capsys.readouterr().err
    assert train.parse_args(["--model", JANUS[0], "--eval", "plugins:count_calls", "--eval-every", "5"]).eval_every == 5


# -----------------------------------------------------------------------------------------------------------
# what a person sees: sample sheets with the model's own answers, before/after, curves


def test_a_toy_run_leaves_sample_sheets_that_agree_with_its_log(tmp_path, capsys):
    """The shipped toy world, 3 GRPO steps: OUT/samples/step_*.png at steps 0 and 2 (the last), samples.jsonl
    whose rewards are the self-check scores of its answers and whose mean is the logged reward of that rollout,
    the exact verdicts of the toy world, and OUT/before_after.png."""
    import reward
    from PIL import Image
    out = tmp_path / "run"
    train.main(["--algo", "grpo", "--out", str(out), "--steps", "3", "--minutes", "0", "--prompts-per-rank", "2",
                "--sample-every", "2", "--sample-groups", "8", "--eval-every", "0", "--eval", "selfcheck"])
    assert sorted(os.listdir(out / "samples")) == ["step_0000000.png", "step_0000002.png"]
    assert json.load(open(out / "config.json"))["verdict"] == "toy:exact_verdict"  # the toy folder's defaults
    log = {e["step"]: e for e in map(json.loads, open(out / "log.jsonl"))}
    lines = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert [x["step"] for x in lines] == [0, 0, 2, 2]  # two groups per rollout, both drawn
    for x in lines:
        assert len(x["answers"]) == len(x["rewards"]) == len(x["verdicts"]) == 8
        assert x["rewards"] == pytest.approx([reward.score(a, x["task"]) for a in x["answers"]])
    for step in (0, 2):
        rewards = [r for x in lines if x["step"] == step for r in x["rewards"]]
        assert sum(rewards) / len(rewards) == pytest.approx(log[step + 1]["reward"])  # log step = updates after
        sheet = Image.open(out / "samples" / f"step_{step:07d}.png")
        assert sheet.width >= 8 * 64 and sheet.height >= 2 * 64  # eight images of at least 64 px per row
    picture = Image.open(out / "before_after.png")
    assert picture.width >= 8 * 64 and picture.height >= 6 * 64  # six prompts, four images before and after
    assert str(out / "before_after.png") in capsys.readouterr().out


def test_a_sample_sheet_shows_each_image_upscaled_where_it_belongs(tmp_path):
    import numpy as np
    import plot
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for _ in range(3)]
    path = plot.sample_sheet([dict(title="a prompt", images=images[:2], captions=[["yes"], ["no"]]),
                              dict(title="another", images=images[2:], captions=[["x", "y"]])], str(tmp_path / "s.png"))
    sheet = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(path))
    for image in images:  # each image appears once, as 8 x 8 blocks of its pixels
        big = image.repeat(8, 0).repeat(8, 1)
        hits = [(y, x) for y in range(sheet.shape[0] - 63) for x in range(sheet.shape[1] - 63)
                if sheet[y, x].tolist() == big[0, 0].tolist() and np.array_equal(sheet[y:y + 64, x:x + 64], big)]
        assert len(hits) == 1


def test_samples_after_resume_hold_each_step_once(tmp_path):
    out = tmp_path / "run"
    args = [a for a in common(out, "sft", steps=3) if a not in ("--sample-every", "0")]
    train.main(args + ["--save-every", "2", "--sample-every", "1", "--sample-groups", "1"])
    shutil.rmtree(out / "step_0000003")  # killed after sampling and logging step 3, before its checkpoint
    train.main(args + ["--save-every", "2", "--sample-every", "1", "--sample-groups", "1", "--resume"])
    assert [json.loads(line)["step"] for line in open(out / "samples.jsonl")] == [0, 1, 2]
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [1, 2, 3]


def test_plot_draws_the_curves_of_a_run(tmp_path):
    pytest.importorskip("matplotlib")  # optional: only plot.py's curves use it
    out = tmp_path / "run"
    train.main(common(out, "grpo", steps=2) + ["--eval-every", "1", "--eval-tasks", "2"])
    run = subprocess.run([sys.executable, os.path.join(ROOT, "plot.py"), str(out)], capture_output=True, text=True,
                         cwd=ROOT)
    assert run.returncode == 0, run.stderr
    from PIL import Image
    assert Image.open(out / "curves.png").size[1] > 4 * 200  # reward, KL, clip fraction, grad norm, eval panels
    import plot
    assert plot.eval_numbers(plot.read_log(str(out))) == {"selfcheck"} | {
        k for k in json.loads(open(out / "log.jsonl").readline()) if k.startswith("selfcheck_")}


# -----------------------------------------------------------------------------------------------------------
# what happens when: interrupted, a broken newest checkpoint, a full disk


def test_sigterm_saves_a_checkpoint_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path):
    import signal
    import time
    out, whole = tmp_path / "run", tmp_path / "whole"
    argv = common(out, "sft", steps=400) + ["--save-every", "1000"]
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py")] + argv, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = out / "log.jsonl"
    while not (log.exists() and len(log.read_text().splitlines()) >= 2):  # a few steps in
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "--resume continues it exactly" in err and "Traceback" not in err
    saved = sorted(glob.glob(os.path.join(out, "step_*[0-9]")))
    assert len(saved) == 1 and "step_" in err
    n = int(saved[0][-7:])
    assert [json.loads(line)["step"] for line in open(log)] == list(range(1, n + 1))
    train.main(common(whole, "sft", steps=400) + ["--save-every", "1000", "--stop-after", str(n + 1)])
    train.main(argv + ["--resume", "--stop-after", "1"])
    assert_same_weights(final_weights(whole), final_weights(out), atol=0.0)


def test_resume_skips_a_broken_newest_checkpoint_and_says_so(tmp_path, capsys):
    out, whole = tmp_path / "run", tmp_path / "whole"
    train.main(common(whole, "sft", steps=3))
    train.main(common(out, "sft", steps=3))
    newest = sorted(glob.glob(os.path.join(out, "step_*[0-9]")))[-1]
    for shard in glob.glob(os.path.join(newest, "train_state", "*.distcp")):
        open(shard, "wb").close()  # truncated, as by a copy cut short
    capsys.readouterr()
    train.main(common(out, "sft", steps=3) + ["--resume"])
    err = capsys.readouterr().err
    assert f"skipping {newest}" in err
    assert_same_weights(final_weights(whole), final_weights(out), atol=0.0)  # step 3 redone from step 2
    for shard in glob.glob(os.path.join(out, "step_*[0-9]", "train_state", "*.distcp")):
        open(shard, "wb").close()
    with pytest.raises(SystemExit, match="no checkpoint in .* loads"):
        train.main(common(out, "sft", steps=4) + ["--resume"])


def test_a_full_disk_leaves_no_partial_checkpoint_and_says_disk_full(tmp_path, monkeypatch):
    import errno
    import safetensors.torch
    out = tmp_path / "run"
    train.main(common(out, "sft", steps=1))

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(SystemExit, match=r"saving .*step_0000002 failed: disk full; its partial folder was removed; "
                                         r"the last good checkpoint is .*step_0000001"):
        train.main(common(out, "sft", steps=2) + ["--resume"])
    assert sorted(os.listdir(out)) == ["config.json", "log.jsonl", "step_0000001"]
