"""Prefix and adapter affinity (serving.gateway.affinity, serving.engine.routing) without Ray running: the keys a
conversation's turns get, and the router's choice from stand-in replicas. The real router in Ray Serve:
tests/integration/test_routing.py."""

from __future__ import annotations

import collections
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest

from serving.engine.routing import AffinityRouter, rendezvous
from serving.gateway.affinity import affinity_key

SYSTEM = {"role": "system", "content": "You are a helpful assistant for the ACME help desk."}


def conversation(first: str, turns: int) -> list[list[dict]]:
    """The message lists a chat client sends on each turn: the whole history every time."""
    history = [SYSTEM, {"role": "user", "content": first}]
    sent = [list(history)]
    for i in range(turns - 1):
        history += [{"role": "assistant", "content": f"answer {i}"}, {"role": "user", "content": f"follow-up {i}"}]
        sent.append(list(history))
    return sent


def test_every_turn_of_a_conversation_gets_its_key_and_other_conversations_another():
    keys = {affinity_key("chat", {"model": "m", "messages": messages}) for messages in conversation("hi", 6)}
    assert len(keys) == 1
    other = affinity_key("chat", {"model": "m", "messages": conversation("hello", 1)[0]})
    assert other not in keys
    # the key's salt and the model take part: different keys and models never share cached prefixes
    base = conversation("hi", 1)[0]
    assert affinity_key("chat", {"model": "m", "messages": base}, "salt-a") != \
        affinity_key("chat", {"model": "m", "messages": base}, "salt-b")
    assert affinity_key("chat", {"model": "m2", "messages": base}) not in keys


def test_responses_messages_and_completions_have_keys_and_embeddings_none():
    assert affinity_key("responses", {"model": "m", "input": "hello"}) is not None
    items = [{"type": "message", "role": "user", "content": "hello"}]
    later = items + [{"type": "message", "role": "assistant", "content": "hi"},
                     {"type": "message", "role": "user", "content": "more"}]
    assert affinity_key("responses", {"model": "m", "input": items, "instructions": "be brief"}) == \
        affinity_key("responses", {"model": "m", "input": later, "instructions": "be brief"})
    first = [{"role": "user", "content": "hello"}]
    assert affinity_key("messages", {"model": "m", "system": "s", "messages": first}) == \
        affinity_key("messages", {"model": "m", "system": "s",
                                  "messages": first + [{"role": "assistant", "content": "x"},
                                                       {"role": "user", "content": "y"}]})
    long = "x" * 5000
    assert affinity_key("completion", {"model": "m", "prompt": long + "a"}) == \
        affinity_key("completion", {"model": "m", "prompt": long + "b"})  # the first 2,048 characters
    assert affinity_key("completion", {"model": "m", "prompt": ["a", "b"]}) is None  # several prompts
    assert affinity_key("embedding", {"model": "m", "input": "hello"}) is None
    assert affinity_key("chat", {"model": "m", "messages": "not a list"}) is None


# ------------------------------------------------------------------------------- the router


@dataclass(frozen=True)
class ReplicaId:
    unique_id: str


@dataclass
class Replica:
    """Stands in for Ray Serve's RunningReplica: what the router reads of one."""

    replica_id: ReplicaId
    routing_stats: dict[str, Any] = field(default_factory=dict)


class QueueLengths:
    def __init__(self) -> None:
        self.lengths: dict[str, int] = {}

    def get(self, replica_id: ReplicaId) -> int | None:
        return self.lengths.get(replica_id.unique_id)


@dataclass
class Pending:
    kwargs: dict[str, Any]


def router(max_imbalance: int = 8) -> tuple[AffinityRouter, QueueLengths]:
    instance = object.__new__(AffinityRouter)  # Ray builds it inside a handle; only its policy is tested here
    instance.initialize_state(max_imbalance=max_imbalance)
    lengths = QueueLengths()
    instance._replica_queue_len_cache = lengths  # what its `replica_queue_len_cache` property returns
    return instance, lengths


def replicas(n: int) -> list[Replica]:
    return [Replica(ReplicaId(uuid.uuid4().hex[:8])) for _ in range(n)]


async def choose(r: AffinityRouter, candidates: list[Replica], **kwargs: Any) -> list[list[Replica]]:
    return await r.choose_replicas(candidates, Pending(kwargs))  # type: ignore[arg-type]


async def test_a_key_goes_to_the_same_replica_from_every_gateway_and_keys_spread():
    fleet = replicas(4)
    first, second = router()[0], router()[0]  # two gateways' routers: no state shared
    chosen = collections.Counter()
    for i in range(400):
        key = affinity_key("chat", {"model": "m", "messages": conversation(f"question {i}", 1)[0]})
        a, b = await choose(first, fleet, affinity=key), await choose(second, list(reversed(fleet)), affinity=key)
        assert a[0][0] is b[0][0] and len(a[0]) == 1
        assert {r.replica_id.unique_id for r in a[1]} == {r.replica_id.unique_id for r in fleet} - {
            a[0][0].replica_id.unique_id}
        chosen[a[0][0].replica_id.unique_id] += 1
    assert len(chosen) == 4 and min(chosen.values()) > 60, chosen  # 400 keys, about 100 each


