"""The registered champion answers generation requests under `mlflow models serve` (a real server on
loopback, stopped after), and the same files still load with plain transformers; `dpoflow deploy`
renders a KServe InferenceService that validates against KServe's schema and reads exactly the
champion's files."""

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from conftest import validate_against_crd
from dpoflow_bench.serve import mlflow_serve, post

BIN = Path(sys.executable).parent


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_the_champion(tmp_path, tiny_model_dir, monkeypatch):
    from dpoflow import mlflow_registry, tracking
    from dpoflow.registry import run_promote, run_register
    from dpoflow.serving import Policy

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    run_id = tracking.start_parent_run("dpoflow", "serve")
    version = run_register(tiny_model_dir, {"win_rate": 0.8, "beta": 0.1}, {"beta": 0.1}, model_name="m",
                           run_id=run_id, log=lambda *_: None)
    run_promote("m", version, force=True, log=lambda *_: None)
    local = mlflow_registry.download_model("models:/m@champion")
    from mlflow.models import Model

    signature = Model.load(str(Path(local) / "MLmodel")).signature
    assert signature.inputs.input_names() == ["prompt", "messages"] and signature.params.params[0].name == "max_new_tokens"
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(local).config.vocab_size > 0  # still plain transformers
    expected = Policy(local).predict({"prompt": ["the film was", "a movie"]}, {"max_new_tokens": 6, "seed": 3})

    with mlflow_serve("models:/m@champion", uri) as port:
        request = {"dataframe_records": [{"prompt": "the film was"}, {"prompt": "a movie"}],
                   "params": {"max_new_tokens": 6, "seed": 3}}
        predictions = post(port, request)
        print("served:", json.dumps(request), "->", json.dumps(predictions))
        assert [p["completion"] for p in predictions] == expected["completion"].tolist()  # the same seeded samples
        assert all(isinstance(p["completion"], str) for p in predictions)
        bad = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(
            {"dataframe_records": [{"prompt": "x"}], "params": {"max_new_tokens": "many"}}).encode(),
            headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bad, timeout=60)
        assert refused.value.code == 400
        # chat messages: the model's template applied on the server (the demo model has one too)
        chat = [{"role": "user", "content": "the film was"}]
        served = post(port, {"dataframe_records": [{"messages": chat}], "params": {"max_new_tokens": 6, "seed": 3}})
        assert served[0]["completion"] == Policy(local).predict({"messages": [chat]}, {"max_new_tokens": 6, "seed": 3}
                                                                ).completion[0]


def validate_inference_service(obj: dict) -> None:
    validate_against_crd(obj, "kserve-inferenceservice-v1beta1.json.gz")
    assert len(obj["metadata"]["name"]) <= 45 and obj["metadata"]["name"].replace("-", "").isalnum()


def test_the_inference_service_schema_refuses_what_a_cluster_would():
    import jsonschema

    from dpoflow.deploy import inference_service

    good = inference_service(model_name="m", version={"version": "3", "tags": {}}, alias="champion", uri="s3://b/m")
    validate_inference_service(good)
    typo = json.loads(json.dumps(good))
    typo["spec"]["predictor"]["model"]["storageURI"] = typo["spec"]["predictor"]["model"].pop("storageUri")
    with pytest.raises(jsonschema.ValidationError, match="storageURI"):
        validate_inference_service(typo)
    wrong_type = json.loads(json.dumps(good))
    wrong_type["spec"]["predictor"]["minReplicas"] = "one"
    with pytest.raises(jsonschema.ValidationError, match="'one' is not of type 'integer'"):
        validate_inference_service(wrong_type)


@pytest.mark.slow
def test_deploy_serves_the_champions_own_files_and_follows_a_promotion(tmp_path, tiny_model_dir, monkeypatch):
    """`dpoflow deploy` against a real MLflow server that proxies its artifacts: the InferenceService
    validates against KServe's schema and its storageUri is where that version's weights really are
    (mapped back to the server's artifact folder, they load and hash to the version's model_sha); a
    new champion gives a new storageUri; bad input is named."""
    import yaml

    from dpoflow import tracking
    from dpoflow.manifest import model_sha
    from dpoflow.pipeline.containers import mlflow_server
    from dpoflow.registry import run_promote, run_register
    from test_registry import _model_copy

    monkeypatch.chdir(tmp_path)
    artifacts = tmp_path / "artifacts"
    with mlflow_server(f"sqlite:///{tmp_path / 'mlflow.db'}", artifacts, tmp_path / "server.log") as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
        versions = []
        for seed in (1, 2):
            run_id = tracking.start_parent_run("dpoflow", f"deploy-{seed}")
            folder = _model_copy(tiny_model_dir, tmp_path / f"m{seed}", seed)
            versions.append(run_register(folder, {"win_rate": 0.8, "beta": 0.1}, {"beta": 0.1}, model_name="m",
                                         run_id=run_id, log=lambda *_: None))

        def deploy(*extra):
            return subprocess.run([str(BIN / "dpoflow"), "deploy", "--set", "registry.model_name=m", *extra],
                                  capture_output=True, text=True, env=env, cwd=tmp_path)

        missing = deploy("--artifact-root", "s3://mlflow/artifacts")
        assert missing.returncode == 1 and f"models:/m@champion is not in the MLflow registry at {url}" in missing.stderr

        for version, seed in zip(versions, (1, 2), strict=True):
            run_promote("m", version, force=True, log=lambda *_: None)
            no_root = deploy()
            assert no_root.returncode == 1 and "give --artifact-root" in no_root.stderr
            done = deploy("--artifact-root", "s3://mlflow/artifacts/", "--namespace", "serving", "-o", "isvc.yaml")
            assert done.returncode == 0, done.stderr
            service = yaml.safe_load((tmp_path / "isvc.yaml").read_text())
            validate_inference_service(service)
            annotations, model = service["metadata"]["annotations"], service["spec"]["predictor"]["model"]
            assert annotations["dpoflow/version"] == version and annotations["dpoflow/alias"] == "champion"
            assert service["metadata"] == {**service["metadata"], "name": "m", "namespace": "serving"}
            assert model["modelFormat"] == {"name": "huggingface"} and "--model_name=m" in model["args"]
            assert model["storageUri"].startswith("s3://mlflow/artifacts/") and "//" not in model["storageUri"][5:]
            files = artifacts / model["storageUri"].removeprefix("s3://mlflow/artifacts/")
            assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in files.iterdir()}
            assert model_sha(files) == model_sha(tmp_path / f"m{seed}") == annotations["dpoflow/model-sha"]
            from transformers import AutoModelForCausalLM

            assert AutoModelForCausalLM.from_pretrained(files).config.vocab_size > 0
            assert f"serving m v{version} from {model['storageUri']}" in done.stdout
        cpu = yaml.safe_load(deploy("--version", versions[0], "--storage-uri", "pvc://models/m1", "--gpus", "0").stdout)
        validate_inference_service(cpu)
        assert cpu["spec"]["predictor"]["model"]["storageUri"] == "pvc://models/m1"
        assert "--backend=huggingface" in cpu["spec"]["predictor"]["model"]["args"]
        assert "nvidia.com/gpu" not in cpu["spec"]["predictor"]["model"]["resources"]["limits"]
        assert cpu["metadata"]["annotations"]["dpoflow/version"] == versions[0]
