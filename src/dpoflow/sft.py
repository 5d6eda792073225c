"""`dpoflow sft`: causal-LM fine-tuning of the base on the SFT corpus; the result is the reference.

    run_sft(cfg, model_cfg, data_dir, out_dir, resume=False) -> summary

Loss masking: plain text -> every token; prompt/completion -> completion tokens (+EOS) only;
conversational -> assistant turns only (each rendered with the chat template; the other turns are -100).
With `model.base: null` the base is built from scratch (Llama preset + BPE tokenizer trained on the
corpus) and saved to <out>/base first, so the whole run needs no download.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from dpoflow.config import ModelConfig, SftConfig
from dpoflow.lm.logprobs import IGNORE, SequenceLogProbs, collate_packed, encode_completions
from dpoflow.manifest import building
from dpoflow.meter import Meter
from dpoflow.training import (
    Guard,
    MetricsWriter,
    global_batch_indices,
    make_accelerator,
    make_optimizer,
    make_scheduler,
    micro_batches,
    resume_step,
    save_checkpoint,
    sigterm_restored,
    write_summary,
)


def encode_example(tokenizer, row: dict, max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one SFT row, labels -100 where no loss is taken; truncated keep_start."""
    if row.get("messages"):
        ids, labels = [], []
        messages = json.loads(row["messages"])
        for index in range(len(messages)):
            # render the conversation up to this turn and keep only the new tokens: exact template text
            text = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
            new = tokenizer(text, add_special_tokens=False)["input_ids"][len(ids):]
            ids += new
            labels += new if messages[index]["role"] == "assistant" else [IGNORE] * len(new)
    else:  # plain text is a completion of the empty prompt (which is just BOS for Llama-style tokenizers)
        prompt, [completion] = encode_completions(tokenizer, row.get("prompt") or "", "", [row["completion"]])
        ids, labels = prompt + completion, [IGNORE] * len(prompt) + completion
    return ids[:max_length], labels[:max_length]


def collate(examples, indices, pad_token_id: int, pack: bool = True, blocks: bool = False) -> dict[str, torch.Tensor]:
    """Packed, no padding between examples (`collate_packed`; `blocks`: one row, block attention);
    the loss is the same either way."""
    return collate_packed([examples[i][0] for i in indices], [examples[i][1] for i in indices], pad_token_id, pack,
                          blocks)


