"""GenEval scoring: the decision rules on synthetic detections with hand-derived verdicts, the official folder
layout, and the summary formula. No weights: ScriptedDetector reads detections written into the test PNGs."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import eval_geneval as ge
from data_paths import fixture_dirs

BLANK = Image.new("RGB", (64, 64))
PALETTE = ge.PaletteColours()


def det(*objects):
    """{class: [(box, score, mask=None)]} from (class, box, score) triples."""
    out = {}
    for classname, box, score in objects:
        out.setdefault(classname, []).append((box, score, None))
    return out


def verdict(metadata, detections, image=BLANK, colours=PALETTE, **opts):
    opts = {**ge.DEFAULT_OPTIONS, **opts}
    return ge.evaluate_image(image, metadata, lambda im: detections, colours, opts)[:2]


# ------------------------------------------------------------------------------------------- thresholds, top-16, NMS

SINGLE = {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}
COUNTING = {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}],
            "prompt": "a photo of two clocks"}
BOX = [0, 0, 10, 10]


def test_threshold_is_strict():
    assert verdict(SINGLE, det(("bench", BOX, 0.3))) == (False, "expected bench>=1, found 0")
    assert verdict(SINGLE, det(("bench", BOX, np.float32(0.3)))) == (False, "expected bench>=1, found 0")  # as mmdet's
    assert verdict(SINGLE, det(("bench", BOX, 0.3001))) == (True, "")


def test_ties_come_out_in_reverse_detector_order_like_argsort_reversed():
    tied = det(("cup", [0, 0, 1, 1], 0.5), ("cup", [2, 2, 3, 3], 0.5), ("cup", BOX, 0.9))
    kept = ge.keep_confident(tied, "two_object")["cup"]
    assert [box5[:4] for box5, _ in kept] == [BOX, [2, 2, 3, 3], [0, 0, 1, 1]]


def test_counting_is_exact_with_the_0_9_threshold():
    assert verdict(COUNTING, det(("clock", BOX, 0.95), ("clock", BOX, 0.95))) == (True, "")
    # too low: the second clock scores 0.85 <= 0.9, although it would pass the 0.3 threshold of other tags
    assert verdict(COUNTING, det(("clock", BOX, 0.95), ("clock", BOX, 0.85))) == (False, "expected clock>=2, found 1")
    # too high: the exclude clause {clock, 3} fires on the third confident clock
    three = det(("clock", BOX, 0.95), ("clock", BOX, 0.95), ("clock", BOX, 0.91))
    assert verdict(COUNTING, three) == (False, "expected clock<3, found 3")
    # a third clock at exactly 0.9 is dropped (strict >), so the count is still exactly two
    assert verdict(COUNTING, det(("clock", BOX, 0.95), ("clock", BOX, 0.95), ("clock", BOX, 0.9))) == (True, "")


def test_at_most_16_objects_per_class_most_confident_first():
    people = det(*[("person", BOX, 0.5 + 0.02 * i) for i in range(20)])  # scores 0.50 .. 0.88
    kept = ge.keep_confident(people, "single_object")["person"]
    assert len(kept) == 16
    assert [round(box5[4], 2) for box5, _ in kept] == [round(0.88 - 0.02 * i, 2) for i in range(16)]
    # exclude counts the kept list: 20 detected, 16 kept, so ">= 17 persons" never fires and ">= 16" does
    meta = {"tag": "single_object", "include": [{"class": "person", "count": 1}], "prompt": "p"}
    assert verdict({**meta, "exclude": [{"class": "person", "count": 17}]}, people) == (True, "")
    assert verdict({**meta, "exclude": [{"class": "person", "count": 16}]}, people) == (False, "expected person<16, found 16")


def test_nms_uses_plus_one_iou_and_is_off_by_default():
    a, b = [0, 0, 9, 9], [5, 0, 14, 9]
    # +1 areas: 10*10 each, overlap 5*10 -> 50 / 150 = 1/3 (without +1: 36 / 126 = 0.286)
    assert ge.box_iou_plus1(a, b) == pytest.approx(1 / 3)
    two = det(("cup", a, 0.9), ("cup", b, 0.8))
    assert len(ge.keep_confident(two, "single_object")["cup"]) == 2  # max_overlap 1.0: no NMS
    nms = {**ge.DEFAULT_OPTIONS, "max_overlap": 0.3}  # 1/3 >= 0.3 suppresses; 0.286 would not
    assert [box5 for box5, _ in ge.keep_confident(two, "single_object", nms)["cup"]] == [[0, 0, 9, 9, 0.9]]


def official_order(scores, threshold=0.3, max_objects=16):
    """evaluate_images.py's expressions on its float32 rows."""
    scores = np.asarray(scores, dtype=np.float32)
    order = np.argsort(scores)[::-1]
    return order[scores[order] > np.float32(threshold)][:max_objects].tolist()


