"""The model and the data every contender of a case trains on, built here (no download): the bench's
Llama presets or real shapes with random weights, a tokenizer trained on the demo corpus, and one
batch of pairs (or SFT rows), so every step of every contender sees the same data whatever its data
order; plus the FLOP counts and the matmul peak that MFU is measured against."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

from dpoflow_bench import CASES, SCALING_MODELS, SHAPES


def matmul_peak_gflops(sizes=(512, 1024, 2048, 3072), repeats: int = 5, precision: str = "fp32") -> float:
    """Best GEMM rate of this machine (GFLOP/s) over square sizes (fp32 on CPU with the current thread
    count; on a GPU 8192² in the bench's precision): the best of several sizes and repeats, because a
    single size can land on a slow moment or a slow blocking of a shared machine and would inflate MFU."""
    import torch

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    best_rate = 0.0
    for n in (8192,) if cuda else sizes:
        a, b = (torch.randn(n, n, dtype=dtype, device="cuda" if cuda else "cpu") for _ in range(2))
        a @ b
        for _ in range(repeats):
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            a @ b
            if cuda:
                torch.cuda.synchronize()
            best_rate = max(best_rate, 2 * n ** 3 / (time.perf_counter() - started) / 1e9)
    return best_rate


def _lengths(case: str, batch: int, rng: random.Random) -> list[tuple[int, int]]:
    if CASES[case] is not None:
        return [CASES[case]] * batch
    def draw(median, low, high):  # log-normal: most short, a long tail
        return int(min(high, max(low, rng.lognormvariate(math.log(median), 0.8))))
    return [(draw(48, 8, 320), draw(40, 4, 180)) for _ in range(batch)]


def make_case(case: str, batch: int, work: Path, seed: int = 0, lengths: tuple[int, int] | None = None,
              model: dict | None = None, shape: dict | None = None) -> dict:
    """The model (the `bench` preset, Llama sizes `model`, or a real model's shape: `shape` =
    build_shape_model's settings), tokenizer and pairs of a case in `work`; `lengths` =
    (prompt, completion) tokens instead of the case's; returns its setting."""
    import pandas as pd

    from dpoflow.data.demo import generate_reviews
    from dpoflow.dpo.pairs import tokenize_pairs
    from dpoflow.manifest import write_manifest
    from dpoflow.modeling import train_tokenizer

    reviews = generate_reviews(2000, seed)
    tokenizer = train_tokenizer(reviews, vocab_size=2000)
    stream = tokenizer(" ".join(reviews), add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)

    def text(tokens: int) -> str:
        start = rng.randrange(len(stream) - tokens)
        return tokenizer.decode(stream[start:start + tokens])

    drawn = [lengths] * batch if lengths else _lengths(case, batch, rng)
    rows = [{"prompt": text(p), "chosen": " " + text(c), "rejected": " " + text(max(2, c + rng.randint(-4, 4))),
             "prompt_messages": ""} for p, c in drawn]
    frame = pd.DataFrame(rows)
    (work / "pairs").mkdir(parents=True, exist_ok=True)
    frame.to_parquet(work / "pairs" / "train.parquet")
    write_manifest(work / "pairs", "bench pairs", case)
    model = _build(tokenizer, shape, "bench", model)
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    pairs = tokenize_pairs(frame, tokenizer, 100_000)
    config = model.config
    body = _body_parameters(config)
    lengths = [(len(p), len(c), len(r)) for p, c, r in zip(pairs.prompt_ids, pairs.chosen_ids, pairs.rejected_ids)]
    tokens = sum(p + c + r for p, c, r in lengths)
    completion = sum(c + r for _, c, r in lengths)
    attention = sum((p + c) ** 2 + (p + r) ** 2 - p * p for p, c, r in lengths)
    flops = (6 * body * tokens + 6 * config.hidden_size * config.vocab_size * completion
             + 12 * config.num_hidden_layers * config.hidden_size * attention)
    # TRL's concatenated layout: 2B rows padded to the longest prompt + completion, logits at every position
    padded = _padded_flops(config, 2 * batch, max(p + max(c, r) for p, c, r in lengths))
    return {"case": case, "pairs": batch, "parameters_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
            "prompt_tokens_mean": round(sum(p for p, _, _ in lengths) / batch, 1),
            "completion_tokens_mean": round(completion / (2 * batch), 1), "pair_tokens": tokens,
            "longest_sequence": max(p + max(c, r) for p, c, r in lengths), "useful_gflop_per_step": round(flops / 1e9, 2),
            "trl_precompute_gflop_per_step": round(padded / 1e9, 2),
            "trl_gflop_per_step": round(padded * 4 / 3 / 1e9, 2)}  # + the reference's forward (1/3 of fwd+bwd)


def _padded_flops(config, rows: int, width: int) -> int:
    """Forward + backward FLOPs of `rows` rows padded to `width` tokens with logits at every position."""
    return (6 * _body_parameters(config) * rows * width + 6 * config.hidden_size * config.vocab_size * rows * width
            + 12 * config.num_hidden_layers * config.hidden_size * rows * width * width)


def _build(tokenizer, shape: dict | None, preset: str, overrides: dict | None = None):
    from dpoflow.modeling import build_model

    return build_shape_model(tokenizer, **shape) if shape else build_model(tokenizer, preset, overrides=overrides)


def make_sft_case(batch: int, work: Path, max_length: int, preset: str = "bench", seed: int = 0,
                  shape: dict | None = None) -> dict:
    """The demo SFT corpus (prompt = a review's opening, completion = the rest), one batch of it, and
    the bench model + tokenizer in `work`; returns its setting."""
    import pandas as pd

    from dpoflow.config import DataConfig
    from dpoflow.data.step import run_data
    from dpoflow.manifest import write_manifest
    from dpoflow.modeling import load_tokenizer, train_tokenizer
    from dpoflow.sft import encode_example

    run_data(DataConfig(demo={"n_reviews": 4 * batch + 200, "seed": seed}), work / "corpus")
    rows = pd.read_parquet(work / "corpus" / "train.parquet")
    tokenizer = train_tokenizer((rows["prompt"] + rows["completion"]).tolist(), vocab_size=2000)
    model = _build(tokenizer, shape, preset)
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    (work / "sft-data").mkdir(parents=True, exist_ok=True)
    rows.iloc[:batch].to_parquet(work / "sft-data" / "train.parquet")
    rows.iloc[batch:batch + 8].to_parquet(work / "sft-data" / "eval.parquet")
    write_manifest(work / "sft-data", "bench sft corpus", "sft")
    tokenizer = load_tokenizer(str(work / "model"))
    examples = [encode_example(tokenizer, row, max_length) for row in rows.iloc[:batch].fillna("").to_dict("records")]
    lengths = [len(ids) for ids, _ in examples]
    labelled = sum(sum(1 for label in labels[1:] if label != -100) for _, labels in examples)
    config = model.config
    body = _body_parameters(config)
    flops = (6 * body * sum(lengths) + 6 * config.hidden_size * config.vocab_size * labelled
             + 6 * config.num_hidden_layers * config.hidden_size * sum(n * n for n in lengths))
    return {"case": "sft_demo_corpus", "model_preset": preset, "examples": batch, "tokens": sum(lengths),
            "labelled_tokens": labelled, "longest_sequence": max(lengths),
            "padding_if_padded": round(1 - sum(lengths) / (batch * max(lengths)), 3),
            "useful_gflop_per_step": round(flops / 1e9, 2),
            "trl_gflop_per_step": round(_padded_flops(config, batch, max(lengths)) / 1e9, 2)}


def _body_parameters(config) -> int:
    """Non-embedding parameters of a Llama config (what the 6·N rule counts)."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = h * config.num_key_value_heads // config.num_attention_heads
    return layers * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) + h


def build_shape_model(tokenizer, shape: str, layers: int | None = None, vocab: int | None = None, seed: int = 0):
    """A model of a real shape (SHAPES) with random weights: `layers` of its body (None = all), its
    own vocabulary or `vocab` rows (at least the tokenizer's)."""
    import torch
    import transformers

    class_name, settings = SHAPES[shape]
    config = getattr(transformers, class_name)(**{
        **settings, "num_hidden_layers": layers or settings["num_hidden_layers"],
        "vocab_size": max(len(tokenizer), vocab or settings["vocab_size"]), "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id})
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config)


def scaling_model(size: str) -> dict:
    return {**SCALING_MODELS[size], "max_position_embeddings": 16384}
