"""SFT -> reference, and preference pairs sampled from it and judged (the DPO paper's protocol)."""

import json

import pandas as pd
import pytest
import torch

from conftest import assert_same_weights
from dpoflow.config import DataConfig, ModelConfig, PrefsConfig, SftConfig
from dpoflow.data.step import run_data
from dpoflow.lm.logprobs import IGNORE
from dpoflow.modeling import ModelLoadError, load_model, load_tokenizer
from dpoflow.preferences import run_prefs
from dpoflow.sft import encode_example, run_sft


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    run_data(DataConfig(demo={"n_reviews": 600}, eval_fraction=0.2), root / "data")
    cfg = SftConfig(max_steps=60, per_device_batch_size=16, learning_rate=5e-3, max_length=96, log_every=10)
    summary = run_sft(cfg, ModelConfig(preset="tiny", vocab_size=400), root / "data", root / "sft")
    return root, summary


def test_tokenizer_and_model_build(demo):
    root, _ = demo
    tokenizer = load_tokenizer(str(root / "sft" / "base"))
    ids = tokenizer("The movie was great.", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "The movie was great." and len(ids) < 10  # BPE merged the corpus words
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None and tokenizer.chat_template
    model = load_model(str(root / "sft" / "base"))
    assert model.config.model_type == "llama" and model.config.vocab_size == len(tokenizer)


def test_sft_lowers_held_out_nll(demo):
    _, summary = demo
    assert summary["eval_nll"] < summary["eval_nll_before"] - 1.5  # from ~6 nats/token (uniform) down
    assert summary["eval_nll"] < 4.0


def test_conversational_sft_masks_non_assistant_tokens(demo):
    root, _ = demo
    tokenizer = load_tokenizer(str(root / "sft" / "base"))
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Rate it."},
                {"role": "assistant", "content": "Great film."}, {"role": "user", "content": "Why?"},
                {"role": "assistant", "content": "Fun plot."}]
    ids, labels = encode_example(tokenizer, {"messages": json.dumps(messages)}, 256)
    assert len(ids) == len(labels)
    trained = tokenizer.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])
    assert trained == "<|assistant|>Great film.<|eos|><|assistant|>Fun plot.<|eos|>"
    ignored = tokenizer.decode([i for i, lab in zip(ids, labels) if lab == IGNORE])
    assert "Rate it." in ignored and "Be kind." in ignored and "Great film" not in ignored
    # prompt/completion rows: only completion + EOS carry loss
    ids, labels = encode_example(tokenizer, {"prompt": "The movie", "completion": " was fun."}, 64)
    assert tokenizer.decode([i for i, lab in zip(ids, labels) if lab != IGNORE]) == " was fun.<|eos|>"


def test_packed_sft_loss_equals_the_padded_full_logits_loss(demo):
    from dpoflow.lm.logprobs import SequenceLogProbs, pad_right
    from dpoflow.sft import _token_nll, collate

    root, _ = demo
    tokenizer = load_tokenizer(str(root / "sft" / "model"))
    model = load_model(str(root / "sft" / "model")).eval()
    rows = pd.read_parquet(root / "data" / "train.parquet").fillna("").to_dict(orient="records")[:24]
    examples = [encode_example(tokenizer, row, 96) for row in rows]
    packed = collate(examples, range(24), tokenizer.pad_token_id)
    assert packed["input_ids"].shape[0] < 24  # several examples per row
    padded = pad_right([ids for ids, _ in examples], [labels for _, labels in examples], tokenizer.pad_token_id)
    with torch.no_grad():
        nll, count = _token_nll(SequenceLogProbs(model), packed)
        unpacked, _ = _token_nll(SequenceLogProbs(model), collate(examples, range(24), tokenizer.pad_token_id, pack=False))
        blocks, _ = _token_nll(SequenceLogProbs(model), collate(examples, range(24), tokenizer.pad_token_id, blocks=True))
        logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits[:, :-1]
        labels = padded["labels"][:, 1:]
        expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                     ignore_index=IGNORE, reduction="sum")
    assert count.item() == (labels != IGNORE).sum().item()
    assert nll.item() == pytest.approx(expected.item(), rel=1e-5)
    assert unpacked.item() == pytest.approx(expected.item(), rel=1e-5)
    assert blocks.item() == pytest.approx(expected.item(), rel=1e-5)


def test_pairs_respect_min_gap_and_are_deterministic(demo):
    root, _ = demo
    cfg = PrefsConfig(k=4, min_gap=0.2, max_new_tokens=24, max_prompts=40, max_eval_prompts=10)
    first = run_prefs(cfg, root / "data", root / "sft" / "model", root / "prefs_a")
    run_prefs(cfg, root / "data", root / "sft" / "model", root / "prefs_b")
    a = pd.read_parquet(root / "prefs_a" / "train.parquet")
    b = pd.read_parquet(root / "prefs_b" / "train.parquet")
    pd.testing.assert_frame_equal(a, b)
    assert len(a) > 0 and (a.chosen_score >= a.rejected_score + 0.2).all()
    assert first["train"]["prompts"] == 40 and first["train"]["pairs"] + sum(first["train"]["dropped"].values()) == 40
    other = run_prefs(cfg.model_copy(update={"seed": 1}), root / "data", root / "sft" / "model", root / "prefs_c")
    assert not pd.read_parquet(root / "prefs_c" / "train.parquet").equals(a) and other


