"""Formats and row validation: every accepted row becomes one internal schema per kind.

Preference formats (as TRL names them):
    standard        {"prompt": str, "chosen": str, "rejected": str}
    implicit        {"chosen": str, "rejected": str}            prompt = longest common prefix
    conversational  {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
                    (or implicit: chosen/rejected full conversations sharing the prompt turns)

Internal schemas (all columns strings; `*_messages` is JSON, "" for text data):
    preferences  prompt, chosen, rejected, prompt_messages
    sft          prompt, completion, messages      (plain text: prompt "" and the loss on all of it)
    prompts      prompt, prompt_messages

`normalize(kind, fmt, record)` returns the internal row or raises RowError(reason, detail). The reason
is a short code counted in stats.json; the detail names the field and what to do.
"""

from __future__ import annotations

import json

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


def _text(record: dict, name: str) -> str:
    if name not in record:
        raise RowError("missing_field", f"field {name!r} is missing")
    value = record[name]
    if value is None:
        raise RowError("null_value", f"field {name!r} is null/NaN")
    if not isinstance(value, str):
        raise RowError("wrong_type", f"field {name!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RowError("empty_text", f"field {name!r} is empty or whitespace only")
    return value


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
        if not content.strip():
            raise RowError("empty_text", f"{name}[{index}].content is empty or whitespace only")
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


def resolve_format(configured: str, record: dict) -> str:
    """The preference parser for a row: `configured` is standard | implicit | conversational; the
    last two cover both shapes (implicit over text or messages; conversational with an explicit or a
    shared prompt)."""
    if configured == "implicit" and isinstance(record.get("chosen"), list):
        return "implicit_conversational"
    if configured == "conversational" and "prompt" not in record:
        return "implicit_conversational"
    return configured


def detect_format(kind: str, record: dict) -> str:
    if kind != "preferences":
        return "conversational" if isinstance(record.get("messages") or record.get("prompt"), list) else "standard"
    conversational = isinstance(record.get("chosen"), list)
    if "prompt" not in record:
        return "implicit_conversational" if conversational else "implicit"
    return "conversational" if conversational else "standard"


def _assistant_reply(messages: list[dict], name: str) -> str:
    if any(m["role"] != "assistant" for m in messages):
        raise RowError("bad_role_order", f"{name}: completion turns must all be 'assistant'")
    return "\n".join(m["content"] for m in messages)


def _preference(fmt: str, record: dict) -> dict:
    if fmt == "standard":
        prompt, chosen, rejected = _text(record, "prompt"), _text(record, "chosen"), _text(record, "rejected")
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
    if chosen == rejected:
        raise RowError("chosen_equals_rejected", "chosen and rejected are identical; the pair teaches nothing")
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
