"""Log-probs through the output head in chunks (lm/head.py) equal the full-logits log-softmax, values
and gradients, whatever the chunking, the soft-cap, a bias or the kind of head."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpoflow.lm.head import BYTES_PER_LOGIT, head_logps


def full_logps(hidden, head, targets, softcap=None):
    z = head(hidden).float()
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    return torch.gather(F.log_softmax(z, -1), 1, targets[:, None]).squeeze(1)


def case(vocabulary=97, hidden_size=12, n=41, bias=False, seed=0):
    torch.manual_seed(seed)
    head = nn.Linear(hidden_size, vocabulary, bias=bias).double().float()
    hidden = torch.randn(n, hidden_size, requires_grad=True)
    targets = torch.randint(0, vocabulary, (n,))
    upstream = torch.randn(n)  # an arbitrary upstream gradient, not a plain sum
    return head, hidden, targets, upstream


def grads(fn, head, hidden, upstream):
    head.zero_grad()
    hidden.grad = None
    values = fn()
    (values * upstream).sum().backward()
    return values.detach(), hidden.grad.clone(), [p.grad.clone() for p in head.parameters()]


@pytest.mark.parametrize("chunk_tokens", [1, 7, 40, 41, 1000])  # one token, uneven, n-1, n, all kept
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_chunked_head_equals_full_logits_with_gradients(chunk_tokens, bias, softcap):
    head, hidden, targets, upstream = case(bias=bias)
    budget = chunk_tokens * head.out_features * BYTES_PER_LOGIT
    expected = grads(lambda: full_logps(hidden, head, targets, softcap), head, hidden, upstream)
    got = grads(lambda: head_logps(hidden, head, targets, budget=budget, softcap=softcap), head, hidden, upstream)
    for want, have in zip(expected[:2] + tuple(expected[2]), got[:2] + tuple(got[2])):
        assert torch.allclose(want, have, atol=1e-6, rtol=1e-5), (want - have).abs().max()


def test_hooked_or_wrapped_heads_take_the_checkpointed_path_to_the_same_numbers():
    head, hidden, targets, upstream = case(n=50)
    calls = []
    head.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    budget = 16 * head.out_features * BYTES_PER_LOGIT  # chunks of 16 tokens
    expected = grads(lambda: full_logps(hidden, head, targets), head, hidden, upstream)
    calls.clear()
    got = grads(lambda: head_logps(hidden, head, targets, budget=budget), head, hidden, upstream)
    assert calls[:4] == [16, 16, 16, 2]  # the module ran chunk by chunk (then again in the backward)
    assert len(calls) == 8
    for want, have in zip(expected[:2] + tuple(expected[2]), got[:2] + tuple(got[2])):
        assert torch.allclose(want, have, atol=1e-6, rtol=1e-5)


def test_peak_memory_grows_with_the_chunk_not_the_tokens():
    """A 20,000-row head over 2,000 tokens: the full logits are 160 MB; with a 4 MB budget the
    forward and backward allocate a few chunks at a time (measured by torch's CPU allocator profile)."""
    torch.manual_seed(0)
    head = nn.Linear(64, 20_000, bias=False)
    hidden = torch.randn(2000, 64, requires_grad=True)
    targets = torch.randint(0, 20_000, (2000,))
    from torch.profiler import ProfilerActivity, profile

    def peak(fn):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn().sum().backward()
        live = peak_live = 0
        for event in sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns()):
            if event.name() == "[memory]":
                live += event.nbytes()
                peak_live = max(peak_live, live)
        return peak_live

    chunked = peak(lambda: head_logps(hidden, head, targets, budget=4 << 20))
    full = peak(lambda: full_logps(hidden, head, targets))
    weights = head.weight.numel() * 4
    assert full > 2 * 2000 * 20_000 * 4  # logits and their log-softmax at least
    # the weight's gradient (5 MB) + a few 4 MB chunks; nothing of the 160 MB
    assert chunked < weights + 4 * (4 << 20), (chunked, full)


