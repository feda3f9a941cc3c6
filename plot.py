"""
What a person looks at: the model's drawings with its own answers, before against after, and the curves of a run.

A self-judged reward can be hacked by the model it judges; the pictures and the answers are how one tells
learning from hacking. train.py writes the sheets while it runs (OUT/samples/step_XXXXXXX.png + samples.jsonl,
OUT/before_after.png); this script draws OUT/curves.png from OUT/log.jsonl:

    python plot.py OUT            # reward overall and per tag, KL, clip fraction, grad norm, the eval hook's numbers

Small images (the toy world's 8 x 8) are upscaled by an integer factor, nearest neighbour, to at least MIN_SIDE
pixels, so every cell stays a crisp square. The curves need matplotlib, an optional package used only here.
"""
import json
import os
import sys
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MIN_SIDE = 64  # no PNG of ours shows an image smaller than this
GAP, LINE = 6, 12  # pixels between images; height of one text line of the default font


def visible(image):
    """uint8 [H, W, 3] (array or tensor) -> PIL image, upscaled k x by nearest neighbour so that min(H, W) >= MIN_SIDE."""
    array = np.asarray(image.cpu() if hasattr(image, "cpu") else image)
    picture = Image.fromarray(array)
    k = -(-MIN_SIDE // min(picture.size))
    return picture.resize((picture.width * k, picture.height * k), Image.NEAREST) if k > 1 else picture


def _text(draw, xy, lines, fill=(0, 0, 0)):
    font = ImageFont.load_default()
    for i, line in enumerate(lines):
        draw.text((xy[0], xy[1] + i * LINE), line, fill=fill, font=font)


def sample_sheet(groups, path):
    """One PNG: per group a title (its prompt), its images in a row, and under each image its caption lines
    (e.g. the answer, the reward, an exact verdict). groups: [dict(title=str, images=[uint8 HxWx3],
    captions=[[str]])]."""
    rows = []
    for g in groups:
        pictures = [visible(im) for im in g["images"]]
        side = max(p.width for p in pictures)
        chars = max(8, side // 6)  # the default font is about 6 px wide
        captions = [[w for line in lines for w in textwrap.wrap(line, chars) or [""]] for lines in g["captions"]]
        title = textwrap.wrap(g["title"], max(20, len(pictures) * (side + GAP) // 6))
        rows.append((title, pictures, captions, side))
    width = max(len(p) * (s + GAP) for _, p, _, s in rows) + GAP
    heights = [LINE * len(t) + max(p.height for p in ps) + LINE * max(len(c) for c in cs) + 3 * GAP
               for t, ps, cs, _ in rows]
    sheet = Image.new("RGB", (max(width, 200), sum(heights) + GAP), "white")
    draw, y = ImageDraw.Draw(sheet), GAP
    for (title, pictures, captions, side), h in zip(rows, heights):
        _text(draw, (GAP, y), title)
        top = y + LINE * len(title) + GAP
        for i, (picture, lines) in enumerate(zip(pictures, captions)):
            x = GAP + i * (side + GAP)
            sheet.paste(picture, (x, top))
            _text(draw, (x, top + picture.height + GAP // 2), lines, fill=(40, 40, 40))
        y += h
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sheet.save(path)
    return path


def before_after(prompts, before, after, path, labels=("before", "after")):
    """Rows of prompts; on each row the images drawn before (left) and after (right). before/after: per prompt a
    list of uint8 images."""
    groups = [dict(title=f"{p}    [{labels[0]} | {labels[1]}]", images=list(b) + list(a),
                   captions=[[labels[0]]] * len(b) + [[labels[1]]] * len(a)) for p, b, a in zip(prompts, before, after)]
    return sample_sheet(groups, path)


def read_log(run_dir):
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def curves(run_dir, out=None):
    """OUT/curves.png from OUT/log.jsonl: one panel each for the rewards (overall and per tag), KL, clip fraction,
    gradient norm, and the evaluation hook's numbers. Returns the path."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plot.py needs matplotlib (optional, for the curves only): pip install matplotlib")
    entries = read_log(run_dir)
    train = [e for e in entries if "reward" in e]
    eval_keys = eval_numbers(entries)
    evals = [e for e in entries if eval_keys & set(e)]
    panels = [("reward", [k for k in _keys(train) if k == "reward" or (k.startswith("reward_") and k != "reward_std")]),
              ("KL (k3)", [k for k in _keys(train) if k.endswith("_kl")]),
              ("clip fraction", [k for k in _keys(train) if k.endswith("clip_frac")]),
              ("gradient norm", ["grad_norm"]),
              ("evaluation hook", sorted(eval_keys))]
    panels = [(name, keys) for name, keys in panels if keys]
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), sharex=True, squeeze=False)
    for ax, (name, keys) in zip(axes[:, 0], panels):
        source = evals if name == "evaluation hook" else train
        for k in keys:
            steps, values = zip(*[(e["step"], e[k]) for e in source if isinstance(e.get(k), (int, float))])
            if name == "evaluation hook":
                ax.plot(steps, values, label=k, marker="o", markersize=3)
                continue
            line, = ax.plot(steps, smooth(values), label=k)  # per-step values are noisy: a running mean, and
            ax.plot(steps, values, color=line.get_color(), alpha=0.15, linewidth=0.8)  # the raw values faint
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    out = out or os.path.join(run_dir, "curves.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def eval_numbers(entries):
    """The evaluation hook's keys: those of the step-0 line (train.py logs the starting evaluation alone), else the
    numbers that only some steps carry (the hook runs every --eval-every steps)."""
    start = [e for e in entries if e.get("step") == 0]
    if start:
        return set(start[0]) - {"step"}
    train = [e for e in entries if "reward" in e]
    counts = {k: sum(k in e for e in train) for k in _keys(train)}
    return {k for k, n in counts.items() if n <= len(train) / 2 and not k.startswith(("loss_", "reward_"))}


def smooth(values):
    """Running mean over a window of about 1/30 of the run (at least 1)."""
    w = max(1, len(values) // 30)
    c = np.cumsum(np.insert(np.asarray(values, dtype=float), 0, 0.0))
    return [(c[i + 1] - c[max(0, i + 1 - w)]) / (i + 1 - max(0, i + 1 - w)) for i in range(len(values))]


def _keys(entries):
    return sorted({k for e in entries for k in e})


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.isfile(os.path.join(sys.argv[1], "log.jsonl")):
        raise SystemExit("usage: python plot.py OUT   (OUT: a train.py run folder with log.jsonl)")
    print("wrote", curves(sys.argv[1]))
