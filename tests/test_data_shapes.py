"""The preference data people actually have, in small corpora of each public shape: kept and
quarantined counts, reasons, and the prompt/completion split of every kept row."""

import json

import pandas as pd
import pytest

from conftest import write_jsonl
from dpoflow.config import DataConfig
from dpoflow.data.step import DataValidationError, run_data


def _run(tmp_path, source, **kw):
    cfg = DataConfig(kind="preferences", source=str(source), eval_fraction=0.0, mode="quarantine", **kw)
    result = run_data(cfg, tmp_path / "out")
    kept = pd.read_parquet(tmp_path / "out" / "train.parquet")
    return result.stats, kept


def _by_chosen(frame):
    return {row.chosen: row for row in frame.itertuples()}


def test_ultrafeedback_binarized_shape(tmp_path):
    """A string prompt; chosen/rejected message lists that repeat the user turn; extra columns."""
    rows = []
    for i in range(6):
        question = f"How do I sort a list in Python? ({i})"
        rows.append({"prompt": question, "prompt_id": f"id{i}",
                     "chosen": [{"role": "user", "content": question}, {"role": "assistant", "content": f"Use sorted() {i}."}],
                     "rejected": [{"role": "user", "content": question}, {"role": "assistant", "content": f"You can't {i}."}],
                     "messages": [{"role": "user", "content": question}], "score_chosen": 8.0, "score_rejected": 3.5})
    # multi-turn: the shared leading turns are the prompt
    rows.append({"prompt": "Hi", "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                             {"role": "user", "content": "Tell a joke"},
                                             {"role": "assistant", "content": "A pun."}],
                 "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                              {"role": "user", "content": "Tell a joke"}, {"role": "assistant", "content": "No."}]})
    # completions given without the user turn: the string prompt becomes the user turn
    rows.append({"prompt": "Name a color", "chosen": [{"role": "assistant", "content": "Blue"}],
                 "rejected": [{"role": "assistant", "content": "Seven"}]})
    stats, kept = _run(tmp_path, write_jsonl(tmp_path / "uf.jsonl", rows))
    assert stats["rows_in"] == stats["kept"] == 8 and stats["quarantined"] == {}
    assert stats["formats"] == {"ultrafeedback": 8}
    assert stats["ignored_columns"] == {"messages": 6, "prompt_id": 6, "score_chosen": 6, "score_rejected": 6}
    rows_by_chosen = _by_chosen(kept)
    first = rows_by_chosen["Use sorted() 0."]
    assert first.rejected == "You can't 0."
    assert first.prompt == "user: How do I sort a list in Python? (0)\nassistant:"
    assert json.loads(first.prompt_messages) == [{"role": "user", "content": "How do I sort a list in Python? (0)"}]
    joke = rows_by_chosen["A pun."]
    assert joke.rejected == "No." and [m["role"] for m in json.loads(joke.prompt_messages)] == ["user", "assistant", "user"]
    assert json.loads(rows_by_chosen["Blue"].prompt_messages) == [{"role": "user", "content": "Name a color"}]


def test_hh_rlhf_shape(tmp_path):
    """Text turns, implicit prompt: the prompt is the dialogue up to the final 'Assistant:'; the
    completions are whole replies, also when one extends the other or they share first words."""
    rows = [
        {"chosen": "\n\nHuman: How do I cook rice?\n\nAssistant: The key to cook rice is patience.",
         "rejected": "\n\nHuman: How do I cook rice?\n\nAssistant: The key to cook rice is patience and a pot."},
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello, how can I help?\n\nHuman: A long question " + "word " * 60
                   + "\n\nAssistant: Sure, here is a careful answer.",
         "rejected": "\n\nHuman: Hi\n\nAssistant: Hello, how can I help?\n\nHuman: A long question " + "word " * 60
                     + "\n\nAssistant: No."},
        # the dialogues differ before the final reply: not a pair
        {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"},
    ]
    stats, kept = _run(tmp_path, write_jsonl(tmp_path / "hh.jsonl", rows))
    assert stats["kept"] == 2 and stats["quarantined"] == {"no_common_prompt": 1} and stats["formats"] == {"hh": 3}
    rice = _by_chosen(kept)[" The key to cook rice is patience."]
    assert rice.prompt == "\n\nHuman: How do I cook rice?\n\nAssistant:"
    assert rice.rejected == " The key to cook rice is patience and a pot."
    long = _by_chosen(kept)[" Sure, here is a careful answer."]
    assert long.prompt.endswith("A long question " + "word " * 60 + "\n\nAssistant:") and long.rejected == " No."
    quarantined = [json.loads(line) for line in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    assert quarantined[0]["row"] == 3 and "differ before their final 'Assistant:' turn" in quarantined[0]["detail"]


def test_json_array_file_and_rows_of_mixed_shapes(tmp_path):
    """A .json array is read as rows (numbered by position); each row's format is its own, so a
    first row without a prompt does not turn the others into implicit pairs."""
    rows = [{"chosen": "The film was great.", "rejected": "The film was dull."}]
    rows += [{"prompt": f"Question {i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(30)]
    (tmp_path / "pairs.json").write_text(json.dumps(rows, indent=2))
    stats, kept = _run(tmp_path, tmp_path / "pairs.json")
    assert stats["rows_in"] == stats["kept"] == 31 and stats["formats"] == {"implicit": 1, "standard": 30}
    assert _by_chosen(kept)["yes 7"].prompt == "Question 7"
    assert _by_chosen(kept)[" great."].prompt == "The film was"


def test_text_training_cannot_use_is_quarantined_per_row(tmp_path):
    good = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(5)]
    lines = [json.dumps(r).encode() + b"\n" for r in good]
    lines.insert(2, b'{"prompt": "scraped \\ud800 text", "chosen": "a", "rejected": "b"}\n')  # lone surrogate
    lines.append(json.dumps({"prompt": "zw", "chosen": "\u200b", "rejected": "b"}).encode() + b"\n")  # invisible
    lines.append(json.dumps({"prompt": "ws", "chosen": "same answer ", "rejected": "same  answer"}).encode() + b"\n")
    source = tmp_path / "pairs.jsonl"
    source.write_bytes(b"".join(lines))
    stats, kept = _run(tmp_path, source)
    assert stats["rows_in"] == 8 and stats["kept"] == 5
    assert stats["quarantined"] == {"chosen_equals_rejected": 1, "empty_text": 1, "unencodable_text": 1}
    quarantined = {q["reason"]: q for q in map(json.loads, (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines())}
    assert quarantined["unencodable_text"]["row"] == 3 and "lone surrogate" in quarantined["unencodable_text"]["detail"]
    assert quarantined["empty_text"]["row"] == 7 and quarantined["chosen_equals_rejected"]["row"] == 8


def test_nothing_kept_still_writes_the_quarantine_and_says_why(tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "x", "rejected": "x"} for i in range(4)]
    source = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(DataValidationError, match=r"no valid rows out of 4 \(chosen_equals_rejected x4\)") as error:
        _run(tmp_path, source)
    # the step did not finish: its folder stays out.partial (no manifest: no later step takes it)
    assert str(tmp_path / "out.partial" / "quarantine.jsonl") in str(error.value)
    assert len((tmp_path / "out.partial" / "quarantine.jsonl").read_text().splitlines()) == 4
    assert not (tmp_path / "out").exists()
    # pairs given to a run configured for an SFT corpus: the error says which setting to change
    with pytest.raises(DataValidationError, match="set data.kind=preferences"):
        run_data(DataConfig(kind="sft", source=str(source), mode="quarantine"), tmp_path / "sft")
