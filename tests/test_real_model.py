"""A real pretrained model: SmolLM2-135M-Instruct from its GGUF file (`make real-model`), converted once
to a safetensors folder (modeling.gguf_folder) and taken through the pipeline."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpoflow.data.sources import file_md5
from dpoflow.modeling import ModelLoadError, gguf_folder, load_model, load_tokenizer

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_gguf_file_becomes_the_same_model_as_a_cached_safetensors_folder(smollm2):
    import torch
    from transformers import AutoModelForCausalLM

    lines = []
    folder = gguf_folder(smollm2, log=lines.append)
    md5 = file_md5(smollm2)
    assert json.loads((folder / "source.json").read_text()) == {"gguf": smollm2.name, "md5": md5, "architecture": "llama"}
    assert folder.name.endswith(md5[:12]) and not list(folder.parent.glob("*.tmp-*"))
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == 49152
    assert config["tie_word_embeddings"] and "quantization_config" not in config

    # every step reads it through the usual loaders; a second use converts nothing
    again = []
    assert gguf_folder(smollm2, log=again.append) == folder and again == []
    tokenizer, model = load_tokenizer(str(smollm2)), load_model(str(smollm2))
    assert tokenizer.eos_token == "<|im_end|>" and "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied

    # the same function as transformers' own GGUF model: equal logits, bit for bit
    reference = AutoModelForCausalLM.from_pretrained(smollm2.parent, gguf_file=smollm2.name, dtype=torch.float32)
    ids = tokenizer("The movie was", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
        greedy = model.generate(ids, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(greedy[0, ids.shape[1]:])
    assert sum(c.isalpha() or c.isspace() for c in text) > 0.8 * len(text), text  # words, not noise


def test_gguf_files_it_cannot_read_are_refused_by_name(tmp_path):
    import gguf

    with pytest.raises(ModelLoadError, match="missing.gguf: no such GGUF file.*make real-model"):
        gguf_folder(tmp_path / "missing.gguf")
    (tmp_path / "notes.gguf").write_text("not a model")
    with pytest.raises(ModelLoadError, match="notes.gguf: not a readable GGUF model file"):
        gguf_folder(tmp_path / "notes.gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "rwkv.gguf"), "rwkv6")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="rwkv.gguf: GGUF architecture 'rwkv6' cannot be dequantized.*llama"):
        gguf_folder(tmp_path / "rwkv.gguf")
    assert not (Path(os.environ["DPOFLOW_CACHE"]) / "gguf" / "rwkv").exists()


# the CI slice of the real model's pipeline: the demo's review openings as prompts, pairs sampled from
# SmolLM2 itself and judged, its cached log-probs, 2 DPO steps, evaluation, registry
SLICE = ["run.name=smol", "run.betas=[0.1]", "data.demo.n_reviews=200", "sft.enabled=false", "prefs.k=2",
         "prefs.min_gap=0.0", "prefs.max_prompts=8", "prefs.max_eval_prompts=4", "prefs.max_new_tokens=12",
         "dpo.max_steps=2", "dpo.per_device_batch_size=4", "dpo.max_length=64", "dpo.learning_rate=1e-5",
         "dpo.warmup_steps=0", "dpo.log_every=1", "eval.max_prompts=8", "eval.max_new_tokens=12"]


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory):
    """`dpoflow run` of SLICE on SmolLM2: (tmp folder, its terminal output, its tracking URI)."""
    from conftest import SMOLLM2, require

    require("" if SMOLLM2.is_file() else f"{SMOLLM2.name} is missing: run `make real-model`")
    tmp_path = tmp_path_factory.mktemp("smol")
    # every progress line is written (meter.py), so that a short run shows them all
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "DPOFLOW_PROGRESS_EVERY_S": "0",
           "DPOFLOW_CACHE": str(tmp_path_factory.getbasetemp().parent / "dpoflow_cache")}
    args = [str(Path(sys.executable).parent / "dpoflow"), "run", "-c", str(ROOT / "params.yaml"),
            f"--set=run.output_dir={tmp_path}", f"--set=model.base={SMOLLM2}"] + [f"--set={s}" for s in SLICE]
    result = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp_path, result.stdout, env["MLFLOW_TRACKING_URI"]


@pytest.mark.slow
def test_smollm2_gguf_through_the_whole_pipeline_with_its_lineage(smol_run, smollm2):
    from dpoflow.registry import model_card

    tmp_path, stdout, tracking_uri = smol_run
    run = tmp_path / "smol"
    # progress of every long loop, on the step's terminal line and in the task's log
    for line in ("prefs: sample (train): 16/16 samples", "prefs: judge (train): 8/8 prompts", "reference: score: 8/8 pairs",
                 "dpo beta-0.1: dpo: 2/2 steps", "eval beta-0.1: generate (policy): 8/8 samples",
                 "eval beta-0.1: generate (reference): 8/8 samples"):
        assert line in stdout, line
    assert "dpo: 1/2 steps" in (run / "kfp.log").read_text()

    import pandas as pd

    pairs = pd.read_parquet(run / "prefs" / "train.parquet")
    assert len(pairs) == 8 and (pairs.chosen != pairs.rejected).all()
    text = "".join(pairs.chosen) + "".join(pairs.rejected)  # a pretrained model's samples: words, not noise
    assert sum(c.isalpha() or c.isspace() for c in text) > 0.8 * len(text), text[:500]

    # step 1 starts from the reference itself: the policy's log-probs equal the cached reference's
    first = json.loads((run / "dpo" / "beta-0.1" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and abs(first["loss"] - math.log(2)) < 1e-4 and abs(first["rewards/margins"]) < 1e-3
    assert -200 < first["logps/chosen"] < -1  # summed over ~12 real tokens of a 49,152-token vocabulary

    policy = run / "dpo" / "beta-0.1" / "model"
    assert json.loads((policy / "config.json").read_text())["vocab_size"] == 49152
    assert load_tokenizer(str(policy)).chat_template == load_tokenizer(str(smollm2)).chat_template

    from mlflow import MlflowClient

    tags = MlflowClient(tracking_uri=tracking_uri).get_model_version("dpoflow-demo", "1").tags
    md5 = file_md5(smollm2)
    assert tags["dpoflow.base_model"] == str(smollm2) and tags["dpoflow.base_md5"] == md5
    assert f"- base model: {smollm2} (md5 {md5})" in model_card("dpoflow-demo", "1", tags)



@pytest.mark.slow
def test_the_smollm2_champion_answers_chat_requests_under_mlflow_serve(smol_run, monkeypatch):
    """The registered SmolLM2 policy, promoted, served: a chat request is answered with the assistant's
    reply (the template applied on the server), the same as the model answers in process; bounded
    load (16 requests, 4 at a time) is answered in full."""
    from dpoflow import mlflow_registry
    from dpoflow.registry import run_promote
    from dpoflow.serving import Policy
    from dpoflow_bench.serve import chat_requests, load, mlflow_serve, post

    _, _, tracking_uri = smol_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    run_promote("dpoflow-demo", "1", force=True, log=lambda *_: None)  # the slice's gate refused it (2 steps)
    local = mlflow_registry.download_model("models:/dpoflow-demo@champion")
    chat = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Write one sentence about a movie you loved."}]
    settings = {"max_new_tokens": 16, "temperature": 0.0}
    expected = Policy(local).predict({"messages": [chat]}, settings).completion[0]
    assert sum(c.isalpha() or c.isspace() for c in expected) > 0.8 * len(expected) and "<|im" not in expected
    with mlflow_serve("models:/dpoflow-demo@champion", tracking_uri) as port:
        assert post(port, {"dataframe_records": [{"messages": chat}], "params": settings})[0]["completion"] == expected
        report = load(port, chat_requests(16, max_new_tokens=8), concurrency=4)
    print("load:", json.dumps(report))
    assert (report["answered"], report["errors"]) == (16, 0), report


def _conversations():
    """UltraFeedback-shaped pairs: a system turn, an earlier exchange, the last user turn; two replies."""
    import pandas as pd

    rows = [("Name a fruit.", "Apple.", "Another one?", "Pear.", "I do not know any fruit."),
            ("Say hello.", "Hello!", "Now in French.", "Bonjour !", "Hello again."),
            ("What is 2 + 2?", "4.", "And 3 + 3?", "6.", "It is 7, I think."),
            ("Describe the sea.", "Blue and vast.", "Shorter, please.", "Vast.", "The sea is a large body of water.")]
    frame = [{"prompt": turn, "chosen": good, "rejected": bad, "prompt_messages": json.dumps(
        [{"role": "system", "content": "You are a concise assistant."}, {"role": "user", "content": first},
         {"role": "assistant", "content": answer}, {"role": "user", "content": turn}])}
        for first, answer, turn, good, bad in rows]
    return pd.DataFrame(frame)


@pytest.mark.slow
def test_chat_pairs_on_smollm2s_template_score_the_reply_and_match_trl(tmp_path, smollm2):
    """Through SmolLM2's real chat template and 49,152-token vocabulary: the scored tokens are exactly
    the assistant's reply after the template's generation prompt, closed by the eos token the model
    emits; the first DPO step gives TRL DPOTrainer's loss, rewards and log-probs (policy != reference)."""
    import torch

    from dpoflow.dpo.losses import preference_loss
    from dpoflow.dpo.reference import compute_logps
    from dpoflow.lm.logprobs import encode_completions, tokenize_prompt
    from test_dpo_parity import _trl_first_step

    tokenizer, reference = load_tokenizer(str(smollm2)), load_model(str(smollm2))
    pairs = _conversations()
    for row in pairs.itertuples():
        generation_prompt = tokenizer.apply_chat_template(json.loads(row.prompt_messages), tokenize=False,
                                                          add_generation_prompt=True)
        assert generation_prompt.startswith("<|im_start|>system\nYou are a concise assistant.<|im_end|>\n")
        assert generation_prompt.endswith(f"{row.prompt}<|im_end|>\n<|im_start|>assistant\n")
        prompt_ids, (chosen_ids, rejected_ids) = encode_completions(tokenizer, row.prompt, row.prompt_messages,
                                                                    [row.chosen, row.rejected])
        assert prompt_ids == tokenize_prompt(tokenizer, row.prompt, row.prompt_messages)
        assert tokenizer.decode(prompt_ids) == generation_prompt
        for reply, ids in ((row.chosen, chosen_ids), (row.rejected, rejected_ids)):
            # the reply's own tokens, the end of turn as one token (the eos generation stops at), and the
            # template's newline after it (TRL scores the same conversation tokens)
            assert ids[:-2] == tokenizer(reply, add_special_tokens=False).input_ids
            assert ids[-2] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
            assert tokenizer.decode(ids[-1:]) == "\n"

    policy = load_model(str(smollm2))
    torch.manual_seed(0)
    with torch.no_grad():  # a policy that differs from the reference, so the loss is not ln 2
        for parameter in policy.model.layers[-1].parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    theirs = _trl_first_step(tmp_path, (tokenizer, reference, policy), pairs, ["sigmoid"])
    ours_policy = compute_logps(policy.eval(), tokenizer, pairs, 128, "keep_start")[0].float()
    ours_reference = compute_logps(reference.eval(), tokenizer, pairs, 128, "keep_start")[0].float()
    losses, chosen, rejected = preference_loss(ours_policy[:, 0], ours_policy[:, 1], ours_reference[:, 0],
                                               ours_reference[:, 1], beta=0.1, loss_type="sigmoid")
    assert losses.mean().item() == pytest.approx(theirs["loss"], abs=1e-4)
    assert chosen.mean().item() == pytest.approx(theirs["rewards/chosen"], abs=1e-4)
    assert rejected.mean().item() == pytest.approx(theirs["rewards/rejected"], abs=1e-4)
    assert ours_policy[:, 0].mean().item() == pytest.approx(theirs["logps/chosen"], abs=1e-3)
    assert ours_policy[:, 1].mean().item() == pytest.approx(theirs["logps/rejected"], abs=1e-3)
    assert abs(theirs["loss"] - math.log(2)) > 1e-3  # a real comparison, not two copies of ln 2
