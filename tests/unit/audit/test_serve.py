"""The OpenAI-compatible server (`mechflow.audit.serve`) over real loopback HTTP with SmolLM2.

Each SmolLM2 forward pass costs ~0.2 s on two cores, so every generation here is a few tokens long.
"""

import json
import time

import httpx
import pytest
import torch

from mechflow.audit.serve import (
    FaultPlan,
    ServerStats,
    chat_prompt_ids,
    create_app,
    end_token_ids,
    generate,
    load_served_model,
    main,
    serve_in_thread,
)

NAME = "smollm2_135m"
PROMPT = "The capital of France is"
KEY = "sk-mechflow-test-9f3b2c71"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(smollm2):
    """(app, base URL) of one server for the module; faults and stats are reset per test."""
    app = create_app(smollm2, model_name=NAME)
    with serve_in_thread(app) as url:
        yield app, url


@pytest.fixture
def app(served):
    app, _ = served
    app.state.faults = FaultPlan()
    app.state.stats = ServerStats()
    return app


@pytest.fixture
def client(served, app):
    with httpx.Client(base_url=served[1], timeout=60) as c:
        yield c


def complete(client, headers=None, timeout=httpx.USE_CLIENT_DEFAULT, **body):
    """POST /completions: PROMPT, one greedy token unless `body` says otherwise."""
    return client.post("/completions", headers=headers, timeout=timeout,
                       json={"model": NAME, "prompt": PROMPT, "max_tokens": 1, "temperature": 0, **body})


def argmax_loop(model, ids: list[int], n: int, end_ids=frozenset()) -> list[int]:
    """Greedy tokens by full forward passes (no key-value cache), stopping before an end token."""
    toks, out = torch.tensor([ids]), []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(toks)[0, -1].argmax())
            if nxt in end_ids:
                break
            out.append(nxt)
            toks = torch.cat([toks, torch.tensor([[nxt]])], dim=1)
    return out


def hf_chat_ids(tokenizer, messages) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_models_list(client):
    r = client.get("/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    (entry,) = body["data"]
    assert entry["id"] == NAME and entry["object"] == "model" and entry["owned_by"] == "mechflow"
    assert isinstance(entry["created"], int)


def test_greedy_completion_equals_no_cache_argmax_loop(client, app, smollm2):
    r = complete(client, max_tokens=4)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == NAME
    assert set(body) == {"id", "object", "created", "model", "choices", "usage"}
    (choice,) = body["choices"]
    ids = smollm2.to_tokens(PROMPT)[0].tolist()
    ref = argmax_loop(smollm2.model, ids, 4, app.state.end_token_ids)
    assert choice["text"] == smollm2.tokenizer.decode(ref)
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["finish_reason"] == ("length" if len(ref) == 4 else "stop")
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 4, "total_tokens": len(ids) + 4}
    assert app.state.stats.model_calls == 1 and app.state.stats.requests == 1


def test_top_logprobs_are_the_models_log_softmax(client, smollm2):
    r = complete(client, logprobs=5)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    with torch.no_grad():
        expected = torch.log_softmax(smollm2.model(smollm2.to_tokens(PROMPT))[0, -1], dim=-1)
    values, ids = expected.topk(5)
    (top,) = lp["top_logprobs"]
    assert list(top) == [smollm2.tokenizer.decode([int(i)]) for i in ids]
    assert list(top.values()) == sorted(top.values(), reverse=True)
    assert list(top.values()) == pytest.approx(values.tolist(), abs=1e-4)
    (token,) = lp["tokens"]
    assert token in top and lp["token_logprobs"][0] == top[token]
    assert token == smollm2.tokenizer.decode([int(ids[0])])  # greedy: the most likely token
    assert lp["text_offset"] == [len(PROMPT)]


def test_prompt_list_gives_one_choice_per_prompt(client):
    r = client.post("/completions", json={"model": NAME, "prompt": [PROMPT, "One, two,"], "max_tokens": 1,
                                          "temperature": 0})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert choices[0]["text"] == complete(client).json()["choices"][0]["text"]


