"""The toy world: rendering/reading round trip, the exact evaluator against hand-built scenes, the tokenizer's
round trip through reward.py, and the shipped checkpoint (loads, draws 64-code images, reads rendered scenes)."""
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

import eval_geneval
import reward
import toy
from data_paths import TOY, toy_checkpoint
from model import load_janus

ASSETS = TOY
O = toy.Obj


def task(tag, classes, colors=(), count=None, relation=None):
    return reward.build_task(tag, classes, colors, count, relation)


def test_render_read_round_trip_every_tag():
    rng = random.Random(0)
    for tag in reward.TAGS:
        for _ in range(50):
            t = toy.sample_task(rng, tag)
            for scene in [toy.scene_for(t, rng)] + list(toy.near_misses(t, rng).values()):
                assert sorted(toy.read_scene(toy.render(scene))) == sorted(scene)
                assert not toy._touching(scene)  # slots keep a background gap between objects


def test_read_scene_reports_what_it_cannot_recognise():
    codes = toy.render([O("tv", "red", 0, 0, 0), O("kite", "blue", 3, 1, 1)])
    broken = codes.clone()
    broken[0] = 0  # a ring with a corner missing
    two_tone = codes.clone()
    two_tone[1] = toy.CODE["green"]
    for bad in (broken, two_tone):
        objs = toy.read_scene(bad)
        assert objs[0] == O(None, None, 0, None, None) and objs[1] == O("kite", "blue", 3, 1, 1)
    assert toy.read_scene(torch.zeros(64, dtype=torch.long)) == []


def test_pixels_are_the_exact_palette_through_the_model_tokenizer():
    codes = toy.render([O("bench", "white", 1, 0, 1), O("bottle", "black", 2, 1, 0)])
    px = toy.to_pixels(codes)
    assert px.shape == (8, 8, 3) and px.dtype == torch.uint8
    assert [tuple(p) for p in px.reshape(-1, 3).tolist()] == [toy.PALETTE[c] for c in codes.tolist()]
    assert torch.equal(toy.image_codes(Image.fromarray(px.numpy())), codes)


def test_judge_on_hand_built_scenes():
    two_kites = task("counting", ["kite"], count=2)
    assert toy.judge(toy.render([O("kite", "red", 0, 0, 0), O("kite", "blue", 3, 1, 1)]), two_kites)
    assert not toy.judge(toy.render([O("kite", "red", q, 0, 0) for q in (0, 1, 3)]), two_kites)  # exact count
    assert not toy.judge(toy.render([O("kite", "red", 0, 0, 0)]), two_kites)
    left = task("position", ["tv", "bench"], relation="left of")  # "a tv left of a bench"
    assert toy.judge(toy.render([O("tv", "red", 0, 1, 0), O("bench", "red", 1, 0, 1)]), left)
    assert not toy.judge(toy.render([O("tv", "red", 1, 1, 0), O("bench", "red", 0, 0, 1)]), left)  # swapped
    attr = task("color_attr", ["tv", "kite"], ["red", "blue"])
    assert toy.judge(toy.render([O("kite", "blue", 2, 0, 0), O("tv", "red", 1, 0, 0)]), attr)
    assert not toy.judge(toy.render([O("kite", "red", 2, 0, 0), O("tv", "blue", 1, 0, 0)]), attr)  # binding
    assert toy.oracle_reward(toy.render([O("tv", "red", 1, 0, 0)]), attr) == 0.0
    assert toy.oracle_reward(toy.render([O("tv", "red", 1, 0, 0)]), attr, partial=True) == 0.5


def test_every_task_has_a_satisfying_scene_and_rejected_near_misses():
    rng = random.Random(1)
    for t in toy.make_toy_tasks(300, seed=0):
        assert toy.judge(toy.render(toy.scene_for(t, rng)), t), t["prompt"]
        misses = toy.near_misses(t, rng)
        assert misses
        for kind, scene in misses.items():
            assert not toy.judge(toy.render(scene), t), (t["prompt"], kind, scene)


