"""A real redis-server for the whole session, flushed before every test; FakeEngines, no Ray, no vLLM.

`redis_server` is one `redis-server` (the Debian package) on a free loopback port, without
persistence, in a temporary directory. Tests that need Redis to fail call `redis_server.stop()` and
`redis_server.start()` (same port, so a gateway built before the stop can find it again); a stopped
server is started again before the next test.
"""

from __future__ import annotations

from typing import Iterator

import pytest
import pytest_asyncio
import redis

from tests.support import (
    RedisServer,
    no_serving_env,  # noqa: F401 - autouse fixture
)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """The server's URL, with an empty database; a test that stopped or froze the server gets it back after."""
    redis_server.resume()
    if not redis_server.running:
        redis_server.start()
    redis_server.flushall()
    yield redis_server.url
    redis_server.resume()
    if not redis_server.running:
        redis_server.start()


@pytest.fixture
def redis_client(redis_url: str, redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A plain synchronous client, to look at what the platform wrote."""
    with redis_server.client() as client:
        yield client


@pytest_asyncio.fixture(loop_scope="function")
async def gateway(redis_url: str):
    """A factory of gateway apps (create_app with FakeEngines) on the session's Redis; closed at the end.

    gateway(**sections) builds the configuration with support.make_config; `engines=` and `store=`
    go to create_app; `config=` replaces the configuration.
    """
    from serving.gateway.app import create_app
    from tests.redis.support import make_config, make_engines

    apps = []

    def build(*, config=None, engines=None, store=None, models=None, **sections):
        config = config or make_config(redis_url, models=models, **sections)
        app = create_app(config, engines if engines is not None else make_engines(), store=store)
        apps.append(app)
        return app

    yield build
    for app in apps:
        services = app.state.services
        await services.drain()
        await services.store.close()
