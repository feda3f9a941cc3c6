"""
The toy world: GenEval in miniature, small enough that the whole UniRL loop runs on a laptop CPU.

A scene is an 8x8 grid of coloured cells; one image token is one cell's colour (a fixed palette tokenizer,
PaletteTokenizer below, which the checkpoint's config.json names as "toy:PaletteTokenizer": code 0 = grey
background, codes 1..10 = GenEval's ten colours in reward.COLORS order),
so no VQ model has to be trained and every image can be read back *exactly*. Objects are four shapes drawn
with cells, named after four COCO classes so that reward.py's templates and answer parser work unchanged:

    tv      hollow 3x3 ring (8 cells)        ###    kite    plus sign (5 cells)    .#.
                                             #.#                                   ###
                                             ###                                   .#.
    bench   horizontal bar (1x3)             ###    bottle  vertical bar (3x1)     #  (x3)

Slot layout: the grid is four 4x4 quadrants, at most one object per quadrant. A shape sits in a 3x3 box that is
jittered by (dx, dy) in {0,1}^2 inside its quadrant; scenes whose objects would touch are redrawn, so objects are
always separated by background. Counts are 1-4; a relation ("left of", "above", ...) is drawn with the two objects
in the same row (column) of quadrants, where GenEval's centre rule gives it unambiguously. Free placement was
tried in a feasibility study and generation was unlearnable in the time available; slots keep it learnable.

Tasks are UniRL's six GenEval tags built by reward.build_task, so prompts, questions and answers are the real
templates. The exact evaluator reads each quadrant (shape by exact pattern match, single colour), turns what it
read into detections and hands them to eval_geneval.judge: the same decision rules as GenEval (exact counts,
top-1 colour, centre relations), with a perfect detector.

The model is a tiny Janus from model.py (LLaMA 4 x 128, SigLIP 2 x 64), loaded by load_janus like a real checkpoint.
Its processor upsamples the 8x8 image to 24x24 (bicubic, as Janus resizes every image to its encoder's size) and
the ViT cuts it into one 3x3 patch per cell; the patch's border pixels carry a trace of the neighbouring cells, a
local receptive field that made shape reading learnable in minutes (1-pixel patches were far slower).

Why understanding is trained longer and harder than generation: in UniRL the model's answers *are* the reward,
so self-improvement only works when the judge is much better than the drawer; a judge that says "correct" too
easily is hacked by the generator. Pretraining (see pretrain) therefore reads clean scenes first, then near
misses, broken shapes and its own drawings, and ends with a calibration phase on its own drawings labelled by the
exact evaluator. Generation learns this world far faster than understanding, so its quality is set by noisy
captions instead of by stopping early: most pairs show a near miss of the prompt (GenEval's failure modes).

Truthful answers describe only the image (the model never sees the prompt when it answers); they are chosen so
that reward.is_correct of them agrees with judge(): exactly for single_object, two_object, counting and
color_attr; position and colors may under-accept (diagonal or 3+ objects; several colours); colors over-accepts
the right colour on the wrong class, which no answer to "What is the color of the object?" can avoid.

Nothing imports this file. It reaches the rest of the project by name, as plug-ins: the checkpoint folder's
config.json names its image tokenizer (toy:PaletteTokenizer) and its train_defaults.json names the training tasks
(toy:training_tasks, a mix weighted towards position and color_attr) and train.py's evaluation hook (toy:evaluate);
`--reward toy:exact_reward` trains on the exact evaluator instead of the model's own answers (a comparison, never
the default).

    python toy.py pretrain --out assets/toy --threads 2 [--seed S]       # offline, once (~52 min on 2 cores)
    python toy.py eval --model assets/toy                                 # toy-GenEval + judge precision/recall
    python toy.py diagnose --model assets/toy                             # per tag: what GRPO's groups see
"""
import argparse
import json
import math
import os
import random
import time
from collections import Counter, namedtuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import eval_geneval
import reward
from model import JANUS_SPECIALS, JanusConfig, to_uint8, write_janus_roles

# -----------------------------------------------------------------------------------------------------------
# The world: palette, shapes, slots

GRID, QUAD = 8, 4
BACKGROUND_RGB = (128, 128, 128)
COLOR_RGB = dict(red=(220, 30, 30), orange=(255, 140, 0), yellow=(250, 230, 40), green=(30, 160, 50),
                 blue=(30, 70, 220), purple=(140, 50, 170), pink=(255, 150, 200), brown=(130, 80, 30),
                 black=(0, 0, 0), white=(255, 255, 255))
PALETTE = [BACKGROUND_RGB] + [COLOR_RGB[c] for c in reward.COLORS]  # code k -> RGB; 0 is the background
CODE = {c: i + 1 for i, c in enumerate(reward.COLORS)}  # colour name -> image code
CLASSES = ["tv", "kite", "bench", "bottle"]
SHAPES = {  # (row, col) cells inside a 3x3 box
    "tv": [(r, c) for r in range(3) for c in range(3) if (r, c) != (1, 1)],
    "kite": [(0, 1), (1, 0), (1, 1), (1, 2), (2, 1)],
    "bench": [(1, 0), (1, 1), (1, 2)],
    "bottle": [(0, 1), (1, 1), (2, 1)],
}


def _normalised(cells):
    r0, c0 = min(r for r, _ in cells), min(c for _, c in cells)
    return frozenset((r - r0, c - c0) for r, c in cells)


PATTERN = {_normalised(v): k for k, v in SHAPES.items()}  # translation-free pattern -> class
Obj = namedtuple("Obj", "cls color quad dx dy")  # quad 0..3 = TL, TR, BL, BR; (dx, dy) offset of the 3x3 box


