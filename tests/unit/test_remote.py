"""RemoteEngine's readiness view: cached for 2 s, dropped when a replica fails a call."""

from __future__ import annotations

import asyncio

import pytest

from serving.engine.protocol import EngineOverloaded, EngineUnavailable
from serving.engine.remote import RemoteEngine, ReplicaCounter


class Counter(ReplicaCounter):
    def __init__(self, running: int):
        super().__init__("serving")
        self.fetches, self.value = 0, running

    def _fetch(self) -> dict[str, int]:
        self.fetches += 1
        return {"model-m": self.value}


class Handle:
    """Stands in for a DeploymentHandle: `.options(stream=True).generate.remote(...)` yields items or fails."""

    def __init__(self, items, error: BaseException | None = None):
        self.items, self.error, self.cancelled = items, error, False

    def options(self, **_):
        return self

    @property
    def generate(self):
        return self

    def remote(self, *args):
        handle = self

        class Stream:
            def __aiter__(self):
                return self._gen()

            async def _gen(self):
                for item in handle.items:
                    yield item
                if handle.error is not None:
                    raise handle.error

            def cancel(self):
                handle.cancelled = True

        return Stream()


async def drain(engine: RemoteEngine) -> list:
    return [item async for item in engine.generate("chat", b"{}", "r1")]


def test_readiness_is_cached_and_a_failed_call_drops_the_cache():
    async def scenario():
        counter = Counter(running=1)
        engine = RemoteEngine(Handle(["a", "b"]), "model-m", counter)
        assert await drain(engine) == ["a", "b"]
        assert await drain(engine) == ["a", "b"]
        assert counter.fetches == 1  # the second request used the cached view
        failing = RemoteEngine(Handle(["a"], error=RuntimeError("actor died")), "model-m", counter)
        with pytest.raises(RuntimeError):
            await drain(failing)
        counter.value = 0  # the controller now knows the replica is gone
        with pytest.raises(EngineUnavailable):
            await drain(engine)
        assert counter.fetches == 2  # asked again at once, not after the 2 s TTL

    asyncio.run(scenario())


def test_back_pressure_is_overload_and_keeps_the_cache():
    from ray.serve.exceptions import BackPressureError

    async def scenario():
        counter = Counter(running=1)
        engine = RemoteEngine(Handle([], error=BackPressureError(num_queued_requests=3, max_queued_requests=2)),
                              "model-m", counter)
        with pytest.raises(EngineOverloaded):
            await drain(engine)
        await counter.running("model-m")
        assert counter.fetches == 1

    asyncio.run(scenario())


def test_a_caller_that_leaves_early_cancels_the_call():
    async def scenario():
        handle = Handle(["a", "b", "c"])
        stream = RemoteEngine(handle, "model-m", Counter(running=1)).generate("chat", b"{}", "r1")
        assert await anext(stream) == "a"
        await stream.aclose()
        assert handle.cancelled

    asyncio.run(scenario())
