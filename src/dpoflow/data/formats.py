"""Formats and row validation: every accepted row becomes one internal schema per kind.

Preference formats (as TRL names them), detected per row (never for a whole file by its first row):
    standard        {"prompt": str, "chosen": str, "rejected": str}
    implicit        {"chosen": str, "rejected": str}            prompt = longest common prefix
    ultrafeedback   {"prompt": str, "chosen": [messages], "rejected": [messages]}: UltraFeedback-binarized,
                    the completions repeat the prompt's user turn(s); the shared leading turns are the prompt
    hh              {"chosen": "\n\nHuman: ...\n\nAssistant: ...", "rejected": ...}   (Anthropic HH-RLHF)
                    prompt = the dialogue up to and including the final "Assistant:" marker; the
                    completions are the whole final replies
    conversational  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
                    (or implicit: chosen/rejected full conversations sharing the prompt turns; or
                    UltraFeedback-binarized: a string prompt and completions that repeat its user turn)
Other columns (prompt_id, score_chosen, messages, ...) are ignored and counted in stats.json.

Internal schemas (all columns strings; `*_messages` is JSON, "" for text data):
    preferences  prompt, chosen, rejected, prompt_messages
    sft          prompt, completion, messages      (plain text: prompt "" and the loss on all of it)
    prompts      prompt, prompt_messages

`normalize(kind, fmt, record)` returns the internal row or raises RowError(reason, detail). The reason
is a short code counted in stats.json; the detail names the field and what to do.
"""

from __future__ import annotations

import json
import unicodedata

HH_ASSISTANT = "\n\nAssistant:"
ROLES = ("system", "user", "assistant")
COLUMNS = {
    "preferences": ("prompt", "chosen", "rejected", "prompt_messages"),
    "sft": ("prompt", "completion", "messages"),
    "prompts": ("prompt", "prompt_messages"),
}


class RowError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def visible(text: str) -> str:
    """The text without whitespace and invisible format characters (zero-width space, BOM, ...)."""
    return "".join(c for c in text if not c.isspace() and unicodedata.category(c) not in ("Cf", "Cc"))


def check_text(value: str, name: str) -> str:
    """Text a model can be trained on: encodable as UTF-8 and with something visible in it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise RowError("unencodable_text", f"{name} holds a lone surrogate at character {error.start} (broken "
                       "UTF-16 escapes such as \\ud800 in the source): fix the text or drop the row") from None
    if not visible(value):
        raise RowError("empty_text", f"{name} is empty, whitespace or invisible characters only")
    return value


def _text(record: dict, name: str) -> str:
    if name not in record:
        raise RowError("missing_field", f"field {name!r} is missing")
    value = record[name]
    if value is None:
        raise RowError("null_value", f"field {name!r} is null/NaN")
    if not isinstance(value, str):
        raise RowError("wrong_type", f"field {name!r} must be a string, got {type(value).__name__}")
    return check_text(value, f"field {name!r}")


def _messages(record: dict, name: str) -> list[dict]:
    if name not in record:
        raise RowError("missing_field", f"field {name!r} is missing")
    value = record[name]
    if value is None:
        raise RowError("null_value", f"field {name!r} is null/NaN")
    if not isinstance(value, list) or not value:
        raise RowError("wrong_type", f"field {name!r} must be a non-empty list of {{role, content}} messages")
    for index, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise RowError("wrong_type", f"{name}[{index}] must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise RowError("bad_role", f"{name}[{index}].role is {message['role']!r}; expected one of {ROLES}")
        content = message["content"]
        if content is None:
            raise RowError("null_value", f"{name}[{index}].content is null")
        if not isinstance(content, str):
            raise RowError("wrong_type", f"{name}[{index}].content must be a string")
        check_text(content, f"{name}[{index}].content")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def check_role_order(messages: list[dict], name: str, ends_with: str | None) -> None:
    """Optional system first, then user/assistant alternating starting with user."""
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles and roles[0] == "system" else roles
    for index, role in enumerate(body):
        expected = "user" if index % 2 == 0 else "assistant"
        if role != expected:
            raise RowError("bad_role_order", f"{name}: roles {roles} must be [system], user, assistant, user, ...")
    if ends_with and body and body[-1] != ends_with:
        raise RowError("bad_role_order", f"{name}: must end with a {ends_with} turn, roles are {roles}")


def render_messages(messages: list[dict], add_generation_prompt: bool) -> str:
    """Plain-text rendering of a conversation; the tokenizer's chat template is used when it has one."""
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return text + ("assistant:" if add_generation_prompt else "")