def test_scenes_draw_objects_in_the_order_their_prompt_names_them():
    """Two classes: the first named is the first read (reading order), in every quadrant pair, swaps included."""
    rng, quads = random.Random(3), set()
    for t in toy.make_toy_tasks(200, seed=4, tags=["two_object", "color_attr"]):
        for scene in [toy.scene_for(t, rng)] + list(toy.near_misses(t, rng).values()):
            objs = toy.read_scene(toy.render(scene))
            named = [x["class"] for x in t["include"]]
            if len({o.cls for o in objs}) == 2 and {o.cls for o in objs} == set(named):
                assert [o.cls for o in objs] == named, t["prompt"]
                quads.add(tuple(o.quad for o in objs))
    assert len(quads) == 6  # every ordered pair of quadrants in reading order


def test_noisy_captions_never_show_a_relation_or_a_binding_backwards():
    rng = random.Random(5)
    for t in toy.make_toy_tasks(300, seed=6, tags=["position", "color_attr"]):
        for scene in toy._caption_misses(t, rng):
            objs = [o for o in toy.read_scene(toy.render(scene)) if o.cls]
            want = {x["class"]: x.get("color") for x in t["include"]}
            if t["tag"] == "color_attr" and len(objs) == 2 and {o.cls for o in objs} == set(want):
                assert any(o.color == want[o.cls] for o in objs), t["prompt"]  # not both swapped
            if t["tag"] == "position":
                assert toy.describe(objs, "position") != toy.describe(
                    toy.read_scene(toy.render(toy.scene_for(t, rng, swap=True))), "position")


def test_training_mix_weights_the_relational_tags_and_evaluation_stays_uniform():
    from collections import Counter
    n, total = 6000, sum(toy.TRAINING_MIX.values())
    mixed, uniform = Counter(t["tag"] for t in toy.training_tasks(n, 0)), Counter(t["tag"] for t in
                                                                                toy.make_toy_tasks(n, 0))
    for tag in reward.TAGS:
        assert abs(mixed[tag] / n - toy.TRAINING_MIX[tag] / total) < 0.02, tag
        assert abs(uniform[tag] / n - 1 / 6) < 0.02, tag


def test_truthful_answers_never_overclaim():
    """reward.is_correct(describe(image)) => judge(image), except colors on a wrong class (documented)."""
    rng = random.Random(2)
    for _ in range(300):
        codes = toy.off_distribution(rng) if rng.random() < 0.3 else toy.render(toy.random_scene(rng)[1])
        objs = toy.read_scene(codes)
        for tag in reward.TAGS:
            t = toy.sample_task(rng, tag)
            if reward.is_correct(toy.describe(objs, tag), t) and not toy.judge(codes, t):
                assert tag == "colors" and t["include"][0]["class"] not in {o.cls for o in objs}


def test_toy_detector_plugs_into_eval_geneval():
    rng = random.Random(3)
    for t in toy.make_toy_tasks(30, seed=3):
        scene = toy.scene_for(t, rng) if rng.random() < 0.5 else list(toy.near_misses(t, rng).values())[0]
        codes = toy.render(scene)
        big = Image.fromarray(toy.to_pixels(codes).numpy()).resize((64, 64), Image.NEAREST)
        correct, _, _ = eval_geneval.evaluate_image(big, t, toy.ToyDetector(), toy.ToyColours())
        assert correct == toy.judge(codes, t)


def test_tokenizer_round_trips_prompts_and_answers():
    from model import JanusConfig, JanusProcessor
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        toy.write_checkpoint_files(d)
        proc = JanusProcessor(d, JanusConfig())
    tok = proc.tokenizer
    assert tok.token_to_id("<unk>") is not None
    rng = random.Random(4)
    for t in toy.make_toy_tasks(200, seed=4):
        assert proc.decode(proc.encode(t["prompt"])) == t["prompt"]
        ids = tok.encode(" " + t["answer"], add_special_tokens=False).ids  # as janus_answer_logprobs encodes it
        assert tok.token_to_id("<unk>") not in ids
        assert reward.score(proc.decode(ids + [proc.ids["eos"]]), t) == 1.0
        truthful = toy.describe(toy.read_scene(toy.render(toy.scene_for(t, rng))), t["tag"])
        assert proc.decode(proc.encode(truthful)) == truthful
    for text in [proc.question_text(q) for q in reward.QUESTIONS.values()]:
        assert tok.token_to_id("<unk>") not in tok.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def shipped():
    return load_janus(toy_checkpoint())


