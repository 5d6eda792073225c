"""The decode loop behind pairs and evaluation (dpoflow.generation) against HF `generate`: the same
greedy tokens through left padding and the preallocated KV cache, the same sampling law, the same
nucleus."""

import pytest
import torch

from dpoflow.generation import generate_ids, pick_tokens


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from dpoflow.modeling import load_model, load_tokenizer

    return load_model(str(tiny_model_dir)).eval(), load_tokenizer(str(tiny_model_dir))


def test_greedy_tokens_equal_hf_generate_with_left_padding(tiny):
    from types import SimpleNamespace

    model, tokenizer = tiny
    prompts = [tokenizer(text).input_ids for text in ("great fun", "the plot was dull and it is", "a", "movie 3 is")]
    # EOS = a token one prompt's greedy continuation reaches early: its row ends and leaves the batch
    # while the others go on
    free = generate_ids(model, SimpleNamespace(pad_token_id=tokenizer.pad_token_id, eos_token_id=-1), prompts,
                        temperature=0, max_new_tokens=12)
    ids = SimpleNamespace(pad_token_id=tokenizer.pad_token_id, eos_token_id=free[0][0][2])
    ours = generate_ids(model, ids, prompts, temperature=0, max_new_tokens=12, batch_size=3)
    assert min(len(c[0]) for c in ours) < 12 and max(len(c[0]) for c in ours) == 12
    for prompt, (completion,) in zip(prompts, ours):  # one prompt at a time: no padding on HF's side
        with torch.no_grad():
            hf = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                do_sample=False, max_new_tokens=12, pad_token_id=ids.pad_token_id,
                                eos_token_id=ids.eos_token_id)[0, len(prompt):].tolist()
        assert completion == (hf[:hf.index(ids.eos_token_id) + 1] if ids.eos_token_id in hf else hf)


def test_sampling_law_top_k_and_nucleus_match_hf_warpers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(1, 6) * 2
    rows = 200_000
    generator = torch.Generator().manual_seed(1)
    for temperature, top_p, top_k in ((1.0, 1.0, 0), (0.7, 1.0, 0), (1.0, 0.8, 0), (1.0, 1.0, 3), (0.7, 0.8, 4)):
        warped = TemperatureLogitsWarper(temperature)(None, logits.clone())
        warped = TopKLogitsWarper(top_k)(None, warped) if top_k else warped
        expected = TopPLogitsWarper(top_p)(None, warped).softmax(-1)[0]
        drawn = pick_tokens(logits.expand(rows, 6), temperature, top_p, generator, top_k)
        frequencies = torch.bincount(drawn, minlength=6).double() / rows
        assert torch.all(frequencies[expected == 0] == 0), (temperature, top_p)  # outside the cut: never
        assert torch.allclose(frequencies, expected.double(), atol=4e-3), (frequencies, expected)
    assert torch.equal(pick_tokens(logits.expand(3, 6), 0, 1.0, generator), logits.argmax(-1).expand(3))


def test_samples_are_seeded_and_end_at_eos(tiny):
    model, tokenizer = tiny
    prompts = [tokenizer(text).input_ids for text in ("great fun", "the plot was", "a", "boring film")]
    first = generate_ids(model, tokenizer, prompts, num_samples=3, max_new_tokens=16, seed=5, batch_size=6)
    assert first == generate_ids(model, tokenizer, prompts, num_samples=3, max_new_tokens=16, seed=5, batch_size=6)
    assert first != generate_ids(model, tokenizer, prompts, num_samples=3, max_new_tokens=16, seed=6, batch_size=6)
    eos = tokenizer.eos_token_id
    for samples in first:
        assert len(samples) == 3
        for completion in samples:
            assert 1 <= len(completion) <= 16 and eos not in completion[:-1]
            assert tokenizer.pad_token_id not in completion or tokenizer.pad_token_id == eos


def test_sampling_at_a_real_vocabulary_holds_one_fp32_copy_of_the_logits():
    """64 rows x 151,936 entries (Qwen2.5's vocabulary): temperature, top-k and top-p together allocate
    one (rows x vocabulary) fp32 buffer plus bounded per-row work (torch's CPU allocator profile)."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    logits = torch.randn(64, 151_936, dtype=torch.bfloat16)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        tokens = pick_tokens(logits, 0.8, 0.9, torch.Generator().manual_seed(0), top_k=50_000)
    live = peak = 0
    for event in sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns()):
        if event.name() == "[memory]":
            live += event.nbytes()
            peak = max(peak, live)
    one_copy = 64 * 151_936 * 4
    assert peak < one_copy + one_copy // 4 + (64 << 20), (peak, one_copy)  # + bool masks, + ≤ 64 MB of sorting
    assert tokens.shape == (64,) and int(tokens.max()) < 151_936
