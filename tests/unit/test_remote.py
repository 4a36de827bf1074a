"""RemoteEngine's readiness view: cached for 2 s, refreshed behind requests, dropped when a replica fails a call."""

from __future__ import annotations

import asyncio
import threading

import pytest

from serving.engine.protocol import EngineOverloaded, EngineUnavailable
from serving.engine.remote import RemoteEngine, ReplicaCounter


class Counter(ReplicaCounter):
    """The controller's answer is `value`; while `slow` is clear, asking it blocks (in its thread)."""

    def __init__(self, running: int):
        super().__init__()
        self.fetches, self.value = 0, running
        self.slow = threading.Event()
        self.slow.set()

    def _fetch(self) -> dict[str, int]:
        self.fetches += 1
        self.slow.wait(timeout=10)
        return {"model-m": self.value}


class Handle:
    """Stands in for a DeploymentHandle: `.options(stream=True).generate.remote(...)` yields items or fails;
    `delay_s` holds the first item back (a call queued in Ray's router), None: forever."""

    def __init__(self, items, error: BaseException | None = None, delay_s: float | None = 0.0):
        self.items, self.error, self.cancelled, self.delay_s = items, error, False, delay_s

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
                if handle.delay_s is None:
                    await asyncio.Event().wait()
                await asyncio.sleep(handle.delay_s)
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


def test_a_request_waiting_for_a_replica_that_is_gone_is_refused(monkeypatch):
    """The gateway's view said one replica runs (cached); it died: the queued call is cancelled, 503."""
    import serving.engine.remote as remote

    monkeypatch.setattr(remote, "ADMISSION_CHECK_S", 0.05)

    async def scenario():
        counter = Counter(running=1)
        assert await counter.running("model-m") == 1
        counter.value = 0  # the controller knows; the cached view does not yet
        handle = Handle(["a"], delay_s=None)
        with pytest.raises(EngineUnavailable):
            await drain(RemoteEngine(handle, "model-m", counter))
        assert handle.cancelled and counter.fetches == 2

    asyncio.run(scenario())


def test_a_request_queued_behind_busy_replicas_keeps_waiting(monkeypatch):
    import serving.engine.remote as remote

    monkeypatch.setattr(remote, "ADMISSION_CHECK_S", 0.05)

    async def scenario():
        counter = Counter(running=1)
        handle = Handle(["a", "b"], delay_s=0.3)  # admitted after six checks: replicas run, just busy
        assert await drain(RemoteEngine(handle, "model-m", counter)) == ["a", "b"]
        assert not handle.cancelled

    asyncio.run(scenario())


def test_a_stale_view_is_refreshed_behind_requests_but_a_refusal_waits_for_the_controller():
    async def scenario():  # max_age_s=0: every question finds the view stale
        counter = Counter(running=1)
        assert await counter.running("model-m", max_age_s=0.0) == 1  # no view yet: waited for it
        counter.slow.clear()  # the controller is slow now
        counter.value = 2
        answered = await asyncio.wait_for(counter.running("model-m", max_age_s=0.0), timeout=1)
        await asyncio.sleep(0.05)  # the question's thread starts
        assert answered == 1 and counter.fetches == 2  # the old view at once; the question is out
        assert await asyncio.wait_for(counter.running("model-m", max_age_s=0.0), timeout=1) == 1
        assert counter.fetches == 2  # one question at a time
        waiting = asyncio.ensure_future(counter.running("model-m", max_age_s=0.0, wait=True))
        await asyncio.sleep(0.1)
        assert not waiting.done()  # asked to wait: it does
        counter.slow.set()
        assert await waiting == 2
        counter.value = 0
        counter.invalidate()  # a failed call: the next question waits for a fresh answer
        assert await counter.running("model-m", max_age_s=0.0) == 0
        counter.value = 1
        counter.slow.clear()
        refused_view = asyncio.ensure_future(counter.running("model-m", max_age_s=0.0))
        await asyncio.sleep(0.1)
        assert not refused_view.done()  # 0 running: a refusal needs the controller's fresh word
        counter.slow.set()
        assert await refused_view == 1

    asyncio.run(scenario())


def test_a_view_asked_for_before_a_failed_call_is_not_taken_as_fresh():
    async def scenario():
        counter = Counter(running=1)
        counter.slow.clear()
        question = asyncio.ensure_future(counter.running("model-m"))
        await asyncio.sleep(0.05)
        counter.invalidate()  # a call failed while the question was out
        counter.slow.set()
        assert await question == 1
        await counter.running("model-m")
        assert counter.fetches == 2  # asked again: the first answer predates the failure

    asyncio.run(scenario())


def test_a_model_that_scales_to_zero_takes_requests_at_zero(monkeypatch):
    """No replica runs: a model whose autoscaling allows zero lets the request wait in Ray's router
    (which is what makes Ray Serve start a replica) and is ready; any other model refuses at once."""
    import serving.engine.remote as remote

    monkeypatch.setattr(remote, "ADMISSION_CHECK_S", 0.05)

    async def scenario():
        counter = Counter(running=0)
        handle = Handle(["a", "b"], delay_s=0.3)  # the first replica starts and takes it after 6 checks
        cold = RemoteEngine(handle, "model-m", counter, scales_to_zero=True)
        assert await cold.ready()
        assert await drain(cold) == ["a", "b"] and not handle.cancelled
        warm_only = RemoteEngine(Handle(["a"]), "model-m", counter)
        assert not await warm_only.ready()
        with pytest.raises(EngineUnavailable):
            await drain(warm_only)

    asyncio.run(scenario())
