"""
Training tasks and the self-check reward of UniRL: the model answers a question about its own image,
and the answer, matched slot by slot against the reference, is the reward of the generation.

A task is one row in the GenEval/UniRL QA jsonl format:
    {"tag", "include": [{class, count, [color], [position: [rel, idx]]}], ["exclude"], "prompt", "question", "answer"}
Six tags, GenEval's: single_object, two_object, counting, colors, position, color_attr.

Reward, per task (spec/method.md §4; the rule is a reconstruction [SPEC] that reproduces the paper's figure:
"Two chairs" / "Three bowls" / "Four bowls" for "a photo of four bowls" score 0 / 1 / 2 of 2 slots):

    r = matched slots / total slots          in [0, 1]      (score; slots() gives the integer pair, which is
                                                             method.md's default; score is its reward_normalize form)
    correct = (matched slots == total slots)                (is_correct)

    single_object  1 slot : the class is mentioned
    two_object     2 slots: class A mentioned; class B mentioned
    counting       2 slots: class mentioned; the set of number words in the answer is exactly {n}
    colors         1 slot : the target colour is the only one of the 10 colours mentioned
    position       3 slots: S mentioned; R mentioned; first relation reads (S rel R) or (R inverse(rel) S)
    color_attr     2 slots: colour cA bound to class A (and cB not); likewise for B

Negation: a negation word ("no", "not", "isn't", "without", ...) voids every mention after it in its clause (clauses
end at "," and "and"), so "There is no dog" names no dog and "the glass is not purple" binds no colour.
Slots come from the task's `include` metadata, never from the prompt string, so paraphrased prompts score the same.
Pure Python (stdlib only): strings in, numbers out. GenEval's prompts are read by path, never stored here.

CLI (materialise a fixed training set, deduplicated against GenEval):
    python reward.py --n 5000 --seed 0 --exclude data/geneval/evaluation_metadata.jsonl --out train.jsonl
"""
import argparse
import json
import random
import re
from collections import namedtuple

# -----------------------------------------------------------------------------------------------------------
# Vocabulary: GenEval's (djghosh13/geneval prompts/create_prompts.py and object_names.txt)

# the 80 COCO thing classes, in COCO order, with GenEval's spelling ("hair drier", "tv", "skis")
CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
]
COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
RELATIONS = ["left of", "right of", "above", "below"]
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
TAGS = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
NO_PERSON = [c for c in CLASSES if c != "person"]  # GenEval never colours a person

# UniRL's questions, verbatim from showlab/UniRL evaluation_metadata_qa.jsonl (typos and missing period included)
QUESTIONS = {
    "single_object": "What is the main item in this image?",
    "two_object": "What are two items in this image?",
    "counting": "How many items in this image?",
    "colors": "What is the color of the object?",
    "position": "What are two objects and What is position relationship between two main items? Use one sentence.",
    "color_attr": "What are two objects and the colors of two objects in the image? Use one sentence",
}


def with_article(word):
    return ("an " if word[0] in "aeiou" else "a ") + word  # GenEval's rule: letters only, so "an umbrella", "a hair drier"


def geneval_plural(name):
    return name + ("es" if name.endswith("s") else "s")  # GenEval's rule, hence "sheeps", "knifes", "benchs", "buses"


# -----------------------------------------------------------------------------------------------------------
# Task templates and the generator


