"""Private Redis servers for tests that restart, kill or reshard Redis: one ``redis-server``
with its append-only file (restartable on the same port and data), a Redis Cluster of
three primaries with one replica each, a Sentinel deployment (a primary, a replica and
sentinels), on free ports, torn down by pid; and a proxy that loses one reply."""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import redis
from redis.crc import key_slot
from tests.support.process import free_port, wait_for_port


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(1000):
        port = random.randint(20000, 45000)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} is not installed (apt-get install redis-server redis-tools)")
    return found


def primaries(url: str) -> list[tuple[str, int]]:
    """Host and port of every primary behind ``url``: the node itself for a plain Redis, each
    primary that serves slots for a cluster node."""
    with redis.Redis.from_url(url) as first:
        if first.info("cluster").get("cluster_enabled") != 1:
            host = first.connection_pool.connection_kwargs.get("host", "127.0.0.1")
            return [(str(host), int(first.connection_pool.connection_kwargs.get("port", 6379)))]
        found = set()
        for _start, _end, primary, *_ in first.execute_command("CLUSTER", "SLOTS"):
            host = primary[0].decode() if isinstance(primary[0], bytes) else str(primary[0])
            found.add((host, int(primary[1])))
        return sorted(found)


def delete_prefix(url: str, prefix: str) -> None:
    """Delete every key under ``<prefix>:`` on the Redis behind ``url``. On a cluster, SCAN on
    one node sees only that node's keys, so every primary is scanned; keys are deleted one by
    one, each on the primary that holds it (a DEL of keys in different slots is refused).
    Raises if a key is left (a wipe that silently missed keys makes tests fail later, far
    from the cause)."""
    pattern = f"{prefix}:*"
    for host, port in primaries(url):
        with redis.Redis(host=host, port=port) as node:
            for key in list(node.scan_iter(match=pattern, count=1000)):
                node.delete(key)
    left = []
    for host, port in primaries(url):
        with redis.Redis(host=host, port=port) as node:
            if next(iter(node.scan_iter(match=pattern, count=1000)), None) is not None:
                left.append(f"{host}:{port}")
    if left:
        raise RuntimeError(f"keys under {prefix}: are left on {left} after deleting them")


def wipe_store(engine_url: str) -> None:
    """Lose a store, as in a disaster: the SQLite files, or every key of the URL's prefix
    (on every primary of a cluster). Stop the servers using it first."""
    if engine_url.startswith("sqlite"):
        path = engine_url.removeprefix("sqlite:///")
        for suffix in ("", "-wal", "-shm"):
            Path(path + suffix).unlink(missing_ok=True)
        return
    base, prefix = engine_url.split("?", 1)[0], engine_url.split("prefix=", 1)[1]
    delete_prefix(base, prefix)