async def test_a_replica_leaving_moves_only_its_own_keys():
    fleet = replicas(4)
    keys = [f"key-{i}" for i in range(200)]
    before = {k: rendezvous(k, fleet)[0] for k in keys}
    gone = fleet[1]
    after = {k: rendezvous(k, [r for r in fleet if r is not gone])[0] for k in keys}
    moved = [k for k in keys if before[k] is not after[k]]
    assert moved and all(before[k] is gone for k in moved)


async def test_a_hot_key_spills_to_the_next_replica_in_its_ranking_when_its_queue_runs_long():
    r, lengths = router(max_imbalance=4)
    fleet = replicas(3)
    ranking = rendezvous("hot", fleet)
    lengths.lengths = {ranking[0].replica_id.unique_id: 4, ranking[1].replica_id.unique_id: 1,
                       ranking[2].replica_id.unique_id: 0}
    assert (await choose(r, fleet, affinity="hot"))[0] == [ranking[0]]  # 4 - 0 <= 4
    lengths.lengths[ranking[0].replica_id.unique_id] = 9
    assert (await choose(r, fleet, affinity="hot"))[0] == [ranking[1]]  # the next in the same order everywhere
    lengths.lengths[ranking[1].replica_id.unique_id] = 9
    assert (await choose(r, fleet, affinity="hot"))[0] == [ranking[2]]
    # under heavy load a quarter of the shortest queue is allowed: 60 - 48 <= 12
    lengths.lengths = {ranking[0].replica_id.unique_id: 60, ranking[1].replica_id.unique_id: 50,
                       ranking[2].replica_id.unique_id: 48}
    assert (await choose(r, fleet, affinity="hot"))[0] == [ranking[0]]
    # a replica nothing was sent to lately counts as idle
    lengths.lengths = {ranking[0].replica_id.unique_id: 5}
    assert (await choose(r, fleet, affinity="hot"))[0] == [ranking[1]]


async def test_an_adapter_goes_to_a_replica_that_has_it_loaded():
    r, lengths = router()
    fleet = replicas(3)
    holder = rendezvous("k", fleet)[-1]  # the one its key ranks last
    holder.routing_stats = {"adapters": ["sql-lora"]}
    assert (await choose(r, fleet, affinity="k", adapter="sql-lora"))[0] == [holder]
    lengths.lengths = {r.replica_id.unique_id: 0 for r in fleet}
    lengths.lengths[holder.replica_id.unique_id] = 30  # overloaded: the key's own ranking takes over
    assert (await choose(r, fleet, affinity="k", adapter="sql-lora"))[0] != [holder]
    # nobody has it loaded yet: every gateway picks the same replica to load it on
    fresh = replicas(3)
    assert (await choose(r, fresh, adapter="new"))[0] == (await choose(router()[0], fresh, adapter="new"))[0]


async def test_requests_without_a_key_go_by_power_of_two_choices():
    r, _ = router()
    fleet = replicas(5)
    picked = await choose(r, fleet)
    assert len(picked) == 1 and len(picked[0]) == 2 and len({id(x) for x in picked[0]}) == 2
    assert await r.choose_replicas([], None) == []


@pytest.mark.parametrize("route", ["chat", "responses", "messages"])
async def test_the_gateway_hands_the_engine_the_key_and_the_adapter(route):
    import httpx

    from serving.config import load_config
    from serving.gateway.app import create_app
    from serving.gateway.store import MemoryStore
    from tests.support import Recording

    engine = Recording("tiny")
    config = load_config(data={"models": [{"name": "tiny", "source": "/m", "lora_adapters": {"tiny-sql": "/a"}},
                                          {"name": "plain", "source": "/m", "routing": "load"}],
                               "auth": {"enabled": False}, "cache": {"mode": "off"}})
    app = create_app(config, {"tiny": engine, "plain": Recording("plain")}, store=MemoryStore())
    bodies = {"chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
              "responses": ("/v1/responses", {"input": "hi", "max_output_tokens": 2}),
              "messages": ("/v1/messages", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})}
    path, body = bodies[route]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        for model in ("tiny", "tiny-sql"):
            assert (await client.post(path, json={"model": model, **body})).status_code == 200
        assert (await client.post(path, json={"model": "plain", **body})).status_code == 200
    base, adapter = engine.bodies[-2:]
    assert base["_affinity"] and base["_adapter"] is None
    assert adapter["_affinity"] and adapter["_adapter"] == "tiny-sql" and adapter["_affinity"] != base["_affinity"]
    assert app.state.services.registry.engines["plain"].bodies[-1]["_affinity"] is None  # routing: load