def cells(obj):
    """Absolute (row, col) cells of an object."""
    r0, c0 = (obj.quad // 2) * QUAD + obj.dy, (obj.quad % 2) * QUAD + obj.dx
    return [(r0 + r, c0 + c) for r, c in SHAPES[obj.cls]]


class PaletteTokenizer(torch.nn.Module):
    """The toy world's image tokenizer: code k = palette colour k, one code per patch_size x patch_size cell. No
    weights. model.py builds it from config.json's gen_vision_config ("cls": "toy:PaletteTokenizer").

    decode_code: codes [B, g*g] -> pixels [B, 3, g*p, g*p] in [-1, 1];  encode: nearest palette colour per cell.
    """

    def __init__(self, palette, patch_size=1, **sizes):  # sizes (image_size, n_embed, ...) are model.py's
        super().__init__()
        self.palette, self.patch = [tuple(rgb) for rgb in palette], patch_size

    def decode_code(self, codes):
        B, T = codes.shape
        g = math.isqrt(T)
        rgb = torch.tensor(self.palette, dtype=torch.float32, device=codes.device)
        # +0.5 centres each value in its uint8 bin, so to_uint8's truncation returns the palette colour exactly
        x = ((rgb[codes] + 0.5) / 127.5 - 1).view(B, g, g, 3).permute(0, 3, 1, 2)
        return x.repeat_interleave(self.patch, 2).repeat_interleave(self.patch, 3)

    def encode(self, pixels):
        cells = F.avg_pool2d(pixels.float(), self.patch)  # [B, 3, g, g]
        rgb = torch.tensor(self.palette, dtype=torch.float32, device=pixels.device) / 127.5 - 1
        dist = (cells.permute(0, 2, 3, 1)[..., None, :] - rgb).pow(2).sum(-1)  # [B, g, g, K]
        return dist.argmin(-1).flatten(1), None


def render(scene):
    """A scene (list of Obj) -> image codes LongTensor [64], raster order."""
    grid = torch.zeros(GRID, GRID, dtype=torch.long)
    for obj in scene:
        for r, c in cells(obj):
            grid[r, c] = CODE[obj.color]
    return grid.flatten()


def to_pixels(codes):
    """codes [64] or [B, 64] -> uint8 [(B,) 8, 8, 3] through the model's own palette tokenizer (exact colours)."""
    codes = torch.as_tensor(codes)
    x = to_uint8(PaletteTokenizer(PALETTE).decode_code(codes.reshape(-1, GRID * GRID)))
    return x[0] if codes.dim() == 1 else x


def read_scene(codes):
    """Image codes -> the objects it shows, one per non-empty quadrant, in reading order (TL, TR, BL, BR).

    A quadrant holds an object iff its non-background cells have one colour and form exactly one shape (any
    translation inside the quadrant); anything else is reported as Obj(None, None, quad, None, None)."""
    grid = torch.as_tensor(codes).reshape(GRID, GRID).tolist()
    objs = []
    for q in range(4):
        r0, c0 = (q // 2) * QUAD, (q % 2) * QUAD
        found = [(r, c) for r in range(r0, r0 + QUAD) for c in range(c0, c0 + QUAD) if grid[r][c]]
        if not found:
            continue
        colours = {grid[r][c] for r, c in found}
        cls = PATTERN.get(_normalised(found)) if len(colours) == 1 else None
        if cls is None:
            objs.append(Obj(None, None, q, None, None))
            continue
        # the box offset that puts the shape's cells where they were found
        dy = min(r for r, _ in found) - r0 - min(r for r, _ in SHAPES[cls])
        dx = min(c for _, c in found) - c0 - min(c for _, c in SHAPES[cls])
        objs.append(Obj(cls, reward.COLORS[colours.pop() - 1], q, dx, dy))
    return objs


def _touching(scene):
    occupied = [set(cells(o)) for o in scene]
    return any(max(abs(a[0] - b[0]), abs(a[1] - b[1])) <= 1
               for i in range(len(scene)) for j in range(i) for a in occupied[i] for b in occupied[j])


def place(specs, rng, quads=None, loose=False):
    """[(cls, colour)] -> a scene: distinct quadrants (random unless given), jitter redrawn until no two touch.
    loose: any offset that keeps the shape inside its quadrant, touching allowed (readable, but off-layout)."""
    quads = quads or rng.sample(range(4), len(specs))
    while True:
        scene = []
        for (cls, col), q in zip(specs, quads):
            rows, cols = [r for r, _ in SHAPES[cls]], [c for _, c in SHAPES[cls]]
            dx = rng.randint(-min(cols), QUAD - 1 - max(cols)) if loose else rng.randint(0, 1)
            dy = rng.randint(-min(rows), QUAD - 1 - max(rows)) if loose else rng.randint(0, 1)
            scene.append(Obj(cls, col, q, dx, dy))
        if loose or not _touching(scene):
            return scene


# a relation as (subject quadrant, reference quadrant): same row for left/right, same column for above/below
ARRANGEMENTS = {"left of": [(0, 1), (2, 3)], "right of": [(1, 0), (3, 2)],
                "above": [(0, 2), (1, 3)], "below": [(2, 0), (3, 1)]}

# -----------------------------------------------------------------------------------------------------------
# Tasks and the scenes that do or do not satisfy them


def sample_task(rng, tag):
    """One task of the tag, uniform over its toy template space (distinct classes and colours, as GenEval)."""
    classes, colours = rng.sample(CLASSES, 2), rng.sample(reward.COLORS, 2)
    if tag in ("single_object", "colors", "counting"):
        classes, colours = classes[:1], colours[:1]
    if tag in ("single_object", "two_object", "counting", "position"):
        colours = []
    return reward.build_task(tag, classes, colours, count=rng.randint(2, 4) if tag == "counting" else None,
                             relation=rng.choice(reward.RELATIONS) if tag == "position" else None)


def make_toy_tasks(n, seed, tags=None, weights=None):
    """n tasks (reward.py's QA schema) over the toy classes: a tag (uniform, or in proportion to weights {tag: w}),
    then a uniform template of it."""
    rng, tags = random.Random(seed), list(tags or reward.TAGS)
    w = [weights[t] for t in tags] if weights else None
    return [sample_task(rng, rng.choices(tags, w)[0] if w else rng.choice(tags)) for _ in range(n)]


# The training prompts' tag mix. GRPO learns a tag only from the prompts it is given, and the relational tags
# need the most: the start draws the right axis of a relation but its direction at random, and binds colours to
# objects at random (README, "Why position and color_attr did not move"). Evaluation stays uniform over tags.
TRAINING_MIX = dict(single_object=1, two_object=1, counting=1, colors=1, position=3, color_attr=3)


def training_tasks(n, seed):
    """train.py task plug-in (train_defaults.json: "task_source": "toy:training_tasks"): TRAINING_MIX's tags."""
    return make_toy_tasks(n, seed, weights=TRAINING_MIX)


def _specs(task):
    """[(cls, colour or None)] the task asks for, in prompt order (position: subject first)."""
    inc = task["include"]
    if task["tag"] == "position":
        inc = [inc[1], inc[0]]
    return [(x["class"], x.get("color")) for x in inc for _ in range(x["count"])]


def scene_for(task, rng, specs=None, swap=False):
    """A scene that satisfies the task (colours the task leaves free are random). swap: position reversed.
    Objects of different classes are drawn in the order the prompt names them (random quadrants, in reading
    order), as people describe a scene: a raster-order generator then binds "first named, first drawn". With
    free order, binding a colour to its object is a lookup (which class sits beside the colour just drawn?) that
    the tiny model had not learnt after 3,500 steps (color_attr 0.02; README, the diagnosis)."""
    specs = [(cls, col or rng.choice(reward.COLORS)) for cls, col in (specs or _specs(task))]
    quads = None
    if task["tag"] == "position" and len(specs) == 2:
        quads = list(rng.choice(ARRANGEMENTS[task["include"][1]["position"][0]]))
        quads = quads[::-1] if swap else quads
    elif len({cls for cls, _ in specs}) > 1:
        quads = sorted(rng.sample(range(4), len(specs)))
    return place(specs, rng, quads)


def near_misses(task, rng):
    """Scenes one edit away from satisfying the task, each of which judge() rejects, labelled by the edit."""
    specs, tag, out = _specs(task), task["tag"], {}
    other = lambda x, pool: rng.choice([y for y in pool if y != x])
    if len(specs) > 1:
        i = rng.randrange(len(specs))
        out["missing object"] = scene_for(task, rng, specs[:i] + specs[i + 1:])
    i = rng.randrange(len(specs))
    cls, col = specs[i]
    keep = {s[0] for s in specs} if tag in ("two_object", "position", "color_attr") else {cls}
    out["wrong class"] = scene_for(task, rng, specs[:i] + [(rng.choice([c for c in CLASSES if c not in keep]), col)]
                                   + specs[i + 1:])
    if tag == "counting":
        n = len(specs)
        out["wrong count"] = scene_for(task, rng, [specs[0]] * other(n, [1, 2, 3, 4]))
    if tag in ("colors", "color_attr"):
        out["wrong colour"] = scene_for(task, rng, specs[:i] + [(cls, other(col, reward.COLORS))] + specs[i + 1:])
    if tag == "color_attr":
        out["swapped colours"] = scene_for(task, rng, [(specs[0][0], specs[1][1]), (specs[1][0], specs[0][1])])
    if tag == "position":
        out["swapped position"] = scene_for(task, rng, swap=True)
    return out


def random_scene(rng):
    """A scene for a random task, or a near miss of one: the rendered pretraining distribution."""
    task = sample_task(rng, rng.choice(reward.TAGS))
    if rng.random() < 0.5:
        return task, scene_for(task, rng)
    return task, rng.choice(list(near_misses(task, rng).values()))


def off_distribution(rng):
    """Image codes [64] of what a bad generator draws: noise, corrupted shapes, misplaced/merged/two-tone shapes."""
    kind = rng.choice(["noise", "loose", "corrupt", "misplaced", "two-tone"])
    if kind == "noise":
        p = rng.uniform(0.03, 0.4)
        return torch.tensor([rng.randint(1, 10) if rng.random() < p else 0 for _ in range(GRID * GRID)])
    scene = random_scene(rng)[1]
    if kind == "loose":  # the objects of a scene shifted anywhere inside their quadrants, touching allowed
        return render(place([(o.cls, o.color) for o in scene], rng, [o.quad for o in scene], loose=True))
    codes = render(scene)
    if kind == "corrupt":  # 1-3 single-cell edits: a cell added, removed or recoloured
        for _ in range(rng.randint(1, 3)):
            codes[rng.randrange(GRID * GRID)] = rng.choice([0, rng.randint(1, 10)])
    elif kind == "misplaced":  # shapes anywhere on the grid: across quadrant borders, touching or overlapping
        for _ in range(rng.randint(1, 3)):
            cls, col = rng.choice(CLASSES), rng.randint(1, 10)
            r0, c0 = rng.randint(-1, GRID - 2), rng.randint(-1, GRID - 2)
            for r, c in SHAPES[cls]:
                if 0 <= r0 + r < GRID and 0 <= c0 + c < GRID:
                    codes[(r0 + r) * GRID + c0 + c] = col
    else:  # one cell of an object in another colour
        nz = codes.nonzero()[:, 0].tolist()
        if nz:
            codes[rng.choice(nz)] = rng.randint(1, 10)
    return codes


# -----------------------------------------------------------------------------------------------------------
# Truthful answers: what the image shows, in each tag's answer template (the judge's training targets)


def _box(obj):
    """[x1, y1, x2, y2] of an object in cell units (x2, y2 exclusive, as detector boxes)."""
    rc = cells(obj)
    return [min(c for _, c in rc), min(r for r, _ in rc), max(c for _, c in rc) + 1, max(r for r, _ in rc) + 1]


def describe(objs, tag):
    """The truthful answer to the tag's question about an image whose read_scene() is objs (unknowns ignored)."""
    objs = [o for o in objs if o.cls]
    if not objs:
        return "There is nothing" if tag in ("two_object", "position", "color_attr") else "nothing"
    classes = list(dict.fromkeys(o.cls for o in objs))  # distinct, in reading order
    first = {c: next(o for o in objs if o.cls == c) for c in classes}  # GenEval judges the most confident one
    listing = "There is " + " and ".join(f"a {c}" for c in classes)
    if tag == "single_object":
        return " and ".join(classes)
    if tag == "two_object":
        return listing
    if tag == "counting":  # only the most numerous class(es): "one tv and three kites" would read as "three tvs"
        counts = Counter(o.cls for o in objs)
        n = max(counts.values())
        return " and ".join(f"{reward.NUMBERS[n]} {reward.geneval_plural(c) if n > 1 else c}"
                            for c in classes if counts[c] == n)
    if tag == "colors":
        return " and ".join(dict.fromkeys(o.color for o in objs))
    if tag == "position":
        if len(objs) != 2:
            return listing
        rels = eval_geneval.relative_position(_box(objs[0]), _box(objs[1]))
        rel = next((r for r in reward.RELATIONS if r in rels), None)  # horizontal first
        return f"The {objs[0].cls} is {rel} the {objs[1].cls}" if rel else listing
    if tag == "color_attr":
        return " and ".join(f"{'The' if i == 0 else 'the'} {c} is {first[c].color}" for i, c in enumerate(classes))
    raise ValueError(f"unknown tag {tag!r}")


# -----------------------------------------------------------------------------------------------------------
# The exact evaluator: read the scene, then GenEval's own decision rules (eval_geneval.judge)


def detections(objs, scale=1):
    """Read objects -> eval_geneval detector output {class: [(box, score, mask)]}. Scores fall in reading order
    (0.999, 0.998, ...) so GenEval's "most confident object" is the first one read, as describe() assumes."""
    out = {}
    for k, obj in enumerate(o for o in objs if o.cls):
        mask = np.zeros((GRID * scale, GRID * scale), dtype=bool)
        for r, c in cells(obj):
            mask[r * scale:(r + 1) * scale, c * scale:(c + 1) * scale] = True
        out.setdefault(obj.cls, []).append(([v * scale for v in _box(obj)], 0.999 - 0.001 * k, mask))
    return out


def image_codes(image):
    """PIL image (8x8 or an integer upscale) -> codes [64]: each cell's centre pixel, nearest palette colour."""
    s = image.width // GRID
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)[s // 2::s, s // 2::s].reshape(-1, 1, 3)
    return torch.from_numpy(((rgb - np.array(PALETTE, dtype=np.float64)) ** 2).sum(-1).argmin(1))


class ToyDetector:
    """eval_geneval detector plug-in: a perfect detector for toy images (python eval_geneval.py score
    --detector toy:ToyDetector --colour-classifier toy:ToyColours)."""
    name = "toy exact reader (toy.py)"

    def __call__(self, image):
        return detections(read_scene(image_codes(image)), image.width // GRID)


class ToyColours:
    """eval_geneval colour plug-in: each crop's non-#999 pixels mapped to the exact palette, majority vote."""
    name = "toy palette (exact)"

    def __call__(self, crops, colours, classname):
        out = []
        for crop in crops:
            px = [tuple(p) for p in np.asarray(crop.convert("RGB")).reshape(-1, 3).tolist()]
            votes = Counter(PALETTE.index(p) for p in px if p != eval_geneval.BACKGROUND and p in PALETTE)
            votes.pop(0, None)
            out.append(reward.COLORS[votes.most_common(1)[0][0] - 1] if votes else colours[0])
        return out


def judge(codes, task):
    """GenEval's verdict on one toy image for one task (bool), with a perfect detector and colour classifier."""
    detected = eval_geneval.keep_confident(detections(read_scene(codes)), task["tag"])
    image = Image.fromarray(to_pixels(codes).numpy())
    return eval_geneval.judge(image, detected, task, ToyColours())[0]


def oracle_reward(codes, task, partial=False):
    """The exact evaluator as a reward: 1.0/0.0 = judge(). partial=True: the slot fraction (reward.score) of the
    truthful answer, i.e. the self-check reward of a perfect judge, on the same scale as the self-judged reward."""
    if partial:
        return reward.score(describe(read_scene(codes), task["tag"]), task)
    return float(judge(codes, task))


def exact_reward(tasks, tokens, images):
    """train.py reward plug-in (--reward toy:exact_reward): the self-check reward of a perfect judge (the slot
    fraction of the truthful answer) and GenEval's exact verdict as "correct". A comparison for the self-judged
    reward: the model could not compute it itself."""
    return ([oracle_reward(c, t, partial=True) for c, t in zip(tokens.cpu(), tasks)],
            [judge(c, t) for c, t in zip(tokens.cpu(), tasks)])


def exact_verdict(tasks, tokens, images):
    """train.py verdict plug-in (--verdict toy:exact_verdict): GenEval's exact verdict on each sampled image, shown
    under it in OUT/samples/*.png beside the model's own answer and reward."""
    return [judge(c, t) for c, t in zip(tokens.cpu(), tasks)]


def evaluate(model, processor, args, judge_model=None):
    """train.py evaluation hook (train_defaults.json: "eval": "toy:evaluate"): exact toy-GenEval of 2 images per
    held-out task (seeded apart from the training tasks), and how often the judge's "correct" is really correct."""
    tasks = make_toy_tasks(args.eval_tasks, 10_000 + args.seed)
    res = toy_geneval(model, processor, tasks, 2, args.cfg, args.seed, with_judge=True, judge_model=judge_model,
                      progress=True)
    return dict(toy_geneval=res["overall"], **{f"toy_geneval_{t}": v for t, v in res["per_tag"].items()},
                judge_precision=res["judge"]["all"]["precision"], judge_recall=res["judge"]["all"]["recall"],
                judge_agreement=res["judge"]["all"]["agreement"])


@torch.no_grad()
def toy_geneval(model, processor, tasks, images_per_task=4, cfg=2.0, seed=0, with_judge=False, batch=64,
                judge_model=None, progress=False):
    """Toy-GenEval: generate, judge exactly; overall = unweighted mean over tags (as GenEval).
    with_judge: also the model's self-check (rollout.self_check) against judge(): precision of its
    "correct" verdicts and recall of the truly correct images, per tag and pooled. judge_model: the model that
    answers, if not `model` itself (train.py's frozen judge)."""
    from generate import janus_generate
    from rollout import self_check
    gen = torch.Generator().manual_seed(seed)
    rows = []  # (tag, truly correct, self-judged correct)
    per_call = max(1, batch // images_per_task)
    for i in tqdm(range(0, len(tasks), per_call), desc="toy-GenEval", leave=False, disable=not progress):
        chunk = tasks[i:i + per_call]
        out = janus_generate(model, processor, [t["prompt"] for t in chunk], images_per_task, cfg, generator=gen)
        flat = [t for t in chunk for _ in range(images_per_task)]
        truth = [judge(c, t) for c, t in zip(out["tokens"], flat)]
        said = self_check(judge_model or model, processor, flat, out["images"])["correct"].tolist() if with_judge \
            else truth
        rows += [(t["tag"], a, b) for t, a, b in zip(flat, truth, said)]
    tags = [t for t in reward.TAGS if any(r[0] == t for r in rows)]
    per_tag = {t: float(np.mean([r[1] for r in rows if r[0] == t])) for t in tags}
    res = dict(overall=float(np.mean(list(per_tag.values()))), per_tag=per_tag, n_images=len(rows))
    if with_judge:
        def pr(sel):
            tp = sum(a and b for _, a, b in sel)
            return dict(precision=tp / max(1, sum(b for *_, b in sel)), recall=tp / max(1, sum(a for _, a, _ in sel)),
                        agreement=sum(a == b for _, a, b in sel) / max(1, len(sel)),
                        said_correct=sum(b for *_, b in sel))
        res["judge"] = {t: pr([r for r in rows if r[0] == t]) for t in tags}
        res["judge"]["all"] = pr(rows)
    return res


# -----------------------------------------------------------------------------------------------------------
# The tiny Janus: word-level tokenizer, config.json, fresh weights

SYSTEM_PROMPT = "Answer the question about the image."  # short: every understanding sequence carries it
ROLES = ["<|User|>", "<|Assistant|>"]
VIT_SCALE = 3  # the processor upsamples 8x8 -> 24x24 (bicubic); one 3x3 patch per cell, see toy_config


def all_texts():
    """Every string the toy world ever tokenises: prompts, questions, answers (reference and truthful)."""
    texts = [SYSTEM_PROMPT, ":"] + list(reward.QUESTIONS.values())
    for tag in reward.TAGS:
        rng = random.Random(0)
        for _ in range(400):  # every word of every tag (the vocabulary is tiny; a test checks coverage)
            task = sample_task(rng, tag)
            texts += [task["prompt"], task["answer"]]
            texts += [describe(read_scene(off_distribution(rng)), tag), describe(random_scene(rng)[1], tag)]
    texts += [f"{n} {c}" for n in reward.NUMBERS[:5] for c in CLASSES]
    return texts


def build_tokenizer():
    """Word-level tokenizer, built deterministically: Janus specials + roles first, then the sorted words.
    decode() joins words with spaces ("There is a tv and a kite"), which reward.py parses like the template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    pre = pre_tokenizers.Whitespace()  # words and punctuation runs; newlines of the chat template vanish
    words = sorted({w for t in all_texts() for w, _ in pre.pre_tokenize_str(t)} | set(CLASSES) |
                   {reward.geneval_plural(c) for c in CLASSES} | set(reward.COLORS) | set(reward.NUMBERS[:5]))
    specials = list(JANUS_SPECIALS.values()) + ROLES + ["<unk>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.add_special_tokens(specials)
    return tok


def toy_config(vocab_size, hidden=128, layers=4, heads=4, vit_width=64, vit_layers=2, gen_embed=16, vit_scale=VIT_SCALE):
    """An original-layout (deepseek multi_modality) config.json for the tiny Janus, with explicit sizes."""
    mlp = lambda i, o: {"cls": "MlpProjector", "params": {"depth": 2, "input_dim": i, "n_embed": o,
                                                         "projector_type": "mlp_gelu"}}
    return {
        "model_type": "multi_modality",
        "vision_config": {"cls": "CLIPVisionTower", "params": {
            "model_name": "siglip_large_patch16_384", "image_size": GRID * vit_scale, "patch_size": vit_scale,
            "width": vit_width,
            "layers": vit_layers, "heads": 4, "mlp_ratio": 2.0, "select_layer": -1, "select_feature": "same"}},
        "aligner_config": mlp(vit_width, hidden),
        "gen_vision_config": {"cls": "toy:PaletteTokenizer", "params": {
            "palette": [list(p) for p in PALETTE], "image_size": GRID, "patch_size": 1,
            "image_token_size": len(PALETTE), "n_embed": gen_embed}},
        "gen_aligner_config": mlp(gen_embed, hidden),
        "gen_head_config": {"cls": "vision_head", "params": {"image_token_embed": hidden,
                                                             "image_token_size": len(PALETTE), "n_embed": hidden}},
        "language_config": {"vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": 3 * hidden,
                            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": heads,
                            "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "model_type": "llama"},
    }


# train.py's defaults for this checkpoint (train_defaults.json; flags given on the command line win): what works on
# 2 CPU cores in minutes. A feasibility study saw lr 3e-4 collapse, and a self-judged run hacked its own judge
# unless the judge stayed frozen and a small KL held the generator near it. Toy SFT fits the guided sampler
# (--logp cfg): fitting the conditional row to guided samples ran away (sft.janus_t2i_loss). The toy prompts are
# its own world's, never GenEval's test set, so nothing is excluded.
TRAIN_DEFAULTS = dict(lr=1e-4, warmup=5, steps=100_000, minutes=10.0, cfg=2.0, beta=0.02, optimize="t2i",
                      prompts_per_rank=8, frozen_judge=True, skip_flat_groups=True, eval_every=50, eval_tasks=240,
                      reward_normalize=True, task_source="toy:training_tasks", eval="toy:evaluate", exclude="none",
                      sample_every=25, verdict="toy:exact_verdict", sft=dict(logp="cfg"))


def write_checkpoint_files(out):
    """config.json, tokenizer.json, processor and preprocessor configs, train_defaults.json (all but the weights)."""
    os.makedirs(out, exist_ok=True)
    tok = build_tokenizer()
    tok.save(os.path.join(out, "tokenizer.json"))
    json.dump(toy_config(tok.get_vocab_size()), open(os.path.join(out, "config.json"), "w"), indent=1)
    json.dump({"system_prompt": SYSTEM_PROMPT}, open(os.path.join(out, "processor_config.json"), "w"), indent=1)
    # min_size 1: the official default 14 would upscale the 8x8 image before the ViT
    json.dump({"image_size": GRID * VIT_SCALE, "min_size": 1, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
               "do_normalize": True, "background_color": list(BACKGROUND_RGB)},
              open(os.path.join(out, "preprocessor_config.json"), "w"), indent=1)
    write_janus_roles(out, JanusConfig())  # Janus-Pro's roles, the config's default
    json.dump(TRAIN_DEFAULTS, open(os.path.join(out, "train_defaults.json"), "w"), indent=1)


def fresh_model(out, seed):
    """A randomly initialised tiny Janus (PyTorch's default init) for the files in `out`, and its processor.
    (GPT-2's N(0, 0.02) everywhere was tried: the 3-input patch convolution then learnt colours far slower.)"""
    from model import Janus, JanusProcessor
    torch.manual_seed(seed)
    cfg = JanusConfig.from_json(json.load(open(os.path.join(out, "config.json"))))
    return Janus(cfg), JanusProcessor(out, cfg)


def save_weights(model, out):
    """model.safetensors without SigLIP's unused attention-pool head (load_janus treats it as optional)."""
    from safetensors.torch import save_file
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if "attn_pool" not in k}
    save_file(sd, os.path.join(out, "model.safetensors.tmp"), metadata={"format": "pt"})
    os.replace(os.path.join(out, "model.safetensors.tmp"), os.path.join(out, "model.safetensors"))


# -----------------------------------------------------------------------------------------------------------
# Pretraining: generation from rendered scenes; understanding from rendered, broken and self-generated images


def mmu_example(rng, buffer, own=0.3, off=0.25):
    """(codes [64], question tag) for one understanding example: one of the model's own generations (buffer of
    (codes, task)) with probability `own`, else an off-distribution image with probability `off`, else a
    rendered scene for a random task (half of them near misses)."""
    if buffer and rng.random() < own:
        codes, task = rng.choice(buffer)
    elif rng.random() < off:
        codes, task = off_distribution(rng), None
    else:
        task, scene = random_scene(rng)
        codes = render(scene)
    # mostly the task's own question (what self-check asks); otherwise any tag's, so answers stay image-grounded
    tag = task["tag"] if task and rng.random() < 0.7 else rng.choice(reward.TAGS)
    return codes, tag


def mmu_step_loss(model, processor, rng, n, buffer, own=0.3, off=0.25):
    """Answer cross-entropy on n examples whose targets are the truthful answers (describe(read_scene))."""
    from sft import mmu_loss
    from understand import janus_answer_logprobs, janus_pixels
    codes, tags = zip(*[mmu_example(rng, buffer, own, off) for _ in range(n)])
    codes = torch.stack(codes)
    answers = [describe(read_scene(c), t) for c, t in zip(codes, tags)]
    pixels = janus_pixels(processor, to_pixels(codes))
    lp, mask = janus_answer_logprobs(model, processor, pixels, [reward.QUESTIONS[t] for t in tags], answers,
                                     detach_image=False)
    return mmu_loss(lp, mask)


def answerable_misses(task, rng):
    """near_misses that an answer to the task's question can reveal: not "wrong class" for colors, whose question
    ("What is the color of the object?") cannot see the class, so the self-check accepts that failure."""
    return {k: s for k, s in near_misses(task, rng).items() if not (task["tag"] == "colors" and k == "wrong class")}


def _caption_misses(task, rng):
    """The near misses a noisy caption may show: answerable ones (the judge's verdicts could never be precise on
    the others), and not the swapped position or colours: a caption may miss or misname what is there but does
    not state a relation or a binding backwards, and with those in the noise the generator never learnt either (a
    relation's direction stayed a coin flip, 0.47; colours bound at random). Understanding still trains on every
    near miss, the swaps included: the judge must reject them."""
    return [s for k, s in answerable_misses(task, rng).items() if k not in ("swapped position", "swapped colours")]


# Colour is read from the prompt only in colors and color_attr pairs (the other tags' colours are free), and it
# was the last thing generation learnt (colors 0.14 at step 2,500 of 3,500, in the previous recipe); its pairs are
# twice as frequent as each other tag's.
PRETRAIN_T2I_MIX = dict(single_object=1, two_object=1, counting=1, colors=2, position=1, color_attr=2)


def t2i_step_loss(model, processor, rng, n, generator, caption_noise=0.5):
    """Next-code cross-entropy on rendered scenes for random tasks; 10% unconditional rows for CFG.

    Captions are noisy on purpose: with probability caption_noise the image is a near miss of its prompt
    (wrong count, colour or class; a missing object; never a swap, see _caption_misses), as web captions often
    are. This caps the generator's quality (about 0.55 toy-GenEval at CFG 2 with 65% noise, at the end of
    pretrain) and gives it GenEval's failure modes, which self-reward can then remove. A clean-caption generator
    learnt this world in ~1000 steps (toy-GenEval 0.68 at step 750 and rising), far ahead of the judge, so
    stopping early was no option."""
    from sft import janus_t2i_loss
    tasks = [sample_task(rng, rng.choices(reward.TAGS, [PRETRAIN_T2I_MIX[t] for t in reward.TAGS])[0])
             for _ in range(n)]
    scenes = [rng.choice(_caption_misses(t, rng)) if rng.random() < caption_noise else scene_for(t, rng)
              for t in tasks]
    tokens = torch.stack([render(s) for s in scenes])
    return janus_t2i_loss(model, processor, [t["prompt"] for t in tasks], tokens, cond_dropout=0.1,
                          generator=generator)


@torch.no_grad()
def own_generations(model, processor, rng, n, generator):
    """n images the model draws for random tasks, at a random CFG in 1-5 and temperature in 0.8-1.2 (GRPO will
    move the generator around; the judge should have seen it there), paired with their tasks."""
    from generate import janus_generate
    tasks = [sample_task(rng, rng.choice(reward.TAGS)) for _ in range(n)]
    out = janus_generate(model, processor, [t["prompt"] for t in tasks], 1, rng.choice([1.0, 2.0, 3.0, 5.0]),
                         temperature=rng.choice([0.8, 1.0, 1.2]), generator=generator, decode=False)
    return list(zip(out["tokens"], tasks))


def pretrain(out, phases=(1000, 1500, 1000), batch=64, lr=2e-3, seed=0, eval_every=250, caption_noise=0.65):
    """Train a fresh tiny Janus into `out` (config, tokenizer, model.safetensors, pretrain_log.jsonl).

    Generation (noisy captions, see t2i_step_loss) trains in every step. Understanding trains in three phases of
    (read, draw, calibrate) steps:
      1 read       clean rendered scenes and near misses only. Shape reading "clicks" after a few hundred steps
                   on clean data; mixed with noise and own drawings from the start it had not clicked after 1250.
      2 draw       + off-distribution images and a buffer of the model's own drawings (a new draw of `batch`
                   every 50 steps, the newest 40 draws kept).
      3 calibrate  half of every batch freshly drawn by the model (a new draw every 10 steps), labelled by the
                   exact evaluator: its "correct" verdicts must be right on its own images.
    Why generation keeps training while the judge calibrates: the two share every transformer weight, and an
    understanding-only calibration of 2000 steps let drawing decay (toy-GenEval 0.29 -> 0.09) and the judge
    with it (precision 0.73 on those broken drawings).
    """
    write_checkpoint_files(out)
    model, processor = fresh_model(out, seed)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    eval_tasks = make_toy_tasks(120, seed + 1)
    steps, draw_from, calib_from = sum(phases), phases[0], phases[0] + phases[1]
    buffer, recent, log = [], [], open(os.path.join(out, "pretrain_log.jsonl"), "w")
    t0 = time.time()
    for step in (bar := tqdm(range(steps), desc="pretrain", mininterval=5)):
        for g in opt.param_groups:  # 100 warmup steps, then cosine to 10%
            g["lr"] = lr * min(1, (step + 1) / 100) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        loss_t2i = t2i_step_loss(model, processor, rng, batch // 2, gen, caption_noise)
        if step < draw_from:
            loss_mmu = mmu_step_loss(model, processor, rng, batch, [], own=0, off=0)
        elif step < calib_from:
            if step % 50 == 0:
                buffer = (buffer + own_generations(model, processor, rng, batch, gen))[-40 * batch:]
            loss_mmu = mmu_step_loss(model, processor, rng, batch, buffer)
        else:
            if step % 10 == 0:
                recent = own_generations(model, processor, rng, batch, gen)
            loss_mmu = (mmu_step_loss(model, processor, rng, batch // 2, buffer)
                        + mmu_step_loss(model, processor, rng, batch // 2, recent, own=1.0)) / 2
        opt.zero_grad(set_to_none=True)
        (loss_mmu + loss_t2i).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(t2i=f"{loss_t2i.item():.3f}", mmu=f"{loss_mmu.item():.3f}", refresh=False)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            model.eval()
            res = toy_geneval(model, processor, eval_tasks, 2, 2.0, seed, with_judge=True)
            model.train()
            log.write(json.dumps(dict(step=step + 1, minutes=(time.time() - t0) / 60, t2i=loss_t2i.item(),
                                      mmu=loss_mmu.item(), **res)) + "\n")
            log.flush()
            tqdm.write(f"step {step + 1}: toy-GenEval@cfg2 {res['overall']:.3f}, judge precision "
                       f"{res['judge']['all']['precision']:.3f} recall {res['judge']['all']['recall']:.3f}")
            save_weights(model, out)
    return model, processor


# -----------------------------------------------------------------------------------------------------------


def report(model, processor, n_tasks=240, images=4, cfgs=(2.0,), seed=0):
    """Print toy-GenEval per tag and the judge's precision/recall against the exact evaluator, per CFG, on the
    held-out tasks of seed (those of train.py's evaluation hook: make_toy_tasks(n, 10_000 + seed))."""
    tasks = make_toy_tasks(n_tasks, 10_000 + seed)
    for cfg in cfgs:
        res = toy_geneval(model, processor, tasks, images, cfg, seed, with_judge=True)
        print(f"\nCFG {cfg}: toy-GenEval overall {res['overall']:.3f} ({res['n_images']} images)")
        print(f"{'tag':<14} {'geneval':>8} {'judge P':>8} {'judge R':>8} {'said ok':>8}")
        for tag in list(res["per_tag"]) + ["all"]:
            j = res["judge"][tag]
            print(f"{tag:<14} {res['per_tag'].get(tag, res['overall']):8.3f} {j['precision']:8.3f} "
                  f"{j['recall']:8.3f} {j['said_correct']:8d}")


@torch.no_grad()
def diagnose(model, processor, judge_model=None, n_tasks=12, draws=64, group=8, cfg=2.0, seed=0):
    """Why a tag does or does not learn under self-judged GRPO, per tag, on n_tasks held-out tasks x draws images
    (cut into groups of `group`, as a GRPO step sees them). -> {tag: {measure: value}}; printed by main.

    exact       share of drawings the exact evaluator accepts      reach   share of tasks with one within draws
    reward      the judge's slot-fraction reward (the training signal); group_sd its spread inside a group
    flat        share of groups whose rewards are all equal (no gradient); adv_share: the tag's share of sum |A|
    agree       the judge's "correct" equals the exact verdict; precision: its "correct" verdicts that are right
    slots_ok    the judge's answer matches as many slots as the truthful answer (describe) does
    position:   axis (the two objects share a row for left/right, a column for above/below), direction (given the
                axis, the subject on the asked side); dir_first: the direction where the subject (named first)
                is drawn first in reading order ("left of", "above"), dir_second: where it is drawn second
    color_attr: own / other's / unrequested colour per drawn object, same (both objects one colour)
    layout      the scene builder's drawings of the tasks: the judge's acceptance (the evaluator accepts all)"""
    from generate import janus_generate
    from rollout import self_check
    judge_model = judge_model or model
    gen, rng, out = torch.Generator().manual_seed(seed), random.Random(seed), {}
    tasks = {tag: make_toy_tasks(n_tasks, 20_000 + seed, [tag]) for tag in reward.TAGS}
    for tag in tqdm(reward.TAGS, desc="diagnose", leave=False):
        m = Counter()
        for task in tasks[tag]:
            codes = janus_generate(model, processor, [task["prompt"]], draws, cfg, generator=gen,
                                   decode=False)["tokens"]
            flat = [task] * draws
            check = self_check(judge_model, processor, flat, to_pixels(codes), normalize=True)
            exact = [judge(c, task) for c in codes]
            truth = [reward.slots(describe(read_scene(c), tag), task)[0] for c in codes]
            said = [reward.slots(a, task)[0] for a in check["answers"]]
            r = check["rewards"].view(-1, group)
            sd = r.std(1, unbiased=False)
            adv = ((r - r.mean(1, keepdim=True)) / (sd[:, None] + 1e-4)).abs() * (sd[:, None] > 0)
            m.update(images=draws, groups=len(r), exact=sum(exact), reach=any(exact), reward=float(r.sum()),
                     group_sd=float(sd.sum()), flat=int((sd == 0).sum()), adv=float(adv.sum()),
                     agree=sum(a == b for a, b in zip(exact, check["correct"].tolist())),
                     said_ok=int(check["correct"].sum()), said_ok_right=sum(a and b for a, b in zip(exact,
                     check["correct"].tolist())), slots_ok=sum(a == b for a, b in zip(truth, said)))
            drawn = torch.stack([render(scene_for(task, rng)) for _ in range(group)])  # what a perfect drawer draws
            m["layout"] += int(self_check(judge_model, processor, [task] * group, to_pixels(drawn))["correct"].sum())
            for c in codes:
                objs = [o for o in read_scene(c) if o.cls]
                if tag == "position" and len(objs) == 2:
                    s = next(x for x in task["include"] if "position" in x)
                    rel, ref_cls = s["position"][0], task["include"][s["position"][1]]["class"]
                    sub = next((o for o in objs if o.cls == s["class"]), None)
                    ref = next((o for o in objs if o.cls == ref_cls), None)
                    if sub and ref:
                        axis = (sub.quad // 2 == ref.quad // 2) if rel in ("left of", "right of") else \
                            (sub.quad % 2 == ref.quad % 2)
                        side = {"left of": sub.quad % 2 < ref.quad % 2, "right of": sub.quad % 2 > ref.quad % 2,
                                "above": sub.quad // 2 < ref.quad // 2, "below": sub.quad // 2 > ref.quad // 2}[rel]
                        order = "first" if rel in ("left of", "above") else "second"
                        m.update({"pairs": 1, "axis": axis, "direction": axis and side, f"axis_{order}": axis,
                                  f"dir_{order}": axis and side})
                if tag == "color_attr":
                    want = {x["class"]: x["color"] for x in task["include"]}
                    for o in objs:
                        if o.cls in want:
                            m.update(objects=1, own=o.color == want[o.cls], other=o.color in want.values()
                                     and o.color != want[o.cls])
                    if len(objs) == 2:
                        m.update(two=1, same=objs[0].color == objs[1].color)
        out[tag] = dict(exact=m["exact"] / m["images"], reach=m["reach"] / n_tasks, reward=m["reward"] / m["images"],
                        group_sd=m["group_sd"] / m["groups"], flat=m["flat"] / m["groups"], adv=m["adv"],
                        agree=m["agree"] / m["images"], precision=m["said_ok_right"] / max(1, m["said_ok"]),
                        slots_ok=m["slots_ok"] / m["images"], layout=m["layout"] / (group * n_tasks))
        if tag == "position":
            out[tag].update(axis=m["axis"] / max(1, m["pairs"]), direction=m["direction"] / max(1, m["axis"]),
                            **{f"dir_{o}": m[f"dir_{o}"] / max(1, m[f"axis_{o}"]) for o in ("first", "second")})
        if tag == "color_attr":
            out[tag].update(own=m["own"] / max(1, m["objects"]), other=m["other"] / max(1, m["objects"]),
                            unrequested=1 - (m["own"] + m["other"]) / max(1, m["objects"]),
                            same=m["same"] / max(1, m["two"]))
    total = sum(v["adv"] for v in out.values()) or 1
    for v in out.values():
        v["adv_share"] = v.pop("adv") / total
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretrain", help="train the toy checkpoint from scratch")
    p.add_argument("--out", default="assets/toy")
    p.add_argument("--phases", type=int, nargs=3, default=[1000, 1500, 1000], metavar=("READ", "DRAW", "CALIB"),
                   help="steps of the three phases (see pretrain)")
    p.add_argument("--caption-noise", type=float, default=0.65, help="share of T2I pairs showing a near miss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 while another job shares a 2-core box; "
                   "alone on one, 2 is about 1.6x faster)")
    p = sub.add_parser("eval", help="toy-GenEval per tag and judge precision/recall of a checkpoint")
    p.add_argument("--model", default="assets/toy")
    p.add_argument("--tasks", type=int, default=240)
    p.add_argument("--images", type=int, default=4, help="images per task")
    p.add_argument("--cfg", type=float, nargs="+", default=[2.0])
    p.add_argument("--seed", type=int, default=0, help="held-out tasks of this training seed")
    p.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("diagnose", help="per tag: what self-judged GRPO sees (flat groups, the judge, reach)")
    p.add_argument("--model", default="assets/toy")
    p.add_argument("--judge", help="the answering model's folder (default --model; a frozen judge: the start's)")
    p.add_argument("--tasks", type=int, default=12, help="held-out tasks per tag")
    p.add_argument("--draws", type=int, default=64, help="images per task (reach@draws; groups of 8)")
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.command == "pretrain":
        t0 = time.time()
        model, processor = pretrain(args.out, tuple(args.phases), seed=args.seed,
                                     caption_noise=args.caption_noise)
        print(f"pretraining took {(time.time() - t0) / 60:.1f} min; final evaluation:")
    else:
        from model import load_janus
        model, processor = load_janus(args.model)
    if args.command == "eval":
        report(model.eval(), processor, args.tasks, args.images, tuple(args.cfg), args.seed)
    elif args.command == "diagnose":
        if args.draws % 8:
            ap.error(f"--draws {args.draws}: a multiple of 8, the group size")
        judge_model = load_janus(args.judge)[0].eval() if args.judge else None
        res = diagnose(model.eval(), processor, judge_model, args.tasks, args.draws, cfg=args.cfg, seed=args.seed)
        keys = list(dict.fromkeys(k for v in res.values() for k in v))
        print(f"{'tag':<14}" + "".join(f"{k:>12}" for k in keys))
        for tag, v in res.items():
            print(f"{tag:<14}" + "".join(f"{v[k]:12.3f}" if k in v else " " * 12 for k in keys))
    else:
        report(model.eval(), processor, cfgs=(1.0, 2.0, 3.0), seed=1234)


if __name__ == "__main__":
    main()