def build_task(tag, classes, colors=(), count=None, relation=None):
    """One task in the QA jsonl schema. classes/colors are in prompt order: position takes [S, R] ("S rel R")."""
    a, b = (list(classes) + [None])[:2]
    ca, cb = (list(colors) + [None, None])[:2]
    if tag == "single_object":
        include, prompt, answer = [{"class": a, "count": 1}], f"a photo of {with_article(a)}", a
    elif tag == "two_object":
        include = [{"class": a, "count": 1}, {"class": b, "count": 1}]
        prompt = f"a photo of {with_article(a)} and {with_article(b)}"
        answer = f"There is a {a} and a {b}"  # always "a", as in UniRL's file ("a toaster and a oven")
    elif tag == "counting":
        include = [{"class": a, "count": count}]
        answer = f"{NUMBERS[count]} {geneval_plural(a)}"
        prompt = f"a photo of {answer}"
    elif tag == "colors":
        include, prompt, answer = [{"class": a, "count": 1, "color": ca}], f"a photo of {with_article(ca)} {a}", ca
    elif tag == "position":
        include = [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [relation, 0]}]  # a is rel of group 0
        prompt = f"a photo of {with_article(a)} {relation} {with_article(b)}"
        answer = f"The {a} is {relation} the {b}"
    elif tag == "color_attr":
        include = [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}]
        prompt = f"a photo of {with_article(ca)} {a} and {with_article(cb)} {b}"
        answer = f"The {a} is {ca} and the {b} is {cb}"  # grammar unfixed, as in UniRL's file ("The skis is green")
    else:
        raise ValueError(f"unknown tag {tag!r}, expected one of {TAGS}")
    task = {"tag": tag, "include": include}
    if tag == "counting":
        task["exclude"] = [{"class": a, "count": count + 1}]  # GenEval: "exactly n", so n+1 must not be detected
    task.update(prompt=prompt, question=QUESTIONS[tag], answer=answer)
    return task


def _sample(tag, rng):
    # uniform over each tag's template space under GenEval's constraints (distinct classes/colours, no coloured person)
    if tag == "single_object":
        return build_task(tag, [rng.choice(CLASSES)])
    if tag == "two_object":
        return build_task(tag, rng.sample(CLASSES, 2))
    if tag == "counting":
        return build_task(tag, [rng.choice(CLASSES)], count=rng.randint(2, 4))
    if tag == "colors":
        return build_task(tag, [rng.choice(NO_PERSON)], [rng.choice(COLORS)])
    if tag == "position":
        return build_task(tag, rng.sample(CLASSES, 2), relation=rng.choice(RELATIONS))
    if tag == "color_attr":
        return build_task(tag, rng.sample(NO_PERSON, 2), rng.sample(COLORS, 2))
    raise ValueError(f"unknown tag {tag!r}, expected one of {TAGS}")


# GenEval's 80 single_object prompts are its whole template space, so under dedup single_object would vanish.
# These paraphrases [SPEC, method.md §3.5] never equal a GenEval string; question and answer are unchanged.
SINGLE_PARAPHRASES = ["a photo of one {cls}", "an image of {art}", "a picture of {art}"]


def prompt_key(prompt):
    """The dedup key: lowercase, whitespace collapsed, no trailing period."""
    return re.sub(r"\s+", " ", prompt.lower()).strip().rstrip(".").rstrip()


def make_tasks(n, seed, tags=None, exclude_prompts=None, report=None):
    """
    n tasks drawn with random.Random(seed) (use seed + rank per rank). Each draw picks a tag uniformly from `tags`
    (default: all six; repeat a tag to weight it), then a template uniformly within the tag; draws are independent.
    A candidate whose prompt_key is in `exclude_prompts` is dropped and counted; for single_object it is replaced
    by a paraphrase instead. If `report` is a dict it is filled with
    {"excluded": total dropped, "excluded_by_tag": {tag: dropped}}.
    """
    tags = list(tags or TAGS)
    bad = sorted(set(tags) - set(TAGS))
    if bad:
        raise ValueError(f"unknown tags {bad}, expected a subset of {TAGS}")
    rng = random.Random(seed)
    banned = {prompt_key(p) for p in (exclude_prompts or ())}
    excluded = dict.fromkeys(tags, 0)
    tasks = []
    while len(tasks) < n:
        tag = rng.choice(tags)
        task = _sample(tag, rng)
        if tag == "single_object" and prompt_key(task["prompt"]) in banned:
            excluded[tag] += 1
            cls = task["include"][0]["class"]
            task["prompt"] = rng.choice(SINGLE_PARAPHRASES).format(cls=cls, art=with_article(cls))
        if prompt_key(task["prompt"]) in banned:
            excluded[tag] += 1
            if sum(excluded.values()) > 1000 + 100 * n:  # only if exclude_prompts covers (nearly) the whole space
                raise RuntimeError(f"exclude_prompts leaves (almost) no prompts for tags {tags}")
            continue
        tasks.append(task)
    if report is not None:
        report.update(excluded=sum(excluded.values()), excluded_by_tag=excluded)
    return tasks


