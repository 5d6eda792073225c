"""The data step: load -> validate every row -> split by prompt hash -> write Parquet + stats.

    run_data(cfg, out_dir) -> DataResult

Outputs in `out_dir`:
    train.parquet, eval.parquet         the kind's internal schema (see formats.py)
    prompts_train.parquet, prompts_eval.parquet
                                        the split's unique prompts (for an SFT corpus: 2-8-word
                                        openings, split by their own hash)
    stats.json                          rows_in, kept, quarantined {reason: count}, split sizes,
                                        input md5, output fingerprint
    dataset.json                        source, kind, rev, md5 (the lineage record)
    quarantine.jsonl                    (quarantine mode) each bad row verbatim + row number + reason

Invariant: kept + sum(quarantined) == rows_in. Nothing is dropped without a reason.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from dpoflow.config import DataConfig
from dpoflow.data import formats
from dpoflow.data.sources import RawRow, SourceInfo, open_source

MAX_LISTED_ERRORS = 20


class DataValidationError(ValueError):
    """Strict mode found bad rows; the message lists the count and the first rows with reasons."""


@dataclass
class DataResult:
    out_dir: Path
    stats: dict
    dataset: dict


def split_of(text: str, eval_fraction: float) -> str:
    """Deterministic split from a hash of the prompt: stable under reordering, one split per prompt."""
    bucket = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64
    return "eval" if bucket < eval_fraction else "train"


def _demo_source(cfg: DataConfig) -> tuple[list[RawRow], SourceInfo]:
    from dpoflow.data.demo import generate_reviews

    reviews = generate_reviews(cfg.demo.n_reviews, cfg.demo.seed)
    md5 = hashlib.md5("\n".join(reviews).encode()).hexdigest()
    rows = [RawRow(number, {"text": text}) for number, text in enumerate(reviews, start=1)]
    return rows, SourceInfo(source=f"demo:n={cfg.demo.n_reviews},seed={cfg.demo.seed}", kind="demo", md5=md5)


class _PromptLength:
    """Prompt length in tokens of the configured tokenizer; without one, estimated at 4 characters a
    token (English BPE averages about that), so ordinary multi-turn prompts pass the default."""

    def __init__(self, tokenizer_path: str | None):
        self.unit = "estimated tokens (4 characters each; set data.tokenizer to count exactly)"
        self.tokenizer = None
        if tokenizer_path:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
            self.unit = "tokens"

    def __call__(self, text: str) -> int:
        if self.tokenizer is None:
            return -(-len(text) // 4)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def validate_rows(rows, cfg: DataConfig) -> tuple[list[dict], list[dict], int, dict]:
    """Normalize every raw row; return (kept rows, quarantine records, rows_in, {formats seen per row,
    ignored columns})."""
    kept: list[dict] = []
    bad: list[dict] = []
    seen: set[tuple] = set()
    ignored: Counter = Counter()
    formats_seen: Counter = Counter()
    measure = _PromptLength(cfg.tokenizer)
    # the format of every row is detected on its own (data.format may force one for preferences)
    rows_in = 0
    for row in rows:
        rows_in += 1
        try:
            if row.error:
                raise formats.RowError(row.error, row.detail)
            record = row.record
            ignored.update(formats.extra_columns(cfg.kind, record))
            if cfg.kind == "preferences":
                row_fmt = formats.resolve_format(cfg.format, record)
            else:
                row_fmt = formats.detect_format(cfg.kind, record)
            formats_seen[row_fmt] += 1
            normalized = formats.normalize(cfg.kind, row_fmt, record)
            key = formats.dedup_key(cfg.kind, normalized)
            if key in seen:
                raise formats.RowError("duplicate_pair" if cfg.kind == "preferences" else "duplicate_row",
                                       "same content as an earlier row")
            length = measure(normalized["prompt"]) if normalized.get("prompt") else 0
            if length > cfg.max_prompt_tokens:
                raise formats.RowError(
                    "prompt_too_long",
                    f"prompt is {length} {measure.unit} > data.max_prompt_tokens={cfg.max_prompt_tokens}",
                )
            seen.add(key)
            kept.append(normalized)
        except formats.RowError as error:
            original = row.raw or {"record": row.record}
            bad.append({"row": row.number, "reason": error.reason, "detail": error.detail, **original})
    shapes = {"formats": dict(sorted(formats_seen.items())), "ignored_columns": dict(sorted(ignored.items()))}
    return kept, bad, rows_in, shapes


def derive_prompts(texts: list[str], prompt_words: tuple[int, int], seed: int) -> list[str]:
    """Review openings of 2-8 words (the DPO paper's IMDb prompts), unique, in first-seen order."""
    low, high = prompt_words
    prompts: dict[str, None] = {}
    for text in texts:
        words = text.split()
        rng = random.Random(f"{seed}:{text}")
        count = min(rng.randint(low, high), len(words) - 1)
        if count >= 1:
            prompts.setdefault(" ".join(words[:count]), None)
    return list(prompts)


def _row_hash(row: dict) -> str:
    return hashlib.sha256(json.dumps(row, sort_keys=True).encode()).hexdigest()


def _fingerprint(frames: dict) -> str:
    digest = hashlib.sha256()
    for name in sorted(frames):
        digest.update(name.encode())
        digest.update(frames[name].to_json(orient="records").encode())
    return digest.hexdigest()[:16]


def data_config_for_run(cfg) -> DataConfig:
    """The run's data settings: prompts are counted with the base model's tokenizer when the base is
    a local folder or a GGUF file and data.tokenizer is not set (the tokenizer training will use)."""
    from dpoflow.modeling import gguf_folder, is_gguf

    base = str(gguf_folder(cfg.model.base)) if is_gguf(cfg.model.base) else cfg.model.base
    if cfg.data.tokenizer is None and base and Path(base).is_dir() and (Path(base) / "tokenizer_config.json").exists():
        return cfg.data.model_copy(update={"tokenizer": base})
    return cfg.data


def run_data(cfg: DataConfig, out_dir: str | Path, seed: int = 0) -> DataResult:
    """Load, validate, split into out_dir, built atomically (manifest.py)."""
    from dpoflow.manifest import building

    with building("data", out_dir, config=[cfg, seed], inputs={}) as (work, _):
        result = _run_data(cfg, work, seed)
    return DataResult(out_dir=Path(out_dir), stats=result.stats, dataset=result.dataset)


def _run_data(cfg: DataConfig, out_dir: Path, seed: int) -> DataResult:
    import pandas as pd

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.source == "demo" and cfg.dvc is None:
        if cfg.kind != "sft":
            raise ValueError("data.source 'demo' generates an SFT corpus: set data.kind to 'sft'")
        rows, info = _demo_source(cfg)
    else:
        rows, info = open_source(cfg.source, cfg.dvc)
    kept, bad, rows_in, shapes = validate_rows(rows, cfg)
    reasons = Counter(item["reason"] for item in bad)
    assert len(kept) + len(bad) == rows_in  # the no-silent-drop invariant
    quarantine_path = out_dir / "quarantine.jsonl"
    quarantine_path.unlink(missing_ok=True)
    if bad and cfg.mode == "quarantine":  # written whenever a row is set aside, even if none is kept
        with open(quarantine_path, "w") as handle:
            handle.writelines(json.dumps(item, ensure_ascii=True, default=str) + "\n" for item in bad)
    if bad and cfg.mode == "strict":
        listed = "\n".join(f"  row {b['row']}: {b['reason']} - {b['detail']}" for b in bad[:MAX_LISTED_ERRORS])
        raise DataValidationError(
            f"{info.source}: {len(bad)} of {rows_in} rows are invalid ({dict(reasons)}); first "
            f"{min(len(bad), MAX_LISTED_ERRORS)}:\n{listed}\nFix them, or set data.mode=quarantine "
            "(--mode quarantine) to set them aside in quarantine.jsonl."
        )
    if not kept:
        top = ", ".join(f"{reason} x{count}" for reason, count in reasons.most_common(3))
        example = f" (row {bad[0]['row']}: {bad[0]['detail']})" if bad else ""
        hint = (" The rows look like preference pairs: set data.kind=preferences." if cfg.kind != "preferences"
                and "chosen" in str(bad[0]) else "")
        raise DataValidationError(f"{info.source}: no valid rows out of {rows_in} ({top}){example}; nothing to "
                                  f"train on. The set-aside rows with their reasons are in {quarantine_path}.{hint}")

    columns = formats.COLUMNS[cfg.kind]
    split_rows: dict[str, list[dict]] = {"train": [], "eval": []}
    for row in kept:
        split_rows[split_of(formats.split_text(cfg.kind, row), cfg.eval_fraction)].append(row)
    # Rows are written in hash order: the output (and its fingerprint) does not depend on input order.
    frames = {name: pd.DataFrame(sorted(items, key=_row_hash), columns=columns) for name, items in split_rows.items()}
    # every kind also yields prompts_{train,eval}: what prefs samples from and eval evaluates on
    if cfg.kind == "sft":
        texts = [r["completion"] for r in kept if not r["messages"]]
        prompt_rows: dict[str, list[dict]] = {"train": [], "eval": []}
        for prompt in sorted(derive_prompts(texts, cfg.prompt_words, seed)):
            prompt_rows[split_of(prompt, cfg.eval_fraction)].append({"prompt": prompt, "prompt_messages": ""})
        for name, items in prompt_rows.items():
            frames[f"prompts_{name}"] = pd.DataFrame(items, columns=formats.COLUMNS["prompts"])
    else:
        for name in ("train", "eval"):
            prompts = frames[name][list(formats.COLUMNS["prompts"])].drop_duplicates()
            frames[f"prompts_{name}"] = prompts.reset_index(drop=True)
    for name, frame in frames.items():
        frame.to_parquet(out_dir / f"{name}.parquet", index=False)


    dataset = {**asdict(info), "data_kind": cfg.kind}
    stats = {
        "rows_in": rows_in,
        "kept": len(kept),
        "quarantined": dict(sorted(reasons.items())),
        **shapes,
        "splits": {name: len(frame) for name, frame in frames.items()},
        "input_md5": info.md5,
        "output_fingerprint": _fingerprint(frames),
        "source": info.source,
        "rev": info.rev,
    }
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    (out_dir / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
    return DataResult(out_dir=out_dir, stats=stats, dataset=dataset)
