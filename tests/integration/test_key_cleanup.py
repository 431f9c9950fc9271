"""The tests' own key cleanup (``delete_prefix``): on a Redis Cluster a SCAN sent to one node
sees only that node's keys, so a wipe must visit every primary. Tests that wipe a store and
make jobs again under the same ids (and every per-test prefix) depend on it."""

from __future__ import annotations

import uuid

import pytest
import redis
from redis.cluster import RedisCluster
from tests.conftest import REDIS_URL, private_prefix
from tests.support.redis_servers import RedisClusterProcesses, delete_prefix, primaries

pytestmark = pytest.mark.redis


def _keys_on(address: tuple[str, int], pattern: str) -> list[bytes]:
    with redis.Redis(host=address[0], port=address[1]) as node:
        return list(node.scan_iter(match=pattern, count=1000))


def test_delete_prefix_reaches_every_primary_of_a_cluster(
    redis_cluster: RedisClusterProcesses,
) -> None:
    prefix, other = f"pctest-{uuid.uuid4().hex[:12]}", f"pctest-{uuid.uuid4().hex[:12]}"
    with RedisCluster.from_url(redis_cluster.url) as cluster:
        for i in range(60):  # hash tags spread over many slots, so over every primary
            cluster.set(f"{prefix}:job:{{job-{i}}}", "x")
        cluster.set(f"{other}:job:{{kept}}", "y")
        nodes = primaries(redis_cluster.url)
        assert len(nodes) == 3
        assert all(_keys_on(node, f"{prefix}:*") for node in nodes), "keys should span every primary"

        delete_prefix(redis_cluster.url, prefix)

        assert [node for node in nodes if _keys_on(node, f"{prefix}:*")] == []
        assert cluster.get(f"{other}:job:{{kept}}") == b"y"  # another prefix is left alone
        cluster.delete(f"{other}:job:{{kept}}")


def test_private_prefix_removes_its_keys_from_the_shared_redis() -> None:
    with redis.Redis.from_url(REDIS_URL) as client:
        with private_prefix() as prefix:
            for i in range(5):
                client.set(f"{prefix}:job:{{j{i}}}", "x")
        assert list(client.scan_iter(match=f"{prefix}:*", count=1000)) == []
