"""A gateway process of its own (uvicorn, FakeEngines, the given Redis and file storage), for the test that
kills the process running a batch: `python -m tests.redis.batch_gateway REDIS_URL STORAGE_URL PORT LOG`.
Every chat request its engine starts is appended to LOG (one line: the user message), so the test can tell
which lines ran on which process."""

from __future__ import annotations

import sys

import uvicorn

from serving.config import load_config
from serving.engine.fake import FakeEngine
from serving.gateway.app import create_app


class LoggingEngine(FakeEngine):
    def __init__(self, name: str, log: str, **kwargs):
        super().__init__(name, **kwargs)
        self.log = log

    async def generate(self, route, body, request_id, timeout_s=None, **_routing):
        import json

        with open(self.log, "a") as out:
            out.write(json.loads(body)["messages"][-1]["content"] + "\n")
        async for item in super().generate(route, body, request_id, timeout_s):
            yield item


def main() -> None:
    redis_url, storage_url, port, log = sys.argv[1:5]
    config = load_config(data={
        "models": [{"name": "tiny", "source": "/models/tiny"}],
        "redis": {"url": redis_url}, "cache": {"mode": "off"}, "auth": {"enabled": False},
        "files": {"storage_url": storage_url},
        "batches": {"max_in_flight": 4, "lease_s": 2.0, "poll_s": 0.2, "checkpoint_lines": 4, "checkpoint_s": 0.2},
    })
    app = create_app(config, {"tiny": LoggingEngine("tiny", log, itl_s=0.05)})
    uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning")


if __name__ == "__main__":
    main()
