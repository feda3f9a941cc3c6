"""
GenEval scoring without mmdetection: the official decision rules, over a pluggable detector and colour classifier.

GenEval (Ghosh et al. 2023, djghosh13/geneval) judges a text-to-image model with an object detector. Each of its
553 prompts carries a spec: `include` clauses {class, count, [color], [position: [relation, group]]} that must all
hold, and `exclude` clauses {class, count} none of which may hold. For every generated image:

    1. detect   detector(image) -> {class: [(box, score, mask)]}      (official: Mask2Former Swin-S, COCO, mmdet 2.x)
    2. keep     per class: sort by score, keep score > 0.3 (strict; > 0.9 for *every* class on counting prompts),
                keep the 16 most confident, greedy NMS at IoU 1.0 (= off)
    3. judge    clause by clause, looking only at the `count` most confident objects of the class:
                  count     fewer than `count` kept                   -> fail
                  color     all of them must be classified `color`: argmax over 10 colours of a classifier
                            run on each object pasted through its mask onto #999 grey and cropped to its box
                  position  every (object, target) pair, targets = the objects clause `group` matched, must
                            satisfy relation in relative_position(object, target); a failed group -> fail
                exclude: fail if the class has >= count kept objects (counting "two" excludes 3: exact count)
    4. score    image correct = every include holds and no exclude does.
                GenEval score = unweighted mean over the six tags of the per-tag share of correct images
                (not the pooled image accuracy, and not the prompt-level "any image correct").

Constants and code paths follow evaluation/evaluate_images.py and summary_scores.py (spec geneval.md
sections 3-5). results.jsonl carries the official keys, so the official summary_scores.py runs on our output and
`summary` here runs on the official evaluator's output. Scores equal published GenEval only with the official
detector and CLIP ViT-L-14 colour classifier plugged in; the built-in ScriptedDetector and PaletteColours are for
tests and toy runs (their names are written into every result row and printed by `summary`).

    python eval_geneval.py generate --model DIR --metadata evaluation_metadata.jsonl --outdir OUT --n-samples 4 --seed 0
    torchrun --nproc_per_node=8 eval_geneval.py generate ...    # prompts split over ranks, the same images
    python eval_geneval.py score --imagedir OUT --outfile OUT/results.jsonl [--detector mymodule:MyDetector]
    python eval_geneval.py summary OUT/results.jsonl
    python eval_geneval.py selfcheck --model DIR --metadata evaluation_metadata_qa.jsonl --imagedir OUT \
        --results OUT/results.jsonl [--reference-dir REF --reference-results REF/results.jsonl]

Bookkeeping: a missing prompt folder or sample would silently raise the score (the mean is over what is there),
so `score` and `summary` count images per prompt against what was expected (OUT/config.json of `generate`, else
inferred and said so) and refuse an incomplete set; --allow-incomplete scores it anyway, marked INCOMPLETE.
"""
import argparse
import importlib
import json
import math
import os
import re
import sys
from collections import Counter

import numpy as np
from PIL import Image, ImageDraw, ImageOps
from PIL.PngImagePlugin import PngInfo
from tqdm import tqdm

from model import load_model, read_json

GENEVAL_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "geneval")  # shipped copies
TAGS = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
COLOURS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]  # GenEval's order
DEFAULT_OPTIONS = dict(  # names and defaults of evaluate_images.py's --options
    threshold=0.3,           # keep a detection iff score > this (strict), every tag except counting
    counting_threshold=0.9,  # ... iff score > this on counting prompts, for every class
    max_objects=16,          # most confident detections kept per class
    max_overlap=1.0,         # greedy-NMS IoU threshold; 1.0 turns NMS off (the official default)
    position_threshold=0.1,  # margin in relative_position, as a fraction of the two boxes' summed sizes
)
BACKGROUND = (153, 153, 153)  # "#999": colour crops show the object on flat grey so the scene does not vote