def load_tasks(path):
    """Tasks from a jsonl file (the QA file, GenEval's evaluation_metadata.jsonl, or a saved training set)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def geneval_prompts(path):
    """The set of prompt strings in a GenEval metadata jsonl: pass it as make_tasks(exclude_prompts=...)."""
    return {t["prompt"] for t in load_tasks(path)}


# -----------------------------------------------------------------------------------------------------------
# Answer normalisation: text -> ordered mentions of classes, colours, numbers and relations


def _english_plural(phrase):
    *head, last = phrase.split()
    irregular = {"person": "people", "people": "people", "man": "men", "woman": "women", "knife": "knives",
                 "sheep": "sheep", "mouse": "mice", "skis": "skis", "scissors": "scissors", "broccoli": "broccoli"}
    if last in irregular:
        last = irregular[last]
    elif re.search(r"(s|x|z|ch|sh)$", last):
        last += "es"
    elif re.search(r"[^aeiou]y$", last):
        last = last[:-1] + "ies"
    else:
        last += "s"
    return " ".join(head + [last])


# words a model may use for a class [SPEC table, method.md §4.2; "ski" added so that the singular also counts]
SYNONYMS = {
    "tv": ["television", "tv monitor", "monitor"], "couch": ["sofa"], "hair drier": ["hair dryer", "blow dryer"],
    "cell phone": ["phone", "mobile phone", "smartphone"], "tv remote": ["remote", "remote control"],
    "computer mouse": ["mouse"], "computer keyboard": ["keyboard"], "dining table": ["table"],
    "potted plant": ["plant", "houseplant"], "motorcycle": ["motorbike"], "airplane": ["plane", "aeroplane"],
    "donut": ["doughnut"], "sports ball": ["ball"], "wine glass": ["glass"], "teddy bear": ["teddy", "stuffed bear"],
    "person": ["man", "woman", "people"], "bicycle": ["bike"], "skis": ["ski"],
}

# phrase (tuple of words) -> (kind, value); matched longest first, so "hot dog" wins over "dog"
PHRASES = {}
for _cls in CLASSES:
    for _name in [_cls] + SYNONYMS.get(_cls, []):
        # singular, GenEval's naive plural, proper plural: "bench", "benchs", "benches"
        for _form in (_name, geneval_plural(_name), _english_plural(_name)):
            PHRASES[tuple(_form.split())] = ("class", _cls)
for _c in COLORS:
    if _c != "orange":  # "orange" is stored as a class and resolved in context (_orange_kind)
        PHRASES[(_c,)] = ("color", _c)
for _side in ("left", "right"):
    for _form in ("{} of", "{} side of", "{} hand side of"):  # "to the"/"on the" before them is filler
        PHRASES[tuple(_form.format(_side).split())] = ("rel", f"{_side} of")
for _form, _rel in [("above", "above"), ("on top of", "above"), ("over", "above"), ("below", "below"),
                    ("under", "below"), ("beneath", "below"), ("underneath", "below")]:
    PHRASES[tuple(_form.split())] = ("rel", _rel)
for _i in range(2, 11):  # "one", "a", "an" are not counts: "one of them" or "a bowl" must not read as a number
    PHRASES[(NUMBERS[_i],)] = ("num", _i)
MAX_PHRASE = max(map(len, PHRASES))

Mention = namedtuple("Mention", "kind value start end clause")  # [start, end) word span; clause index


def _words(answer):
    s = (answer or "").lower().replace("-", " ").replace("_", " ")
    s = re.sub(r"['\u2019]", "", s)  # "dog's" -> "dogs"
    s = re.sub(r"[,;.!?:]", " , ", s)  # clause breaks survive as a "," word (color_attr binding needs them)
    s = re.sub(r"[^a-z0-9, ]", " ", s)
    s = re.sub(r"\ba\s+pair\s+of\s+(?!skis\b|scissors\b)", "two ", s)  # but a pair of skis is one object
    words = []
    for w in s.split():
        if w.isdigit() and int(w) <= 10:
            w = NUMBERS[int(w)]
        if w not in ("a", "an", "the"):
            words.append(w)
    return words


def _class_at(words, i):
    return any(PHRASES.get(tuple(words[i:i + L]), ("",))[0] == "class" for L in range(1, MAX_PHRASE + 1))


def _orange_kind(words, i, mentions, clause, tag, task_has_orange):
    # "orange" is a GenEval class and a GenEval colour. [SPEC rule, extended so that all 553 reference answers parse]
    last = mentions[-1] if mentions else None
    if _class_at(words, i + 1):
        return "color"  # "orange cow", "orange orange"
    if last and last.kind == "color" and last.end == i:
        return "class"  # "yellow orange"
    if last and last.kind == "class" and last.clause == clause and words[i - 1] in ("is", "are"):
        return "color"  # "the cow is orange" (but not "there is an orange")
    nxt = words[i + 1] if i + 1 < len(words) else ""
    if task_has_orange and (tag != "colors" or nxt in ("is", "are")):
        return "class"  # "the orange is red"; but a bare "orange" answering "what colour?" is the colour
    return "color"


# after _words (apostrophes dropped): "isn't" -> "isnt"
NEGATIONS = {"no", "not", "isnt", "arent", "wasnt", "werent", "doesnt", "dont", "without", "none", "neither", "nor",
             "never", "cannot", "cant"}


def parse(answer, task=None):
    """(words, mentions): the normalised words and the ordered class/colour/number/relation mentions.

    A negation word negates the rest of its clause: "there is no dog", "the glass is not purple", "a dog and no
    cat" (the cat) mention nothing there [our choice; method.md marks the reward rule SPEC]."""
    words = _words(answer)
    tag = task["tag"] if task else None
    has_orange = bool(task) and any(x["class"] == "orange" for x in task["include"])
    mentions, clause, i, negated = [], 0, 0, False
    while i < len(words):
        if words[i] in (",", "and"):
            clause, i, negated = clause + 1, i + 1, False
            continue
        if words[i] in NEGATIONS:
            negated, i = True, i + 1
            continue
        if negated:
            i += 1
            continue
        for L in range(min(MAX_PHRASE, len(words) - i), 0, -1):
            hit = PHRASES.get(tuple(words[i:i + L]))
            if hit:
                break
        else:
            i += 1
            continue
        kind, value = hit
        if words[i] == "orange" and L == 1:
            kind, value = _orange_kind(words, i, mentions, clause, tag, has_orange), "orange"
        mentions.append(Mention(kind, value, i, i + L, clause))
        i += L
    return words, mentions


