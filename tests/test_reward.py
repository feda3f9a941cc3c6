import json
import os
import re

import pytest

import reward
from reward import build_task, is_correct, make_tasks, score

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENEVAL = os.environ.get("UNIRL_GENEVAL", os.path.join(REPO, "data", "geneval"))  # shipped with the repository


def _geneval_file(name):
    path = os.path.join(GENEVAL, name)
    if not os.path.exists(path):  # a skipped reward check would be a silent pass
        pytest.fail(f"GenEval data not found at {path} (data/geneval ships it; UNIRL_GENEVAL points elsewhere)")
    return path


@pytest.fixture(scope="module")
def qa_rows():
    return reward.load_tasks(_geneval_file("evaluation_metadata_qa.jsonl"))


@pytest.fixture(scope="module")
def test_prompts():
    return reward.geneval_prompts(_geneval_file("evaluation_metadata.jsonl"))


# -----------------------------------------------------------------------------------------------------------
# The score table

BOWLS4 = build_task("counting", ["bowl"], count=4)  # the paper's figure
SHEEP2 = build_task("counting", ["sheep"], count=2)
KNIFE3 = build_task("counting", ["knife"], count=3)
PERSON3 = build_task("counting", ["person"], count=3)
BENCH4 = build_task("counting", ["bench"], count=4)
DOG = build_task("single_object", ["dog"])
TV = build_task("single_object", ["tv"])
DRIER = build_task("single_object", ["hair drier"])
COUCH = build_task("single_object", ["couch"])
ORANGE = build_task("single_object", ["orange"])
SKIS = build_task("single_object", ["skis"])
TOASTER_OVEN = build_task("two_object", ["toaster", "oven"])
PHONE_COUCH = build_task("two_object", ["cell phone", "couch"])
BLUE_HYDRANT = build_task("colors", ["fire hydrant"], ["blue"])
ORANGE_ORANGE = build_task("colors", ["orange"], ["orange"])
YELLOW_ORANGE = build_task("colors", ["orange"], ["yellow"])
DOG_RIGHT_TEDDY = build_task("position", ["dog", "teddy bear"], relation="right of")
GLASS_ABOVE_KITE = build_task("position", ["wine glass", "kite"], relation="above")
GLASS_APPLE = build_task("color_attr", ["wine glass", "apple"], ["purple", "black"])
ORANGE_BROCCOLI = build_task("color_attr", ["orange", "broccoli"], ["red", "purple"])
ORANGE_COW = build_task("color_attr", ["orange", "cow"], ["red", "orange"])
ORANGE_BEAR = build_task("two_object", ["orange", "bear"])
DOG_CAT = build_task("two_object", ["dog", "cat"])
GLASS_CAT = build_task("color_attr", ["wine glass", "cat"], ["purple", "red"])
DOG_LEFT_CAT = build_task("position", ["dog", "cat"], relation="left of")