def to_numpy(x):
    """numpy view of a list, array or (possibly CUDA) torch tensor, without importing torch."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


# -----------------------------------------------------------------------------------------------------------
# Step 2: which detections count


def box_iou_plus1(a, b):
    """IoU with the "+1 pixel" areas (x2 - x1 + 1)(y2 - y1 + 1) the official code uses; only matters with NMS on.
    Computed in the dtype of the boxes given: keep_confident passes the float32 rows, as the official code does."""
    def area(x1, y1, x2, y2):
        return max(x2 - x1 + 1, 0) * max(y2 - y1 + 1, 0)
    inter = area(max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    union = area(*a[:4]) + area(*b[:4]) - inter
    return inter / union if union else 0


def keep_confident(detections, tag, opts=DEFAULT_OPTIONS):
    """Raw {class: [(box, score, mask)]} -> {class: [(box5, mask)]}, box5 = [x1, y1, x2, y2, score], most
    confident first. Classes with nothing left are absent, so `exclude` can simply count.

    The official expressions on mmdet's float32 rows, so that any numpy orders and rounds the same way:
    np.argsort(scores)[::-1] (NaN sorts last, so comes first reversed, then fails the threshold; ties among more
    than 16 detections keep argsort's order), the strict float32 threshold (a score of float32(0.3) is dropped),
    the first max_objects, and greedy NMS with the IoU of the float32 rows."""
    threshold = np.float32(opts["counting_threshold"] if tag == "counting" else opts["threshold"])
    kept = {}
    for classname, objects in detections.items():
        if not objects:
            continue
        rows = np.array([[*to_numpy(box).reshape(-1)[:4], score] for box, score, _ in objects], dtype=np.float32)
        order = np.argsort(rows[:, 4])[::-1]
        order = order[rows[order, 4] > threshold][: opts["max_objects"]].tolist()
        chosen = []
        while order:  # greedy NMS over what survived; a no-op at max_overlap 1.0
            best = order.pop(0)
            box, score, mask = objects[best]  # box5 keeps the detector's values; rows only decide
            chosen.append(([float(v) for v in to_numpy(box).reshape(-1)[:4]] + [float(score)], mask))
            if opts["max_overlap"] < 1:
                order = [i for i in order if box_iou_plus1(rows[best], rows[i]) < opts["max_overlap"]]
        if chosen:
            kept[classname] = chosen
    return kept


# -----------------------------------------------------------------------------------------------------------
# Step 3: the decision rules


def relative_position(box_a, box_b, position_threshold=0.1):
    """The relations of A to B among {left of, right of, above, below}; image y points down.

    The centre offset is shrunk per axis by position_threshold x (sum of the two box sizes), so near or overlapping
    objects have no relation, then divided by the length of the *unshrunk* offset: a relation holds when the shrunk
    component is more than half of that length. A diagonal placement can therefore hold two relations, and a pure
    sideways offset needs to exceed twice the margin. float32 because mmdet boxes are float32 and the official code
    computes in their dtype, so edge cases round the same way."""
    a = np.asarray(box_a[:4], dtype=np.float32).reshape(2, 2)  # [[x1, y1], [x2, y2]]
    b = np.asarray(box_b[:4], dtype=np.float32).reshape(2, 2)
    offset = a.mean(0) - b.mean(0)
    size_sum = np.abs(a[1] - a[0]) + np.abs(b[1] - b[0])  # (width, height) summed; no +1 here
    revised = np.maximum(np.abs(offset) - np.float32(position_threshold) * size_sum, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):  # also guards the division below against a zero offset
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def crop_objects(image, objects):
    """Each (box5, mask) object pasted through its boolean HxW mask onto #999 grey (the whole image when mask is
    None), then cropped to its box. PIL rounds float boxes, exactly as in the official crop."""
    image = image.convert("RGB")
    grey = Image.new("RGB", image.size, BACKGROUND)
    crops = []
    for box5, mask in objects:
        if mask is None:
            pasted = image
        else:
            mask = to_numpy(mask).astype(bool)
            assert mask.shape == (image.height, image.width), f"mask {mask.shape} vs image {image.size[::-1]}"
            pasted = Image.composite(image, grey, Image.fromarray(mask))
        crops.append(pasted.crop(tuple(box5[:4])))
    return crops


def object_colours(image, objects, classname, classify_colours):
    """One colour name per object. classify_colours(crops, COLOURS, classname) may return colour names, or scores
    [N, 10] in COLOURS order (logits or probabilities; argmax is taken, ties go to the earlier colour)."""
    out = classify_colours(crop_objects(image, objects), COLOURS, classname)
    if all(isinstance(c, str) for c in out):
        return list(out)
    scores = to_numpy(out).reshape(len(objects), len(COLOURS))
    return [COLOURS[i] for i in scores.argmax(1)]


def judge(image, detected, metadata, classify_colours, position_threshold=0.1):
    """GenEval's `evaluate`: (correct, reason) of one image, from the kept detections (keep_confident's output).
    Reasons use the official wording, one per failed clause, newline-joined; "" when correct."""
    correct, reasons, groups = True, [], []  # groups[i]: the objects include clause i matched, None if it failed
    for clause in metadata.get("include", []):
        classname, count = clause["class"], clause["count"]
        found = detected.get(classname, [])[:count]  # only the `count` most confident objects are judged
        matched = len(found) >= count
        if not matched:
            reasons.append(f"expected {classname}>={count}, found {len(found)}")
        else:
            if "color" in clause:
                colours = object_colours(image, found, classname, classify_colours)
                n_right = colours.count(clause["color"])
                if n_right < count:  # i.e. every judged object must have the colour, a majority is not enough
                    matched = False
                    reasons.append(f"expected {clause['color']} {classname}>={count}, found {n_right} {clause['color']}"
                                   "; and " + ", ".join(f"{colours.count(c)} {c}" for c in COLOURS if c in colours))
            if "position" in clause and matched:
                relation, group = clause["position"]
                if groups[group] is None:
                    matched = False
                    reasons.append(f"no target for {classname} to be {relation}")
                else:
                    pairs = [(obj, target) for obj in found for target in groups[group]]
                    for obj, target in pairs:  # like the official loops: stop at the first failing pair
                        relations = relative_position(obj[0], target[0], position_threshold)
                        if relation not in relations:
                            matched = False
                            # sorted: the official code joins a set, whose order varies between runs
                            reasons.append(f"expected {classname} {relation} target, found "
                                           f"{' and '.join(sorted(relations))} target")
                            break
        correct = correct and matched
        groups.append(found if matched else None)
    for clause in metadata.get("exclude", []):
        n_found = len(detected.get(clause["class"], []))  # all kept objects, not just the top `count`
        if n_found >= clause["count"]:
            correct = False
            reasons.append(f"expected {clause['class']}<{clause['count']}, found {n_found}")
    return correct, "\n".join(reasons)


def evaluate_image(image, metadata, detector, classify_colours, opts=DEFAULT_OPTIONS):
    """Detect, keep, judge one RGB PIL image -> (correct, reason, kept detections)."""
    detected = keep_confident(detector(image), metadata["tag"], opts)
    correct, reason = judge(image, detected, metadata, classify_colours, opts["position_threshold"])
    return correct, reason, detected


# -----------------------------------------------------------------------------------------------------------
# Step 1 plug-ins: a scripted detector and a palette colour classifier (tests, toy runs), and plug-in loading

SCRIPT_KEY = "geneval_detections"  # PNG text chunk: json {class: [[x1, y1, x2, y2, score], ...]}
PALETTE = dict(red=(255, 0, 0), orange=(255, 165, 0), yellow=(255, 255, 0), green=(0, 128, 0), blue=(0, 0, 255),
               purple=(128, 0, 128), pink=(255, 192, 203), brown=(139, 69, 19), black=(0, 0, 0),
               white=(255, 255, 255))  # CSS colours


def write_scripted_sample(path, objects, size=(64, 64)):
    """A synthetic sample for ScriptedDetector: objects [(class, (x1, y1, x2, y2), score, colour name)] are drawn
    as filled rectangles (pixels x1..x2-1, y1..y2-1) on dark grey and written into the PNG as its detections."""
    image = Image.new("RGB", size, (60, 60, 60))
    draw, script = ImageDraw.Draw(image), {}
    for classname, (x1, y1, x2, y2), score, colour in objects:
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=PALETTE[colour])
        script.setdefault(classname, []).append([x1, y1, x2, y2, score])
    info = PngInfo()
    info.add_text(SCRIPT_KEY, json.dumps(script))
    image.save(path, pnginfo=info)


class ScriptedDetector:
    """Test detector: "sees" the detections write_scripted_sample stored in the PNG, with box-shaped masks.
    Any other image has no detections. It stands in for Mask2Former so the pipeline runs without weights."""
    name = "scripted (detections read from the PNG; a test detector, not GenEval)"

    def __call__(self, image):
        detections = {}
        for classname, boxes in json.loads(image.info.get(SCRIPT_KEY, "{}")).items():
            detections[classname] = []
            for x1, y1, x2, y2, score in boxes:
                mask = np.zeros((image.height, image.width), dtype=bool)
                mask[int(y1):int(y2), int(x1):int(x2)] = True
                detections[classname].append(((x1, y1, x2, y2), score, mask))
        return detections


class PaletteColours:
    """Toy colour classifier: the mean of a crop's non-grey pixels -> the nearest of the 10 reference colours.
    Exact on flat synthetic colours, meaningless on photos (plug in CLIP there, see the README)."""
    name = "palette-nearest (toy, not CLIP)"

    def __call__(self, crops, colours, classname):
        reference = np.array([PALETTE[c] for c in colours], dtype=np.float64)  # [10, 3]
        labels = []
        for crop in crops:
            pixels = np.asarray(crop.convert("RGB"), dtype=np.float64).reshape(-1, 3)  # [H*W, 3]
            pixels = pixels[(pixels != BACKGROUND).any(1)]  # drop the grey that replaced the background
            mean = pixels.mean(0) if len(pixels) else np.array(BACKGROUND, dtype=np.float64)
            labels.append(colours[int(((reference - mean) ** 2).sum(1).argmin())])
        return labels


def load_plugin(spec):
    """'module:name' -> a callable. A class is instantiated with no arguments (load weights in __init__); any
    other callable is used as it is. The current directory is importable, for modules beside the repo."""
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    obj = getattr(importlib.import_module(module_name), attr)
    return obj() if isinstance(obj, type) else obj


# -----------------------------------------------------------------------------------------------------------
# score: the official folder layout -> results.jsonl


def find_samples(imagedir):
    """[(image path, metadata)] read the way evaluate_images.py reads OUT/<digits>/{metadata.jsonl,samples/}:
    entries that are not all-digit folders are skipped, metadata.jsonl must be one JSON object, and only files
    whose names start with digits + ".png" are samples (a .jpg is silently ignored, as officially).
    A folder without metadata.jsonl or samples/ (a run killed early) holds no samples: the bookkeeping of
    `score` counts its prompt as missing. The metadata must carry a prompt and one of GenEval's tags."""
    samples = []
    folders = [d for d in os.listdir(imagedir) if d.isdigit() and os.path.isdir(os.path.join(imagedir, d))]
    for folder in sorted(folders, key=int):
        meta_path = os.path.join(imagedir, folder, "metadata.jsonl")
        if not os.path.isfile(meta_path):
            continue
        with open(meta_path) as f:
            try:
                metadata = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{meta_path}: must hold exactly one JSON object, the prompt's line: {e}") from e
        if not isinstance(metadata, dict) or not isinstance(metadata.get("prompt"), str):
            raise ValueError(f"{meta_path}: must hold one JSON object with a prompt, not {str(metadata)[:80]}")
        if metadata.get("tag") not in TAGS:
            raise ValueError(f"{meta_path}: unknown tag {metadata.get('tag')!r} (GenEval's: {', '.join(TAGS)})")
        sample_dir = os.path.join(imagedir, folder, "samples")
        names = [n for n in (os.listdir(sample_dir) if os.path.isdir(sample_dir) else [])
                 if re.match(r"\d+\.png", n) and os.path.isfile(os.path.join(sample_dir, n))]
        for name in sorted(names, key=lambda n: (int(re.match(r"\d+", n).group()), n)):
            samples.append((os.path.join(sample_dir, name), metadata))
    return samples