def common_prefix(chosen: str, rejected: str) -> str:
    """Longest common prefix, backed off to a word boundary; completions keep their leading space."""
    length = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        length += 1
    prefix = chosen[:length]
    if length < min(len(chosen), len(rejected)) and prefix and not prefix[-1].isspace():
        cut = max(prefix.rfind(" "), prefix.rfind("\n"))
        prefix = prefix[: cut + 1] if cut >= 0 else ""
    # the separating whitespace belongs to the completion (" great"), as in standard-format data
    return prefix.rstrip()


def _is_hh(record: dict) -> bool:
    chosen = record.get("chosen")
    return isinstance(chosen, str) and HH_ASSISTANT in chosen


def resolve_format(configured: str, record: dict) -> str:
    """The preference parser for a row: `configured` is auto | standard | implicit | conversational;
    implicit covers text, HH dialogues and messages; conversational an explicit or a shared prompt."""
    if configured == "auto":
        return detect_format("preferences", record)
    if configured == "implicit" and isinstance(record.get("chosen"), list):
        return "implicit_conversational"
    if configured == "implicit" and _is_hh(record):
        return "hh"
    if configured == "conversational" and "prompt" not in record:
        return "implicit_conversational"
    return configured


def detect_format(kind: str, record: dict) -> str:
    """The format of one row (rows of one file may differ)."""
    if kind != "preferences":
        return "conversational" if isinstance(record.get("messages") or record.get("prompt"), list) else "standard"
    conversational = isinstance(record.get("chosen"), list)
    if "prompt" not in record:
        return "implicit_conversational" if conversational else "hh" if _is_hh(record) else "implicit"
    if conversational:
        return "ultrafeedback" if isinstance(record.get("prompt"), str) else "conversational"
    return "standard"


KNOWN_COLUMNS = {"preferences": {"prompt", "chosen", "rejected"}, "sft": {"text", "prompt", "completion", "messages"},
                 "prompts": {"prompt"}}


def extra_columns(kind: str, record: dict) -> list[str]:
    """Columns this kind does not read (kept out of training; counted in stats.json)."""
    return sorted(set(record) - KNOWN_COLUMNS[kind])


def split_hh(text: str, name: str) -> tuple[str, str]:
    """HH-RLHF text -> (dialogue up to and including the final 'Assistant:', the final reply)."""
    cut = text.rfind(HH_ASSISTANT)
    if cut < 0:
        raise RowError("no_common_prompt", f"hh format: {name} has no '\\n\\nAssistant:' turn")
    cut += len(HH_ASSISTANT)
    return text[:cut], text[cut:]


def _assistant_reply(messages: list[dict], name: str) -> str:
    if any(m["role"] != "assistant" for m in messages):
        raise RowError("bad_role_order", f"{name}: completion turns must all be 'assistant'")
    return "\n".join(m["content"] for m in messages)


