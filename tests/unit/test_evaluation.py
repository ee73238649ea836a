"""Task scores (homefire.evaluation), shared by `homefire train` and `homefire tune`: the task format, errors named by
file and line, exact and prefix matching, and the shipped cloze task."""

from __future__ import annotations

import json

import pytest

from homefire import evaluation
from homefire.errors import ConfigError


def test_the_shipped_cloze_task_loads():
    task = evaluation.load_task("builtin:pydoc-cloze")
    assert len(task) == 128 and all(ex.prompt and ex.reference.isalpha() and ex.reference.islower() for ex in task)
    assert len({ex.prompt for ex in task}) == 128


def test_matching_ignores_case_and_spacing():
    assert evaluation.matches("  The   Answer\n", "the answer")
    assert not evaluation.matches("the answer is", "the answer")
    assert evaluation.matches("\nevaluated once", "evaluated", "prefix")
    assert not evaluation.matches("not evaluated", "evaluated", "prefix")


def test_score_counts_hits_and_keeps_samples(tmp_path):
    path = tmp_path / "t.jsonl"
    rows = [{"prompt": "2+2=", "reference": "4"}, {"messages": [{"role": "user", "content": "hi"}], "reference": "hello"},
            {"prompt": "x", "reference": "y"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    task = evaluation.load_task(str(path))
    answers = {"2+2=": "4", "hi": "Hello!", "x": "z"}
    out = evaluation.score(task, lambda ex: answers[ex.prompt or ex.messages[-1]["content"]], "prefix", samples=2)
    assert out["score"] == pytest.approx(2 / 3) and out["n"] == 3 and out["match"] == "prefix"
    assert out["samples"] == [{"prompt": "2+2=", "reference": "4", "answer": "4"},
                              {"prompt": "hi", "reference": "hello", "answer": "Hello!"}]
    with pytest.raises(ValueError):  # answers must line up with the examples
        evaluation.score_answers(task, ["4"])


@pytest.mark.parametrize("line, words", [
    ('{"prompt": "a"', "t.jsonl:2: not valid JSON"),
    ('{"prompt": "a"}', "t.jsonl:2: expected"),
    ('{"messages": "hi", "reference": "b"}', "t.jsonl:2: expected"),
])
def test_a_bad_example_is_named_by_file_and_line(tmp_path, line, words):
    path = tmp_path / "t.jsonl"
    path.write_text('{"prompt": "ok", "reference": "ok"}\n' + line + "\n")
    with pytest.raises(ConfigError, match=words):
        evaluation.load_task(str(path))


def test_a_missing_task_says_what_a_task_is(tmp_path):
    with pytest.raises(ConfigError, match="is not a file. Fix: a JSONL file"):
        evaluation.load_task(str(tmp_path / "none.jsonl"))
