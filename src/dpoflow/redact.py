"""Secrets never reach a record: MLflow params and tags, logs, summaries, reports, compiled YAML.

Credentials belong in environment variables / Kubernetes Secrets (the pipeline maps them in); a
config value is not the place. Whatever still looks like one is replaced by `***` wherever dpoflow
writes something down:

- the value of any environment variable whose name says secret (…KEY, …TOKEN, …SECRET…, …PASSWORD…,
  and the ones named by `*_env` settings such as eval.llm_judge.api_key_env) wherever it appears;
- the password of a URL (`https://user:***@host/...`);
- token-shaped strings (OpenAI `sk-…`, Hugging Face `hf_…`, AWS access key ids `AKIA…`, GitHub `ghp_…`);
- the value of a setting whose name says secret (`password`, `token`, `api_key`, ...; `*_env` settings
  hold a variable's name, not its value, and are kept).
"""

from __future__ import annotations

import os
import re

MASK = "***"
# a whole name component: TOKEN, AWS_SECRET_ACCESS_KEY, api_key — not `tokenizer` or `max_new_tokens`
SECRET_NAME = re.compile(r"(^|[_.\-])(pass(word|wd)?|secret|token|api_?key|access_?key|private_?key|credentials?)"
                         r"($|[_.\-])", re.I)
NOT_A_VALUE = re.compile(r"_(env|path|file|dir)$", re.I)  # names of variables, files, folders: not secrets
URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.\-]*://)(?P<user>[^/\s:@]*):(?P<password>[^/\s@]+)@", re.I)
TOKEN_SHAPES = re.compile(r"\b(sk-[A-Za-z0-9_\-]{16,}|hf_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{30,})\b")
_extra_names: set[str] = set()


def register_secret_env(*names: str) -> None:
    """Environment variables the config names as holding secrets (e.g. eval.llm_judge.api_key_env)."""
    _extra_names.update(n for n in names if n)


def _environment() -> dict[str, str]:
    """A copy of os.environ, taken again when another thread changes it meanwhile (MLflow's telemetry
    deletes a variable while a task logs: iterating os.environ then raises KeyError)."""
    while True:
        try:
            return dict(os.environ)
        except (KeyError, RuntimeError):
            continue


def _secret_values() -> list[str]:
    values = {value for name, value in _environment().items()
              if ((SECRET_NAME.search(name) and not NOT_A_VALUE.search(name)) or name in _extra_names)
              and len(value) >= 6}
    return sorted(values, key=len, reverse=True)  # longest first: a value containing another is masked whole


def redact(text):
    """`text` with every secret-looking part masked; non-strings are returned as they are."""
    if not isinstance(text, str) or not text:
        return text
    for value in _secret_values():
        text = text.replace(value, MASK)
    text = URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
    return TOKEN_SHAPES.sub(MASK, text)


def redact_mapping(values: dict) -> dict:
    """A flat or nested dict of settings/params/tags with secrets masked (by name and by value)."""
    clean = {}
    for key, value in values.items():
        name = str(key).rsplit(".", 1)[-1]
        if isinstance(value, dict):
            clean[key] = redact_mapping(value)
        elif SECRET_NAME.search(name) and not NOT_A_VALUE.search(name) and isinstance(value, str) and value:
            clean[key] = MASK
        elif isinstance(value, list):
            clean[key] = [redact(v) for v in value]
        else:
            clean[key] = redact(value)
    return clean


def found_secrets(values: dict) -> list[str]:
    """Dotted keys of `values` whose value redact_mapping would change: what a compiled pipeline
    must not carry (the caller says which to move into a Secret)."""
    found: list[str] = []

    def compare(old: dict, new: dict, prefix: str) -> None:
        for key, value in old.items():
            if isinstance(value, dict):
                compare(value, new[key], f"{prefix}{key}.")
            elif value != new[key]:
                found.append(f"{prefix}{key}")

    compare(values, redact_mapping(values), "")
    return found
