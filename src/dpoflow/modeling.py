"""Models and tokenizers: load from a local folder, a GGUF file, a hub id or an MLflow `models:/` URI; or build a
tiny Llama-style model from a config plus a byte-level BPE tokenizer trained on the corpus.

Safetensors only by default: a checkpoint whose weights exist only as pickle (`pytorch_model.bin`,
`.pt`) is refused unless `allow_pickle=True`, because unpickling runs arbitrary code.
"""

from __future__ import annotations

from pathlib import Path

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"

# A chat template for from-scratch tokenizers, so conversational data works with the demo model.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}" + EOS + "{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# Llama-style sizes. `tiny` is for unit tests (~0.1M params), `small` for the CPU demo (~1.3M).
PRESETS = {
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256),
    "small": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256),
    # ~15M parameters: the size of the benchmark in shared REFERENCE.md ("17M-param Llama")
    "bench": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=6,
                  num_key_value_heads=6, max_position_embeddings=512),
}


class ModelLoadError(ValueError):
    """A model that cannot be loaded safely; the message says what to do."""


def train_tokenizer(texts, vocab_size: int = 2000):
    """Byte-level BPE trained on `texts` (BOS added on encode), as a transformers fast tokenizer with a
    chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, BOS, EOS, "<|system|>", "<|user|>", "<|assistant|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # every encoded text starts with BOS, as Llama tokenizers do: SFT text, DPO prompts and generation
    # prompts then share the same first position
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                      model_max_length=1024)
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_model(tokenizer, preset: str = "small", seed: int = 0, overrides: dict | None = None):
    """A freshly initialised Llama-style causal LM sized by `preset` (or `overrides` of it), tied to
    the tokenizer's vocab."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if preset not in PRESETS:
        raise ModelLoadError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=True, **{**PRESETS[preset], **(overrides or {})})
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _check_weights(path: Path, allow_pickle: bool) -> None:
    safetensors = list(path.glob("*.safetensors"))
    pickles = [p for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt") and "model" in p.name]
    if not safetensors and pickles and not allow_pickle:
        raise ModelLoadError(
            f"{path} holds only pickle weights ({', '.join(p.name for p in pickles)}); loading pickle runs "
            "arbitrary code. Convert them to safetensors (save_pretrained(..., safe_serialization=True)) or, "
            "if you trust the file, set model.allow_pickle: true."
        )
    if not safetensors and not pickles:
        raise ModelLoadError(f"{path} has no model weights (*.safetensors): point the setting at a folder written by "
                             "save_pretrained (config.json, model*.safetensors, tokenizer files)")


def resolve_model_path(uri: str) -> str:
    """A local folder for `models:/name@alias` or `models:/name/version` (downloaded from MLflow), a
    `.gguf` file (converted once to a cached safetensors folder: gguf.py) or a hub id (downloaded,
    safetensors and configs only; needs network); a local folder as it is."""
    from dpoflow.gguf import gguf_folder, is_gguf

    if is_gguf(uri):
        return str(gguf_folder(uri))
    if uri.startswith("models:/"):
        from dpoflow.mlflow_registry import download_model

        return download_model(uri)
    if Path(uri).exists():
        return uri
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(uri, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as error:
        raise ModelLoadError(f"{uri!r} is neither a local folder nor a reachable hub model ({error})") from error


def load_tokenizer(uri: str):
    """The tokenizer of a model folder. Completions end at its eos token, so one is required; a
    missing pad token becomes the eos token (as TRL does: padding is masked by length, never by id)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(uri))
    if tokenizer.eos_token is None:
        raise ModelLoadError(f"the tokenizer of {uri} has no eos_token: completions could never end. Set one and "
                             "save it (tokenizer.eos_token = '</s>'; tokenizer.save_pretrained(folder)) or use the "
                             "model's original tokenizer files")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(uri: str, *, allow_pickle: bool = False, trust_remote_code: bool = False, dtype=None):
    """Load a causal LM from a local folder, a hub id (online only) or a models:/ URI."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(uri)
    if Path(path).is_dir():
        _check_weights(Path(path), allow_pickle)
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, use_safetensors=None if allow_pickle else True, trust_remote_code=trust_remote_code,
            dtype=dtype,
        )
    except OSError as error:
        raise ModelLoadError(f"cannot load model {uri!r}: {error}") from error
