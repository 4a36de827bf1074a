"""ModelServer: the Ray Serve deployment that owns one engine (one model and its LoRA adapters)."""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator

from serving.config import ModelConfig
from serving.engine.protocol import Reply, Route

logger = logging.getLogger(__name__)


class ModelServer:
    """Holds a vLLM engine (or the fake one, for gateway tests and benchmarks) in a replica.

    Deployed once per model by serving.app; vllm is imported only inside the replica.
    """

    async def __init__(self, model: dict[str, Any], engine: str = "vllm", fake_options: dict[str, Any] | None = None):
        self.model = ModelConfig.model_validate(model)
        if engine == "fake":
            from serving.engine.fake import FakeEngine

            self.engine: Any = FakeEngine(self.model.name, **(fake_options or {}))
        else:
            from serving.engine.vllm import VLLMEngine

            self.engine = VLLMEngine(self.model, ray_metrics=True)
            await self.engine.start()

    async def generate(self, route: Route, body: bytes, request_id: str,
                       timeout_s: float | None = None) -> AsyncIterator[Reply | str]:
        async for item in self.engine.generate(route, body, request_id, timeout_s):
            yield item

    async def ready(self) -> bool:
        return await self.engine.ready()

    async def stats(self) -> dict[str, float]:
        """Requests the engine holds now (`unfinished`), finished (stop/length), aborted, tokens generated."""
        return await self.engine.stats()

    async def check_health(self) -> None:
        check = getattr(self.engine, "check_health", None)
        if check is not None:
            await check()

    async def __del__(self) -> None:
        stop = getattr(self.engine, "stop", None)
        if stop is not None:
            try:
                await stop()
            except Exception:  # noqa: BLE001 - shutting down; nothing left to tell
                logger.exception("stopping the engine of %s", self.model.name)
