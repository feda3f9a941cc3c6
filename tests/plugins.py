"""Plug-ins for train.py's tests, loaded by name as a user's would be (--reward plugins:first_image_wins)."""
CALLS = []


def first_image_wins(tasks, tokens, images):
    """An external reward: 1 for the first image of each run of equal prompts, 0 for the others."""
    return [float(i == 0 or tasks[i]["prompt"] != tasks[i - 1]["prompt"]) for i in range(len(tasks))]


def count_calls(model, processor, args, judge_model):
    """An evaluation hook: how often it ran, and the number of held-out tasks it was told to use."""
    CALLS.append(args.eval_tasks)
    return dict(hook_calls=float(len(CALLS)), hook_tasks=float(args.eval_tasks))


def two_tasks(n, seed):
    """A task source: n copies of two fixed tasks."""
    cat = dict(prompt="a photo of a cat", question="What is the main item in this image?", answer="cat",
               tag="single_object", include=[{"class": "cat", "count": 1}])
    dogs = dict(prompt="a photo of two dogs", question="How many items in this image?", answer="two dogs",
                tag="counting", include=[{"class": "dog", "count": 2}])
    return [dict(t) for t in ([cat, dogs] * n)[:n]]


def uneven_verified(tasks, tokens, images):
    """An external reward whose verified images (correct) are uneven across prompts: every image of "a photo of a
    cat" is verified, only the first of any other prompt. With --task-source plugins:two_tasks and one prompt per
    rank, rank 0 then holds 2 verified images and rank 1 one (group size 2): the layout that hung FSDP2."""
    first = [i == 0 or tasks[i]["prompt"] != tasks[i - 1]["prompt"] for i in range(len(tasks))]
    correct = [f or t["prompt"] == "a photo of a cat" for f, t in zip(first, tasks)]
    return [float(f) for f in first], correct