def test_nan_scores_and_ties_sort_as_the_official_argsort():
    """A NaN score is dropped, not a reason to misorder the rest; with more than 16 detections, tied scores come
    out in np.argsort(scores)[::-1]'s order (not a stable sort's)."""
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(1, 40))
        scores = rng.choice([0.2, 0.5, 0.7, 0.9, float("nan")], size=n).tolist()
        raw = {"cup": [([i, 0, i + 5, 5], s, None) for i, s in enumerate(scores)]}
        got = [int(box5[0]) for box5, _ in ge.keep_confident(raw, "single_object").get("cup", [])]
        assert got == official_order(scores), (scores, got)


def test_nms_iou_is_computed_on_the_float32_rows():
    """Non-integer boxes whose IoU lies between its float64 and float32 values of the threshold: the official code
    (float32 rows) keeps the second box, a float64 IoU suppresses it."""
    a = [2.702, 14.43, 13.209, 20.634999999999998]
    b = [9.717, 17.79, 28.398000000000003, 24.945999999999998]
    opts = {**ge.DEFAULT_OPTIONS, "max_overlap": 0.0763714388012886}
    kept = ge.keep_confident({"cup": [(a, 0.9, None), (b, 0.8, None)]}, "single_object", opts)["cup"]
    assert len(kept) == 2


# ------------------------------------------------------------------------------------------------------ position

B = [0, 0, 100, 100]  # the target: centre (50, 50), 100 x 100, so the margin is 0.1 * (100 + 100) = 20 per axis


def test_relative_position_directions_and_diagonal():
    assert ge.relative_position([140, 0, 240, 100], B) == {"right of"}  # offset (140, 0): 120 / 140 > 0.5
    assert ge.relative_position(B, [140, 0, 240, 100]) == {"left of"}
    assert ge.relative_position([0, -200, 100, -100], B) == {"above"}  # y points down
    assert ge.relative_position([0, 200, 100, 300], B) == {"below"}
    # offset (100, 100): shrunk (80, 80) / 141.4 = 0.566 on both axes -> two relations
    assert ge.relative_position([100, 100, 200, 200], B) == {"right of", "below"}
    assert ge.relative_position(B, B) == set()  # zero offset: no relation, no division by zero


def test_relative_position_margin_edge():
    # sideways: shrunk / full = (d - 20) / d > 0.5 needs d > 40
    assert ge.relative_position([40, 0, 140, 100], B) == set()  # d = 40: exactly 0.5, not > 0.5
    assert ge.relative_position([41, 0, 141, 100], B) == {"right of"}  # d = 41: 21 / 41 = 0.512
    assert ge.relative_position([20, 0, 120, 100], B) == set()  # d = margin: shrunk to 0
    # the margin scales with the boxes: the same offset of 5 is "right of" for 10-wide boxes (margin 2: 3/5)
    assert ge.relative_position([5, 0, 15, 10], [0, 0, 10, 10]) == {"right of"}
    assert ge.relative_position([5, 0, 105, 100], B) == set()


POSITION = {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                           {"class": "dog", "count": 1, "position": ["right of", 0]}],
            "prompt": "a photo of a dog right of a teddy bear"}


def test_position_clause():
    assert verdict(POSITION, det(("teddy bear", B, 0.9), ("dog", [140, 0, 240, 100], 0.9))) == (True, "")
    assert verdict(POSITION, det(("teddy bear", [140, 0, 240, 100], 0.9), ("dog", B, 0.9))) == \
        (False, "expected dog right of target, found left of target")
    assert verdict(POSITION, det(("dog", [140, 0, 240, 100], 0.9))) == \
        (False, "expected teddy bear>=1, found 0\nno target for dog to be right of")
    # only the most confident dog is judged: a low-scoring dog on the wrong side does not matter
    dogs = det(("teddy bear", B, 0.9), ("dog", [140, 0, 240, 100], 0.9), ("dog", [-200, 0, -100, 100], 0.5))
    assert verdict(POSITION, dogs) == (True, "")


