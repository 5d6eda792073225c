"""`dpoflow bench`: dpoflow against TRL at equal math, measured, never asserted in tests. A package of
its own: the library never imports it (only the `bench` command does, lazily).

    harness.py  one contender in its own process: dpoflow's or TRL's DPO/SFT steps, scoring, sampling
    cases.py    the models (built from configs) and the one-batch data every contender trains on
    suites.py   `dpoflow bench`: the DPO cases, SFT, generation; the headline ratios
    scaling.py  cost against sequence length and model size (`--suite scaling`)
    vocab.py    real model shapes and vocabularies 2k-152k, and what fits in memory (`--suite vocab`)

This file holds the names the CLI lists (stdlib only: importing it is cheap).
"""

# ---- the DPO and SFT bench (suites.py) ----
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
SUITES = ("dpo", "sft", "generate")  # and "scaling" (~15 min on 2 cores) and "vocab" (~25 min) when asked for

# ---- scaling (scaling.py) ----
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
SCALING_CONTENDERS = ("dpoflow", "trl")

# ---- real shapes and vocabularies (vocab.py) ----
SHAPES = {
    "qwen2.5-0.5b": ("Qwen2Config", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151_936,
                                         tie_word_embeddings=True, rope_theta=1e6, max_position_embeddings=32768,
                                         rms_norm_eps=1e-6)),
    "llama-3.2-1b": ("LlamaConfig", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                         num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                         vocab_size=128_256, tie_word_embeddings=True, rope_theta=500000.0,
                                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 8192},
                                         max_position_embeddings=131072, rms_norm_eps=1e-5)),
}
VOCABULARIES = (2000, 32_000, 128_256, 151_936)
BUDGETS_GB = (8, 16, 24, 40, 80)
DPO = ("dpoflow", "trl", "trl (precompute_ref_log_probs)")
