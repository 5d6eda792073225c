"""`dpoflow bench --against trl`: DPO training speed of dpoflow against TRL's DPOTrainer at equal math.

Every contender trains the same model (the `bench` preset, ~15M parameters, built from a config) on
the same pairs with the same batch, optimizer (AdamW, constant lr, clipping 1.0), precision (fp32 on
CPU) and thread count, each in its own process, contenders alternated. The dataset is exactly one
batch, so every step of every contender sees the same pairs whatever its data order: the loss after
the timed steps must then agree with TRL's (within 1e-4) — the speed is measured at equal math.

Cases: standard (prompt ≈ 96 + completion ≈ 96 tokens), long_prompt (≈ 384 + 64) and length_mix
(prompt and completion lengths drawn from a long-tailed log-normal, so padding matters).

Per contender: s/step (first step is warm-up, not timed), pair-tokens/s (a pair's tokens = its
prompt, chosen and rejected tokens, each counted once), peak RSS of its process, and MFU = useful
FLOPs per step / s per step / the fp32 matmul peak measured in the same run. Useful FLOPs are the
same count for every contender — the least work DPO needs with a cached reference (no padding, the
prompt encoded once, logits only where a completion token is scored), forward + backward:
    6 · N_body · Σ (p + c + r)  +  6 · H · V · Σ (c + r)  +  12 · L · H · Σ ((p + c)² + (p + r)² − p²)
with p, c, r a pair's prompt, chosen and rejected tokens, N_body the non-embedding parameters, L
layers, H hidden size, V vocabulary (the last term: attention scores and mixing, causal).
Reference log-prob precomputation (dpoflow's cache, TRL's precompute_ref_log_probs) is not in the
step time: both compute it once before training.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {"standard": (96, 96), "long_prompt": (384, 64), "length_mix": None}
# name -> (kind, settings); "dpoflow" is the default path (DpoConfig's defaults)
CONTENDERS = {
    "dpoflow": ("dpoflow", {}),
    "dpoflow (cached, concatenated)": ("dpoflow", {"reference": "cached", "prefix_sharing": False}),
    "dpoflow (prefix sharing, one pair per row)": ("dpoflow", {"prefix_sharing": True, "packing": False}),
    "dpoflow (one forward per step)": ("dpoflow", {"max_forward_tokens": 0}),
    "dpoflow (live reference)": ("dpoflow", {"reference": "live"}),
    "trl": ("trl", {"precompute_ref_log_probs": False}),
    "trl (precompute_ref_log_probs)": ("trl", {"precompute_ref_log_probs": True}),
}
SFT_CONTENDERS = {
    "dpoflow sft": ("sft-dpoflow", {}),
    "trl SFTTrainer": ("sft-trl", {}),
}
LEARNING_RATE = 1e-6  # small enough that the loss after the timed steps is still informative (≈ 0.6)


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
    bench_vocab.build_shape_model's settings), tokenizer and pairs of a case in `work`; `lengths` =
    (prompt, completion) tokens instead of the case's; returns its setting."""
    import pandas as pd

    from dpoflow.data.demo import generate_reviews
    from dpoflow.dpo.logprobs import tokenize_pairs
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
    from dpoflow.bench_vocab import build_shape_model
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