def test_position_checks_every_object_target_pair():
    meta = {"tag": "position", "prompt": "p", "include": [{"class": "teddy bear", "count": 2},
                                                          {"class": "dog", "count": 1, "position": ["right of", 0]}]}
    # the dog (centre 190) is right of the first bear (centre 50) but left of the second (centre 450)
    objects = det(("teddy bear", B, 0.9), ("teddy bear", [400, 0, 500, 100], 0.8), ("dog", [140, 0, 240, 100], 0.9))
    assert verdict(meta, objects) == (False, "expected dog right of target, found left of target")


# -------------------------------------------------------------------------------------------------------- colour


def scripted(tmp_path, objects, name="x.png"):
    ge.write_scripted_sample(tmp_path / name, objects)
    image = Image.open(tmp_path / name).convert("RGB")
    return image, ge.ScriptedDetector()(image)


def test_colour_judges_only_the_top_count_objects(tmp_path):
    red_car = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"}
    image, found = scripted(tmp_path, [("car", (0, 0, 20, 20), 0.9, "red"), ("car", (30, 30, 50, 50), 0.8, "blue")])
    assert verdict(red_car, found, image) == (True, "")  # the blue car is less confident, so it is not judged
    image, found = scripted(tmp_path, [("car", (0, 0, 20, 20), 0.7, "red"), ("car", (30, 30, 50, 50), 0.8, "blue")])
    assert verdict(red_car, found, image) == (False, "expected red car>=1, found 0 red; and 1 blue")


def test_colour_majority_is_not_enough(tmp_path):
    three_red = {"tag": "colors", "include": [{"class": "car", "count": 3, "color": "red"}], "prompt": "p"}
    image, found = scripted(tmp_path, [("car", (0, 0, 10, 10), 0.9, "red"), ("car", (20, 0, 30, 10), 0.8, "red"),
                                       ("car", (40, 0, 50, 10), 0.7, "blue")])
    assert verdict(three_red, found, image) == (False, "expected red car>=3, found 2 red; and 2 red, 1 blue")


def test_colour_crop_uses_mask_on_grey_and_classifier_scores():
    image = Image.new("RGB", (20, 10), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 10, 10))  # left half red, right half blue
    mask = np.zeros((10, 20), dtype=bool)
    mask[:, :10] = True
    box5 = [0, 0, 20, 10, 0.9]
    masked, unmasked = ge.crop_objects(image, [(box5, mask), (box5, None)])
    assert masked.getpixel((15, 5)) == (153, 153, 153)  # outside the mask: #999 grey, ignored by the palette
    assert PALETTE([masked, unmasked], ge.COLOURS, "kite") == ["red", "purple"]  # unmasked: red + blue averaged
    # a classifier may return [N, 10] scores instead of names; argmax picks the colour
    scores = lambda crops, colours, classname: np.eye(10)[[colours.index("green")] * len(crops)]
    assert ge.object_colours(image, [(box5, mask)], "kite", scores) == ["green"]


# ------------------------------------------------------------------------------------------------ layout, summary


def write_prompt(imagedir, index, metadata, samples):
    folder = imagedir / f"{index:05d}"
    (folder / "samples").mkdir(parents=True)
    (folder / "metadata.jsonl").write_text(json.dumps(metadata) + "\n")
    for k, objects in enumerate(samples):
        ge.write_scripted_sample(folder / "samples" / f"{k:05d}.png", objects)


def test_layout_is_read_like_the_official_evaluator(tmp_path):
    write_prompt(tmp_path, 0, SINGLE, [[], []])
    Image.new("RGB", (8, 8)).save(tmp_path / "00000" / "samples" / "00002.jpg")  # not PNG: ignored
    write_prompt(tmp_path, 1, SINGLE, [[]])
    os.rename(tmp_path / "00001", tmp_path / "extra")  # not all digits: skipped
    assert [os.path.basename(p) for p, _ in ge.find_samples(tmp_path)] == ["00000.png", "00001.png"]
    (tmp_path / "00000" / "metadata.jsonl").write_text(json.dumps(SINGLE) + "\n" + json.dumps(SINGLE) + "\n")
    with pytest.raises(ValueError, match="exactly one JSON object"):
        ge.find_samples(tmp_path)