def test_chat_shape_and_prompt_ids_match_hf_template(client, smollm2):
    tok = smollm2.tokenizer
    messages = [{"role": "user", "content": "Is the sky blue? Answer yes or no."}]
    ids = hf_chat_ids(tok, messages)
    assert chat_prompt_ids(tok, messages) == ids
    longer = [{"role": "system", "content": "Be brief."}, *messages, {"role": "assistant", "content": "Yes."},
              {"role": "user", "content": "Why?"}]
    assert chat_prompt_ids(tok, longer) == hf_chat_ids(tok, longer)

    r = client.post("/chat/completions", json={"model": NAME, "messages": messages, "max_tokens": 3,
                                               "temperature": 0, "logprobs": True, "top_logprobs": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == NAME
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant"
    ref = argmax_loop(smollm2.model, ids, 3, end_token_ids(tok))
    assert choice["message"]["content"] == tok.decode(ref)
    assert body["usage"]["prompt_tokens"] == len(ids)
    content = choice["logprobs"]["content"]
    assert len(content) == len(ref)
    for entry, tid in zip(content, ref):
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["token"] == tok.decode([tid]) and entry["bytes"] == list(entry["token"].encode())
        assert len(entry["top_logprobs"]) == 2 and entry["top_logprobs"][0]["token"] == entry["token"]
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]
    # without logprobs: null
    r = client.post("/chat/completions", json={"model": NAME, "messages": messages, "max_completion_tokens": 1,
                                               "temperature": 0})
    assert r.json()["choices"][0]["logprobs"] is None
    assert r.json()["choices"][0]["message"]["content"] == tok.decode(ref[:1])


def test_seed_makes_sampling_deterministic(client):
    def sample(prompt, seed):
        r = client.post("/completions", json={"model": NAME, "prompt": prompt, "max_tokens": 3,
                                              "temperature": 0.8, "seed": seed})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    assert sample(PROMPT, 1) == sample(PROMPT, 1)
    changed = False
    for prompt in ("Once upon a time", "My favourite colour is", PROMPT):
        if sample(prompt, 1) != sample(prompt, 2):
            changed = True
            break
    assert changed, "seeds 1 and 2 gave the same samples for every prompt"


def test_tiny_top_p_keeps_only_the_most_likely_token(client):
    greedy = complete(client, max_tokens=2).json()["choices"][0]["text"]
    for seed in (1, 2):
        r = complete(client, max_tokens=2, temperature=1.5, top_p=1e-9, seed=seed)
        assert r.json()["choices"][0]["text"] == greedy


def test_stop_string_truncates(client, app, smollm2):
    ids = smollm2.to_tokens(PROMPT)[0].tolist()
    ref = smollm2.tokenizer.decode(argmax_loop(smollm2.model, ids, 2, app.state.end_token_ids))
    assert ref == " Paris."  # the fixture's premise: SmolLM2's greedy continuation
    r = complete(client, max_tokens=5, stop=["\n", "."], logprobs=1)
    (choice,) = r.json()["choices"]
    assert choice["text"] == " Paris" and choice["finish_reason"] == "stop"
    assert choice["logprobs"]["tokens"] == [" Paris"]  # the "." token starts at the cut
    assert r.json()["usage"]["completion_tokens"] == 2


def test_end_token_stops_generation(smollm2):
    ids = smollm2.to_tokens(PROMPT)[0].tolist()
    first = argmax_loop(smollm2.model, ids, 1)[0]
    g = generate(smollm2.model, smollm2.tokenizer, ids, max_tokens=3, temperature=0, top_p=None, seed=None,
                 stop=[], end_ids=frozenset({first}), top_k=2)
    assert (g.text, g.token_ids, g.steps, g.finish_reason, g.completion_tokens) == ("", [], [], "stop", 1)


def test_api_key(smollm2):
    app = create_app(smollm2, model_name=NAME, api_key=KEY)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        bodies = []
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            for r in (c.get("/models", headers=headers), complete(c, headers=headers), c.get("/nope", headers=headers)):
                assert r.status_code == 401, r.text
                assert r.json() == {"error": {"message": "invalid API key", "type": "invalid_request_error",
                                              "param": None, "code": "invalid_api_key"}}
                bodies.append(r.text)
        good = {"Authorization": f"Bearer {KEY}"}
        ok = [c.get("/models", headers=good), complete(c, headers=good)]
        assert [r.status_code for r in ok] == [200, 200]
        bad_model = c.post("/completions", headers=good, json={"model": KEY, "prompt": "x"})
        assert bad_model.status_code == 404
        bodies += [r.text for r in ok]
        assert all(KEY not in b for b in bodies)
        assert all(KEY not in str(v) for r in ok for v in r.headers.values())
        assert app.state.stats.by_status == {401: 3, 200: 1, 404: 1} and app.state.stats.model_calls == 1
        assert app.state.faults.seen == 2  # 401s do not count towards fault windows


def test_unknown_model_is_404(client):
    r = complete(client, model="gpt-4o")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found" and r.json()["error"]["param"] == "model"
    assert r.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("body,param", [({"logprobs": 21}, "logprobs"), ({"echo": True}, "echo"),
                                        ({"n": 2}, "n"), ({"stream": True}, "stream"),
                                        ({"prompt": None}, "prompt"), ({"max_tokens": 0}, "max_tokens")])
def test_bad_completion_requests_are_400(client, app, body, param):
    r = complete(client, **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"
    assert r.json()["error"]["message"]
    assert app.state.stats.model_calls == 0


def test_bad_requests_are_400(client, app):
    assert "echo" in complete(client, echo=True).json()["error"]["message"]
    r = client.post("/chat/completions", json={"model": NAME})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = client.post("/chat/completions", json={"model": NAME, "messages": [{"role": "user", "content": "hi"}],
                                               "top_logprobs": 30, "logprobs": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    r = client.post("/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = complete(client, prompt="hello " * 2100, max_tokens=5)
    assert r.status_code == 400 and "2048" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert app.state.stats.model_calls == 0 and app.state.stats.by_status == {400: 5}


def test_fault_windows_in_order(client, app):
    app.state.faults = FaultPlan(status_500_first=2, rate_limit_first=1, retry_after=2.5, invalid_json_first=1)
    rs = [complete(client) for _ in range(5)]
    assert [r.status_code for r in rs] == [500, 500, 429, 200, 200]
    assert rs[0].json()["error"]["type"] == "server_error"
    assert rs[2].headers["retry-after"] == "2.5" and rs[2].json()["error"]["code"] == "rate_limit_exceeded"
    assert rs[3].headers["content-type"].startswith("application/json")
    with pytest.raises(json.JSONDecodeError):
        json.loads(rs[3].text)
    assert rs[4].json()["choices"][0]["text"]
    stats = app.state.stats
    assert (stats.requests, stats.model_calls) == (5, 1)
    assert stats.by_status == {500: 2, 429: 1, 200: 2}
    assert stats.faults == {"500": 2, "429": 1, "invalid_json": 1}


def test_rate_limit_integer_retry_after_and_chat_faults(client, app):
    app.state.faults = FaultPlan(rate_limit_first=1, retry_after=2.0)
    r = client.post("/chat/completions", json={"model": NAME, "messages": [{"role": "user", "content": "hi"}],
                                               "max_tokens": 1})
    assert r.status_code == 429 and r.headers["retry-after"] == "2"
    assert complete(client).status_code == 200  # the window counts both routes together


def test_delay_makes_a_short_timeout_expire(client, app):
    app.state.faults = FaultPlan(delay_first=2, delay_s=0.6)
    with pytest.raises(httpx.TimeoutException):
        complete(client, timeout=0.2)
    start = time.monotonic()
    assert complete(client).status_code == 200
    assert time.monotonic() - start >= 0.6
    assert app.state.stats.faults == {"delay": 2}


def test_fail_after_kills_the_server(client, app):
    app.state.faults = FaultPlan(fail_after=2)
    assert [complete(client).status_code for _ in range(4)] == [200, 200, 500, 500]
    assert app.state.stats.model_calls == 2 and app.state.stats.faults == {"fail_after": 2}
    app.state.faults = FaultPlan()  # a new plan starts counting again
    assert complete(client).status_code == 200


def test_cli_loads_the_configured_model_and_refuses_an_unset_key(smollm2, monkeypatch):
    assert load_served_model(NAME) is smollm2  # the same config/model yaml as the test fixture
    monkeypatch.delenv("MECHFLOW_TEST_UNSET_KEY", raising=False)
    with pytest.raises(SystemExit):
        main(["--api-key-env", "MECHFLOW_TEST_UNSET_KEY"])
