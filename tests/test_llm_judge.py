"""The OpenAI-compatible judge against a real local HTTP server speaking the chat-completions protocol."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dpoflow.evaluation.judges import LLMJudge


class _Handler(BaseHTTPRequestHandler):
    calls: list = []
    flaky_seen: set = set()

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        content = body["messages"][0]["content"]
        type(self).calls.append({"path": self.path, "auth": self.headers.get("Authorization"), "content": content})
        if "ALWAYS-FAILS" in content:
            self.send_response(500)
            self.end_headers()
            return
        if "FLAKY" in content and content not in type(self).flaky_seen:  # fails once, then answers
            type(self).flaky_seen.add(content)
            self.send_response(503)
            self.end_headers()
            return
        first = content.split("Completion 1:")[1].split("Completion 2:")[0]
        answer = "maybe" if "GIBBERISH" in content else ("1" if "great" in first else "2")
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Handler.calls.clear()
    _Handler.flaky_seen.clear()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_llm_judge_protocol_order_retries_and_failures(server, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "secret")
    sleeps = []
    judge = LLMJudge(server, "judge-model", api_key_env="JUDGE_KEY", max_retries=2, backoff_s=0.5, sleep=sleeps.append)
    prompts = ["p1", "p2", "p3", "p4 ALWAYS-FAILS", "p5 FLAKY", "p6 GIBBERISH"]
    policy = ["a great film"] * 6
    reference = ["a dull film"] * 6
    verdicts = judge.compare(prompts, policy, reference)
    # the judge prefers "great" wherever it sits, so every judged item is a policy win
    assert verdicts == [1.0, 1.0, 1.0, None, 1.0, None]
    assert set(judge.last_orders) == {"AB", "BA"}  # the A/B order was randomised (seeded) and recorded
    assert judge.last_failures[3].startswith("HTTPError") and "unparseable answer 'maybe'" in judge.last_failures[5]
    assert sleeps == [0.5, 1.0, 0.5]  # 2 backoffs for the failing item, 1 for the flaky one
    assert all(c["auth"] == "Bearer secret" and c["path"] == "/v1/chat/completions" for c in _Handler.calls)
    assert len(_Handler.calls) == 3 + 3 + 2 + 1  # ok items, failing item (1+2 retries), flaky (2), gibberish
    # the same seed gives the same orders
    again = LLMJudge(server, "judge-model", api_key_env="JUDGE_KEY", max_retries=0, sleep=sleeps.append)
    again.compare(prompts[:3], policy[:3], reference[:3])
    assert again.last_orders == judge.last_orders[:3]


def test_failed_items_are_not_wins_in_the_win_rate(server):
    from dpoflow.evaluation.stats import win_rate_summary

    judge = LLMJudge(server, "m", max_retries=0, sleep=lambda s: None)
    verdicts = judge.compare(["x ALWAYS-FAILS", "y"], ["great", "dull"], ["dull", "great"])
    assert verdicts == [None, 0.0]
    judged = [v for v in verdicts if v is not None]
    assert win_rate_summary(judged)["win_rate"] == 0.0 and win_rate_summary(judged)["n_prompts"] == 1


def test_run_eval_with_the_llm_judge(server, tmp_path, tiny_model_dir):
    import pandas as pd

    from dpoflow.config import DataConfig, EvalConfig
    from dpoflow.data.step import run_data
    from dpoflow.evaluation.evaluate import run_eval

    run_data(DataConfig(demo={"n_reviews": 300}, eval_fraction=0.5), tmp_path / "data")
    cfg = EvalConfig(judge="llm", max_prompts=12, max_new_tokens=8,
                     llm_judge={"base_url": server, "model": "judge", "max_retries": 0})
    metrics = run_eval(cfg, tiny_model_dir, tiny_model_dir, tmp_path / "data", tmp_path / "eval", beta=0.1)
    # identical models and seeds give identical completions, so the fake judge's answer depends only on
    # the text ("1" if it holds "great", else "2"); the verdict must follow the recorded A/B order
    samples = pd.read_parquet(tmp_path / "eval" / "samples.parquet")
    assert (samples.policy == samples.reference).all()
    first_wins = ["great" in text for text in samples.policy]
    expected = [float(first == (order == "AB")) for first, order in zip(first_wins, samples.judge_order)]
    assert samples.verdict.tolist() == expected and set(samples.judge_order) == {"AB", "BA"}
    assert metrics["n_prompts"] == 12 and metrics["judge_failures"] == 0 and "reward_margin" not in metrics
    assert metrics["win_rate"] == pytest.approx(sum(expected) / 12)
    assert "data:image/png" in (tmp_path / "eval" / "report.html").read_text()