def score(imagedir, outfile, detector, classify_colours, opts=DEFAULT_OPTIONS, allow_incomplete=False):
    """Judge every sample under imagedir and write one official-schema row per image to outfile, as it is judged
    (an interrupted run keeps its rows). Extra keys: `evaluator` (detector, colour classifier, options) and
    `expected` (the prompts and images per prompt the folder should hold, and how that is known).

    A folder whose prompts do not all hold the expected images (see completeness) is refused before anything is
    judged, unless allow_incomplete. An image that cannot be read or judged is named on stderr and skipped: it
    then counts as missing. -> (rows, errors [(path, reason)])."""
    samples = find_samples(imagedir)
    check = completeness(Counter(prompt_index(path) for path, _ in samples), *expected_of_folder(imagedir),
                         texts={prompt_index(path): meta["prompt"] for path, meta in samples})
    if check["off"] and not allow_incomplete:
        raise ValueError(f"{imagedir} is incomplete: {describe(check)}. Finish it with `generate` (it resumes), or "
                         "pass --allow-incomplete to score it anyway (the summary is then marked INCOMPLETE)")
    expected = dict(prompts=check["prompts"], images_per_prompt=check["per_prompt"], source=check["how"])
    evaluator = json.dumps(dict(detector=getattr(detector, "name", repr(detector)),
                                colour_classifier=getattr(classify_colours, "name", repr(classify_colours)), **opts))
    rows, errors = [], []
    if os.path.dirname(outfile):
        os.makedirs(os.path.dirname(outfile), exist_ok=True)
    with open(outfile, "w") as f:
        for path, metadata in tqdm(samples, desc="score", unit="img"):
            step = "unreadable image"
            try:
                image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")  # EXIF orientation, as officially
                step = "detector or colour classifier failed"
                correct, reason, detected = evaluate_image(image, metadata, detector, classify_colours, opts)
            except Exception as e:  # one bad image is never a reason to lose the other rows
                errors.append((path, f"{step} ({type(e).__name__}: {e})"))
                tqdm.write(f"{path}: skipped, {errors[-1][1]}", file=sys.stderr)
                continue
            rows.append(dict(filename=path, tag=metadata["tag"], prompt=metadata["prompt"], correct=bool(correct),
                             reason=reason, metadata=json.dumps(metadata),
                             details=json.dumps({c: [box5 for box5, _ in objs] for c, objs in detected.items()}),
                             evaluator=evaluator, expected=expected))
            f.write(json.dumps(rows[-1]) + "\n")
            f.flush()
    return rows, errors