def rows_of(tag, prompt, verdicts):
    meta = json.dumps({"tag": tag, "prompt": prompt})
    return [{"tag": tag, "prompt": prompt, "correct": c, "metadata": meta} for c in verdicts]


def test_summary_is_the_unweighted_tag_mean(tmp_path, capsys):
    rows = (rows_of("single_object", "A", [True, True]) + rows_of("single_object", "B", [True, False])
            + rows_of("counting", "C", [False, False]) + rows_of("position", "D", [True, True]))
    s = ge.summarize(rows)
    assert s["tags"] == {"single_object": [3, 4], "counting": [0, 2], "position": [2, 2]}
    assert s["overall"] == pytest.approx((3 / 4 + 0 + 1) / 3)  # 0.5833, while the pooled mean is 5/8 = 0.625
    assert (s["n_images_correct"], s["n_images"]) == (5, 8)
    assert (s["n_prompts_correct"], s["n_prompts"]) == (3, 4)  # A, B, D have an image right
    # an official-evaluator file: pandas records with "\/" escapes and no `evaluator` key
    names = [f"out/{i // 2:05d}/samples/{i % 2:05d}.png" for i in range(len(rows))]  # 4 prompts x 2 images
    lines = [json.dumps(dict(filename=name, **r)).replace("/", "\\/") for name, r in zip(names, rows)]
    (tmp_path / "official.jsonl").write_text("\n".join(lines))
    ge.main(["summary", str(tmp_path / "official.jsonl")])
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "GenEval overall: 0.5833"
    assert "not recorded" in out[0]


def test_score_round_trip_into_summary(tmp_path, capsys):
    out = tmp_path / "out"
    write_prompt(out, 0, SINGLE, [[("bench", (5, 5, 40, 40), 0.9, "brown")], []])
    write_prompt(out, 1, COUNTING, [[("clock", (0, 0, 10, 10), 0.95, "white"), ("clock", (20, 0, 30, 10), 0.95, "white")],
                                    [("clock", (0, 0, 10, 10), 0.95, "white")] * 3])
    color_attr = {"tag": "color_attr", "prompt": "a photo of a red car and a blue bench",
                  "include": [{"class": "car", "count": 1, "color": "red"}, {"class": "bench", "count": 1, "color": "blue"}]}
    write_prompt(out, 2, color_attr, [[("car", (0, 0, 20, 20), 0.9, "red"), ("bench", (30, 30, 60, 60), 0.9, "blue")]] * 2)
    results = tmp_path / "results.jsonl"
    ge.main(["score", "--imagedir", str(out), "--outfile", str(results)])
    rows = ge.read_results(results)
    assert [r["correct"] for r in rows] == [True, False, True, False, True, True]
    assert rows[3]["reason"] == "expected clock<3, found 3"
    assert {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"} <= set(rows[0])
    assert json.loads(rows[0]["details"]) == {"bench": [[5, 5, 40, 40, 0.9]]}
    assert json.loads(rows[0]["metadata"]) == SINGLE
    capsys.readouterr()
    ge.main(["summary", str(results)])
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1] == "GenEval overall: 0.6667"  # (1/2 + 1/2 + 2/2) / 3
    assert "scripted" in printed[0]


# -----------------------------------------------------------------------------------------------------------
# generate -> official layout -> score -> summary -> selfcheck, on a fixture model

MODEL_DIRS = fixture_dirs("janus")[:1] + fixture_dirs("showo")[:1]