CASES = [
    # counting: class slot + count slot; the figure's rows first
    ("Two chairs", BOWLS4, 0.0),
    ("Three bowls", BOWLS4, 0.5),  # wrong count, right class
    ("Four bowls", BOWLS4, 1.0),
    ("4 bowls.", BOWLS4, 1.0),  # digits
    ("four chairs", BOWLS4, 0.5),
    ("two or four bowls", BOWLS4, 0.5),  # a hedge is not a count
    ("", BOWLS4, 0.0),
    ("There are four bowls in the image!", BOWLS4, 1.0),  # extra words, punctuation
    ("four bowl", BOWLS4, 1.0),  # singular where plural expected
    ("bowls", BOWLS4, 0.5),
    ("4", BOWLS4, 0.5),
    ("FOUR   BOWLS!!!", BOWLS4, 1.0),
    ("one bowl", BOWLS4, 0.5),
    ("14 bowls", BOWLS4, 0.5),  # only 0-10 become number words
    ("two sheep", SHEEP2, 1.0),  # irregular plural
    ("two sheeps", SHEEP2, 1.0),  # GenEval's naive plural
    ("a pair of sheep", SHEEP2, 1.0),
    ("2 sheep", SHEEP2, 1.0),
    ("three knives", KNIFE3, 1.0),
    ("three knifes", KNIFE3, 1.0),
    ("three forks", KNIFE3, 0.5),
    ("three people", PERSON3, 1.0),
    ("3 persons", PERSON3, 1.0),
    ("three men", PERSON3, 1.0),
    ("four benches", BENCH4, 1.0),
    ("four benchs", BENCH4, 1.0),
    # single_object: the class
    ("dog", DOG, 1.0),
    ("A dog.", DOG, 1.0),  # article, punctuation
    ("The main item in this image is a dog sitting on the grass.", DOG, 1.0),
    ("dogs", DOG, 1.0),  # plural where singular expected
    ("hot dog", DOG, 0.0),  # longest match: a hot dog is not a dog
    ("cat", DOG, 0.0),
    ("", DOG, 0.0),
    ("television", TV, 1.0),  # synonyms
    ("A TV.", TV, 1.0),
    ("tv remote", TV, 0.0),
    ("hair dryer", DRIER, 1.0),
    ("hair-drier", DRIER, 1.0),
    ("sofa", COUCH, 1.0),
    ("couches", COUCH, 1.0),
    ("an orange", ORANGE, 1.0),
    ("oranges", ORANGE, 1.0),
    ("a pair of skis", SKIS, 1.0),
    ("ski", SKIS, 1.0),
    # two_object: each class
    ("There is a toaster and a oven", TOASTER_OVEN, 1.0),
    ("a toaster and an oven.", TOASTER_OVEN, 1.0),
    ("toaster", TOASTER_OVEN, 0.5),
    ("an oven, a microwave", TOASTER_OVEN, 0.5),
    ("", TOASTER_OVEN, 0.0),
    ("There is a smartphone and a sofa.", PHONE_COUCH, 1.0),
    ("a mobile phone on a couch", PHONE_COUCH, 1.0),
    ("There is an orange and a bear.", ORANGE_BEAR, 1.0),  # the fruit, not the colour
    # colors: the colour, and no other
    ("blue", BLUE_HYDRANT, 1.0),
    ("Blue.", BLUE_HYDRANT, 1.0),
    ("The fire hydrant is blue.", BLUE_HYDRANT, 1.0),
    ("red", BLUE_HYDRANT, 0.0),
    ("blue and white", BLUE_HYDRANT, 0.0),
    ("", BLUE_HYDRANT, 0.0),
    ("orange", ORANGE_ORANGE, 1.0),  # asked for a colour, "orange" is the colour
    ("The orange is orange.", ORANGE_ORANGE, 1.0),
    ("yellow", YELLOW_ORANGE, 1.0),
    ("orange", YELLOW_ORANGE, 0.0),
    ("It is a yellow orange.", YELLOW_ORANGE, 1.0),
    # position: S, R, and the relation in the right order
    ("The dog is right of the teddy bear", DOG_RIGHT_TEDDY, 1.0),
    ("The dog is to the right of the teddy bear.", DOG_RIGHT_TEDDY, 1.0),
    ("The teddy bear is to the left of the dog.", DOG_RIGHT_TEDDY, 1.0),  # the inverse reading is also true
    ("The teddy bear is right of the dog", DOG_RIGHT_TEDDY, 2 / 3),  # swapped order
    ("The dog is left of the teddy bear", DOG_RIGHT_TEDDY, 2 / 3),
    ("a dog and a teddy bear", DOG_RIGHT_TEDDY, 2 / 3),
    ("The dog is right of the cat", DOG_RIGHT_TEDDY, 1 / 3),
    ("", DOG_RIGHT_TEDDY, 0.0),
    ("The dog is on the right side of the teddy.", DOG_RIGHT_TEDDY, 1.0),
    ("The wine glass is above the kite", GLASS_ABOVE_KITE, 1.0),
    ("The kite is below the wine glass.", GLASS_ABOVE_KITE, 1.0),
    ("A glass on top of a kite", GLASS_ABOVE_KITE, 1.0),
    ("The kite is above the wine glass", GLASS_ABOVE_KITE, 2 / 3),
    ("The wine glass is under the kite", GLASS_ABOVE_KITE, 2 / 3),
    # color_attr: each (class, colour) binding
    ("The wine glass is purple and the apple is black", GLASS_APPLE, 1.0),
    ("A purple wine glass and a black apple.", GLASS_APPLE, 1.0),
    ("The wine glass is black and the apple is purple", GLASS_APPLE, 0.0),  # swapped colours
    ("The wine glass is purple and the apple is red", GLASS_APPLE, 0.5),
    # one requested colour on both objects binds neither: else a one-colour image earns half the slots
    ("The wine glass is purple and the apple is purple", GLASS_APPLE, 0.0),
    ("A black wine glass and a black apple", GLASS_APPLE, 0.0),
    ("The apple is black and the wine glass is black", GLASS_APPLE, 0.0),
    ("The wine glass is purple", GLASS_APPLE, 0.5),
    ("purple and black", GLASS_APPLE, 0.0),  # colours bound to nothing
    ("The apple is black, the wine glass is purple.", GLASS_APPLE, 1.0),
    ("The purple glass is next to a black apple", GLASS_APPLE, 1.0),
    ("", GLASS_APPLE, 0.0),
    ("The orange is red and the broccoli is purple", ORANGE_BROCCOLI, 1.0),
    ("A red orange and a purple broccoli", ORANGE_BROCCOLI, 1.0),
    ("The orange is purple and the broccoli is red", ORANGE_BROCCOLI, 0.0),
    ("A red orange and an orange cow", ORANGE_COW, 1.0),  # "orange" as colour before a class, class after one
    ("The cow is orange and the orange is red", ORANGE_COW, 1.0),
    ("The cow is red and the orange is orange", ORANGE_COW, 0.0),
    # negations void the rest of their clause
    ("There is no dog in this image.", DOG, 0.0),
    ("No dog.", DOG, 0.0),
    ("This isn't a dog.", DOG, 0.0),
    ("A toaster and no oven.", TOASTER_OVEN, 0.5),
    ("There is a toaster but not an oven", TOASTER_OVEN, 0.5),
    ("The wine glass is not purple, the apple is black", GLASS_APPLE, 0.5),
    ("The dog is not right of the teddy bear", DOG_RIGHT_TEDDY, 1 / 3),  # the dog alone; no relation, no bear
    ("There are four bowls, not two", BOWLS4, 1.0),
    ("A dog and no cat.", DOG_CAT, 0.5),
    ("The wine glass is not purple, the cat is red", GLASS_CAT, 0.5),
    ("the dog is not left of the cat", DOG_LEFT_CAT, 1 / 3),
]