# -----------------------------------------------------------------------------------------------------------
# Bookkeeping: the prompts and images a folder or results file should hold, against those it holds


def read_jsonl(path):
    """[(line number, object)] of a jsonl file, blank lines skipped; a bad line: ValueError naming file and line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not a json object ({e})") from e
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: not a json object ({line.strip()[:80]})")
            out.append((number, row))
    return out


def prompt_index(filename):
    """The prompt index of a sample path OUT/<index>/samples/<k>.png (either slash), or None."""
    m = re.search(r"(?:^|[/\\])(\d+)[/\\]samples[/\\][^/\\]+$", filename)
    return int(m[1]) if m else None


def expected_of_folder(imagedir):
    """(prompts, images per prompt, source) as `generate` recorded them in OUT/config.json: its metadata file's
    line count and images_per_prompt. None for what is not recorded (no config.json, a metadata file moved away)."""
    path = os.path.join(imagedir, "config.json")
    if not os.path.isfile(path):
        return None, None, None
    config = read_json(path)
    n, meta = config.get("images_per_prompt"), config.get("metadata")
    if type(n) is not int or n < 1 or not isinstance(meta, str):
        raise ValueError(f"{path}: images_per_prompt must be a positive integer and metadata a path, not {n!r}, "
                         f"{meta!r}")
    if not os.path.isfile(meta):
        return None, n, f"{n} images per prompt from {path} (its metadata {meta} is not here)"
    return len(read_jsonl(meta)), n, f"from {path} and its metadata {meta}"


def completeness(found, prompts=None, per_prompt=None, source=None, texts=None):
    """found {prompt index: images} against the expected prompts 0..prompts-1 with per_prompt images each (as
    `source` knows them). What is not given is inferred, and `how` says so: images per prompt = the most common
    count (ties: the larger); prompts = 553 if the prompt texts found ({index: prompt}) are GenEval's own,
    else the highest index + 1. off: [(index, images)] of prompts with other counts (beyond prompts: any)."""
    how = [source] if source else []
    if per_prompt is None:
        tally = Counter(found.values())
        per_prompt = max(tally, key=lambda c: (tally[c], c), default=0)
        how.append(f"{per_prompt} images per prompt inferred (the most common count)")
    if prompts is None:
        shipped = os.path.join(GENEVAL_DATA, "evaluation_metadata.jsonl")
        shipped = [row.get("prompt") for _, row in read_jsonl(shipped)] if os.path.isfile(shipped) else []
        ours = texts and all(i < len(shipped) and shipped[i] == text for i, text in texts.items())
        prompts = len(shipped) if ours else max(found, default=-1) + 1
        how.append(f"{prompts} prompts inferred " + ("(the prompts found are GenEval's own)" if ours
                                                     else "(indices 0 to the highest found)"))
    off = [(i, found.get(i, 0)) for i in sorted(set(range(prompts)) | set(found))
           if found.get(i, 0) != (per_prompt if i < prompts else 0)]
    return dict(prompts=prompts, per_prompt=per_prompt, how="; ".join(how), images=sum(found.values()), off=off)


def describe(check, most=12):
    """One line: the prompts without the expected images (the first `most`), with counts, and how it is known."""
    n, k, off = check["prompts"], check["per_prompt"], check["off"]
    listed = ", ".join(f"{i:05d} {got}/{k if i < n else 0}" for i, got in off[:most]) + ", ..." * (len(off) > most)
    return (f"{len(off)} of {n} prompts do not hold {k} images: {listed} ({check['images']} of {n * k} images; "
            f"expected {n} x {k}: {check['how']})")


def results_completeness(rows):
    """completeness() of results rows (checked by read_results): images per prompt index, from the filenames,
    against the `expected` that `score` recorded in every row, or inferred (the official evaluator records none)."""
    expected = rows[0].get("expected") or {}
    return completeness(Counter(prompt_index(row["filename"]) for row in rows), expected.get("prompts"),
                        expected.get("images_per_prompt"), expected.get("source"),
                        {prompt_index(row["filename"]): row.get("prompt") for row in rows})


# -----------------------------------------------------------------------------------------------------------
# summary: results.jsonl (ours or the official evaluator's) -> per-tag and overall scores


def read_results(path):
    """Rows of a results.jsonl (ours or the official evaluator's; json undoes pandas' "\\/" escapes), checked,
    a bad line raising ValueError naming the file and line: a boolean `correct` ("False", a string, would count
    as correct), one of GenEval's six tags (another would be averaged into the overall score), a filename
    <index>/samples/<k>.png seen once (a file appended twice would count twice), one `expected` for all rows."""
    rows, seen = [], {}
    for number, row in read_jsonl(path):
        if not isinstance(row.get("correct"), bool):
            raise ValueError(f"{path}:{number}: 'correct' must be true or false, not {row.get('correct')!r}")
        if row.get("tag") not in TAGS:
            raise ValueError(f"{path}:{number}: unknown tag {row.get('tag')!r} (GenEval's: {', '.join(TAGS)})")
        name, expected = row.get("filename"), row.get("expected")
        if not isinstance(name, str) or prompt_index(name) is None:
            raise ValueError(f"{path}:{number}: filename {name!r} is not <index>/samples/<k>.png, so images "
                             "cannot be counted per prompt")
        if name in seen:
            raise ValueError(f"{path}:{number}: {name} again (first on line {seen[name]}): each image counts once")
        if expected is not None and not (isinstance(expected, dict) and all(
                type(expected.get(k)) is int for k in ("prompts", "images_per_prompt"))):
            raise ValueError(f"{path}:{number}: 'expected' must hold integer prompts and images_per_prompt, not "
                             f"{expected!r}")
        if rows and expected != rows[0].get("expected"):
            raise ValueError(f"{path}:{number}: 'expected' {expected!r} differs from the first row's (results of "
                             "several folders in one file?)")
        seen[name] = number
        rows.append(row)
    return rows


def wilson_interval(k, n, z=1.96):
    """95% Wilson score interval of a binomial proportion k/n (sane at 0% and 100%, unlike p +- 1.96 se)."""
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return centre - half, centre + half


def summarize(rows):
    """The official summary_scores.py numbers. Tags in order of first appearance; overall = unweighted mean of
    the per-tag image accuracies; prompts are grouped by the metadata string and count if any image is right."""
    tags, prompts = {}, {}  # tag -> [n correct, n images]; metadata string -> any image correct
    for row in rows:
        ok = bool(row["correct"])
        counts = tags.setdefault(row["tag"], [0, 0])
        counts[0] += ok
        counts[1] += 1
        prompts[row["metadata"]] = prompts.get(row["metadata"], False) or ok
    per_tag = {tag: k / n for tag, (k, n) in tags.items()}
    return dict(n_images=len(rows), n_images_correct=sum(k for k, _ in tags.values()),
                n_prompts=len(prompts), n_prompts_correct=sum(prompts.values()),
                tags=tags, per_tag=per_tag, overall=sum(per_tag.values()) / len(per_tag),
                evaluators=sorted({row.get("evaluator") or "not recorded (official evaluate_images.py?)"
                                   for row in rows}))


def print_summary(s, check=None, errors=0):
    """The summary; check (completeness) adds what was expected, and an INCOMPLETE mark, also on the last line."""
    for evaluator in s["evaluators"]:
        print(f"evaluator: {evaluator}")
    print(f"images: {s['n_images']}, prompts: {s['n_prompts']}")
    incomplete = check is not None and bool(check["off"])
    if check is not None:
        print(f"INCOMPLETE: {describe(check)}" if incomplete else
              f"complete: {check['prompts']} prompts x {check['per_prompt']} images ({check['how']})")
    if errors:
        print(f"INCOMPLETE: {errors} images could not be judged (named on stderr), so they count as missing")
    print(f"correct images, pooled over tags: {s['n_images_correct'] / s['n_images']:.4f} (not the GenEval score)")
    print(f"correct prompts, any image right: {s['n_prompts_correct'] / s['n_prompts']:.4f} (not the GenEval score)")
    print(f"{'tag':<14} {'score':>6}  {'correct/images':>14}  95% Wilson CI")
    for tag, (k, n) in s["tags"].items():
        lo, hi = wilson_interval(k, n)
        print(f"{tag:<14} {k / n:6.4f}  {f'{k}/{n}':>14}  [{lo:.4f}, {hi:.4f}]")
    if sorted(s["tags"]) != sorted(TAGS):  # still the official formula, but not comparable to published scores
        print(f"warning: the overall score averages these {len(s['tags'])} tags, not GenEval's six")
    mark = (f" INCOMPLETE ({check['images']} of {check['prompts'] * check['per_prompt']} images; "
            f"{len(check['off'])} of {check['prompts']} prompts incomplete)") if incomplete else ""
    print(f"GenEval overall: {s['overall']:.4f}{mark}")  # the last line, for scripts


# -----------------------------------------------------------------------------------------------------------
# generate: the model samples images into the official layout; selfcheck: the model judges its own images


def distributed(device=None):
    """(rank, world, device, started): torchrun's process group if launched by it (nccl on CUDA, gloo on CPU),
    else one process. started: whether this call initialised the group (and so should destroy it)."""
    import torch
    import torch.distributed as dist
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if "RANK" not in os.environ:
        return 0, 1, device, False
    started = not dist.is_initialized()
    if str(device).startswith("cuda"):
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
        if started:
            dist.init_process_group("nccl", device_id=torch.device(device))
    elif started:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device, started


RECIPE = ("model", "metadata", "images_per_prompt", "cfg_weight", "temperature", "showo_steps", "seed",
          "prompts_per_call")


def generate_images(model_dir, metadata_path, outdir, n=4, batch=16, seed=0, cfg_weight=5.0, temperature=1.0,
                    steps=50, device=None, vq_dir=None):
    """OUT/<index:05d>/{metadata.jsonl, samples/<k:05d>.png, grid.png, codes.npy} for every prompt of a metadata
    jsonl (codes.npy: the image tokens, so Show-o's self-check reads its own tokens; GenEval ignores the file).

    Prompts go in chunks of max(1, batch // n) consecutive indices; a chunk is one sampler call (a prompt with more
    than `batch` images: several calls) with its own generator, seeded by (seed, the chunk's first index). Under
    torchrun rank r takes chunks r, r + world, ...: the images depend on the recipe alone, never on the number of
    ranks or on what ran before. Resumable: a chunk whose prompts all have n samples is skipped; a folder made
    with another recipe (OUT/config.json) is refused. Returns the number of prompt folders this rank wrote.
    """
    import torch
    import torch.distributed as dist
    from generate import sample, save_images
    rank, world, device, started = distributed(device)
    rows = [row for _, row in read_jsonl(metadata_path)]
    per_call = max(1, batch // n)
    config = dict(model=os.path.abspath(model_dir), metadata=os.path.abspath(metadata_path), images_per_prompt=n,
                  cfg_weight=cfg_weight, temperature=temperature, showo_steps=steps, seed=seed,
                  prompts_per_call=per_call, seed_policy="a torch.Generator per chunk of prompts_per_call prompts, "
                                                          "seeded with seed * 100003 + the chunk's first index")
    path = os.path.join(outdir, "config.json")
    if os.path.isfile(path):  # resuming: the images already there must have come from this recipe
        old = read_json(path)
        changed = [f"{k} {old.get(k)!r} -> {config[k]!r}" for k in RECIPE if old.get(k) != config[k]]
        if changed:
            raise SystemExit(f"{outdir} holds images of another recipe ({', '.join(changed)}): use another --outdir")
    if rank == 0:
        os.makedirs(outdir, exist_ok=True)
        json.dump(config, open(path, "w"), indent=1)
    chunks = [list(range(c, min(c + per_call, len(rows)))) for c in range(0, len(rows), per_call)]
    done = lambda i: sum(map(readable, glob_samples(os.path.join(outdir, f"{i:05d}", "samples"), full=True))) >= n
    todo = [c for k, c in enumerate(chunks) if k % world == rank and not all(map(done, c))]
    written = 0
    if todo:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
        model, processor = load_model(model_dir, device=device, dtype=dtype, vq_dir=vq_dir)
    for chunk in tqdm(todo, desc="geneval prompt chunks", disable=rank != 0):
        g = torch.Generator(device).manual_seed(seed * 100003 + chunk[0])
        prompts = [rows[i]["prompt"] for i in chunk]
        calls = [sample(model, processor, prompts, min(batch, n - k) if len(chunk) == 1 else n, cfg_weight,
                        temperature, g, steps=steps) for k in range(0, n, batch if len(chunk) == 1 else n)]
        out = {key: torch.cat([c[key] for c in calls]) for key in ("tokens", "images")}  # prompt-major
        for j, i in enumerate(chunk):
            folder = os.path.join(outdir, f"{i:05d}")
            os.makedirs(os.path.join(folder, "samples"), exist_ok=True)
            with open(os.path.join(folder, "metadata.jsonl"), "w") as f:
                f.write(json.dumps(rows[i]) + "\n")  # exactly one JSON object, as the evaluator loads it
            np.save(os.path.join(folder, "codes.npy"), out["tokens"][j * n:(j + 1) * n].cpu().numpy())
            save_images(out["images"][j * n:(j + 1) * n], os.path.join(folder, "samples"),
                        os.path.join(folder, "grid.png"))
            written += 1
    if world > 1:
        dist.barrier()
    if started:
        dist.destroy_process_group()
    return written


def readable(path):
    """A sample PNG that a disk-full or a kill left empty or cut short counts as missing."""
    try:
        with Image.open(path) as image:
            image.load()
        return True
    except (OSError, SyntaxError):
        return False


def glob_samples(folder, full=False):
    """The sample PNG names of a folder (<k>.png), sorted; full: their paths."""
    names = sorted(f for f in os.listdir(folder) if re.match(r"\d+\.png$", f)) if os.path.isdir(folder) else []
    return [os.path.join(folder, f) for f in names] if full else names


def self_check_folder(model_dir, imagedir, qa_path, results_path=None, reference_dir=None, reference_results=None,
                      device=None, max_new_tokens=100, vq_dir=None):
    """UniRL's consistency metrics over a generated GenEval folder (method.md section 9.2).

    selfcheck      share of images the model itself judges correct (reward.is_correct on its greedy answer)
    Acc(MMU|T2I)   among images the detector judged correct (results.jsonl of `score`), the share the model
                   also answers correctly
    Acc(T2I|MMU)   on reference images known to be correct (another checkpoint's folder + results), for the prompts
                   the model answers correctly, the share of the model's OWN images that the detector judged correct
    ratio          Acc(MMU|T2I) / Acc(T2I|MMU) (near 1 = balanced); gap = their difference
    """
    import torch
    import torch.distributed as dist
    from rollout import self_check
    qa = read_jsonl(qa_path)
    for path, meta in find_samples(imagedir) + (find_samples(reference_dir) if reference_dir else []):
        index, meta_path = prompt_index(path), os.path.join(os.path.dirname(os.path.dirname(path)), "metadata.jsonl")
        if index >= len(qa):
            raise ValueError(f"{meta_path}: prompt {index}, but {qa_path} has {len(qa)} rows")
        if qa[index][1].get("prompt") != meta["prompt"]:  # QA rows pair with folders by index: prompts must agree
            raise ValueError(f"{meta_path} has the prompt {meta['prompt']!r}, but {qa_path}:{qa[index][0]} has "
                             f"{qa[index][1].get('prompt')!r}: the folder was made from other prompts than these")
    qa = [row for _, row in qa]
    rank, world, device, started = distributed(device)
    model, processor = load_model(model_dir, device=device, vq_dir=vq_dir,
                                  dtype=torch.bfloat16 if str(device).startswith("cuda") else torch.float32)

    def saved_codes(path):
        """The image tokens `generate` saved beside a sample (codes.npy), or None. Show-o judges these tokens of
        its own samples (without them it encodes the PNG with MAGVIT-v2); Janus reads the pixels."""
        codes = os.path.join(os.path.dirname(os.path.dirname(path)), "codes.npy")
        k = int(re.match(r"\d+", os.path.basename(path))[0])
        if os.path.isfile(codes) and k < len(np.load(codes)):
            return torch.from_numpy(np.load(codes)[k:k + 1]).to(device)
        return None

    def judge_folder(folder):
        """{relative path: verdict} of every sample; under torchrun each rank judges every world-th prompt and
        the verdicts are gathered."""
        verdicts = {}
        for path, meta in tqdm(find_samples(folder), desc=f"selfcheck {os.path.basename(folder)}", disable=rank != 0):
            index = int(os.path.basename(os.path.dirname(os.path.dirname(path))))
            if index % world != rank:
                continue
            task = qa[index]
            out = self_check(model, processor, [task], [Image.open(path).convert("RGB")], saved_codes(path),
                             max_new_tokens)
            verdicts[os.path.relpath(path, folder)] = dict(index=index, tag=task["tag"], answer=out["answers"][0],
                                                           correct=bool(out["correct"][0]))
        if world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, verdicts)
            verdicts = {k: v for part in parts for k, v in part.items()}
        return verdicts

    def detector_verdicts(path):
        return {row["filename"]: bool(row["correct"]) for row in read_results(path)} if path else {}

    own = judge_folder(imagedir)
    own_det = detector_verdicts(results_path)
    own_det = {os.path.relpath(k, imagedir) if os.path.isabs(k) else k: v for k, v in own_det.items()}
    out = {"selfcheck": _per_tag([(v["tag"], v["correct"]) for v in own.values()])}
    if own_det:
        pairs = [(v["tag"], v["correct"]) for k, v in own.items() if own_det.get(k)]
        out["acc_mmu_given_t2i"] = _per_tag(pairs)
    if reference_dir and reference_results and own_det:
        ref = judge_folder(reference_dir)
        ref_det = detector_verdicts(reference_results)
        ref_det = {os.path.relpath(k, reference_dir) if os.path.isabs(k) else k: v for k, v in ref_det.items()}
        understood = {v["index"] for k, v in ref.items() if ref_det.get(k) and v["correct"]}
        pairs = [(v["tag"], own_det[k]) for k, v in own.items() if v["index"] in understood and k in own_det]
        out["acc_t2i_given_mmu"] = _per_tag(pairs)
        a, b = out["acc_mmu_given_t2i"]["overall"], out["acc_t2i_given_mmu"]["overall"]
        out["ratio"] = a / b if b else float("nan")
        out["gap"] = a - b
    if rank == 0:
        with open(os.path.join(imagedir, "selfcheck.jsonl"), "w") as f:
            for name, v in sorted(own.items()):
                f.write(json.dumps(dict(filename=name, **v, detector_correct=own_det.get(name))) + "\n")
    if started:
        dist.destroy_process_group()
    return out


def _per_tag(pairs):
    """[(tag, bool)] -> {tag: accuracy, ..., "overall": unweighted mean over tags, "n": count}."""
    by_tag = {}
    for tag, ok in pairs:
        by_tag.setdefault(tag, []).append(ok)
    acc = {t: sum(v) / len(v) for t, v in sorted(by_tag.items())}
    return dict(acc, overall=sum(acc.values()) / len(acc) if acc else float("nan"), n=len(pairs))


def main(argv=None):
    parser = argparse.ArgumentParser(description="GenEval scoring and summary (see the module docstring).")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("generate", help="sample images into the official folder layout (resumable)")
    p.add_argument("--model", required=True, help="checkpoint folder")
    p.add_argument("--metadata", default=os.path.join(GENEVAL_DATA, "evaluation_metadata.jsonl"),
                   help="GenEval evaluation_metadata.jsonl (default: the copy in data/geneval)")
    p.add_argument("--outdir", required=True)
    # not --n: torchrun would take it for an abbreviation of its own --nnodes / --nproc-per-node
    p.add_argument("--n-samples", "--n_samples", dest="n", type=int, default=4, help="images per prompt (GenEval: 4)")
    p.add_argument("--batch", type=int, default=16,
                   help="images per sampler call: batch // n prompts share one (n > batch: one prompt, several calls)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=50, help="Show-o MaskGIT steps (UniRL's eval: 50)")
    p.add_argument("--vq", help="Show-o only: the MAGVIT-v2 folder, if not inside --model")

    p = commands.add_parser("score", help="judge every image of an OUT folder in the official layout")
    p.add_argument("--imagedir", required=True, help="OUT/<index>/{metadata.jsonl, samples/<k>.png}")
    p.add_argument("--outfile", default="results.jsonl")
    p.add_argument("--detector", default="eval_geneval:ScriptedDetector",
                   help="module:name of a detector, image -> {class: [(box, score, mask)]}; a class is instantiated")
    p.add_argument("--colour-classifier", default="eval_geneval:PaletteColours",
                   help="module:name of a classifier, (crops, colours, classname) -> names or [N, 10] scores")
    for key, value in DEFAULT_OPTIONS.items():  # the official --options, as typed flags
        p.add_argument("--" + key.replace("_", "-"), type=type(value), default=value)
    p.add_argument("--allow-incomplete", action="store_true", help="score a folder whose prompts do not all hold "
                   "the expected images (per OUT/config.json, else inferred), refused without it; the summary then "
                   "says INCOMPLETE, with counts. An unreadable or unjudgeable image is always skipped and named")

    p = commands.add_parser("summary", help="per-tag and overall scores of a results.jsonl (ours or official)")
    p.add_argument("results")
    p.add_argument("--allow-incomplete", action="store_true", help="summarize results missing images (against "
                   "the counts `score` recorded; official results: inferred, see the output), refused without it; "
                   "the summary then says INCOMPLETE")
    p = commands.add_parser("selfcheck", help="the model answers its own questions: Acc(MMU|T2I), Acc(T2I|MMU)")
    p.add_argument("--model", required=True)
    p.add_argument("--metadata", default=os.path.join(GENEVAL_DATA, "evaluation_metadata_qa.jsonl"),
                   help="UniRL's evaluation_metadata_qa.jsonl (question, answer; default: the copy in data/geneval)")
    p.add_argument("--imagedir", required=True, help="a folder written by `generate` with this model")
    p.add_argument("--results", help="results.jsonl of `score` on --imagedir (enables Acc(MMU|T2I))")
    p.add_argument("--reference-dir", help="GenEval folder of ANOTHER checkpoint, for Acc(T2I|MMU)")
    p.add_argument("--reference-results", help="results.jsonl of --reference-dir")
    p.add_argument("--vq", help="Show-o only: the MAGVIT-v2 folder, if not inside --model")

    args = parser.parse_args(argv)
    if args.command == "score":
        opts = {key: getattr(args, key) for key in DEFAULT_OPTIONS}
        detector, colours = load_plugin(args.detector), load_plugin(args.colour_classifier)
        try:
            rows, errors = score(args.imagedir, args.outfile, detector, colours, opts, args.allow_incomplete)
        except (OSError, ValueError) as e:
            sys.exit(str(e))
        print(f"wrote {len(rows)} rows to {args.outfile}")
        if rows:
            print_summary(summarize(rows), results_completeness(rows), len(errors))
        if errors and not args.allow_incomplete:
            sys.exit(f"{len(errors)} images could not be judged (named above); {args.outfile} holds the other "
                     f"{len(rows)} rows, and `summary` refuses it without --allow-incomplete")
    elif args.command == "generate":
        if not os.path.isdir(args.model):
            sys.exit(f"--model {args.model!r} is not a folder")
        done = generate_images(args.model, args.metadata, args.outdir, args.n, args.batch, args.seed, args.cfg,
                               args.temperature, args.steps, vq_dir=args.vq)
        print(f"rank {os.environ.get('RANK', 0)}: generated {done} prompt folders in {args.outdir} (the others were "
              "already complete, or another rank's)")
    elif args.command == "selfcheck":
        out = self_check_folder(args.model, args.imagedir, args.metadata, args.results, args.reference_dir,
                                args.reference_results, vq_dir=args.vq)
        for name, value in out.items() if os.environ.get("RANK", "0") == "0" else ():
            print(f"{name}: {json.dumps(value) if isinstance(value, dict) else f'{value:.4f}'}")
    elif args.command == "summary":
        try:
            rows = read_results(args.results)
        except (OSError, ValueError) as e:
            sys.exit(str(e))
        if not rows:
            sys.exit(f"{args.results}: no results")
        check = results_completeness(rows)
        if check["off"] and not args.allow_incomplete:
            sys.exit(f"{args.results} is incomplete: {describe(check)}. Pass --allow-incomplete to summarize it "
                     "anyway (marked INCOMPLETE)")
        print_summary(summarize(rows), check)


if __name__ == "__main__":
    main()
