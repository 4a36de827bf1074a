"""Routing that knows what each replica holds: a Ray Serve request router for the model deployments.

A model replica is not interchangeable with another: its vLLM engine keeps the KV blocks of the prompts it
computed (the prefix cache) and the LoRA adapters it loaded. Ray Serve's default router sees only queue
lengths, so the turns of one conversation land on any replica and recompute the history each time.

`serving.gateway.affinity.affinity_key` names what a request's prompt starts with: for a chat, the conversation's
opening (its system/developer messages and first user message, in the chat template's order) — every turn
of a conversation resends it, so every turn gets the same key —, for a completion the prompt's first
PREFIX_CHARS characters; mixed with the model name and the API key's prefix-cache salt (requests of
different keys never share cached blocks: serving.gateway.routes.prefix_salt). It is a stable proxy for the
start of the engine's token sequence, computed without a tokenizer.

`AffinityRouter` (in every gateway's handle to the model, `request_router_config` of its deployment) ranks
the replicas for a key by rendezvous hashing (highest random weight): the same key ranks the same replicas
first in every gateway replica, without any shared state, and a replica that comes or goes moves only the
keys it ranked first. A replica whose queue is more than `max_imbalance` requests (or a quarter of the
shortest queue, when more) longer than the shortest one's is passed over for the next in the ranking, so
one very hot key spreads over the replicas in a fixed order. A request for a LoRA adapter ranks first
the replicas that report it loaded (their `record_routing_stats`: serving.engine.server). A request
without a key (embeddings, several prompts) goes by Ray's power of two choices.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from serving.engine.remote import ADAPTER_KWARG, AFFINITY_KWARG  # the handle call's keyword arguments


def rendezvous(key: str, replicas: list[RunningReplica]) -> list[RunningReplica]:
    """`replicas` ordered by their weight for `key` (highest random weight first): the same order in every
    process for the same replica ids."""
    def weight(replica: RunningReplica) -> bytes:
        return hashlib.blake2b(f"{key}/{replica.replica_id.unique_id}".encode(), digest_size=8).digest()

    return sorted(replicas, key=weight, reverse=True)


class AffinityRouter(RequestRouter):
    """Ray Serve request router (its public extension API) for a model deployment; see the module."""

    def initialize_state(self, max_imbalance: int = 4, **_: Any) -> None:
        """max_imbalance: requests by which a replica's queue may exceed the shortest one's and still get
        the requests whose key ranks it first (request_router_kwargs of the deployment)."""
        self.max_imbalance = max_imbalance

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        kwargs = pending_request.kwargs if pending_request is not None else {}
        key, adapter = kwargs.get(AFFINITY_KWARG), kwargs.get(ADAPTER_KWARG)
        if not key and not adapter:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        ranked = rendezvous(str(key or adapter), candidate_replicas)
        if adapter:  # replicas that hold the adapter first, each group in its rendezvous order
            ranked.sort(key=lambda r: adapter not in (r.routing_stats or {}).get("adapters", ()))
        chosen = self.least_imbalanced(ranked)
        return [[chosen], [r for r in ranked if r is not chosen]]

    def least_imbalanced(self, ranked: list[RunningReplica]) -> RunningReplica:
        """The first replica of `ranked` whose queue is within the allowed imbalance of the shortest queue:
        max_imbalance requests, or a quarter of the shortest queue when that is more (under heavy load the
        queues' ordinary spread would otherwise move conversations away from their cache). Queues
        come from the router's cache (Ray Serve keeps it from the replicas' answers and this router's own
        sends); a replica without a recent entry counts as idle (0): nothing was sent to it lately."""
        cache = self.replica_queue_len_cache
        lengths = [cache.get(r.replica_id) or 0 for r in ranked]
        shortest = min(lengths)
        allowed = max(self.max_imbalance, shortest // 4)
        for replica, length in zip(ranked, lengths, strict=True):
            if length - shortest <= allowed:
                return replica
        return ranked[0]


ROUTER_PATH = f"{__name__}:{AffinityRouter.__name__}"