def test_no_grad_scoring_and_empty_input():
    head, hidden, targets, _ = case()
    with torch.no_grad():
        got = head_logps(hidden, head, targets, budget=16 * head.out_features * BYTES_PER_LOGIT)
    assert torch.allclose(got, full_logps(hidden, head, targets).detach(), atol=1e-6)
    empty = head_logps(hidden[:0], head, targets[:0], budget=1 << 20)
    assert empty.shape == (0,)


def test_sequence_log_probs_apply_the_models_final_soft_cap():
    """Gemma 2 soft-caps its logits (30 · tanh(z / 30)) after the head: the summed completion
    log-probs must be those of the model's own logits, not of the raw head."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from dpoflow.dpo.pairs import collate_pairs
    from dpoflow.lm.logprobs import SequenceLogProbs, TokenizedPairs

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5,
                          sliding_window=8, pad_token_id=0)
    model = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        model.model.norm.weight.fill_(20.0)  # logits of a few units: the cap at 0.5 changes them
    pairs = TokenizedPairs([[1, 5, 6], [1, 7]], [[9, 10, 2], [11, 2]], [[12, 2], [13, 14, 15, 2]], 0)
    batch = collate_pairs(pairs, [0, 1], 0)
    with torch.no_grad():
        sums, _ = SequenceLogProbs(model)(batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels = batch["labels"][:, 1:]
    logps = torch.gather(F.log_softmax(logits[:, :-1], -1), 2, labels.clamp(min=0)[..., None]).squeeze(-1)
    expected = (logps * (labels != -100)).sum(-1)
    assert torch.allclose(sums, expected, atol=1e-5), (sums, expected)
    raw = F.log_softmax(model.lm_head(model.model(input_ids=batch["input_ids"],
                                                  attention_mask=batch["attention_mask"]).last_hidden_state), -1)
    assert not torch.allclose(sums, (torch.gather(raw[:, :-1], 2, labels.clamp(min=0)[..., None]).squeeze(-1)
                                     * (labels != -100)).sum(-1).detach(), atol=1e-2)  # the cap matters here


def test_tied_embedding_rows_go_into_the_heads_gradient_in_place(monkeypatch):
    """Qwen2-shaped, tied head and embedding, a padded row, two backwards accumulated: every
    gradient equals autograd's own embedding backward (the dense sum of two gradients), and the
    backward allocates one (vocabulary x hidden) buffer, not two."""
    import contextlib

    from torch.profiler import ProfilerActivity, profile
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import dpoflow.lm.logprobs as logprobs

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=40_000, tie_word_embeddings=True, pad_token_id=0)
    model = Qwen2ForCausalLM(config)
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    ids = torch.randint(1, config.vocab_size, (3, 24))
    ids[2, 16:] = 0
    labels = ids.clone()
    labels[:, :6] = -100
    labels[2, 16:] = -100
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": labels}
    upstream = torch.tensor([1.0, -2.0, 0.5])

    table = config.vocab_size * config.hidden_size * 4  # 10 MB

    def gradients_and_tables():
        model.zero_grad(set_to_none=True)
        scorer = logprobs.SequenceLogProbs(model)
        tables = []
        for _ in range(2):
            sums, _ = scorer(batch)
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                (sums * upstream).sum().backward()
            tables.append(sum(1 for event in prof.profiler.kineto_results.events()
                              if event.name() == "[memory]" and event.nbytes() >= table))
        assert "forward" not in vars(model.get_input_embeddings())  # the module's own forward again
        return {name: p.grad.clone() for name, p in model.named_parameters()}, tables

    ours, ours_tables = gradients_and_tables()
    monkeypatch.setattr(logprobs, "tied_rows", lambda model: contextlib.nullcontext(None))
    autograds, autograd_tables = gradients_and_tables()
    for name, want in autograds.items():
        assert torch.allclose(ours[name], want, atol=1e-6, rtol=1e-5), (name, (ours[name] - want).abs().max())
    assert ours_tables == [1, 1] and min(autograd_tables) >= 2, (ours_tables, autograd_tables)