def test_pickle_checkpoint_is_refused(demo, tmp_path):
    root, _ = demo
    model = load_model(str(root / "sft" / "model"))
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # a pickle checkpoint, as older tools write
    with pytest.raises(ModelLoadError, match="only pickle weights.*allow_pickle: true"):
        load_model(str(tmp_path))
    loaded = load_model(str(tmp_path), allow_pickle=True)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_model_code_in_a_checkpoint_never_runs_unless_trusted(demo, tmp_path):
    """A checkpoint that ships its own model code (auto_map to a .py in the folder): loading it with
    the defaults refuses and runs none of that code; model.trust_remote_code: true runs it."""
    root, _ = demo
    marker = tmp_path / "the checkpoint's code ran"
    folder = tmp_path / "remote"
    model = load_model(str(root / "sft" / "model"))
    model.save_pretrained(folder)
    (folder / "custom_llama.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom_llama'\n\n\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="custom_llama", architectures=["CustomModel"],
                  auto_map={"AutoConfig": "custom_llama.CustomConfig", "AutoModelForCausalLM": "custom_llama.CustomModel"})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(str(folder))
    assert not marker.exists()
    assert not ModelConfig().trust_remote_code  # off unless set
    loaded = load_model(str(folder), trust_remote_code=True)
    assert marker.exists() and type(loaded).__name__ == "CustomModel"
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_models_uri_through_sqlite_mlflow(demo, tmp_path, monkeypatch):
    from dpoflow.mlflow_registry import register_model_dir

    root, _ = demo
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlruns.db'}")
    monkeypatch.chdir(tmp_path)  # artifacts land under ./mlartifacts of this temp dir
    version = register_model_dir(str(root / "sft" / "model"), "demo-reference", alias="champion")
    assert version == "1"
    loaded = load_model("models:/demo-reference@champion")
    original = load_model(str(root / "sft" / "model"))
    assert torch.equal(loaded.lm_head.weight, original.lm_head.weight)
    assert load_tokenizer("models:/demo-reference/1").eos_token == "<|eos|>"
    with pytest.raises(ValueError, match="cannot resolve models:/nope@champion"):
        load_model("models:/nope@champion")


def test_sft_resume_from_checkpoint_is_exact(demo, tmp_path):
    import shutil


    root, _ = demo
    base = ModelConfig(base=str(root / "sft" / "base"))
    cfg = SftConfig(max_steps=8, per_device_batch_size=8, learning_rate=1e-3, max_length=64, checkpoint_every=4,
                    scheduler="cosine", warmup_steps=2)
    run_sft(cfg, base, root / "data", tmp_path / "full")
    assert (tmp_path / "full" / "checkpoints" / "step-4" / "trainer_state.json").exists()
    # a run that stopped at step 4: only its checkpoint exists, then --resume finishes it
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-4", tmp_path / "resumed" / "checkpoints" / "step-4")
    run_sft(cfg, base, root / "data", tmp_path / "resumed", resume=True)
    assert_same_weights(tmp_path / "full", tmp_path / "resumed", atol=1e-6)
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps[0] == 5  # steps 1-4 were not re-run


@pytest.mark.slow
def test_sft_two_processes_equal_one(demo, tmp_path):
    """The SFT loss is normalised by the token count of the whole global batch: 2 gloo processes x 4
    sequences give the same weights as 1 process x 8."""
    import subprocess
    import sys
    from pathlib import Path


    root, _ = demo
    settings = dict(max_steps=4, per_device_batch_size=8, learning_rate=1e-3, max_length=64, seed=2, warmup_steps=1,
                    scheduler="linear", log_every=1, gradient_accumulation_steps=1)  # one schedule step per step
    run_sft(SftConfig(**settings), ModelConfig(base=str(root / "sft" / "base")), root / "data", tmp_path / "one")
    overrides = {**settings, "per_device_batch_size": 4}
    command = [str(Path(sys.executable).parent / "dpoflow"), "sft", "--num-processes", "2",
               "-c", str(Path(__file__).resolve().parents[1] / "params.yaml"), "--data", str(root / "data"),
               "--out", str(tmp_path / "two"), f"--set=model.base={root / 'sft' / 'base'}"]
    command += [f"--set=sft.{k}={v}" for k, v in overrides.items()]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # grad_norm (before clipping) first: weights after clipped AdamW barely see a lost `* world`
    steps = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)] for d in ("one", "two")]
    assert len(steps[0]) == len(steps[1]) == 4
    for a, b in zip(*steps):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["learning_rate"] == pytest.approx(b["learning_rate"], abs=1e-9)
    assert_same_weights(tmp_path / "one", tmp_path / "two", atol=1e-5)


def test_unknown_model_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="neither a local folder nor a reachable hub model"):
        load_model("someone/not-a-model")
