"""The demo's synthetic data: mixed-quality SFT demonstrations and the preference pairs that name the
preferred style (services/demo/task.py)."""

from __future__ import annotations

import json

import pytest

from internlm2.services.demo.task import Question, descending, make_data

pytestmark = pytest.mark.timeout(60)


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def question_of(messages) -> Question:
    return Question(tuple(int(d) for d in messages[0]["content"].removeprefix("Sort the digits: ").split()))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("demo-data"), num_train=2000, num_heldout=64, ascending_share=0.3)


def test_sft_demonstrations_mix_the_two_styles_in_the_given_share(data):
    styles = []
    for row in read(data.sft):
        q, answer = question_of(row["messages"]), row["messages"][1]["content"]
        if q.answer == descending(q):
            continue  # all digits equal: both styles agree
        assert answer in (q.answer, descending(q))
        styles.append(answer == q.answer)
    assert len(styles) > 1900
    assert 0.27 <= sum(styles) / len(styles) <= 0.33


def test_preference_pairs_choose_ascending_over_descending_and_near_misses(data):
    pairs = read(data.preferences)
    by_question: dict[tuple, list[str]] = {}
    for row in pairs:
        q = question_of(row["prompt"])
        assert row["chosen"][0]["content"] == q.answer != row["rejected"][0]["content"]
        by_question.setdefault(q.digits, []).append(row["rejected"][0]["content"])
    assert len(by_question) == 2000
    for digits, rejected in by_question.items():
        q = Question(digits)
        assert (descending(q) in rejected) == (descending(q) != q.answer)
        assert len(rejected) == len(set(rejected))


def test_held_out_questions_are_in_no_training_file(data):
    held = {q.digits for q in data.heldout}
    assert len(held) == 64
    for path in (data.sft, data.preferences, data.prompts):
        for row in read(path):
            messages = row.get("messages") or row["prompt"]
            assert question_of(messages).digits not in held