@pytest.mark.parametrize("model_dir", MODEL_DIRS, ids=os.path.basename)
def test_generate_layout_score_summary_round_trip(model_dir, tmp_path, capsys):
    rows = [{"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat",
             "question": "What is the main item in this image?", "answer": "cat"},
            {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}],
             "prompt": "a photo of two dogs", "question": "How many items in this image?", "answer": "two dogs"}]
    meta = tmp_path / "meta.jsonl"
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    args = ["generate", "--model", model_dir, "--metadata", str(meta), "--outdir", str(out), "--n-samples", "3",
            "--batch", "2", "--steps", "2"]
    ge.main(args)
    for i, row in enumerate(rows):
        folder = out / f"{i:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == row  # one JSON object, the metadata line
        assert sorted(os.listdir(folder / "samples")) == ["00000.png", "00001.png", "00002.png"]
        assert (folder / "grid.png").exists()
    assert json.load(open(out / "config.json"))["images_per_prompt"] == 3
    first = (out / "00001" / "samples" / "00002.png").read_bytes()
    os.remove(out / "00001" / "samples" / "00002.png")
    ge.main(args)  # resumes: only the incomplete prompt is sampled again, with the same seed
    assert (out / "00001" / "samples" / "00002.png").read_bytes() == first
    ge.main(["score", "--imagedir", str(out), "--outfile", str(out / "results.jsonl")])
    results = ge.read_results(str(out / "results.jsonl"))
    assert len(results) == 6
    assert {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"} <= set(results[0])
    capsys.readouterr()
    ge.main(["summary", str(out / "results.jsonl")])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("GenEval overall: ")
    qa = tmp_path / "qa.jsonl"
    qa.write_text(meta.read_text())
    res = ge.self_check_folder(model_dir, str(out), str(qa), str(out / "results.jsonl"), max_new_tokens=4)
    assert res["selfcheck"]["n"] == 6 and 0.0 <= res["selfcheck"]["overall"] <= 1.0
    assert len((out / "selfcheck.jsonl").read_text().splitlines()) == 6


def three_prompts(tmp_path):
    rows = [{"tag": "single_object", "include": [{"class": c, "count": 1}], "prompt": f"a photo of a {c}",
             "question": "What is the main item in this image?", "answer": c} for c in ("cat", "dog", "bench")]
    meta = tmp_path / "meta.jsonl"
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return meta


def folder_bytes(out):
    """{relative path: bytes} of every sample PNG and codes.npy of a generated folder."""
    return {os.path.relpath(os.path.join(d, f), out): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(out) for f in files if f.endswith((".png", ".npy")) and f != "grid.png"}


def test_generation_in_chunks_of_prompts_is_deterministic_resumable_and_keeps_its_recipe(tmp_path):
    """--n 2 --batch 4: two prompts per sampler call. The same recipe writes the same bytes into a fresh folder
    and into a resumed one; another recipe is refused rather than mixed into the folder."""
    meta, model_dir = three_prompts(tmp_path), MODEL_DIRS[0]
    args = lambda out, *extra: ["generate", "--model", model_dir, "--metadata", str(meta), "--outdir", str(out),
                                "--n-samples", "2", "--batch", "4", *extra]
    ge.main(args(tmp_path / "a"))
    ge.main(args(tmp_path / "b"))
    first = folder_bytes(tmp_path / "a")
    assert len(first) == 3 * 3 and first == folder_bytes(tmp_path / "b")
    assert json.load(open(tmp_path / "a" / "config.json"))["prompts_per_call"] == 2
    import shutil
    shutil.rmtree(tmp_path / "a" / "00001")  # its chunk (prompts 0 and 1) is drawn again, with its own seed
    ge.main(args(tmp_path / "a"))
    assert folder_bytes(tmp_path / "a") == first
    with pytest.raises(SystemExit, match="seed 0 -> 1"):
        ge.main(args(tmp_path / "a", "--seed", "1"))


@pytest.mark.slow
def test_torchrun_generation_and_selfcheck_equal_one_process(tmp_path):
    """Two ranks split the prompt chunks (rank 0: prompts 0-1, rank 1: prompt 2) and write the same images as one
    process; the self-check gathers the same verdicts."""
    import subprocess
    import sys
    from data_paths import ROOT
    meta, model_dir = three_prompts(tmp_path), MODEL_DIRS[0]
    gen = lambda out: ["generate", "--model", model_dir, "--metadata", str(meta), "--outdir", str(out), "--n-samples", "2",
                       "--batch", "4"]
    check = ["selfcheck", "--model", model_dir, "--metadata", str(meta), "--imagedir"]
    one = [sys.executable, os.path.join(ROOT, "eval_geneval.py")]  # one thread each, as every torchrun rank
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                os.path.join(ROOT, "eval_geneval.py")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for launch, folder in ((one, "one"), (torchrun, "two")):
        for argv in (gen(tmp_path / folder), check + [str(tmp_path / folder)]):
            run = subprocess.run(launch + argv, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
            assert run.returncode == 0, run.stderr[-3000:]
    assert folder_bytes(tmp_path / "one") == folder_bytes(tmp_path / "two")
    verdicts = [(tmp_path / d / "selfcheck.jsonl").read_text() for d in ("one", "two")]
    assert verdicts[0] == verdicts[1] and len(verdicts[0].splitlines()) == 6


def test_an_empty_or_truncated_sample_counts_as_missing_and_is_drawn_again(tmp_path):
    meta, model_dir = three_prompts(tmp_path), MODEL_DIRS[0]
    args = ["generate", "--model", model_dir, "--metadata", str(meta), "--outdir", str(tmp_path / "out"),
            "--n-samples", "2", "--batch", "2"]
    ge.main(args)
    first = folder_bytes(tmp_path / "out")
    (tmp_path / "out" / "00002" / "samples" / "00001.png").write_bytes(b"")  # a disk that filled
    cut = tmp_path / "out" / "00000" / "samples" / "00000.png"
    cut.write_bytes(first["00000/samples/00000.png"][:40])  # a kill mid-write
    ge.main(args)
    assert folder_bytes(tmp_path / "out") == first


@pytest.mark.parametrize("bad, message", [('"correct": "False"', "'correct' must be true or false"),
                                          ('"tag": "colour"', "unknown tag 'colour'"), ("not json", "not a json")])
def test_results_with_a_string_verdict_or_an_unknown_tag_are_refused_by_line(tmp_path, bad, message):
    good = dict(filename="00000/samples/00000.png", tag="single_object", correct=False, metadata="{}", prompt="x")
    line = json.dumps(good)
    line = bad if bad == "not json" else line.replace('"correct": false', bad) if "correct" in bad \
        else line.replace('"tag": "single_object"', bad)
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(good) + "\n" + line + "\n")
    with pytest.raises(SystemExit) as exit:
        ge.main(["summary", str(path)])
    assert str(exit.value.code).startswith(f"{path}:2: {message}")


# -----------------------------------------------------------------------------------------------------------
# bookkeeping: a folder or results file missing prompts or samples is refused (or scored marked INCOMPLETE)

CLASSES4 = ["bench", "cat", "dog", "cup"]


def four_prompts(tmp_path, config=True):
    """OUT with 4 single_object prompts x 2 images, prompts 0-1 drawn right and 2-3 wrong (GenEval 0.5), and the
    OUT/config.json `generate` would write (its metadata file and images per prompt)."""
    rows = [{"tag": "single_object", "include": [{"class": c, "count": 1}], "prompt": f"a photo of a {c}",
             "question": "What is the main item in this image?", "answer": c} for c in CLASSES4]
    meta = tmp_path / "meta.jsonl"
    meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    for i, row in enumerate(rows):
        seen = [(row["include"][0]["class"], (5, 5, 40, 40), 0.9, "brown")] if i < 2 else []
        write_prompt(out, i, row, [seen, seen])
    if config:
        (out / "config.json").write_text(json.dumps(dict(metadata=str(meta), images_per_prompt=2)))
    return out


def exit_message(argv):
    with pytest.raises(SystemExit) as exit:
        ge.main(argv)
    return str(exit.value.code)


@pytest.mark.parametrize("config", [True, False], ids=["config.json", "inferred"])
def test_score_refuses_a_folder_missing_prompts_or_samples(tmp_path, capsys, config):
    """Deleting the failing prompts' folders must not turn 0.50 into 1.00. With OUT/config.json the expected
    counts are known (so even the last prompt's folder is missed); without it they are inferred (contiguous
    indices up to the highest, the most common number of images)."""
    out, results = four_prompts(tmp_path, config), tmp_path / "results.jsonl"
    score = ["score", "--imagedir", str(out), "--outfile", str(results)]
    ge.main(score)
    assert capsys.readouterr().out.splitlines()[-1] == "GenEval overall: 0.5000"
    shutil.rmtree(out / "00002")
    os.remove(out / "00001" / "samples" / "00001.png")
    if config:
        shutil.rmtree(out / "00003")
    message = exit_message(score)
    assert "00001 1/2" in message and "00002 0/2" in message and "--allow-incomplete" in message
    assert ("00003 0/2" in message) == config
    assert ("config.json" if config else "inferred") in message
    assert len(ge.read_results(results)) == 8  # refused before judging anything: the old results stand
    ge.main(score + ["--allow-incomplete"])
    printed = capsys.readouterr().out
    assert "INCOMPLETE" in printed and ("3 of 4 prompts" if config else "2 of 4 prompts") in printed
    assert printed.splitlines()[-1].startswith("GenEval overall: 1.0000 INCOMPLETE" if config
                                               else "GenEval overall: 0.6000 INCOMPLETE")


def test_summary_refuses_results_missing_rows_using_the_counts_score_recorded(tmp_path, capsys):
    out, results = four_prompts(tmp_path), tmp_path / "results.jsonl"
    ge.main(["score", "--imagedir", str(out), "--outfile", str(results)])
    lines = results.read_text().splitlines()
    results.write_text("\n".join(lines[:4]) + "\n")  # prompts 2 and 3, the failing ones, dropped
    message = exit_message(["summary", str(results)])
    assert "2 of 4 prompts" in message and "00002 0/2" in message and "00003 0/2" in message
    capsys.readouterr()
    ge.main(["summary", str(results), "--allow-incomplete"])
    printed = capsys.readouterr().out.splitlines()
    assert printed[-1].startswith("GenEval overall: 1.0000 INCOMPLETE")


def official_rows(prompts, per_prompt=4):
    """Official-evaluator rows (no `expected` key): filename OUT/<index>/samples/<k>.png, index-major."""
    return [dict(filename=f"/x/out/{i:05d}/samples/{k:04d}.png", tag="single_object", prompt=p, correct=k % 2 == 0,
                 reason="", metadata=json.dumps({"tag": "single_object", "prompt": p}))
            for i, p in enumerate(prompts) for k in range(per_prompt)]


def write_official(path, rows):
    path.write_text("".join(json.dumps(r).replace("/", "\\/") + "\n" for r in rows))
    return str(path)


def test_summary_of_official_results_infers_what_it_can_and_says_so(tmp_path, capsys):
    rows = official_rows(["a photo of a x", "a photo of a y", "a photo of a z"])
    ge.main(["summary", write_official(tmp_path / "full.jsonl", rows)])
    printed = capsys.readouterr().out
    assert "inferred" in printed and "INCOMPLETE" not in printed
    message = exit_message(["summary", write_official(tmp_path / "short.jsonl", rows[:5] + rows[6:])])
    assert "00001 3/4" in message and "inferred" in message and "most common" in message
    message = exit_message(["summary", write_official(tmp_path / "gap.jsonl", rows[:4] + rows[8:])])
    assert "00001 0/4" in message
    ge.main(["summary", str(tmp_path / "gap.jsonl"), "--allow-incomplete"])
    printed = capsys.readouterr().out
    assert "INCOMPLETE" in printed and "inferred" in printed


def test_summary_of_geneval_prompts_expects_all_553(tmp_path):
    """Rows whose prompts are GenEval's own (the shipped metadata, index for index) expect all 553 prompts: a
    results file that stops early is caught although its indices are contiguous."""
    from data_paths import GENEVAL
    shipped = [json.loads(l)["prompt"] for l in open(os.path.join(GENEVAL, "evaluation_metadata.jsonl")) if l.strip()]
    message = exit_message(["summary", write_official(tmp_path / "r.jsonl", official_rows(shipped[:3]))])
    assert "550 of 553 prompts" in message and "GenEval" in message


def test_summary_refuses_a_duplicated_image(tmp_path):
    rows = official_rows(["a photo of a x"])
    message = exit_message(["summary", write_official(tmp_path / "r.jsonl", rows + rows[1:2])])
    assert message.startswith(f"{tmp_path / 'r.jsonl'}:5: ") and "line 2" in message


class Flaky:
    """A detector that fails on images holding a scripted "boom" object (a CUDA error on one image, say)."""
    name = "flaky (test)"

    def __call__(self, image):
        found = ge.ScriptedDetector()(image)
        if "boom" in found:
            raise RuntimeError("boom on this image")
        return found


def test_one_bad_image_is_reported_and_skipped_never_losing_the_rest(tmp_path, capsys):
    out, results = four_prompts(tmp_path), tmp_path / "results.jsonl"
    cut = out / "00001" / "samples" / "00000.png"
    cut.write_bytes(cut.read_bytes()[:60])  # truncated
    ge.write_scripted_sample(out / "00002" / "samples" / "00001.png", [("boom", (0, 0, 9, 9), 0.9, "red")])
    message = exit_message(["score", "--imagedir", str(out), "--outfile", str(results),
                            "--detector", "test_eval_geneval:Flaky"])
    captured = capsys.readouterr()
    assert f"{cut}:" in captured.err and "boom on this image" in captured.err
    assert "2 images could not be judged" in message
    assert len(ge.read_results(results)) == 6  # every other image is scored and written
    assert "INCOMPLETE" in captured.out and "2 of 4 prompts" in captured.out


def test_rows_scored_before_an_interrupt_survive(tmp_path):
    out, results = four_prompts(tmp_path), tmp_path / "results.jsonl"
    calls = []

    def detector(image):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return ge.ScriptedDetector()(image)

    with pytest.raises(KeyboardInterrupt):
        ge.score(str(out), str(results), detector, PALETTE)
    assert len(ge.read_results(results)) == 2


# -------------------------------------------------------------------------------------------------- selfcheck, files


def test_selfcheck_refuses_qa_rows_of_other_prompts(tmp_path):
    out = four_prompts(tmp_path)
    rows = [json.loads(l) for l in (tmp_path / "meta.jsonl").read_text().splitlines()]
    rows[2] = {**rows[2], "prompt": "a photo of a horse", "answer": "horse"}
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError) as err:
        ge.self_check_folder(MODEL_DIRS[0], str(out), str(qa))
    message = str(err.value)
    assert str(out / "00002" / "metadata.jsonl") in message and f"{qa}:3" in message
    assert "'a photo of a dog'" in message and "'a photo of a horse'" in message
    qa.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))  # fewer QA rows than prompt folders
    with pytest.raises(ValueError, match=f"{qa} has 2 rows"):
        ge.self_check_folder(MODEL_DIRS[0], str(out), str(qa))


