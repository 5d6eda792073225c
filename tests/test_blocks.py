"""Block attention (lm/blocks.py): packed sequences in one row attend along causal chains, exactly
as the dense block mask (and the padded concatenated forward) would have them, gradients included."""

import pytest
import torch

from conftest import full_logit_logp, make_pairs
from dpoflow.dpo.pairs import collate_pairs, tokenize_pairs
from dpoflow.lm.blocks import IMPLEMENTATION, Blocks, checked, supports_blocks
from dpoflow.lm.logprobs import SequenceLogProbs, collate_shared_prefix
from dpoflow.modeling import load_model, load_tokenizer


def test_chains_batch_by_length_and_every_token_has_one_output():
    # a pair [prompt 0-2 | chosen 3-4 | rejected 5-6] (two chains sharing the prompt) and an 8-token sequence
    blocks = Blocks([([0, 1, 2, 3, 4], 0), ([0, 1, 2, 5, 6], 3), (list(range(7, 15)), 0)], total=15)
    # causal chains first, by length (5 < 0.75 * 8: a group of its own), then the query-only chain
    assert [group[2:5] for group in blocks.groups] == [(1, 8, 8), (1, 5, 5), (1, 2, 5)]
    (seq_q, seq_k, *_, seq_mask), (chosen_q, chosen_k, *_, chosen_mask) = blocks.groups[:2]
    assert seq_q is seq_k and seq_k.tolist() == list(range(7, 15)) and seq_mask is None and chosen_mask is None
    assert chosen_k.tolist() == [0, 1, 2, 3, 4]
    rejected_q, rejected_k, *_, mask = blocks.groups[2]
    assert rejected_q.tolist() == [5, 6] and rejected_k.tolist() == [0, 1, 2, 5, 6]  # the prompt read again as keys
    assert mask[0, 0].tolist() == [[True, True, True, True, False], [True] * 5]  # causal, aligned to the last key
    # outputs: the prompt and chosen from the first chain, the rejected from the second
    assert blocks.scatter.tolist() == [8, 9, 10, 11, 12, 13, 14] + list(range(8))
    padded = Blocks([([0, 1, 2], 0), ([3, 4, 5, 6], 0), ([0, 1, 7, 8, 9, 10], 2), ([3, 4, 11, 12, 13], 2)], total=14)
    causal, queries = padded.groups
    assert causal[1].tolist() == [3, 4, 5, 6, 0, 1, 2, 2]  # right padding repeats the last token
    assert queries[0].tolist() == [7, 8, 9, 10, 11, 12, 13, 13]
    assert queries[1].tolist() == [0, 1, 7, 8, 9, 10, 3, 4, 11, 12, 13, 13]
    assert queries[5][1, 0].int().tolist() == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0],
                                               [1, 0, 0, 0, 0, 0]]  # the last row: a padding query, one key
    with pytest.raises(ValueError, match="no attention chain"):
        Blocks([([0, 1], 0)], total=3)
    with pytest.raises(ValueError, match="two attention chains"):
        Blocks([([0, 1], 0), ([1, 2], 0)], total=3)


def _grads(model, batch):
    model.zero_grad()
    sums, counts = SequenceLogProbs(model)(batch)
    (sums * torch.linspace(0.5, 1.5, len(sums))).sum().backward()
    return sums.detach(), counts, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_block_attention_equals_dense_mask_and_concat_with_gradients(tiny_model_dir, tmp_path):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir))  # tiny preset: 4 query heads over 2 key/value heads (GQA)
    assert model.config.num_key_value_heads < model.config.num_attention_heads and supports_blocks(model)
    pairs = tokenize_pairs(make_pairs(10, seed=3), tokenizer, 64)
    pad = tokenizer.pad_token_id
    padded = collate_pairs(pairs, range(10), pad)
    with torch.no_grad():
        before = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    ours = _grads(model, collate_shared_prefix(pairs, range(10), pad, blocks=True))
    assert model.config._attn_implementation == IMPLEMENTATION
    for other in (collate_shared_prefix(pairs, range(10), pad), padded):
        sums, counts, grads = _grads(model, other)
        torch.testing.assert_close(ours[0], sums, atol=1e-5, rtol=0)
        assert ours[1].tolist() == counts.tolist()
        for name, grad in grads.items():
            torch.testing.assert_close(ours[2][name], grad, atol=1e-5, rtol=1e-4, msg=name)
    # a plain forward of the same model (padding, no blocks) is SDPA's, bit for bit
    with torch.no_grad():
        after = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
    assert torch.equal(before, after)
    # gradient checkpointing recomputes the attention inside the backward: still by blocks
    model.gradient_checkpointing_enable()
    model.train()
    _, _, recomputed = _grads(model, collate_shared_prefix(pairs, range(10), pad, blocks=True))
    for name, grad in recomputed.items():
        torch.testing.assert_close(ours[2][name], grad, atol=1e-5, rtol=1e-4, msg=name)
    model.save_pretrained(tmp_path)  # the implementation is not saved with the model
    assert IMPLEMENTATION not in (tmp_path / "config.json").read_text()


