"""Training data: rows -> chat template -> tokens with the loss on the answers only; every bad row named by file and line."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from homefire.train.config import DataSpec
from homefire.train.data import IGNORE_INDEX, DataError, Row, encode_chat, pad_batch, prepare_data, read_rows


@pytest.fixture(scope="module")
def tok(tiny_model_path):
    return AutoTokenizer.from_pretrained(tiny_model_path)


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


CHAT = {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hello there."}]}


def test_loss_is_on_the_answer_only_and_prompt_tokens_match_what_a_server_encodes(tok):
    ids, labels, truncated = encode_chat(CHAT["messages"], tok, 512)
    assert not truncated and len(ids) == len(labels)
    prompt = tok.apply_chat_template(CHAT["messages"][:1], tokenize=False, add_generation_prompt=True)
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    assert ids[: len(prompt_ids)] == prompt_ids  # the prefix a server renders before generating
    assert all(x == IGNORE_INDEX for x in labels[: len(prompt_ids)])
    answer = labels[len(prompt_ids):]
    assert answer == ids[len(prompt_ids):] and IGNORE_INDEX not in answer
    assert tok.decode(answer).startswith("Hello there.<|end|>")


def test_multi_turn_trains_every_assistant_turn_and_no_user_turn(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "one"},
            {"role": "user", "content": "b"}, {"role": "assistant", "content": "two"}]
    ids, labels, _ = encode_chat(msgs, tok, 512)
    targets = tok.decode([i for i, l in zip(ids, labels) if l != IGNORE_INDEX])
    assert "one" in targets and "two" in targets and "Be brief" not in targets and "<|user|>" not in targets


def test_instruction_and_prompt_completion_rows_become_chats(tmp_path, tok):
    f = _jsonl(tmp_path / "d.jsonl", [
        {"instruction": "Reverse", "input": "abc", "output": "cba"}, {"prompt": "2+2?", "completion": "4"},
    ] * 5)
    data = prepare_data(DataSpec(train=str(f), eval_fraction=0.2), tok)
    assert data.stats["train_examples"] == 8 and data.stats["eval_examples"] == 2
    for e in data.eval_examples:  # `input` is appended to the instruction; the output is the reference
        prompt = {"cba": "Reverse\n\nabc", "4": "2+2?"}[e["reference"]]
        assert e["messages"] == [{"role": "user", "content": prompt}]


def test_truncation_is_counted_and_answerless_rows_dropped(tmp_path, tok):
    long = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    f = _jsonl(tmp_path / "d.jsonl", [CHAT, CHAT, long])
    data = prepare_data(DataSpec(train=str(f), eval_fraction=0, max_length=32), tok)
    assert data.stats["truncated"] == 1 and data.stats["dropped_no_target"] == 1
    assert data.stats["train_examples"] == 2
    assert max(len(x) for x in data.train.column("input_ids").to_pylist()) <= 32


def test_text_rows_are_packed_into_blocks_with_every_token_a_target(tmp_path, tok):
    f = _jsonl(tmp_path / "t.jsonl", [{"text": "The quick brown fox jumps over the lazy dog. " * 20}] * 4)
    data = prepare_data(DataSpec(train=str(f), eval_fraction=0, max_length=64, format="text"), tok)
    rows = data.train.to_pylist()
    assert rows and all(len(r["input_ids"]) == 64 and r["input_ids"] == r["labels"] for r in rows)


@pytest.mark.parametrize("bad, line, words", [
    ('{"messages": [', 2, "not valid JSON"),
    ("[1, 2]", 2, "expected a JSON object"),
    ({"question": "a", "answer": "b"}, 2, "expected 'messages'"),
    ({"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, 2, "messages[0]"),
    ({"messages": [{"role": "user", "content": "x"}]}, 2, "last message must be the assistant"),
    ({"instruction": "x", "output": 3}, 2, "must be strings"),
])
def test_a_bad_row_is_named_by_file_and_line(tmp_path, tok, bad, line, words):
    f = _jsonl(tmp_path / "bad.jsonl", [CHAT, bad, CHAT])
    with pytest.raises(DataError) as err:
        prepare_data(DataSpec(train=str(f)), tok)
    assert f"{f}:{line}" in str(err.value) and words in str(err.value)


def test_empty_dataset_and_missing_file_are_clear_errors(tmp_path, tok):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="the dataset is empty"):
        prepare_data(DataSpec(train=str(empty)), tok)
    with pytest.raises(DataError, match="does not exist"):
        prepare_data(DataSpec(train=str(tmp_path / "nope.jsonl")), tok)


def test_a_tokenizer_without_chat_template_is_refused_for_chat_rows(tmp_path, tiny_model_path):
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    tok.chat_template = None
    f = _jsonl(tmp_path / "d.jsonl", [CHAT])
    with pytest.raises(DataError, match="chat template"):
        prepare_data(DataSpec(train=str(f)), tok)


def test_csv_and_directories_load_through_datasets(tmp_path, tok):
    d = tmp_path / "data"
    d.mkdir()
    (d / "a.csv").write_text("prompt,completion\nhi,hello\nbye,later\n")
    _jsonl(d / "b.jsonl", [CHAT])
    rows = read_rows(str(d))
    assert len(rows) == 3 and rows[0].where.endswith("a.csv: row 2")
    data = prepare_data(DataSpec(train=str(d), eval_fraction=0), tok)
    assert data.stats["train_examples"] == 3 and len(data.data_hash) == 64


def test_data_hash_follows_the_content(tmp_path, tok):
    f = _jsonl(tmp_path / "d.jsonl", [CHAT] * 3)
    h1 = prepare_data(DataSpec(train=str(f), eval_fraction=0), tok).data_hash
    _jsonl(f, [CHAT] * 4)
    assert prepare_data(DataSpec(train=str(f), eval_fraction=0), tok).data_hash != h1


def test_pad_batch_masks_padding():
    b = pad_batch({"input_ids": [[5, 6, 7], [8]], "labels": [[-100, 6, 7], [8]]}, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_rows_given_in_memory(tok):
    rows = [Row("mem:1", CHAT), Row("mem:2", CHAT)]
    data = prepare_data(DataSpec(train="in-memory", eval_fraction=0), tok, rows=rows)
    assert data.stats["train_examples"] == 2 and data.data_hash