# -----------------------------------------------------------------------------------------------------------
# Slots and the reward


def _relation(mentions):
    # the first relation; its subject is the last class before it, its object the first class after it
    rels = [m for m in mentions if m.kind == "rel"]
    if not rels:
        return None
    before = [m.value for m in mentions if m.kind == "class" and m.end <= rels[0].start]
    after = [m.value for m in mentions if m.kind == "class" and m.start >= rels[0].end]
    return (before[-1], rels[0].value, after[0]) if before and after else None


def _bindings(words, mentions):
    # colour c is bound to class X if c directly precedes X ("purple wine glass"), or X comes first in the same
    # clause with "is"/"are" between them ("the wine glass is purple"); X is then the nearest class before c
    pairs = set()
    for k, c in enumerate(mentions):
        if c.kind != "color":
            continue
        nxt = mentions[k + 1] if k + 1 < len(mentions) else None
        if nxt and nxt.kind == "class" and nxt.start == c.end:
            pairs.add((nxt.value, c.value))
            continue
        prev = [m for m in mentions[:k] if m.kind == "class" and m.clause == c.clause]
        if prev and any(w in ("is", "are") for w in words[prev[-1].end:c.start]):
            pairs.add((prev[-1].value, c.value))
    return pairs


def slots(answer, task, strict_single=False):
    """(matched, total) slots of `answer` for `task`. strict_single: single_object also forbids other classes."""
    tag, inc = task["tag"], task["include"]
    words, mentions = parse(answer, task)
    classes = {m.value for m in mentions if m.kind == "class"}
    colors = {m.value for m in mentions if m.kind == "color"}
    numbers = {m.value for m in mentions if m.kind == "num"}
    if tag == "single_object":
        cls = inc[0]["class"]
        return int(cls in classes and (not strict_single or classes == {cls})), 1
    if tag == "two_object":
        return sum(x["class"] in classes for x in inc), 2
    if tag == "counting":
        # a hedge ("two or four bowls") has a number set != {4} and loses the count slot
        return int(inc[0]["class"] in classes) + int(numbers == {inc[0]["count"]}), 2
    if tag == "colors":
        return int(colors == {inc[0]["color"]}), 1
    if tag == "position":
        s = next(x for x in inc if "position" in x)
        rel, r = s["position"][0], inc[s["position"][1]]["class"]
        s = s["class"]
        # a bag of words is not enough: "the teddy bear is right of the dog" has every keyword and is false
        order = _relation(mentions) in ((s, rel, r), (r, INVERSE[rel], s))
        return int(s in classes) + int(r in classes) + int(order), 3
    if tag == "color_attr":
        bound = _bindings(words, mentions)
        (a, ca), (b, cb) = [(x["class"], x["color"]) for x in inc]
        # a colour counts for its object only when it is that object's alone: "the tv is red and the kite is
        # red" for "a red tv and a blue kite" binds nothing. Without the last condition painting the whole image
        # one requested colour earned half the slots, and the toy world's GRPO learnt exactly that
        ok_a = (a, ca) in bound and (a, cb) not in bound and (b, ca) not in bound
        ok_b = (b, cb) in bound and (b, ca) not in bound and (a, cb) not in bound
        return int(ok_a) + int(ok_b), 2
    raise ValueError(f"unknown tag {tag!r}, expected one of {TAGS}")


