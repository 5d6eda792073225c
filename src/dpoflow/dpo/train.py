"""`dpoflow dpo`: the DPO training loop on accelerate (one process, DDP, FSDP or DeepSpeed alike).

    run_dpo(cfg, pairs_dir, reference_model_dir, out_dir, reference_dir=None, resume=False) -> summary

Setup chooses, once: the reference strategy (cached log-probs | live frozen copy | the LoRA base with
adapters disabled), the batch layout (concatenated | shared prefix, packed rows) and the precision. The loop then
runs the same lines for every choice:

    for each optimizer step:
        global batch of size per_device x grad_accum x processes (seeded order, see training.py)
        for each of this rank's micro-batches, in parts only when its activations and logits would
        not fit the activation budget (memory.py; or parts of at most dpo.max_forward_tokens):
            policy log-probs (one forward over chosen+rejected) -> reference log-probs -> loss
            backward (gradient sync only on the last part of the last micro-batch)
        clip, step, schedule; gather every example's rewards across ranks; log TRL's metric names

Loss scaling: each micro-batch contributes mean(losses)/grad_accum and DDP averages over ranks, so
the update is the mean over the global batch whatever the split (tested to 1e-5).
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch

from dpoflow.config import DpoConfig
from dpoflow.dpo.losses import preference_loss, sft_loss
from dpoflow.dpo.pairs import collate_pairs, tokenize_pairs
from dpoflow.dpo.reference import cache_key, load_pair_frames, load_reference_logps
from dpoflow.lm.logprobs import SequenceLogProbs, collate_shared_prefix
from dpoflow.manifest import building
from dpoflow.memory import activation_budget, training_costs
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


def _apply_lora(model, lora):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _reference_fn(cfg: DpoConfig, reference_dir, expected_key, model_dir, scorer_module, device):
    """Return f(indices, batch) -> (ref_chosen, ref_rejected) for the configured strategy."""
    if cfg.reference == "cached":
        table = load_reference_logps(reference_dir, expected_key).to(device=device, dtype=torch.float32)
        return lambda indices, batch: (table[indices, 0], table[indices, 1])
    if cfg.reference == "live":
        from dpoflow.modeling import load_model

        frozen = SequenceLogProbs(load_model(str(model_dir)).to(device)).eval().requires_grad_(False)

        @torch.no_grad()
        def live(indices, batch):
            sums, _ = frozen(batch)
            return sums[: len(indices)], sums[len(indices):]
        return live
    if not cfg.lora.enabled:
        raise ValueError("dpo.reference=lora_disabled needs dpo.lora.enabled=true")

    @torch.no_grad()
    def adapters_off(indices, batch):  # the same weights with the LoRA adapters disabled: no second copy
        with scorer_module.model.disable_adapter():
            sums, _ = scorer_module(batch)
        return sums[: len(indices)], sums[len(indices):]
    return adapters_off


def split_by_tokens(indices: list[int], lengths: list[int], budget: int) -> list[list[int]]:
    """A micro-batch cut into ceil(cost / budget) parts of about equal cost (`lengths`: each example's
    tokens, or bytes; longest first into the lightest part); budget 0 = one part. Same update either
    way: the loss is summed over the parts."""
    total = sum(lengths[i] for i in indices)
    if not budget or total <= budget:
        return [list(indices)]
    parts: list[list[int]] = [[] for _ in range(min(len(indices), math.ceil(total / budget)))]
    load = [0] * len(parts)
    for i in sorted(indices, key=lambda i: -lengths[i]):
        lightest = load.index(min(load))
        parts[lightest].append(i)
        load[lightest] += lengths[i]
    return parts


def run_dpo(cfg: DpoConfig, pairs_dir, reference_model_dir, out_dir, *, reference_dir=None, resume: bool = False,
            init_model_dir=None, log_metrics=None, log=print) -> dict:
    """DPO into out_dir, built atomically (manifest.py): inputs are verified against their manifests;
    an interrupted run resumes from its last checkpoint when started again with the same settings.
    `init_model_dir`: the policy training starts from (default: the reference model itself), e.g.
    the previous on-policy round's policy or the registry's champion; it must share the reference's
    tokenizer."""
    if init_model_dir is not None and Path(init_model_dir).resolve() == Path(reference_model_dir).resolve():
        init_model_dir = None  # starting from the reference itself: the same step as without an init
    inputs = {"pairs": pairs_dir, "reference_model": reference_model_dir, "init": init_model_dir,
              "reference": reference_dir if cfg.reference == "cached" else None}
    with building("dpo", out_dir, config=cfg, inputs=inputs,
                  verify_inputs={"reference_model": False, "init": False}, resume=resume) as (work, resumable), \
            sigterm_restored():
        return _run_dpo(cfg, pairs_dir, reference_model_dir, work, reference_dir=reference_dir, resume=resumable,
                        init_model_dir=init_model_dir, log_metrics=log_metrics, log=log)


def _run_dpo(cfg: DpoConfig, pairs_dir, reference_model_dir, out_dir, *, reference_dir, resume: bool, init_model_dir,
             log_metrics, log) -> dict:
    from dpoflow.manifest import model_sha
    from dpoflow.modeling import load_model, load_tokenizer

    pairs_dir, model_dir, out_dir = Path(pairs_dir), Path(reference_model_dir), Path(out_dir)
    accelerator = make_accelerator(cfg.precision)
    out_dir.mkdir(parents=True, exist_ok=True)

    frames = load_pair_frames(pairs_dir)
    train_frame = frames.get("train")
    if train_frame is None or len(train_frame) == 0:
        raise ValueError(f"{pairs_dir}/train.parquet has no pairs; nothing to train on")
    tokenizer = load_tokenizer(str(model_dir))
    pairs = tokenize_pairs(train_frame, tokenizer, cfg.max_length, cfg.truncation)
    expected_key = cache_key(frames, model_dir, cfg.max_length, cfg.truncation)

    torch.manual_seed(cfg.seed)
    init_dir = Path(init_model_dir) if init_model_dir is not None else model_dir
    if init_dir != model_dir and load_tokenizer(str(init_dir)).get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"the initial policy {init_dir} has another tokenizer than the reference {model_dir}: "
                         "a policy and its reference must share one vocabulary (set model.policy_init to a "
                         "policy trained from this reference, or leave it null)")
    model = load_model(str(init_dir))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if cfg.lora.enabled:
        model = _apply_lora(model, cfg.lora)
    scorer = SequenceLogProbs(model)
    optimizer = make_optimizer(scorer.parameters(), cfg)
    scheduler = make_scheduler(optimizer, cfg)
    scorer, optimizer, scheduler = accelerator.prepare(scorer, optimizer, scheduler)
    scorer_module = accelerator.unwrap_model(scorer)
    reference = _reference_fn(cfg, reference_dir, expected_key, model_dir, scorer_module, accelerator.device)
    collate = (partial(collate_shared_prefix, pack=cfg.packing, blocks=cfg.packing and scorer_module.blocks)
               if cfg.prefix_sharing else collate_pairs)
    lengths = pairs.forward_tokens(cfg.prefix_sharing)  # the cost of each pair, cut into parts by budget
    budget = cfg.max_forward_tokens
    if budget is None:  # auto: one forward whenever its activations and logits fit the activation budget
        budget = activation_budget(scorer_module.model)
        lengths, scorer_module.keep_budget = training_costs(
            scorer_module.model.config, 2 if accelerator.mixed_precision in ("bf16", "fp16") else 4, lengths,
            pairs.scored_tokens(), budget)

    start = resume_step(accelerator, out_dir, log) if resume else 0
    if resume and start:
        log(f"dpo: resuming from step {start}")
    write = MetricsWriter(out_dir / "metrics.jsonl", accelerator.is_main_process, log_metrics, resume_from=start)
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = cfg.per_device_batch_size * cfg.gradient_accumulation_steps * world
    meter = Meter("dpo", cfg.max_steps, "steps", start=start, log=log, enabled=accelerator.is_local_main_process)
    started, tokens, window = time.perf_counter(), 0, []
    guard = Guard(accelerator, out_dir, "dpo")
    for step in range(start, cfg.max_steps):
        indices = global_batch_indices(len(pairs), global_batch, step, cfg.seed)
        micro = micro_batches(indices, rank, world, cfg.per_device_batch_size)
        per_example = []
        for position, batch_indices in enumerate(micro):
            parts = split_by_tokens(batch_indices, lengths, budget)
            for part, part_indices in enumerate(parts):
                batch = {k: v.to(accelerator.device) for k, v in
                         collate(pairs, part_indices, tokenizer.pad_token_id).items()}
                tokens += int((batch["input_ids"] != tokenizer.pad_token_id).sum())
                last = position == len(micro) - 1 and part == len(parts) - 1
                sync = nullcontext() if last else accelerator.no_sync(scorer)
                with sync, accelerator.autocast():
                    sums, counts = scorer(batch)
                    size = len(part_indices)
                    policy_chosen, policy_rejected = sums[:size], sums[size:]
                    ref_chosen, ref_rejected = reference(part_indices, batch)
                    losses, chosen_rewards, rejected_rewards = preference_loss(
                        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=cfg.beta,
                        loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                        chosen_lengths=counts[:size], rejected_lengths=counts[size:],
                    )
                    if cfg.rpo_alpha:
                        losses = losses + cfg.rpo_alpha * sft_loss(policy_chosen, counts[:size])
                    # the micro-batch's mean loss, whatever the parts: the same update as one forward
                    accelerator.backward(losses.sum() / (len(batch_indices) * len(micro)))
                per_example.append(torch.stack([losses.detach(), chosen_rewards, rejected_rewards,
                                                policy_chosen.detach(), policy_rejected.detach()], dim=1))
        grad_norm = accelerator.clip_grad_norm_(scorer.parameters(), cfg.max_grad_norm)
        guard.check_finite(step + 1, torch.cat([chunk[:, 0] for chunk in per_example]), grad_norm,
                           scorer.named_parameters())
        learning_rate = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        window.append(accelerator.gather(torch.cat(per_example).float()))  # every example of every rank
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps:
            # like TRL: example metrics are averaged over every step since the last log line
            values = torch.cat(window)
            window = []
            loss, chosen, rejected, logps_chosen, logps_rejected = values.mean(0).tolist()
            metrics = {
                "loss": loss, "rewards/chosen": chosen, "rewards/rejected": rejected,
                "rewards/margins": chosen - rejected,
                "rewards/accuracies": (values[:, 1] > values[:, 2]).float().mean().item(),
                "logps/chosen": logps_chosen, "logps/rejected": logps_rejected,
                "grad_norm": float(grad_norm), "learning_rate": learning_rate,
            }
            write(step + 1, metrics)
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.max_steps:
            save_checkpoint(accelerator, out_dir, step + 1)
        guard.check_stop(step + 1)
        meter.to(step + 1)
    meter.close()

    seconds = time.perf_counter() - started
    accelerator.wait_for_everyone()
    summary = {}
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(scorer).model
        if cfg.lora.enabled:
            final.save_pretrained(out_dir / "adapter")
            final = final.merge_and_unload()
        final.save_pretrained(out_dir / "model", safe_serialization=True)
        tokenizer.save_pretrained(out_dir / "model")
        steps_run = cfg.max_steps - start
        summary = write_summary(out_dir, {
            "steps": cfg.max_steps, "pairs": len(pairs), "truncated_pairs": pairs.truncated, "processes": world,
            "nodes": world // int(os.environ.get("LOCAL_WORLD_SIZE", world)),
            "global_batch": global_batch, "reference": cfg.reference, "reference_cache_key": expected_key,
            "beta": cfg.beta, "loss_type": cfg.loss_type, "config": cfg.model_dump(mode="json"),
            **({"init_model_sha": model_sha(init_dir)} if init_dir != model_dir else {}),
        }, {
            "seconds": round(seconds, 2), "steps_this_run": steps_run, "resumed_from": start,
            "s_per_step": round(seconds / max(1, steps_run), 4),
            "tokens_per_s": round(tokens * world / max(seconds, 1e-9), 1),
        })
        # the training curve as a JSON table: what `dvc plots show` draws (it does not read JSON lines)
        curve = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
        (out_dir / "curve.json").write_text(json.dumps(curve, indent=1) + "\n")
        if pairs.truncated:
            log(f"dpo: {pairs.truncated} of {len(pairs)} pairs were longer than max_length={cfg.max_length} and "
                "were truncated (keep_start)")
    accelerator.wait_for_everyone()
    return summary