class RedisNode:
    """One ``redis-server`` process; with ``aof`` every acknowledged write is in its
    append-only file (fsync always), so a restart on the same directory keeps them."""

    def __init__(
        self,
        *,
        port: int | None = None,
        folder: Path | None = None,
        aof: bool = True,
        cluster: bool = False,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.port = port or (cluster_port() if cluster else free_port())
        self.dir = folder or Path(tempfile.mkdtemp(prefix="phasecast-redis-"))
        self.aof = aof
        self.cluster = cluster
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> RedisNode:
        argv = [
            _binary("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--dir", str(self.dir), "--protected-mode", "no",
        ]
        if self.aof:
            argv += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            argv += ["--appendonly", "no"]
        if self.cluster:
            argv += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(self.dir / "nodes.conf"),
                # Failure detection and the replica's election take about this long.
                "--cluster-node-timeout", "1000",
                "--cluster-replica-validity-factor", "0",
                "--cluster-allow-reads-when-down", "no",
            ]
        argv += self.extra
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_port(self.port, 10, self.process)
        except BaseException:
            self.kill()  # never leave a server running that nobody will stop
            raise
        return self

    def kill(self) -> None:
        """SIGKILL, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self.process = None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True)

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisNode:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class RedisClusterProcesses:
    """Three primaries and three replicas (``redis-cli --cluster create``)."""

    def __init__(self, primaries: int = 3, replicas: int = 1) -> None:
        self.nodes = [RedisNode(cluster=True) for _ in range(primaries * (1 + replicas))]
        self.replicas = replicas

    @property
    def url(self) -> str:
        """Any node will do: the engine discovers the others."""
        return self.nodes[0].url

    def start(self, timeout: float = 30.0) -> RedisClusterProcesses:
        try:
            for node in self.nodes:
                node.start()
            subprocess.run(
                [_binary("redis-cli"), "--cluster", "create",
                 *(n.address for n in self.nodes),
                 "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout,
            )
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until every live node reports the cluster ok with every slot served, and every
        primary has its replicas attached."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._healthy():
                return
            time.sleep(0.05)
        raise TimeoutError("the Redis Cluster did not become healthy")

    def _healthy(self) -> bool:
        try:
            for node in self.nodes:
                if not node.alive:
                    continue
                with node.client() as client:
                    info = client.execute_command("CLUSTER", "INFO")
                    text = info if isinstance(info, str) else info.decode()
                    if "cluster_state:ok" not in text or "cluster_slots_ok:16384" not in text:
                        return False
            return len(self.shards()) == len(self.nodes) // (1 + self.replicas)
        except redis.RedisError:
            return False

    def shards(self) -> dict[str, list[tuple[int, int]]]:
        """Primary address -> its slot ranges, as a live node sees it."""
        for node in self.nodes:
            if not node.alive:
                continue
            with node.client() as client:
                found: dict[str, list[tuple[int, int]]] = {}
                for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
                    address = f"{primary[0]}:{primary[1]}"
                    found.setdefault(address, []).append((int(start), int(end)))
                return found
        raise RuntimeError("no live cluster node")

    def node_at(self, address: str) -> RedisNode:
        return next(n for n in self.nodes if n.address == address)

    def owner_of(self, key: str) -> RedisNode:
        """The primary that serves ``key`` (or a job id: its keys are tagged with it) now."""
        return self.owner_for_slot(key_slot(key.encode()))

    def node_id(self, node: RedisNode) -> str:
        with node.client() as client:
            found: str = client.execute_command("CLUSTER", "MYID")
            return found

    def wait_replicas_synced(self, timeout: float = 30.0) -> None:
        """Until every live replica's link to its primary is up (so a failover is possible)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                states = []
                for node in self.nodes:
                    if node.alive:
                        with node.client() as client:
                            states.append(client.info("replication"))
                if all(
                    s.get("role") == "master" or s.get("master_link_status") == "up" for s in states
                ) and sum(s.get("role") == "slave" for s in states) >= len(self.shards()):
                    return
            except redis.RedisError:
                pass
            time.sleep(0.05)
        raise TimeoutError("replicas did not sync")

    def migrate_slot(self, slot: int, target: RedisNode) -> None:
        """Move one hash slot and its keys to ``target`` the way ``redis-cli --cluster
        reshard`` does: IMPORTING/MIGRATING, MIGRATE the keys, then SETSLOT NODE on every
        primary."""
        source = self.owner_for_slot(slot)
        source_id, target_id = self.node_id(source), self.node_id(target)
        with target.client() as to, source.client() as src:
            to.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            while True:
                keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100)
                if not keys:
                    break
                src.execute_command(
                    "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "REPLACE", "KEYS", *keys
                )
            to.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        for node in self.nodes:
            if node.alive and node not in (source, target):
                with node.client() as client, contextlib.suppress(redis.ResponseError):
                    # Replicas refuse it; they follow their primary.
                    client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)

    def owner_for_slot(self, slot: int) -> RedisNode:
        for address, ranges in self.shards().items():
            if any(start <= slot <= end for start, end in ranges):
                return self.node_at(address)
        raise RuntimeError(f"slot {slot} is not served")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisClusterProcesses:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class SentinelNode:
    """One ``redis-server --sentinel`` with a config file of its own (a sentinel rewrites it)."""

    def __init__(self, primary: RedisNode, service: str, quorum: int, password: str | None = None) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="phasecast-sentinel-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.password = password
        # A sentinel with a password asks it of every client, and of the other sentinels.
        secured = "" if password is None else f"requirepass {password}\nsentinel sentinel-pass {password}\n"
        (self.dir / "sentinel.conf").write_text(secured +
            f"port {self.port}\nbind 127.0.0.1\nprotected-mode no\ndir {self.dir}\n"
            f"sentinel monitor {service} 127.0.0.1 {primary.port} {quorum}\n"
            # A primary silent this long is down; an election that stalls is retried after
            # the failover timeout.
            f"sentinel down-after-milliseconds {service} 1000\n"
            f"sentinel failover-timeout {service} 4000\n"
            f"sentinel parallel-syncs {service} 1\n"
        )

    def start(self) -> SentinelNode:
        self.process = subprocess.Popen(
            [_binary("redis-server"), str(self.dir / "sentinel.conf"), "--sentinel"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port(self.port, 10, self.process)
        except BaseException:
            self.stop()
            raise
        return self

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True,
                           socket_timeout=2, password=self.password)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)
        self.process = None
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisSentinelProcesses:
    """A primary, one replica and ``sentinels`` sentinels watching them with ``quorum``, on
    free ports, torn down by pid."""

    SERVICE = "phasecast"

    def __init__(self, sentinels: int = 3, quorum: int = 2, sentinel_password: str | None = None) -> None:
        self.primary = RedisNode(aof=True)
        self.replica = RedisNode(
            aof=True, extra=("--replicaof", "127.0.0.1", str(self.primary.port))
        )
        self.nodes = [self.primary, self.replica]
        self.sentinel_password = sentinel_password
        self.sentinels = [SentinelNode(self.primary, self.SERVICE, quorum, sentinel_password)
                          for _ in range(sentinels)]

    @property
    def url(self) -> str:
        """The URL naming the deployment; with the sentinels' password when they have one."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        secret = "" if self.sentinel_password is None else f"?sentinel_password={self.sentinel_password}"
        return f"redis+sentinel://{hosts}/{self.SERVICE}/0{secret}"

    def start(self, timeout: float = 30.0) -> RedisSentinelProcesses:
        try:
            for node in self.nodes:
                node.start()
            for sentinel in self.sentinels:
                sentinel.start()
            self.wait_settled(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_settled(self, timeout: float = 30.0) -> None:
        """Until every live sentinel names the same primary, sees its live replicas and
        knows the other sentinels (they find each other through the primary, within a few
        seconds), and every live replica's link is up: only then can a failover succeed."""
        deadline = time.monotonic() + timeout
        replicas = sum(n.alive for n in self.nodes) - 1
        while time.monotonic() < deadline:
            try:
                named = set()
                settled = True
                for sentinel in self.sentinels:
                    with sentinel.client() as client:
                        fields = client.sentinel_master(self.SERVICE)
                        named.add(int(fields["port"]))
                        settled &= (
                            int(fields["num-slaves"]) >= replicas
                            and int(fields["num-other-sentinels"]) == len(self.sentinels) - 1
                            and not fields["is_sdown"]
                        )
                links = []
                for node in self.nodes:
                    if node.alive:
                        with node.client() as client:
                            info = client.info("replication")
                            links.append(info["role"] == "master" or info.get("master_link_status") == "up")
                if settled and len(named) == 1 and all(links):
                    return
            except redis.RedisError:
                pass
            time.sleep(0.1)
        raise TimeoutError("the sentinels did not settle on a primary")

    def current_primary(self) -> RedisNode:
        """The node the sentinels name as primary now."""
        with self.sentinels[0].client() as client:
            _host, port = client.sentinel_get_master_addr_by_name(self.SERVICE)
        return next(n for n in self.nodes if n.port == int(port))

    def wait_promoted(self, old: RedisNode, timeout: float = 30.0) -> RedisNode:
        """Until every sentinel names another node than ``old`` and that node says it is a
        primary."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError, StopIteration):
                ports = set()
                for sentinel in self.sentinels:
                    with sentinel.client() as client:
                        _host, port = client.sentinel_get_master_addr_by_name(self.SERVICE)
                        ports.add(int(port))
                if len(ports) == 1 and old.port not in ports:
                    new = next(n for n in self.nodes if n.port in ports)
                    with new.client() as client:
                        if client.info("replication")["role"] == "master":
                            return new
            time.sleep(0.05)
        raise TimeoutError("no replica was promoted")

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisSentinelProcesses:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class ReplyDroppingProxy:
    """A TCP proxy in front of one Redis that forwards both ways, except once: the reply to
    the first command whose bytes contain ``marker`` is swallowed and the client's
    connection cut, as when a network drops a connection after the server ran the command
    but before its reply arrived. Runs on the test's event loop."""

    def __init__(self, upstream_port: int, marker: bytes) -> None:
        self.upstream_port = upstream_port
        self.marker = marker
        self.port = 0
        self.dropped: list[bytes] = []  # replies swallowed
        self._armed = True
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> ReplyDroppingProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def _accept(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        self._writers.add(client_out)
        server_in, server_out = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers.add(server_out)
        drop = asyncio.Event()

        async def upstream() -> None:
            while data := await client_in.read(65536):
                if self._armed and self.marker in data:
                    self._armed = False
                    drop.set()
                server_out.write(data)
                await server_out.drain()

        async def downstream() -> None:
            while data := await server_in.read(65536):
                if drop.is_set():
                    self.dropped.append(data)
                    client_out.transport.abort()
                    server_out.close()
                    return
                client_out.write(data)
                await client_out.drain()

        tasks = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await task
            for writer in (client_out, server_out):
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                self._writers.discard(writer)
            self._handlers.discard(handler)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> ReplyDroppingProxy:
        return await self.start()

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


def serve_all_slots(node: RedisNode, announce_port: int | None = None, timeout: float = 10.0) -> None:
    """Make a lone cluster-enabled node a cluster of one that serves every slot; with
    ``announce_port`` it tells clients to reach it there (a proxy in front of it)."""
    with node.client() as client:
        if announce_port is not None:
            client.config_set("cluster-announce-port", announce_port)
        client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        deadline = time.monotonic() + timeout
        while "cluster_state:ok" not in str(client.execute_command("CLUSTER", "INFO")):
            if time.monotonic() > deadline:
                raise TimeoutError("a one-node cluster did not become ok")
            time.sleep(0.02)
