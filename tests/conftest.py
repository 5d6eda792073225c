import json
import os
from pathlib import Path

import pytest

# Tests never reach a hub; HF libraries must stay offline and write caches under tmp.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def require(missing: str) -> None:
    """A test whose tool is missing (`missing` says which and how to get it; '' = nothing missing)
    skips — except under CI=true (.ci/run), where it fails: CI runs every test or says what it lacked."""
    if not missing:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{missing} (CI=true: a missing tool fails the run instead of skipping)", pytrace=False)
    pytest.skip(missing)


def write_jsonl(path: Path, rows) -> Path:
    with open(path, "wb") as handle:
        handle.writelines(row if isinstance(row, bytes) else (json.dumps(row) + "\n").encode() for row in rows)
    return path


# Tests that run on the same xdist worker, one after another (`make test` runs two workers, --dist
# loadgroup): every test of the container engine (one engine; a TrainJob's cleanup check looks at all
# of its jobs' containers), and the tests that share a module-scoped fixture (so it is made once).
SERIAL_MODULES = {"test_containers.py": "containers", "test_trainjob.py": "containers"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config, items):
    """Each test's xdist group (see SERIAL_MODULES; a shared fixture's group is named by the most derived
    module fixture a test uses) and the order work is handed out in: the container group first, then the
    other slow work, then the fast (the longest work starts first: no worker is left alone with a long
    test at the end)."""
    def group(item) -> str:
        module = item.path.name
        if module in SERIAL_MODULES:
            return SERIAL_MODULES[module]
        shared = [defs[-1] for defs in item._fixtureinfo.name2fixturedefs.values()
                  if defs and defs[-1].scope == "module" and defs[-1].baseid.endswith(module)]
        if not shared:
            return ""
        last = max(shared, key=lambda d: d.func.__code__.co_firstlineno)
        return f"{module}::{last.argname}"

    units: dict[str, list] = {}  # a group's tests stay together, so its module fixtures are made once
    for item in items:
        name = group(item)
        if name:
            item.add_marker(pytest.mark.xdist_group(name))
        units.setdefault(name or item.nodeid, []).append(item)
    order = sorted(units.items(), key=lambda unit: (unit[0] != "containers",
                                                    all(i.get_closest_marker("slow") is None for i in unit[1])))
    items[:] = [item for _, unit in order for item in unit]  # sorted() is stable: file order within a rank


@pytest.fixture(scope="session")
def learning_process_run(tmp_path_factory):
    """`dpoflow run` of test_pipeline's tiny config with a learning rate that moves the policy (2 β,
    process runner, tracking and registry in `process.db`): what the container runner (test_containers)
    and the 2-node TrainJobs (test_trainjob) must reproduce. (tmp folder, summary)"""
    import subprocess

    from test_pipeline import env_for, run_args

    tmp_path = tmp_path_factory.mktemp("learning_process_run")
    env = {**env_for(tmp_path), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'process.db'}"}
    result = subprocess.run(run_args(tmp_path, *LEARN, "run.name=same"), capture_output=True, text=True, cwd=tmp_path,
                            env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp_path, json.loads((tmp_path / "same" / "summary.json").read_text())


LEARN = ["dpo.learning_rate=0.003", "dpo.max_steps=20"]  # the policy moves: metrics that can differ


@pytest.fixture(autouse=True)
def _hf_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf_home"))
    # converted GGUF models (modeling.gguf_folder) in one folder all workers share: a model is converted once a session
    monkeypatch.setenv("DPOFLOW_CACHE", str(tmp_path_factory.getbasetemp().parent / "dpoflow_cache"))


SMOLLM2 = Path(__file__).parent.parent / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture
def smollm2() -> Path:
    """The real pretrained model `make real-model` installs (SmolLM2-135M-Instruct, 4-bit GGUF)."""
    require("" if SMOLLM2.is_file() else f"{SMOLLM2.name} is missing: run `make real-model`")
    return SMOLLM2


PAIR_WORDS = "great fun lovely dull awful boring superb film movie plot acting was the a and it is".split()


def make_pairs(n: int, seed: int = 0):
    import random

    import pandas as pd

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = " ".join(rng.choice(PAIR_WORDS) for _ in range(rng.randint(2, 6))) + f" {i}"
        chosen = " " + " ".join(rng.choice(PAIR_WORDS[:7]) for _ in range(rng.randint(1, 6)))
        rejected = " " + " ".join(rng.choice(PAIR_WORDS[3:]) for _ in range(rng.randint(1, 8)))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected + " no", "prompt_messages": ""})
    return pd.DataFrame(rows)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama + BPE tokenizer built from a config, saved as safetensors (nothing downloaded)."""
    from dpoflow.modeling import build_model, train_tokenizer

    path = tmp_path_factory.mktemp("tiny_model")
    frame = make_pairs(64, seed=99)
    texts = (frame.prompt + frame.chosen).tolist() + (frame.prompt + frame.rejected).tolist()
    tokenizer = train_tokenizer(texts * 4, vocab_size=320)
    model = build_model(tokenizer, "tiny", seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def pairs_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs")
    make_pairs(16).to_parquet(path / "train.parquet")
    make_pairs(8, seed=1).to_parquet(path / "eval.parquet")
    return vouch(path)


def weights(out: Path) -> dict:
    """A step output's model weights (out/model/model.safetensors)."""
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "model" / "model.safetensors"))


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    """Two step outputs hold the same model: the same tensors, each within `atol`."""
    import torch

    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=atol, rtol=0, msg=name)


def complete_checkpoint(checkpoint: Path) -> bool:
    """A training checkpoint that is whole, as resuming would take it; False while it is being written
    or deleted (training removes older checkpoints while a test looks)."""
    from dpoflow.training import checkpoint_problem

    try:
        return not checkpoint_problem(checkpoint)
    except (OSError, ValueError):
        return False


def vouch(folder):
    """A hand-made step folder, vouched for like a finished step's (steps refuse folders without one)."""
    from dpoflow.manifest import write_manifest

    write_manifest(folder, "test fixture", "hand-made")
    return folder


def _strict(schema):
    """A CRD's structural schema as JSON Schema that, like `kubectl apply --validate=strict`, refuses
    unknown fields (objects with declared properties and no preserve-unknown-fields)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_strict(s) for s in schema]
    return schema


def validate_against_crd(obj: dict, vendored: str) -> None:
    """Validate `obj` offline against a custom resource's own schema, kept in tests/data/<vendored>
    (taken from the project's CRD: the file's `source` names it)."""
    import gzip

    import jsonschema

    document = json.loads(gzip.open(Path(__file__).parent / "data" / vendored).read())
    jsonschema.validate(obj, _strict(document["schema"]))


def full_logit_logp(model, prompt: list[int], completion: list[int]) -> float:
    """log p(completion | prompt) from the model's own forward over that sequence alone, with the
    whole vocabulary's logits in float64 (no chunking, packing or padding): the textbook computation
    dpoflow's scorers must equal."""
    import torch

    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logps = model(input_ids=ids).logits[0, :-1].double().log_softmax(-1)
    return float(logps[len(prompt) - 1:].gather(1, ids[0, len(prompt):, None]).sum())