def test_shipped_checkpoint_loads_and_draws(shipped):
    from generate import janus_generate
    model, proc = shipped
    assert os.path.getsize(os.path.join(ASSETS, "model.safetensors")) <= 20 * 2 ** 20
    assert model.cfg.gen_grid ** 2 == 64 and model.cfg.gen_vocab_size == len(toy.PALETTE)
    prompts = [t["prompt"] for t in toy.make_toy_tasks(4, seed=5)]
    out = janus_generate(model, proc, prompts, 2, cfg_weight=2.0, generator=torch.Generator().manual_seed(0))
    assert out["tokens"].shape == (8, 64) and out["images"].shape == (8, 8, 8, 3)
    assert torch.equal(out["images"], toy.to_pixels(out["tokens"]))


def test_shipped_judge_reads_rendered_scenes(shipped):
    from rollout import self_check
    model, proc = shipped
    rng = random.Random(6)
    tasks, images, truth = [], [], []
    for t in toy.make_toy_tasks(24, seed=6):
        scenes = [toy.scene_for(t, rng)] + list(toy.answerable_misses(t, rng).values())[:1]
        for s in scenes:
            tasks.append(t)
            images.append(toy.to_pixels(toy.render(s)))
            truth.append(toy.judge(toy.render(s), t))
    said = self_check(model, proc, tasks, torch.stack(images))["correct"].tolist()
    agree = np.mean([a == b for a, b in zip(said, truth)])
    assert agree >= 0.9, agree


@pytest.mark.parametrize("reward_kind", ["toy:exact_reward", "self"])
def test_short_grpo_run_improves_toy_geneval(reward_kind, tmp_path):
    """The embedded main job in miniature: a few seeded GRPO steps on the shipped checkpoint raise toy-GenEval,
    with the exact evaluator as reward and with the model's own (frozen) judge."""
    toy_checkpoint()
    import train
    before, after = train.main(["--algo", "grpo", "--reward", reward_kind, "--out", str(tmp_path), "--steps", "12",
                                "--eval-every", "1000", "--eval-tasks", "60", "--seed", "0", "--save-every", "1000"])
    assert after["toy_geneval"] > before["toy_geneval"], (before, after)


def test_toy_diagnose_cli_prints_every_measure_of_every_tag():
    """README: `python toy.py diagnose` (here 1 task per tag, 8 images)."""
    import subprocess
    import sys
    from data_paths import ROOT
    run = subprocess.run([sys.executable, os.path.join(ROOT, "toy.py"), "diagnose", "--model", toy_checkpoint(),
                          "--tasks", "1", "--draws", "8"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    header = next(line for line in lines if line.startswith("tag")).split()
    for measure in ("exact", "reach", "flat", "adv_share", "precision", "layout", "direction", "dir_second",
                    "unrequested"):
        assert measure in header, measure
    rows = {line.split()[0]: line for line in lines if line.split() and line.split()[0] in reward.TAGS}
    assert list(rows) == reward.TAGS
    shares = [float(rows[t].split()[header.index("adv_share")]) for t in reward.TAGS]  # every row has it
    assert abs(sum(shares) - 1) < 0.01 or sum(shares) == 0


def test_toy_eval_cli_prints_the_per_tag_table():
    """README: `python toy.py eval` (here on 12 held-out prompts, 1 image each)."""
    import subprocess
    import sys
    from data_paths import ROOT
    run = subprocess.run([sys.executable, os.path.join(ROOT, "toy.py"), "eval", "--model", toy_checkpoint(), "--tasks",
                          "12", "--images", "1"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "CFG 2.0: toy-GenEval overall" in run.stdout and "(12 images)" in run.stdout
    assert all(tag in run.stdout for tag in ("all", "judge P"))
