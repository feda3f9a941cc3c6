"""understand.py: the CLI on both fixture models, Show-o's KV-cached answers against teacher forcing, mixed-question
batches, and the self-check's rewards."""
import os
import subprocess
import sys

import pytest
import torch

import generate
import model
import reward
import rollout
import understand
from data_paths import ROOT, fixture_dirs

JANUS = fixture_dirs("janus")[:1]
SHOWO = fixture_dirs("showo")[:1]


@pytest.mark.parametrize("which", ["janus", "showo"])
def test_cli_answers_on_both_fixture_models(which, tmp_path):
    folder = (JANUS if which == "janus" else SHOWO)[0]
    subprocess.run([sys.executable, os.path.join(ROOT, "generate.py"), "--model", folder, "--prompt", "a cat",
                    "--n", "2", "--steps", "2", "--out", str(tmp_path)], check=True, capture_output=True, cwd=ROOT)
    out = subprocess.run([sys.executable, os.path.join(ROOT, "understand.py"), "--model", folder, "--image",
                          str(tmp_path / "00000.png"), str(tmp_path / "00001.png"), "--question", "What is this?",
                          "--max-new-tokens", "4"], check=True, capture_output=True, text=True, cwd=ROOT)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(str(tmp_path / "00000.png") + ":")
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "understand.py"), "--model", folder, "--image",
                          str(tmp_path / "missing.png"), "--question", "x"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0 and "does not exist" in bad.stderr


@pytest.fixture(scope="module")
def showo():
    return model.load_model(SHOWO[0])


def test_showo_sampled_answer_logprobs_match_teacher_forcing(showo):
    m, p = showo
    codes = generate.showo_generate(m, p, ["a cat", "a dog"], 1, timesteps=3, decode=False,
                                    generator=torch.Generator().manual_seed(0))["tokens"]
    questions = ["What is the main item in this image?", "How many items in this image?"]
    out = understand.showo_answer(m, p, codes, questions, max_new_tokens=5, temperature=1.0,
                                  generator=torch.Generator().manual_seed(1), return_logprobs=True)
    with torch.no_grad():
        lp, mask = understand.showo_answer_logprobs(m, p, codes, questions, out["ids"])
    for i in range(2):
        assert int(mask[i].sum()) == len(out["ids"][i])
        torch.testing.assert_close(lp[i][mask[i]], out["logprobs"][i], atol=1e-4, rtol=0)


def test_showo_mixed_questions_equal_one_row_at_a_time(showo):
    m, p = showo
    codes = torch.randint(0, m.config.codebook_size, (3, m.config.num_vq_tokens), generator=torch.Generator().manual_seed(2))
    questions = ["What is this?", "How many items in this image?", "What is this?"]
    together = understand.showo_answer(m, p, codes, questions, max_new_tokens=4)["ids"]
    for i in range(3):
        assert understand.showo_answer(m, p, codes[i:i + 1], questions[i:i + 1], max_new_tokens=4)["ids"][0] == together[i]


def test_self_check_rewards_are_the_slot_scores_of_the_answers():
    m, p = model.load_model(JANUS[0])
    tasks = reward.make_tasks(4, seed=0)
    images = generate.janus_generate(m, p, [t["prompt"] for t in tasks], 1, greedy=True)["images"]
    out = rollout.self_check(m, p, tasks, images, max_new_tokens=6)
    for ans, task, r, ok in zip(out["answers"], tasks, out["rewards"], out["correct"]):
        matched, total = reward.slots(ans, task)
        assert float(r) == matched and bool(ok) == (matched == total)
    norm = rollout.self_check(m, p, tasks, images, max_new_tokens=6, normalize=True)
    for ans, task, r in zip(norm["answers"], tasks, norm["rewards"]):
        assert float(r) == pytest.approx(reward.score(ans, task))
    eos = p.ids["eos"]
    assert all(ids[-1] == eos or len(ids) == 6 for ids in out["answer_ids"])
