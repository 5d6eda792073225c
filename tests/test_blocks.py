"""Block attention (dpo/blocks.py): packed sequences in one row attend as causal blocks, exactly as
the dense block mask (and the padded concatenated forward) would have them, gradients included."""

import pytest
import torch

from conftest import make_pairs
from dpoflow.dpo.blocks import IMPLEMENTATION, Blocks, checked, supports_blocks
from dpoflow.dpo.logprobs import SequenceLogProbs, collate_pairs, collate_shared_prefix, tokenize_pairs
from dpoflow.modeling import load_model, load_tokenizer


def test_groups_batch_similar_lengths_and_every_token_has_one_output():
    # blocks of 8 (causal), 7 (a mask: token 3 sees only itself) and 2 tokens over 17 positions
    own = torch.ones(7, 7, dtype=torch.bool).tril()
    own[3, :3] = False
    blocks = Blocks([(0, 8, None), (8, 7, own), (15, 2, None)], total=17)
    assert [(n, width) for _, n, width, _ in blocks.groups] == [(2, 8), (1, 2)]  # 7 >= 0.75 * 8 rides with 8
    gather, _, _, masks = blocks.groups[0]
    assert gather.tolist() == list(range(8)) + list(range(8, 15)) + [14]  # right padding repeats the last token
    assert torch.equal(masks[0, 0], torch.ones(8, 8, dtype=torch.bool).tril())
    assert torch.equal(masks[1, 0, :7, :7], own) and not masks[1, 0, :7, 7].any() and masks[1, 0, 7, 7]
    assert blocks.groups[1][3] is None  # all causal: is_causal, no mask
    assert blocks.scatter.tolist() == list(range(8)) + list(range(8, 15)) + [16, 17]
    with pytest.raises(ValueError, match="no attention block"):
        Blocks([(0, 2, None)], total=3)
    with pytest.raises(ValueError, match="two attention blocks"):
        Blocks([(0, 2, None), (1, 2, None)], total=3)


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
        with checked(model, Blocks([(0, 2, None)], total=2)):
            pass