def _best_of_alternated(contenders, repeats: int, work: Path, steps: int, batch: int, max_length: int,
                        precision: str, setting: dict, tokens_key: str, rate_key: str, peak: float | None) -> dict:
    """Every contender `repeats` times, alternated (a slow moment of the machine hits them all alike);
    each one's fastest run, its rate (`setting[tokens_key]` per second, as `rate_key`), MFU and loss."""
    runs: dict[str, list[dict]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name in contenders:
            runs[name].append(_run_contender(name, work, steps, batch, max_length, precision))
    results = {}
    for name, attempts in runs.items():
        best = min(attempts, key=lambda r: r["s_per_step"])
        results[name] = {"s_per_step": round(best["s_per_step"], 4),
                         rate_key: round(setting[tokens_key] / best["s_per_step"], 1),
                         "peak_rss_mb": round(max(r["peak_rss_mb"] for r in attempts), 1),
                         **({"peak_gpu_mb": round(best["peak_gpu_mb"], 1)} if best.get("peak_gpu_mb") else {}),
                         "mfu": round(setting["useful_gflop_per_step"] / best["s_per_step"] / peak, 4) if peak else None,
                         "loss_after_timed_steps": best["loss"]}
    return results


def run_sft_bench(steps: int = 5, batch: int = 32, repeats: int = 2, peak: float | None = None, preset: str = "bench",
                  log=print) -> dict:
    """dpoflow's SFT (packed rows) against TRL's SFTTrainer (padded batch) on one batch of the demo corpus."""
    work = Path(tempfile.mkdtemp(prefix="dpoflow-bench-sft-"))
    max_length = 128
    setting = make_sft_case(batch, work, max_length, preset)
    results = _best_of_alternated(SFT_CONTENDERS, repeats, work, steps, batch, max_length, "fp32", setting,
                                  "tokens", "tokens_per_s", peak)
    for name, result in results.items():
        log(f"sft          {name:34s} {result['s_per_step']:7.3f} s/step  {result['tokens_per_s']:8.1f} tokens/s  "
            f"RSS {result['peak_rss_mb']:.0f} MB  loss {result['loss_after_timed_steps']:.6f}")
    trl_result, ours = results["trl SFTTrainer"], results["dpoflow sft"]
    speedup = round(trl_result["s_per_step"] / ours["s_per_step"], 3)
    target = round(0.95 * setting["trl_gflop_per_step"] / setting["useful_gflop_per_step"], 3)
    return {"setting": setting, "results": results,
            "sft_speedup_vs_trl": speedup, "sft_flop_target": target, "sft_flop_target_met": speedup >= target,
            "sft_loss_diff_vs_trl": abs(trl_result["loss_after_timed_steps"] - ours["loss_after_timed_steps"])}


def run_generation_bench(prompts: int = 256, samples: int = 4, max_new_tokens: int = 48, repeats: int = 2,
                         log=print) -> dict:
    """Sampling as the prefs and eval steps do it (`generate_ids`: our decode loop on length-sorted
    batches) against HF `model.generate` on the same sorted batches and against a plain loop of
    `model.generate` over the same prompts one at a time, k samples each, same settings. The model: the demo's `small` preset
    after a short SFT on the demo corpus, so completions end on EOS at realistic lengths."""
    import pandas as pd
    import torch

    from dpoflow.config import ModelConfig, SftConfig
    from dpoflow.dpo.logprobs import tokenize_prompt
    from dpoflow.generation import generate_ids
    from dpoflow.modeling import load_model, load_tokenizer
    from dpoflow.sft import run_sft

    work = Path(tempfile.mkdtemp(prefix="dpoflow-bench-generate-"))
    make_sft_case(800, work, 128, preset="small")
    run_sft(SftConfig(max_steps=150, per_device_batch_size=32, learning_rate=3e-3, warmup_steps=10, log_every=50),
            ModelConfig(base=str(work / "model")), work / "corpus", work / "sft", log=lambda *_: None)
    model, tokenizer = load_model(str(work / "sft" / "model")).eval(), load_tokenizer(str(work / "sft" / "model"))
    texts = pd.read_parquet(work / "corpus" / "eval.parquet")["prompt"].tolist()
    encoded = [tokenize_prompt(tokenizer, text) for text in (texts * (prompts // len(texts) + 1))[:prompts]]

    def plain_loop():
        out = []
        for i, ids in enumerate(encoded):
            torch.manual_seed(i)
            with torch.no_grad():
                rows = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                      do_sample=True, top_k=0, max_new_tokens=max_new_tokens,
                                      num_return_sequences=samples, pad_token_id=tokenizer.pad_token_id,
                                      eos_token_id=tokenizer.eos_token_id)
            out.append([row[len(ids):] for row in rows.tolist()])
        return out

    def batched_hf(rows: int = 512):  # what our decode loop adds: HF generate on the same sorted batches
        out, order = [None] * len(encoded), sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        for start in range(0, len(order), rows // samples):
            members = order[start:start + rows // samples]
            width = max(len(encoded[i]) for i in members)
            ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(encoded[i])) + encoded[i] for i in members])
            torch.manual_seed(start)
            with torch.no_grad():
                rows_out = model.generate(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long(),
                                          do_sample=True, top_k=0, max_new_tokens=max_new_tokens,
                                          num_return_sequences=samples, pad_token_id=tokenizer.pad_token_id,
                                          eos_token_id=tokenizer.eos_token_id)[:, width:].tolist()
            for position, i in enumerate(members):
                out[i] = rows_out[position * samples:(position + 1) * samples]
        return out

    contenders = {"dpoflow generate_ids": lambda: generate_ids(model, tokenizer, encoded, num_samples=samples,
                                                              max_new_tokens=max_new_tokens),
                  "model.generate, same sorted batches": batched_hf,
                  "plain model.generate loop": plain_loop}
    best: dict[str, dict] = {}
    eos = tokenizer.eos_token_id
    for _ in range(repeats):
        for name, generate in contenders.items():
            started = time.perf_counter()
            completions = generate()
            seconds = time.perf_counter() - started
            tokens = sum(len(row[:row.index(eos) + 1] if eos in row else row) for rows in completions for row in rows)
            if name not in best or seconds < best[name]["seconds"]:
                best[name] = {"seconds": round(seconds, 3), "generated_tokens": tokens,
                              "tokens_per_s": round(tokens / seconds, 1)}
    for name, result in best.items():
        log(f"generate     {name:34s} {result['seconds']:7.2f} s  {result['tokens_per_s']:8.1f} tokens/s  "
            f"({result['generated_tokens']} tokens)")
    return {"setting": {"prompts": prompts, "samples_per_prompt": samples, "max_new_tokens": max_new_tokens,
                        "model_preset": "small"}, "results": best,
            "generation_speedup_vs_plain_loop": round(best["dpoflow generate_ids"]["tokens_per_s"]
                                                      / best["plain model.generate loop"]["tokens_per_s"], 2),
            "generation_speedup_vs_batched_generate": round(
                best["dpoflow generate_ids"]["tokens_per_s"]
                / best["model.generate, same sorted batches"]["tokens_per_s"], 2)}


# ---- one contender, in its own process ----------------------------------------------------------

def _worker(kind: str, settings: dict, work: Path, steps: int, batch: int, max_length: int) -> dict:
    import torch

    torch.manual_seed(0)
    times, losses = [], []
    if kind in ("reference", "generate-dpoflow", "generate-hf"):  # no steps: seconds and memory
        from dpoflow.bench_vocab import worker

        return {**worker(kind, settings, work, max_length), **_peaks()}
    if kind.startswith("sft"):
        times, losses = _sft_worker(kind, settings, work, steps, batch, max_length)
    elif kind == "dpoflow":
        from dpoflow.config import DpoConfig
        from dpoflow.dpo.train import run_dpo

        cfg = DpoConfig(**{"max_steps": steps + 1, "per_device_batch_size": batch, "max_length": max_length,
                           "learning_rate": LEARNING_RATE, "warmup_steps": 0, "scheduler": "constant",
                           "log_every": 1, "checkpoint_every": 0, **settings})

        def on_step(step, metrics):
            times.append(time.perf_counter())
            losses.append(metrics["loss"])

        run_dpo(cfg, work / "pairs", work / "model", work / f"out-{os.getpid()}", log_metrics=on_step,
                reference_dir=work / "reference" if cfg.reference == "cached" else None, log=lambda *_: None)
    else:
        import datasets
        import pandas as pd
        import trl
        from transformers import TrainerCallback

        from dpoflow.modeling import load_model, load_tokenizer

        class Timer(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                times.append(time.perf_counter())

        frame = pd.read_parquet(work / "pairs" / "train.parquet")[["prompt", "chosen", "rejected"]]
        args = trl.DPOConfig(**{"output_dir": str(work / f"trl-{os.getpid()}"), "per_device_train_batch_size": batch,
                                "max_steps": steps + 1, "learning_rate": LEARNING_RATE, "lr_scheduler_type": "constant",
                                "warmup_steps": 0, "max_grad_norm": 1.0, "weight_decay": 0.0, "optim": "adamw_torch",
                                "beta": 0.1, "logging_steps": 1, "report_to": [], "use_cpu": True,
                                "max_length": max_length, "save_strategy": "no", "disable_tqdm": True, "bf16": False,
                                "gradient_checkpointing": False, "seed": 0, **settings})
        trainer = trl.DPOTrainer(model=load_model(str(work / "model")), ref_model=load_model(str(work / "model")),
                                 args=args, train_dataset=datasets.Dataset.from_pandas(frame),
                                 processing_class=load_tokenizer(str(work / "model")), callbacks=[Timer()])
        trainer.train()
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    seconds = (times[-1] - times[0]) / steps
    return {"s_per_step": seconds, "loss": losses[-1], **_peaks()}


def _peaks() -> dict:
    import torch

    return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available() else None}


def _sft_worker(kind: str, settings: dict, work: Path, steps: int, batch: int, max_length: int):
    """SFT on the one-batch demo corpus: dpoflow's `run_sft` or TRL's SFTTrainer (prompt-completion
    rows, loss on completion tokens + EOS, mean over the batch's tokens on both sides)."""
    times, losses = [], []

    def on_step(step, metrics):
        if "loss" in metrics:
            times.append(time.perf_counter())
            losses.append(metrics["loss"])

    if kind == "sft-dpoflow":
        from dpoflow.config import ModelConfig, SftConfig
        from dpoflow.sft import run_sft

        cfg = SftConfig(**{"max_steps": steps + 1, "per_device_batch_size": batch, "max_length": max_length,
                           "learning_rate": LEARNING_RATE, "warmup_steps": 0, "scheduler": "constant",
                           "log_every": 1, "checkpoint_every": 0, **settings})
        run_sft(cfg, ModelConfig(base=str(work / "model")), work / "sft-data", work / f"sft-{os.getpid()}",
                log_metrics=on_step, log=lambda *_: None)
        return times, losses
    import datasets
    import pandas as pd
    import trl
    from transformers import TrainerCallback

    from dpoflow.modeling import load_model, load_tokenizer

    class Timer(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter())

    frame = pd.read_parquet(work / "sft-data" / "train.parquet")[["prompt", "completion"]]
    args = trl.SFTConfig(**{"output_dir": str(work / f"trl-sft-{os.getpid()}"), "per_device_train_batch_size": batch,
                            "max_steps": steps + 1, "learning_rate": LEARNING_RATE, "lr_scheduler_type": "constant",
                            "warmup_steps": 0, "max_grad_norm": 1.0, "weight_decay": 0.0, "optim": "adamw_torch",
                            "logging_steps": 1, "report_to": [], "use_cpu": True, "max_length": max_length,
                            "save_strategy": "no", "disable_tqdm": True, "bf16": False, "gradient_checkpointing": False,
                            "seed": 0, "packing": False, **settings})
    trainer = trl.SFTTrainer(model=load_model(str(work / "model")), args=args,
                             train_dataset=datasets.Dataset.from_pandas(frame),
                             processing_class=load_tokenizer(str(work / "model")), callbacks=[Timer()])
    trainer.train()
    return times, [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def _run_contender(name: str, work: Path, steps: int, batch: int, max_length: int, precision: str = "fp32") -> dict:
    kind, settings = {**CONTENDERS, **SFT_CONTENDERS}[name]
    return run_worker(kind, settings, work, steps, batch, max_length, precision, name)


def run_worker(kind: str, settings: dict, work: Path, steps: int, batch: int, max_length: int,
               precision: str = "fp32", name: str | None = None) -> dict:
    """One contender (`kind` with `settings`) in its own process; its result line."""
    if precision != "fp32" or _cuda():  # the same precision on both sides; TRL off its CPU default
        if kind in ("dpoflow", "sft-dpoflow"):
            settings = {**settings, "precision": precision}
        elif kind not in ("reference", "generate-dpoflow", "generate-hf"):  # TRL's trainers
            settings = {**settings, "bf16": precision == "bf16", "use_cpu": False}
    command = [sys.executable, "-m", "dpoflow.bench", kind, json.dumps(settings), str(work), str(steps), str(batch),
               str(max_length)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench contender {name or kind!r} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- the whole bench ----------------------------------------------------------------------------

SUITES = ("dpo", "sft", "generate")  # and "scaling" (~15 min on 2 cores) and "vocab" (~25 min) when asked for


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_bench(steps: int = 5, batch: int = 8, cases=tuple(CASES), contenders=tuple(CONTENDERS), repeats: int = 2,
              out: str | None = None, suites=SUITES, sft_presets=("bench", "small"), generate_prompts: int = 256,
              precision: str = "fp32", model: str | None = None, shape: str = "qwen2.5-0.5b", layers: int | None = 2,
              log=print) -> dict:
    import torch

    from dpoflow.dpo.reference import run_reference

    peak = matmul_peak_gflops(precision=precision)
    device = torch.cuda.get_device_name() if _cuda() else f"cpu, {torch.get_num_threads()} threads"
    log(f"{precision} matmul peak: {peak:.1f} GFLOP/s on {device}")
    report: dict = {"matmul_peak_gflops": round(peak, 1), "device": device, "precision": precision,
                    "threads": torch.get_num_threads(), "steps": steps, "repeats": repeats,
                    "learning_rate": LEARNING_RATE, "model": model or "bench", "cases": {}}
    for case in cases if "dpo" in suites else ():
        work = Path(tempfile.mkdtemp(prefix=f"dpoflow-bench-{case}-"))
        setting = make_case(case, batch, work, model=_scaling_model(model) if model else None)
        max_length = setting["longest_sequence"] + 8
        run_reference(work / "pairs", work / "model", work / "reference", max_length=max_length, log=lambda *_: None)
        results = _best_of_alternated(contenders, repeats, work, steps, batch, max_length, precision, setting,
                                      "pair_tokens", "pair_tokens_per_s", peak)
        for name, result in results.items():
            log(f"{case:12s} {name:34s} {result['s_per_step']:7.3f} s/step  {result['pair_tokens_per_s']:8.1f} "
                f"pair-tokens/s  MFU {result['mfu']:.1%}  RSS {result['peak_rss_mb']:.0f} MB  "
                f"loss {result['loss_after_timed_steps']:.6f}")
        report["cases"][case] = {"setting": setting, "results": results}
        if "trl" in results:
            for result in results.values():
                result["loss_diff_vs_trl"] = abs(result["loss_after_timed_steps"] - results["trl"]["loss_after_timed_steps"])
    report.update(_headline(report))
    if "sft" in suites:
        for preset in sft_presets:
            sft = run_sft_bench(max(steps, 2), repeats=repeats, peak=peak, preset=preset, log=log)
            report[f"sft_{preset}_model"] = sft
            report[f"sft_speedup_vs_trl{'' if preset == 'bench' else '_' + preset + '_model'}"] = sft["sft_speedup_vs_trl"]
    if "scaling" in suites:  # writes scaling.json / .md / .png beside the JSON report (default: bench/)
        report["scaling"] = run_scaling(str(Path(out).parent) if out else "bench", precision=precision, log=log)
    if "vocab" in suites:  # writes vocab.json / .md / .png beside the JSON report (default: bench/)
        from dpoflow.bench_vocab import run_vocab

        report["vocab"] = run_vocab(str(Path(out).parent) if out else "bench", shape=shape, layers=layers,
                                    precision=precision, log=log)
    if "generate" in suites:
        report["generation"] = run_generation_bench(prompts=generate_prompts, repeats=repeats, log=log)
        report["generation_speedup_vs_plain_loop"] = report["generation"]["generation_speedup_vs_plain_loop"]
    if out:
        Path(out).write_text(json.dumps(report, indent=2) + "\n")
    return report


def _headline(report: dict) -> dict:
    """The figures issue targets are stated in: dpoflow's default path against TRL."""
    def ratio(case, a, b, key="s_per_step"):
        results = report["cases"].get(case, {}).get("results", {})
        if a in results and b in results:
            return round(results[a][key] / results[b][key], 3)
        return None

    standard = report["cases"].get("standard", {}).get("results", {})
    setting = report["cases"].get("standard", {}).get("setting", {})
    precompute = ratio("standard", "trl (precompute_ref_log_probs)", "dpoflow")
    # the speed a FLOP-for-FLOP equal implementation would reach, less 5 %: TRL's FLOPs / ours
    target = (round(0.95 * setting["trl_precompute_gflop_per_step"] / setting["useful_gflop_per_step"], 3)
              if setting else None)
    return {"speedup_vs_trl": ratio("standard", "trl", "dpoflow"),
            "speedup_vs_trl_precompute_flop_target": target,
            "speedup_vs_trl_precompute_flop_target_met": None if precompute is None or target is None
            else precompute >= target,
            "speedup_vs_trl_precompute": precompute,
            "rss_ratio_vs_trl": ratio("standard", "dpoflow", "trl", "peak_rss_mb"),
            "mfu": standard.get("dpoflow", {}).get("mfu"),
            "speedup_vs_trl_length_mix": ratio("length_mix", "trl", "dpoflow"),
            "speedup_vs_trl_long_prompt": ratio("long_prompt", "trl", "dpoflow"),
            "loss_equal_to_trl_within_1e-4": all(r.get("loss_diff_vs_trl", 0) <= 1e-4
                                                for c in report["cases"].values() for r in c["results"].values())}


# ---- scaling: how cost grows with sequence length and model size --------------------------------

# Llama shapes from ~17M to ~120M parameters (vocabulary 2000; non-embedding parameters dominate)
SCALING_MODELS = {
    "17M": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=10, num_attention_heads=6,
                num_key_value_heads=6),
    "35M": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=10, num_attention_heads=8,
                num_key_value_heads=8),
    "70M": dict(hidden_size=640, intermediate_size=1728, num_hidden_layers=13, num_attention_heads=10,
                num_key_value_heads=10),
    "120M": dict(hidden_size=896, intermediate_size=2432, num_hidden_layers=12, num_attention_heads=14,
                 num_key_value_heads=14),
}
SCALING_LENGTHS = (256, 512, 1024, 2048)


def _scaling_model(size: str) -> dict:
    return {**SCALING_MODELS[size], "max_position_embeddings": 16384}
SCALING_CONTENDERS = ("dpoflow", "trl")


def run_scaling(out_dir: str = "bench", steps: int = 2, batch: int = 4, lengths=SCALING_LENGTHS,
                sizes=tuple(SCALING_MODELS), size_length: int = 512, precision: str = "fp32", log=print) -> dict:
    """dpoflow's default path and TRL's DPOTrainer as the sequence (prompt + completion, half each)
    doubles from 256 to 2048 tokens on the 17M model, and as the model grows from 17M to 120M
    parameters at 512 tokens: s/step and peak memory (RSS on CPU, GPU memory on a GPU; a contender
    that runs out is recorded as such), a table (scaling.md), a plot (scaling.png) and the JSON
    (scaling.json) in `out_dir`."""
    import torch

    from dpoflow.dpo.reference import run_reference

    memory = "peak_gpu_mb" if _cuda() else "peak_rss_mb"
    points = [(sizes[0], length) for length in lengths] + [(size, size_length) for size in sizes[1:]]
    rows = []
    for size, length in points:
        work = Path(tempfile.mkdtemp(prefix=f"dpoflow-scaling-{size}-{length}-"))
        setting = make_case("standard", batch, work, lengths=(length // 2, length // 2), model=_scaling_model(size))
        max_length = setting["longest_sequence"] + 8
        run_reference(work / "pairs", work / "model", work / "reference", max_length=max_length, log=lambda *_: None)
        row = {"model": size, "parameters_m": setting["parameters_m"], "sequence_tokens": length, "pairs": batch}
        for name in SCALING_CONTENDERS:
            try:
                result = _run_contender(name, work, steps, batch, max_length, precision)
                row[name] = {"s_per_step": round(result["s_per_step"], 3), "peak_memory_mb": round(result[memory])}
            except RuntimeError as error:  # out of memory is a result here, anything else is not
                if "out of memory" not in str(error).lower() and "(exit -9)" not in str(error):
                    raise
                row[name] = {"s_per_step": None, "peak_memory_mb": None, "out_of_memory": True}
        ours, theirs = row["dpoflow"], row["trl"]
        if ours["s_per_step"] and theirs["s_per_step"]:
            row["speedup_vs_trl"] = round(theirs["s_per_step"] / ours["s_per_step"], 2)
            row["memory_ratio_vs_trl"] = round(ours["peak_memory_mb"] / theirs["peak_memory_mb"], 2)
        log(f"scaling {size:>5s} {length:5d} tokens: " + " | ".join(
            f"{name} " + (f"{row[name]['s_per_step']:7.3f} s/step {row[name]['peak_memory_mb']:6d} MB"
                          if row[name]["s_per_step"] else "out of memory") for name in SCALING_CONTENDERS))
        rows.append(row)
    device = torch.cuda.get_device_name() if _cuda() else f"{torch.get_num_threads()} CPU threads"
    report = {"steps": steps, "pairs": batch, "device": device, "precision": precision,
              "memory": "peak GPU memory" if _cuda() else "peak RSS", "rows": rows}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "scaling.md").write_text(_scaling_table(report))
    _scaling_plot(report, out / "scaling.png")
    return report


def _scaling_table(report: dict) -> str:
    def cell(result, key):
        return "out of memory" if result.get("out_of_memory") else result[key]

    lines = [f"| model | params | tokens/sequence | dpoflow s/step | TRL s/step | speedup | dpoflow {report['memory']} MB "
             f"| TRL {report['memory']} MB |", "|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        ours, theirs = row["dpoflow"], row["trl"]
        speedup = f"{row['speedup_vs_trl']}x" if "speedup_vs_trl" in row else "-"
        lines.append(f"| {row['model']} | {row['parameters_m']}M | {row['sequence_tokens']} | {cell(ours, 's_per_step')} | "
                     f"{cell(theirs, 's_per_step')} | {speedup} | {cell(ours, 'peak_memory_mb')} | "
                     f"{cell(theirs, 'peak_memory_mb')} |")
    return "\n".join(lines) + "\n"


def _scaling_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    by_length = [r for r in rows if r["model"] == rows[0]["model"]]
    by_size = [r for r in rows if r["sequence_tokens"] == rows[-1]["sequence_tokens"]]
    figure, axes = plt.subplots(2, 2, figsize=(10, 7))
    for column, (group, key, label) in enumerate([
            (by_length, "sequence_tokens", f"tokens per sequence ({rows[0]['model']} model)"),
            (by_size, "parameters_m", f"parameters, millions ({rows[-1]['sequence_tokens']} tokens)")]):
        for name, style in (("dpoflow", "o-"), ("trl", "s--")):
            ran = [r for r in group if r[name]["s_per_step"]]  # out-of-memory points are left out
            axes[0][column].plot([r[key] for r in ran], [r[name]["s_per_step"] for r in ran], style, label=name)
            axes[1][column].plot([r[key] for r in ran], [r[name]["peak_memory_mb"] for r in ran], style, label=name)
        for axis, what in ((axes[0][column], "s / step"), (axes[1][column], f"{report['memory']} (MB)")):
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")
            axis.set_xlabel(label)
            axis.set_ylabel(what)
            axis.grid(True, which="both", alpha=0.3)
            axis.legend()
    figure.suptitle(f"DPO step cost, dpoflow (default path) vs TRL DPOTrainer, {report['precision']}, "
                    f"{report['device']}, {report['pairs']} pairs")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)

if __name__ == "__main__":  # one contender: python -m dpoflow.bench <kind> <settings> <work> <steps> <batch> <max_length>
    kind, settings, work, steps, batch, max_length = sys.argv[1:7]
    print(json.dumps(_worker(kind, json.loads(settings), Path(work), int(steps), int(batch), int(max_length))))