def score(answer, task):
    """The reward r = matched slots / total slots, in [0, 1]."""
    matched, total = slots(answer, task)
    return matched / total


def is_correct(answer, task):
    """Strict verdict: every slot matched (for evaluation and for filtering SFT samples)."""
    matched, total = slots(answer, task)
    return matched == total


# -----------------------------------------------------------------------------------------------------------

if __name__ == "__main__":
    p = argparse.ArgumentParser(description="write a training task set (QA jsonl schema), deduplicated against GenEval")
    p.add_argument("--n", type=int, default=5000, help="number of tasks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tags", default=",".join(TAGS), help="comma-separated tags, sampled uniformly")
    p.add_argument("--exclude", default="", help="GenEval evaluation_metadata(.qa).jsonl whose prompts are excluded")
    p.add_argument("--out", default="train_tasks.jsonl")
    args = p.parse_args()
    report = {}
    exclude = geneval_prompts(args.exclude) if args.exclude else None
    tasks = make_tasks(args.n, args.seed, args.tags.split(","), exclude, report=report)
    with open(args.out, "w") as f:
        f.writelines(json.dumps(t) + "\n" for t in tasks)
    print(f"wrote {len(tasks)} tasks to {args.out}; excluded candidates: {report['excluded']} {report['excluded_by_tag']}")
    if not exclude:
        print("warning: no --exclude given, so training prompts may overlap GenEval's test prompts")
