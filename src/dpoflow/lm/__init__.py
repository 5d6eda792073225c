"""Language-model plumbing every step shares (SFT, generation, evaluation, DPO): prompt and completion
tokens, batch layouts, sequence log-probs through a chunked output head, block attention."""