@pytest.mark.parametrize("answer,task,expected", CASES, ids=[f"{t['tag']}:{a!r}" for a, t, _ in CASES])
def test_score_table(answer, task, expected):
    assert score(answer, task) == pytest.approx(expected)
    assert is_correct(answer, task) == (expected == 1.0)


def test_table_is_large_and_covers_every_tag():
    assert len(CASES) >= 60
    assert {t["tag"] for _, t, _ in CASES} == set(reward.TAGS)


def test_negated_mentions_bind_and_relate_nothing():
    words, mentions = reward.parse("The wine glass is not purple, the cat is red", GLASS_CAT)
    assert reward._bindings(words, mentions) == {("cat", "red")}  # purple is not the wine glass's colour
    assert reward._relation(reward.parse("the dog is not left of the cat")[1]) is None


def test_integer_slots_match_the_figure():
    assert [reward.slots(a, BOWLS4) for a in ("Two chairs", "Three bowls", "Four bowls")] == [(0, 2), (1, 2), (2, 2)]


def test_strict_single_rejects_extra_classes():
    assert reward.slots("a dog and a cat", DOG) == (1, 1)
    assert reward.slots("a dog and a cat", DOG, strict_single=True) == (0, 1)
    assert reward.slots("two dogs", DOG, strict_single=True) == (1, 1)


def test_every_class_name_and_plural_parses_to_itself():
    for cls in reward.CLASSES:
        for form in (cls, reward.geneval_plural(cls)):
            assert reward.score(form, build_task("single_object", [cls])) == 1.0, form


# -----------------------------------------------------------------------------------------------------------
# The generator


def test_deterministic_per_seed():
    assert make_tasks(300, seed=7) == make_tasks(300, seed=7)
    assert make_tasks(300, seed=7) != make_tasks(300, seed=8)