def _preference(fmt: str, record: dict) -> dict:
    if fmt == "standard":
        prompt, chosen, rejected = _text(record, "prompt"), _text(record, "chosen"), _text(record, "rejected")
        prompt_messages = ""
    elif fmt == "hh":
        (prompt, chosen), (rejected_prompt, rejected) = (split_hh(_text(record, n), n) for n in ("chosen", "rejected"))
        if prompt != rejected_prompt:
            raise RowError("no_common_prompt", "hh format: chosen and rejected differ before their final "
                           "'Assistant:' turn, so they do not answer the same dialogue")
        for name, value in (("chosen", chosen), ("rejected", rejected)):
            check_text(value, f"hh format: the final {name} reply")
        prompt_messages = ""
    elif fmt == "implicit":
        chosen_full, rejected_full = _text(record, "chosen"), _text(record, "rejected")
        prompt = common_prefix(chosen_full, rejected_full)
        if not prompt.strip():
            raise RowError("no_common_prompt", "implicit format: chosen and rejected share no prompt prefix")
        chosen, rejected = chosen_full[len(prompt):], rejected_full[len(prompt):]
        for name, value in (("chosen", chosen), ("rejected", rejected)):
            if not value.strip():
                raise RowError("empty_text", f"implicit format: {name} has no text after the shared prompt")
        prompt_messages = ""
    else:  # conversational (explicit or implicit prompt)
        chosen_messages, rejected_messages = _messages(record, "chosen"), _messages(record, "rejected")
        if fmt == "ultrafeedback" or (fmt == "conversational" and isinstance(record.get("prompt"), str)):
            # UltraFeedback-binarized: a string prompt, and completions that repeat its user turn(s)
            _text(record, "prompt")
            fmt = "implicit_conversational"
            if chosen_messages[0]["role"] == "assistant" and rejected_messages[0]["role"] == "assistant":
                chosen_messages = [{"role": "user", "content": record["prompt"]}, *chosen_messages]
                rejected_messages = [{"role": "user", "content": record["prompt"]}, *rejected_messages]
        if fmt == "conversational":
            prompt_list = _messages(record, "prompt")
        else:
            shared = 0
            while (shared < min(len(chosen_messages), len(rejected_messages))
                   and chosen_messages[shared] == rejected_messages[shared]):
                shared += 1
            prompt_list = chosen_messages[:shared]
            chosen_messages, rejected_messages = chosen_messages[shared:], rejected_messages[shared:]
            if not prompt_list or not chosen_messages or not rejected_messages:
                raise RowError("no_common_prompt", "implicit conversational: chosen/rejected share no prompt turns")
        check_role_order(prompt_list, "prompt", ends_with="user")
        chosen = _assistant_reply(chosen_messages, "chosen")
        rejected = _assistant_reply(rejected_messages, "rejected")
        prompt = render_messages(prompt_list, add_generation_prompt=True)
        prompt_messages = json.dumps(prompt_list)
    if chosen.split() == rejected.split():  # equal up to whitespace: the pair teaches nothing
        raise RowError("chosen_equals_rejected", "chosen and rejected are identical (up to whitespace); "
                       "the pair teaches nothing")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "prompt_messages": prompt_messages}


def _sft(fmt: str, record: dict) -> dict:
    if fmt == "conversational":
        messages = _messages(record, "messages")
        check_role_order(messages, "messages", ends_with="assistant")
        return {"prompt": "", "completion": "", "messages": json.dumps(messages)}
    if "text" in record or "completion" not in record:
        return {"prompt": "", "completion": _text(record, "text"), "messages": ""}
    return {"prompt": _text(record, "prompt"), "completion": _text(record, "completion"), "messages": ""}


def _prompt(fmt: str, record: dict) -> dict:
    if fmt == "conversational":
        messages = _messages(record, "prompt")
        check_role_order(messages, "prompt", ends_with="user")
        return {"prompt": render_messages(messages, True), "prompt_messages": json.dumps(messages)}
    return {"prompt": _text(record, "prompt"), "prompt_messages": ""}


def normalize(kind: str, fmt: str, record: dict) -> dict:
    if kind == "preferences":
        return _preference(fmt, record)
    if kind == "sft":
        return _sft(fmt, record)
    return _prompt(fmt, record)


def dedup_key(kind: str, row: dict) -> tuple:
    return tuple(row[c] for c in COLUMNS[kind])


def split_text(kind: str, row: dict) -> str:
    """The text whose hash decides the split: the prompt (or, for plain SFT text, the text itself)."""
    return row["prompt"] or row.get("completion") or row.get("messages", "")
