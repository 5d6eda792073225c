"""Data step: every validation reason in both modes, conservation of rows, splits, formats."""

import json

import pandas as pd
import pytest

from conftest import write_jsonl
from dpoflow.config import DataConfig
from dpoflow.data.formats import common_prefix
from dpoflow.data.step import DataValidationError, run_data, split_of

GOOD = [{"prompt": f"Question {i}?", "chosen": f" good answer {i}", "rejected": f" bad answer {i}"} for i in range(20)]

# one bad row per reason, with the detail the user must see
BAD_ROWS = [
    (b'{"prompt": "p", "chosen": "a",\n', "malformed_json", "Expecting"),
    (b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n', "undecodable_bytes", "not UTF-8"),
    ({"prompt": "p1", "chosen": "a"}, "missing_field", "'rejected' is missing"),
    ({"prompt": "p2", "chosen": None, "rejected": "b"}, "null_value", "'chosen' is null"),
    ({"prompt": "p3", "chosen": 5, "rejected": "b"}, "wrong_type", "'chosen' must be a string, got int"),
    ({"prompt": "   ", "chosen": "a", "rejected": "b"}, "empty_text", "'prompt' is empty"),
    ({"prompt": "p4", "chosen": "same", "rejected": "same"}, "chosen_equals_rejected", "identical"),
    (GOOD[0], "duplicate_pair", "earlier row"),
    ({"prompt": "x" * 4100, "chosen": "a", "rejected": "b"}, "prompt_too_long",
     "1025 estimated tokens (4 characters each; set data.tokenizer to count exactly) > data.max_prompt_tokens=1024"),
]

CONVERSATIONAL_BAD = [
    ({"prompt": [{"role": "robot", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "bad_role", "prompt[0].role is 'robot'"),
    ({"prompt": [{"role": "assistant", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "bad_role_order", "must be [system], user"),
]


def _cfg(source, **kw):
    return DataConfig(kind="preferences", source=str(source), eval_fraction=0.25, **kw)


def _read_quarantine(out):
    return [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("bad,reason,detail", BAD_ROWS + CONVERSATIONAL_BAD,
                         ids=lambda v: v if isinstance(v, str) and len(v) < 30 else None)
def test_each_reason_in_both_modes(tmp_path, bad, reason, detail):
    conversational = reason in ("bad_role", "bad_role_order")
    good = GOOD
    if conversational:
        good = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                 "chosen": [{"role": "assistant", "content": r["chosen"]}],
                 "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in GOOD]
    source = write_jsonl(tmp_path / "pairs.jsonl", good[:5] + [bad] + good[5:])

    with pytest.raises(DataValidationError) as error:
        run_data(_cfg(source), tmp_path / "strict")
    message = str(error.value)
    assert "1 of 21 rows are invalid" in message and f"row 6: {reason}" in message and detail in message
    assert not (tmp_path / "strict" / "train.parquet").exists()

    out = tmp_path / "q"
    result = run_data(_cfg(source, mode="quarantine"), out)
    assert result.stats["rows_in"] == 21 and result.stats["kept"] == 20
    assert result.stats["quarantined"] == {reason: 1}
    [item] = _read_quarantine(out)
    assert item["row"] == 6 and item["reason"] == reason and detail in item["detail"]
    # the bad row is kept verbatim: as parsed record, or as raw text (+ exact bytes) when unparseable
    if isinstance(bad, bytes):
        if reason == "undecodable_bytes":
            import base64
            assert base64.b64decode(item["raw_base64"]) == bad
        else:
            assert item["raw_text"] == bad.decode().rstrip("\n")
    else:
        assert item["record"] == bad


def test_all_reasons_at_once_conserve_rows(tmp_path):
    rows = list(GOOD)
    for bad, _, _ in BAD_ROWS:
        rows.insert(3, bad)
    source = write_jsonl(tmp_path / "pairs.jsonl", rows)
    result = run_data(_cfg(source, mode="quarantine"), tmp_path / "out")
    stats = result.stats
    assert stats["rows_in"] == len(rows) == 29
    assert stats["kept"] + sum(stats["quarantined"].values()) == stats["rows_in"]
    assert stats["quarantined"] == {reason: 1 for _, reason, _ in BAD_ROWS}
    kept = pd.concat([pd.read_parquet(tmp_path / "out" / f"{s}.parquet") for s in ("train", "eval")])
    assert len(kept) == stats["kept"] == 20
    assert stats["splits"]["train"] + stats["splits"]["eval"] == 20


def test_strict_lists_at_most_20_rows(tmp_path):
    rows = GOOD + [{"prompt": f"p{i}", "chosen": "same", "rejected": "same"} for i in range(30)]
    source = write_jsonl(tmp_path / "pairs.jsonl", rows)
    with pytest.raises(DataValidationError) as error:
        run_data(_cfg(source), tmp_path / "out")
    assert "30 of 50 rows are invalid" in str(error.value)
    assert str(error.value).count("chosen_equals_rejected -") == 20


def test_prompt_length_in_tokens_with_a_tokenizer(tmp_path):
    from dpoflow.modeling import train_tokenizer

    tokenizer_dir = tmp_path / "tok"
    train_tokenizer(["a b c d e f g h"] * 50, vocab_size=300).save_pretrained(tokenizer_dir)
    rows = [{"prompt": "a b c d e f g h " * 10, "chosen": "x", "rejected": "y"}] + GOOD
    source = write_jsonl(tmp_path / "pairs.jsonl", rows)
    result = run_data(_cfg(source, mode="quarantine", max_prompt_tokens=40, tokenizer=str(tokenizer_dir)), tmp_path / "o")
    assert result.stats["quarantined"] == {"prompt_too_long": 1}
    assert "tokens > data.max_prompt_tokens=40" in _read_quarantine(tmp_path / "o")[0]["detail"]


def test_split_is_stable_under_reordering_and_disjoint(tmp_path):
    rows = [{"prompt": f"Question {i % 40}?", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(200)]
    a = run_data(_cfg(write_jsonl(tmp_path / "a.jsonl", rows)), tmp_path / "a")
    b = run_data(_cfg(write_jsonl(tmp_path / "b.jsonl", rows[::-1])), tmp_path / "b")
    def frame(out, split):
        return pd.read_parquet(out / f"{split}.parquet").sort_values(["prompt", "chosen"]).reset_index(drop=True)
    for split in ("train", "eval"):
        pd.testing.assert_frame_equal(frame(tmp_path / "a", split), frame(tmp_path / "b", split))
    train, held_out = set(frame(tmp_path / "a", "train").prompt), set(frame(tmp_path / "a", "eval").prompt)
    assert train and held_out and not train & held_out
    assert 0.1 < len(held_out) / 40 < 0.45  # eval_fraction 0.25 over 40 prompts
    assert a.stats["output_fingerprint"] == b.stats["output_fingerprint"]
    assert split_of("Question 1?", 0.25) == split_of("Question 1?", 0.25)


def test_three_formats_load_to_the_same_schema(tmp_path):
    standard = [{"prompt": "The movie was", "chosen": " great fun.", "rejected": " a bore."}]
    implicit = [{"chosen": "The movie was great fun.", "rejected": "The movie was a bore."}]
    conversational = [{"prompt": [{"role": "user", "content": "Rate the movie."}],
                       "chosen": [{"role": "assistant", "content": "Great fun."}],
                       "rejected": [{"role": "assistant", "content": "A bore."}]}]
    implicit_conversational = [{"chosen": conversational[0]["prompt"] + conversational[0]["chosen"],
                                "rejected": conversational[0]["prompt"] + conversational[0]["rejected"]}]
    frames = {}
    for name, rows in [("standard", standard), ("implicit", implicit), ("conv", conversational),
                       ("implicit_conv", implicit_conversational)]:
        out = tmp_path / name
        run_data(DataConfig(kind="preferences", source=str(write_jsonl(tmp_path / f"{name}.jsonl", rows)),
                            eval_fraction=0.0), out)
        frames[name] = pd.read_parquet(out / "train.parquet")
    for frame in frames.values():
        assert list(frame.columns) == ["prompt", "chosen", "rejected", "prompt_messages"]
        assert all(pd.api.types.is_string_dtype(t) for t in frame.dtypes)
    pd.testing.assert_frame_equal(frames["standard"], frames["implicit"])
    pd.testing.assert_frame_equal(frames["conv"], frames["implicit_conv"])
    assert json.loads(frames["conv"].prompt_messages[0]) == conversational[0]["prompt"]
    assert frames["conv"].chosen[0] == "Great fun."


def test_common_prefix_backs_off_to_a_word():
    assert common_prefix("The film was great", "The film was grim") == "The film was"
    assert common_prefix("abc", "xyz") == ""


def test_parquet_csv_and_save_to_disk_sources(tmp_path):
    import datasets

    frame = pd.DataFrame(GOOD[:6])
    frame.loc[2, "chosen"] = None  # NaN/None in a Parquet file is reported, not kept
    frame.to_parquet(tmp_path / "pairs.parquet")
    csv_frame = pd.DataFrame(GOOD[:6])
    csv_frame.loc[3, "rejected"] = ""
    csv_frame.to_csv(tmp_path / "pairs.csv", index=False)
    datasets.Dataset.from_list(GOOD[:6]).save_to_disk(str(tmp_path / "hf"))
    expected = {"pairs.parquet": {"null_value": 1}, "pairs.csv": {"empty_text": 1}, "hf": {}}
    for name, quarantined in expected.items():
        result = run_data(_cfg(tmp_path / name, mode="quarantine"), tmp_path / f"out-{name}")
        assert result.stats["quarantined"] == quarantined, name
        assert result.stats["kept"] == 6 - sum(quarantined.values())
        assert result.dataset["kind"] == {"pairs.parquet": "parquet", "pairs.csv": "csv", "hf": "hf_disk"}[name]


def test_missing_source_and_unknown_type_are_clear(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        run_data(_cfg(tmp_path / "none.jsonl"), tmp_path / "o")
    (tmp_path / "pairs.txt").write_text("x")
    with pytest.raises(ValueError, match=r"unknown file type '.txt'"):
        run_data(_cfg(tmp_path / "pairs.txt"), tmp_path / "o")


def test_demo_corpus_is_deterministic_and_yields_prompts(tmp_path):
    cfg = DataConfig(demo={"n_reviews": 300, "seed": 3})
    a = run_data(cfg, tmp_path / "a")
    b = run_data(cfg, tmp_path / "b")
    assert a.stats == b.stats and a.stats["kept"] == 300
    prompts = pd.read_parquet(tmp_path / "a" / "prompts_eval.parquet").prompt.tolist() + \
        pd.read_parquet(tmp_path / "a" / "prompts_train.parquet").prompt.tolist()
    assert all(2 <= len(p.split()) <= 8 for p in prompts)
    assert not set(pd.read_parquet(tmp_path / "a" / "prompts_eval.parquet").prompt) & \
        set(pd.read_parquet(tmp_path / "a" / "prompts_train.parquet").prompt)
    reviews = pd.read_parquet(tmp_path / "a" / "train.parquet").completion
    assert reviews.str.len().between(60, 600).all()


def test_no_common_prompt_in_both_modes(tmp_path):
    rows = [{"chosen": f"The film {i} was great.", "rejected": f"The film {i} was dull."} for i in range(6)]
    rows.insert(2, {"chosen": "Great film.", "rejected": "Dull film."})
    source = write_jsonl(tmp_path / "implicit.jsonl", rows)
    with pytest.raises(DataValidationError, match="row 3: no_common_prompt - implicit format"):
        run_data(_cfg(source), tmp_path / "s")
    result = run_data(_cfg(source, mode="quarantine"), tmp_path / "q")
    assert result.stats["quarantined"] == {"no_common_prompt": 1} and result.stats["kept"] == 6
    assert _read_quarantine(tmp_path / "q")[0]["record"] == rows[2]


def test_sft_and_prompt_kinds_validate_rows(tmp_path):
    sft_rows = [{"text": "A fine film."}, {"messages": [{"role": "user", "content": "hi"},
                                                        {"role": "assistant", "content": "hello"}]},
                {"prompt": "The film", "completion": " was fine."}, {"text": ""}]
    result = run_data(DataConfig(kind="sft", source=str(write_jsonl(tmp_path / "sft.jsonl", sft_rows)),
                                 mode="quarantine"), tmp_path / "sft")
    assert result.stats["quarantined"] == {"empty_text": 1} and result.stats["kept"] == 3
    prompt_rows = [{"prompt": "Rate it"}, {"prompt": "Rate it"}, {"prompt": None}]
    result = run_data(DataConfig(kind="prompts", source=str(write_jsonl(tmp_path / "p.jsonl", prompt_rows)),
                                 mode="quarantine"), tmp_path / "p")
    assert result.stats["quarantined"] == {"duplicate_row": 1, "null_value": 1} and result.stats["kept"] == 1


def test_hub_source_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError, match="hub ids need network access"):
        run_data(DataConfig(kind="preferences", source="hub:someone/pairs"), tmp_path / "o")


def test_configured_format_covers_both_shapes_and_refuses_others(tmp_path):
    conversation = [{"role": "user", "content": "Rate it."}]
    implicit_conv = [{"chosen": conversation + [{"role": "assistant", "content": f"Great {i}."}],
                      "rejected": conversation + [{"role": "assistant", "content": f"Dull {i}."}]} for i in range(4)]
    source = write_jsonl(tmp_path / "conv.jsonl", implicit_conv)
    assert run_data(_cfg(source, format="conversational"), tmp_path / "a").stats["kept"] == 4
    assert run_data(_cfg(source, format="implicit"), tmp_path / "b").stats["kept"] == 4
    with pytest.raises(DataValidationError, match="row 1: missing_field - field 'prompt' is missing"):
        run_data(_cfg(source, format="standard"), tmp_path / "c")