def test_grammar_and_constraints():
    tasks = make_tasks(3000, seed=0)
    assert {t["tag"] for t in tasks} == set(reward.TAGS)
    for t in tasks:
        words = t["prompt"].split()
        for art, nxt in zip(words, words[1:]):
            if art in ("a", "an"):
                assert (art == "an") == (nxt[0] in "aeiou"), t["prompt"]
        classes = [x["class"] for x in t["include"]]
        colors = [x["color"] for x in t["include"] if "color" in x]
        assert len(set(classes)) == len(classes) and len(set(colors)) == len(colors), t
        if colors:
            assert "person" not in classes, t
        if t["tag"] == "counting":
            assert 2 <= t["include"][0]["count"] <= 4 and t["exclude"][0]["count"] == t["include"][0]["count"] + 1
        assert t["question"] == reward.QUESTIONS[t["tag"]]
        assert score(t["answer"], t) == 1.0, t  # the template answer is the reference


def test_tags_argument():
    assert {t["tag"] for t in make_tasks(50, seed=0, tags=["position"])} == {"position"}
    with pytest.raises(ValueError):
        make_tasks(1, seed=0, tags=["nope"])


def test_exclusion_never_emits_a_geneval_prompt(test_prompts):
    assert len(test_prompts) == 553
    report = {}
    tasks = make_tasks(3000, seed=1, exclude_prompts=test_prompts, report=report)
    keys = {reward.prompt_key(p) for p in test_prompts}
    assert len(tasks) == 3000 and not any(reward.prompt_key(t["prompt"]) in keys for t in tasks)
    assert report["excluded"] > 0 and report["excluded"] == sum(report["excluded_by_tag"].values())
    assert report["excluded_by_tag"]["single_object"] > 0  # GenEval holds every single_object prompt
    singles = [t for t in tasks if t["tag"] == "single_object"]
    assert singles and all(score(t["answer"], t) == 1.0 for t in singles)  # paraphrased, still scored
    # the key ignores case, spacing and a trailing period
    assert make_tasks(1, seed=0, tags=["single_object"], exclude_prompts=["A photo of  a DOG."])


def test_without_exclusion_geneval_prompts_appear(test_prompts):
    report = {}
    tasks = make_tasks(500, seed=0, tags=["single_object"], report=report)
    assert report["excluded"] == 0 and {t["prompt"] for t in tasks} <= test_prompts


# -----------------------------------------------------------------------------------------------------------
# Against UniRL's QA file


def _rebuild(row):
    inc, tag = row["include"], row["tag"]
    if tag == "position":
        s = next(x for x in inc if "position" in x)
        return build_task(tag, [s["class"], inc[s["position"][1]]["class"]], relation=s["position"][0])
    count = inc[0]["count"] if tag == "counting" else None
    return build_task(tag, [x["class"] for x in inc], [x["color"] for x in inc if "color" in x], count=count)


def test_templates_reproduce_every_qa_row(qa_rows):
    assert len(qa_rows) == 553
    for row in qa_rows:
        assert json.dumps(_rebuild(row)) == json.dumps(row)  # same keys, order, prompt, question, answer


def test_qa_answers_score_one_on_their_own_rows(qa_rows):
    bad = [r["prompt"] for r in qa_rows if score(r["answer"], r) != 1.0 or not is_correct(r["answer"], r)]
    assert not bad


def test_answers_from_other_rows_score_below_one(qa_rows):
    # for each row, the next row of the same tag with no class in common (and, for colors, another colour)
    for i, row in enumerate(qa_rows):
        mine = {x["class"] for x in row["include"]}
        for other in qa_rows[i + 1:] + qa_rows[:i]:
            theirs = {x["class"] for x in other["include"]}
            if other["tag"] == row["tag"] and not mine & theirs and other["answer"] != row["answer"]:
                break
        else:
            pytest.fail(f"no other row for {row['prompt']!r}")
        assert score(other["answer"], row) < 1.0, (row["prompt"], other["answer"])
        assert not is_correct(other["answer"], row)


def test_geneval_metadata_is_the_qa_file_without_qa_keys(qa_rows):
    meta = reward.load_tasks(_geneval_file("evaluation_metadata.jsonl"))
    assert meta == [{k: v for k, v in r.items() if k not in ("question", "answer")} for r in qa_rows]
    assert re.fullmatch(r"[a-z ]+", "".join(r["prompt"] for r in meta))