def test_a_malformed_qa_or_metadata_line_is_named(tmp_path):
    out = four_prompts(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text((tmp_path / "meta.jsonl").read_text().replace('"cat"}', '"cat"', 1))
    with pytest.raises(ValueError, match=f"{bad}:2: "):
        ge.self_check_folder(MODEL_DIRS[0], str(out), str(bad))
    with pytest.raises(ValueError, match=f"{bad}:2: "):
        ge.generate_images(MODEL_DIRS[0], str(bad), str(tmp_path / "new"))


def test_a_malformed_or_mistyped_config_json_of_a_folder_is_named(tmp_path):
    out = four_prompts(tmp_path)
    config = out / "config.json"
    config.write_text('{"images_per_prompt": 2,')
    with pytest.raises(ValueError, match=f"{config}: malformed json"):
        ge.generate_images(MODEL_DIRS[0], str(tmp_path / "meta.jsonl"), str(out), n=2)
    assert exit_message(["score", "--imagedir", str(out)]).startswith(f"{config}: malformed json")
    config.write_text(json.dumps(dict(metadata=str(tmp_path / "meta.jsonl"), images_per_prompt="2")))
    assert exit_message(["score", "--imagedir", str(out)]).startswith(f"{config}: images_per_prompt must be")


def test_a_prompt_folder_metadata_that_is_not_one_object_with_a_geneval_tag_is_named(tmp_path):
    out = four_prompts(tmp_path)
    meta = out / "00001" / "metadata.jsonl"
    meta.write_text("[1, 2]\n")
    assert exit_message(["score", "--imagedir", str(out)]).startswith(f"{meta}: ")
    meta.write_text(json.dumps({"tag": "colour", "prompt": "p"}))
    assert f"{meta}: unknown tag 'colour'" in exit_message(["score", "--imagedir", str(out)])