def _token_nll(scorer: SequenceLogProbs, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL and token count of the labelled tokens of a batch: the lm_head and an fp32
    log-softmax only where a labelled token is predicted."""
    sums, counts = scorer(batch)
    return -sums.sum(), counts.sum()


@torch.no_grad()
def evaluate_nll(model, examples, pad_token_id: int, batch_size: int = 32) -> float:
    """Mean per-token NLL over held-out examples."""
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    scorer = SequenceLogProbs(model)
    for start in range(0, len(examples), batch_size):
        batch = collate(examples, range(start, min(start + batch_size, len(examples))), pad_token_id,
                        blocks=scorer.blocks)
        nll, n = _token_nll(scorer, {k: v.to(device) for k, v in batch.items()})
        total, count = total + nll.item(), count + n.item()
    model.train()
    return total / max(count, 1)


def build_base(model_cfg: ModelConfig, texts: list[str], out_dir: Path, seed: int) -> Path:
    """Build the from-scratch base (tokenizer trained on `texts`) and save it as safetensors."""
    from dpoflow.modeling import build_model, train_tokenizer

    tokenizer = train_tokenizer(texts, vocab_size=model_cfg.vocab_size)
    model = build_model(tokenizer, model_cfg.preset, seed=seed)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _frame_rows(frame) -> list[dict]:
    return frame.fillna("").to_dict(orient="records")


def run_sft(cfg: SftConfig, model_cfg: ModelConfig, data_dir, out_dir, *, resume: bool = False,
            log_metrics=None, log=print) -> dict:
    """SFT into out_dir, built atomically (manifest.py); an interrupted run resumes from its last
    checkpoint when started again with the same settings."""
    model_settings = model_cfg.model_dump(mode="json", exclude={"policy_init"})  # DPO's business, not SFT's
    with building("sft", out_dir, config=[cfg, model_settings], inputs={"data": data_dir,
                  "base": model_cfg.base if model_cfg.base and Path(model_cfg.base).exists() else None},
                  verify_inputs={"base": False}, resume=resume) as (work, resumable), sigterm_restored():
        return _run_sft(cfg, model_cfg, data_dir, work, resume=resumable, log_metrics=log_metrics, log=log)


def _run_sft(cfg: SftConfig, model_cfg: ModelConfig, data_dir, out_dir, *, resume: bool, log_metrics, log) -> dict:
    import pandas as pd

    from dpoflow.modeling import load_model, load_tokenizer

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_rows = _frame_rows(pd.read_parquet(data_dir / "train.parquet"))
    eval_rows = _frame_rows(pd.read_parquet(data_dir / "eval.parquet"))
    base = model_cfg.base
    if base is None:
        texts = [(r["prompt"] + r["completion"]) or r["messages"] for r in train_rows]
        base = str(build_base(model_cfg, texts, out_dir / "base", cfg.seed))
        log(f"sft: built a from-scratch '{model_cfg.preset}' base + tokenizer -> {base}")
    tokenizer = load_tokenizer(base)
    model = load_model(base, allow_pickle=model_cfg.allow_pickle, trust_remote_code=model_cfg.trust_remote_code)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    train = [encode_example(tokenizer, r, cfg.max_length) for r in train_rows]
    held_out = [encode_example(tokenizer, r, cfg.max_length) for r in eval_rows]
    initial_nll = evaluate_nll(model, held_out, tokenizer.pad_token_id)

    accelerator = make_accelerator(cfg.precision)
    torch.manual_seed(cfg.seed)
    optimizer = make_optimizer(model.parameters(), cfg)
    scheduler = make_scheduler(optimizer, cfg)
    # the wrapper is what accelerate prepares, so DDP's hooks see the forward that computes the loss
    scorer, optimizer, scheduler = accelerator.prepare(SequenceLogProbs(model), optimizer, scheduler)
    blocks = accelerator.unwrap_model(scorer).blocks
    start = resume_step(accelerator, out_dir, log) if resume else 0
    if start:
        log(f"sft: resuming from step {start}")
    guard = Guard(accelerator, out_dir, "sft")
    write = MetricsWriter(out_dir / "metrics.jsonl", accelerator.is_main_process, log_metrics, resume_from=start)
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = cfg.per_device_batch_size * cfg.gradient_accumulation_steps * world
    started = time.perf_counter()
    meter = Meter("sft", cfg.max_steps, "steps", start=start, log=log, enabled=accelerator.is_local_main_process)
    for step in range(start, cfg.max_steps):
        micro = micro_batches(global_batch_indices(len(train), global_batch, step, cfg.seed), rank, world,
                              cfg.per_device_batch_size)
        batches = [{k: v.to(accelerator.device) for k, v in collate(train, m, tokenizer.pad_token_id,
                                                                                    blocks=blocks).items()}
                   for m in micro]
        # normalise by the tokens of the whole global batch, so accumulation does not change the loss
        tokens = accelerator.reduce(torch.tensor(sum(b["score_targets"].numel() for b in batches),
                                                 device=accelerator.device), "sum")
        total = 0.0
        for position, batch in enumerate(batches):
            sync = accelerator.no_sync(scorer) if position < len(batches) - 1 else nullcontext()
            with sync, accelerator.autocast():
                nll, _ = _token_nll(scorer, batch)
                loss = nll * world / tokens
                accelerator.backward(loss)
            total += nll.item()
        grad_norm = accelerator.clip_grad_norm_(scorer.parameters(), cfg.max_grad_norm)
        guard.check_finite(step + 1, torch.tensor(total), grad_norm, scorer.named_parameters())
        learning_rate = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = accelerator.reduce(torch.tensor(total, device=accelerator.device), "sum").item() / tokens.item()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps:
            write(step + 1, {"loss": loss_value, "grad_norm": float(grad_norm), "learning_rate": learning_rate})
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.max_steps:
            save_checkpoint(accelerator, out_dir, step + 1)
        guard.check_stop(step + 1)
        meter.to(step + 1)
    meter.close()

    accelerator.wait_for_everyone()
    summary = {}
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(scorer).model
        final_nll = evaluate_nll(final, held_out, tokenizer.pad_token_id)
        final.save_pretrained(out_dir / "model", safe_serialization=True)
        tokenizer.save_pretrained(out_dir / "model")
        seconds = time.perf_counter() - started
        summary = write_summary(out_dir, {
            "steps": cfg.max_steps, "base": base, "eval_nll_before": round(initial_nll, 4),
            "eval_nll": round(final_nll, 4), "eval_perplexity": round(math.exp(final_nll), 3),
            "train_examples": len(train), "eval_examples": len(held_out),
        }, {"seconds": round(seconds, 2), "resumed_from": start})
        write(cfg.max_steps, {"eval_nll": final_nll, "eval_perplexity": math.exp(final_nll)})
        log(f"sft: held-out NLL {initial_nll:.3f} -> {final_nll:.3f} in {seconds:.0f}s -> {out_dir / 'model'}")
    return summary