def test_gpt2_positions_and_attention_go_through_blocks(tiny_model_dir):
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = load_tokenizer(str(tiny_model_dir))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128, vocab_size=len(tokenizer),
                                       attn_implementation="sdpa")).eval()
    assert supports_blocks(model)
    pairs = tokenize_pairs(make_pairs(6, seed=4), tokenizer, 64)
    with torch.no_grad():
        ours, _ = SequenceLogProbs(model)(collate_shared_prefix(pairs, range(6), tokenizer.pad_token_id, blocks=True))
        concat, _ = SequenceLogProbs(model)(collate_pairs(pairs, range(6), tokenizer.pad_token_id))
    torch.testing.assert_close(ours, concat, atol=1e-5, rtol=0)


def test_models_that_need_more_than_a_causal_mask_keep_the_dense_mask(tiny_model_dir):
    from transformers import MistralConfig, MistralForCausalLM

    windowed = MistralForCausalLM(MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                num_attention_heads=2, num_key_value_heads=2, vocab_size=64,
                                                sliding_window=16))
    assert not supports_blocks(windowed) and not SequenceLogProbs(windowed).blocks
    # a forward that never reached the block attention function is refused, not trusted
    model = load_model(str(tiny_model_dir))
    with pytest.raises(RuntimeError, match="attention interface"):
        with checked(model, Blocks([([0, 1], 0)], total=2)):
            pass


def _windowed(kind: str, attention: str):
    """Tiny models whose attention needs more than a causal mask: a sliding window of 4 on every layer
    (Mistral), on every other layer with soft-capped attention and logits (Gemma 2), on the layers past
    the first (Qwen2 with use_sliding_window)."""
    import transformers

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, vocab_size=64, pad_token_id=0)
    config = {"mistral": lambda: transformers.MistralConfig(sliding_window=4, **common),
              "gemma2": lambda: transformers.Gemma2Config(sliding_window=4, head_dim=16, attn_logit_softcapping=5.0,
                                                          final_logit_softcapping=3.0, **common),
              "qwen2": lambda: transformers.Qwen2Config(use_sliding_window=True, sliding_window=4, max_window_layers=1,
                                                        **common)}[kind]()
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attention).eval()


@pytest.mark.parametrize("kind, attention", [("mistral", "sdpa"), ("mistral", "eager"), ("gemma2", "eager"),
                                             ("qwen2", "sdpa"), ("qwen2", "eager")])
def test_sliding_window_models_score_as_their_own_forward(kind, attention):
    """The dense-mask fallback (prefix sharing and packing without block attention) of models with a
    sliding window: each sequence's summed log-probs equal the model's own forward over that sequence
    alone with full logits, for sequences longer than the window. (The 4-D mask reaches attention as
    given, so a mask without the window scored these with full attention, and eager attention added a
    boolean mask to its scores as 0/1: it masked nothing.)"""
    from dpoflow.lm.logprobs import TokenizedPairs

    model = _windowed(kind, attention)
    scorer = SequenceLogProbs(model)
    assert not scorer.blocks and scorer.window == 4
    pairs = TokenizedPairs([[1, 5, 6, 7, 8], [1, 7], [3, 4, 5, 6, 7, 8, 9]], [[9, 10, 11, 12, 13, 14, 2], [11, 2], [20, 2]],
                           [[12, 13, 14, 15, 16, 2], [13, 14, 15, 2], [21, 22, 23, 24, 25, 26, 2]], 0)

    with torch.no_grad():
        expected = torch.tensor([[full_logit_logp(model, p, c), full_logit_logp(model, p, r)] for p, c, r in
                                 zip(pairs.prompt_ids, pairs.chosen_ids, pairs.rejected_ids)], dtype=torch.float32)
        for pack in (False, True):
            sums, _ = scorer(collate_shared_prefix(pairs, range(3), 0, pack=pack, blocks=False))
            torch.testing.assert_close(sums.view(2, 3).T, expected, atol=1e-5, rtol=0)  # chosen, then rejected
        concat, _ = scorer(collate_pairs(pairs, range(3), 0))
        torch.testing.assert_close(concat.view(2, 3).T, expected, atol=1e-5, rtol=0)
