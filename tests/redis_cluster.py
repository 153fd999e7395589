"""A real local Redis Cluster for tests: redis-server processes in cluster mode.

Import the fixtures into a test module (``from redis_cluster import redis_cluster``)
and mark the module ``pytestmark = pytest.mark.cluster``; run them with

    .venv/bin/python -m pytest -m cluster

``RedisCluster(masters=3, replicas=0)`` starts ``masters * (1 + replicas)``
redis-server processes on free ports of 127.0.0.1 (each with a free cluster-bus port
of its own, ``cluster-port``, so that no port + 10000 arithmetic can collide),
keeping their ``nodes-PORT.conf`` and logs in a temporary directory that ``stop()``
removes. It joins them by hand (CLUSTER SET-CONFIG-EPOCH, ADDSLOTSRANGE, MEET,
REPLICATE), which is what ``redis-cli --cluster create`` does without its one-second
sleeps, and waits (bounded) until the cluster is healthy: every running node says
``cluster_state:ok``, every node sees the same slot owners and the same replicas,
nobody is flagged failing, and every replica's link to its master is up.

Settings chosen for quick, deterministic failovers (``extra_args`` adds or overrides
any of them): ``cluster-node-timeout 1000`` (a dead master is failed after about a
second; a replica's election waits 0.5-1 s more), ``cluster-replica-validity-factor
0`` (a replica may always take over, however long since it heard its master),
``cluster-allow-replica-migration no`` (replicas stay where they were put) and
``repl-diskless-sync-delay 0`` (a replica's first sync does not wait 5 s for
company). Everything else is Redis's default, ``cluster-require-full-coverage yes``
included: while a master is down and not yet replaced, the whole cluster refuses
keyed commands (CLUSTERDOWN), as a production cluster does. Nothing is saved
(``--save '' --appendonly no``): a node restarted with ``restart()`` keeps its
place in the cluster (its nodes.conf) but none of its data.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import pytest

REDIS_SERVER = shutil.which("redis-server")
SLOTS = 16384


def redis_version() -> Tuple[int, ...]:
    """The installed redis-server's version, (0,) if there is none."""
    if REDIS_SERVER is None:
        return (0,)
    out = subprocess.run([REDIS_SERVER, "--version"], capture_output=True, text=True, timeout=10).stdout
    for word in out.split():
        if word.startswith("v="):
            return tuple(int(x) for x in word[2:].split(".") if x.isdigit())
    return (0,)


def key_slot(key: Union[str, bytes]) -> int:
    """The hash slot of ``key`` (its ``{tag}`` if it has one), as CLUSTER KEYSLOT says."""
    from redis.cluster import key_slot as slot

    return slot(key.encode() if isinstance(key, str) else key)


class ClusterError(RuntimeError):
    """The cluster did not reach the state asked for within the time given."""


class _Node:
    """One line of CLUSTER NODES, as one node sees it."""

    __slots__ = ("id", "port", "flags", "master", "link", "slots", "migrating")

    def __init__(self, line: str) -> None:
        fields = line.split()
        self.id = fields[0]
        self.port = int(fields[1].split("@")[0].rsplit(":", 1)[1] or 0)
        self.flags = set(fields[2].split(","))
        self.master = fields[3] if fields[3] != "-" else None
        self.link = fields[7]
        # "[slot->-id]" / "[slot-<-id]" are a migration in progress, not ownership.
        self.slots = [tuple(int(x) for x in s.split("-")) if "-" in s else (int(s), int(s))
                      for s in fields[8:] if not s.startswith("[")]
        self.migrating = any(s.startswith("[") for s in fields[8:])

    @property
    def failing(self) -> bool:
        return bool(self.flags & {"fail", "fail?", "handshake", "noaddr"})


class RedisCluster:
    """A local Redis Cluster of ``masters`` masters with ``replicas`` replicas each."""

    def __init__(self, masters: int = 3, replicas: int = 0, *, node_timeout_ms: int = 1000,
                 extra_args: Sequence[str] = ()) -> None:
        if masters < 1 or replicas < 0:
            raise ValueError("a cluster needs at least one master and no negative replicas")
        self.masters_count = masters
        self.replicas_count = replicas
        self.node_timeout_ms = node_timeout_ms
        self.extra_args = list(extra_args)
        # Ports in creation order: the masters first, then the replicas.
        self.nodes: List[int] = []
        self._bus: Dict[int, int] = {}  # port -> its cluster-bus port
        self._procs: Dict[int, subprocess.Popen] = {}  # running nodes only
        self._ids: Dict[int, str] = {}  # port -> node id (stable: kept in nodes.conf)
        self._admins: Dict[int, Any] = {}  # port -> the fixture's own client to it
        self.dir: Optional[str] = None

    # -- what tests use ----------------------------------------------------------

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:PORT``, PORT the first node still running."""
        return f"redis+cluster://127.0.0.1:{self.running()[0]}"

    def client(self, **kwargs: Any) -> Any:
        """A fresh ``redis.cluster.RedisCluster`` that starts from a running node."""
        from redis.cluster import RedisCluster as Client

        options = dict(socket_timeout=5, socket_connect_timeout=5)
        options.update(kwargs)
        return Client(host="127.0.0.1", port=self.running()[0], **options)

    def node_client(self, port: int, **kwargs: Any) -> Any:
        """A ``redis.Redis`` to the one node at ``port`` (no redirections followed)."""
        import redis

        options = dict(socket_timeout=5, socket_connect_timeout=5)
        options.update(kwargs)
        return redis.Redis(host="127.0.0.1", port=port, **options)

    def running(self) -> List[int]:
        """The ports of the nodes whose process is alive, in creation order."""
        return [p for p in self.nodes if p in self._procs and self._procs[p].poll() is None]

    def masters(self) -> List[int]:
        """The running masters that own slots, in the order of their first slot."""
        owners = self._owners(self._view(self.running()[0]))
        return list(dict.fromkeys(port for _, _, port in owners))

    def replicas_of(self, port: int) -> List[int]:
        """The running nodes that replicate the master at ``port``."""
        view = self._view(self.running()[0])
        return sorted(n.port for n in view if n.master == self._ids[port] and n.port in self.running())

    def master_of(self, key_or_slot: Union[str, bytes, int]) -> int:
        """The port of the master that owns a key's slot (or the slot, given an int)."""
        slot = key_or_slot if isinstance(key_or_slot, int) else key_slot(key_or_slot)
        for start, end, port in self._owners(self._view(self.running()[0])):
            if start <= slot <= end:
                return port
        raise ClusterError(f"no running master owns slot {slot}")

    # -- life --------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> "RedisCluster":
        """Start every node, join them, and wait until the cluster is healthy."""
        assert REDIS_SERVER, "redis-server is not installed"
        deadline = time.monotonic() + timeout
        self.dir = tempfile.mkdtemp(prefix="greenchan-cluster-")
        try:
            count = self.masters_count * (1 + self.replicas_count)
            ports = self._free_ports(2 * count)
            self.nodes = ports[:count]
            self._bus = dict(zip(self.nodes, ports[count:]))
            for port in self.nodes:
                self._spawn(port)
            for port in self.nodes:
                self._wait_ping(port, deadline)
            for epoch, port in enumerate(self.nodes, 1):
                admin = self._admin(port)
                self._ids[port] = admin.execute_command("CLUSTER", "MYID")
                # Distinct epochs from the start, as redis-cli gives them: two masters
                # with the same epoch would have to settle a collision first.
                admin.execute_command("CLUSTER", "SET-CONFIG-EPOCH", epoch)
            masters = self.nodes[: self.masters_count]
            for i, port in enumerate(masters):
                first, last = SLOTS * i // len(masters), SLOTS * (i + 1) // len(masters) - 1
                self._admin(port).execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
            hub = self.nodes[0]
            for port in self.nodes[1:]:
                self._admin(port).execute_command("CLUSTER", "MEET", "127.0.0.1", hub, self._bus[hub])
            self._until(deadline, "every node knows every other", self._all_known)
            for j, port in enumerate(self.nodes[self.masters_count:]):
                master = masters[j % len(masters)]
                self._admin(port).execute_command("CLUSTER", "REPLICATE", self._ids[master])
            self._until(deadline, "the cluster is healthy", self._healthy)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every node and remove the directory."""
        for admin in self._admins.values():
            admin.close()
        self._admins.clear()
        for port, proc in list(self._procs.items()):
            if proc.poll() is None:
                proc.terminate()
        for port, proc in list(self._procs.items()):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self._procs.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def kill(self, port: int) -> None:
        """Stop the node at ``port`` abruptly (SIGKILL), as a crash would."""
        proc = self._procs.pop(port, None)
        admin = self._admins.pop(port, None)
        if admin is not None:
            admin.close()
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)

    def restart(self, port: int, timeout: float = 20.0) -> None:
        """Start a killed node again and wait until the cluster is healthy.

        It rejoins from its nodes.conf, empty: a master no replica replaced takes
        its slots back; one that was replaced becomes a replica of its successor.
        """
        deadline = time.monotonic() + timeout
        self._spawn(port)
        self._wait_ping(port, deadline)
        self._until(deadline, f"the cluster is healthy with {port} back", self._healthy)

    def failover(self, port: int, timeout: float = 20.0) -> int:
        """Kill the master at ``port`` (if running) and wait until one of its replicas
        has taken its slots and the cluster is healthy; the new master's port."""
        deadline = time.monotonic() + timeout
        replicas = self.replicas_of(port)
        if not replicas:
            raise ClusterError(f"the master at {port} has no replica to take over")
        self.kill(port)

        def promoted() -> Optional[int]:
            if not self._healthy():
                return None
            owners = {owner for _, _, owner in self._owners(self._view(self.running()[0]))}
            return next((r for r in replicas if r in owners), None)

        return self._until(deadline, f"a replica of {port} ({replicas}) took over", promoted)

    def manual_failover(self, replica_port: int, timeout: float = 20.0) -> None:
        """CLUSTER FAILOVER on a replica: it and its master swap roles, nothing lost.
        Returns when the replica owns the slots and the cluster is healthy."""
        deadline = time.monotonic() + timeout
        admin = self._admin(replica_port)
        master = next(n for n in self._view(replica_port) if "myself" in n.flags).master
        if master is None:
            raise ClusterError(f"{replica_port} is not a replica")
        admin.execute_command("CLUSTER", "FAILOVER")

        def done() -> bool:
            me = next(n for n in self._view(replica_port) if "myself" in n.flags)
            return "master" in me.flags and bool(me.slots) and self._healthy()

        self._until(deadline, f"{replica_port} took over from its master", done)

    def begin_migration(self, slot: int, to_port: int) -> int:
        """Mark ``slot`` IMPORTING on ``to_port`` and MIGRATING on its owner (whose
        port is returned): from now on the owner answers ASK for keys it lacks."""
        source = self.master_of(slot)
        if source == to_port:
            raise ClusterError(f"slot {slot} is already on {to_port}")
        self._admin(to_port).execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", self._ids[source])
        self._admin(source).execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", self._ids[to_port])
        return source

    def move_keys(self, slot: int, source: int, to_port: int, timeout: float = 20.0) -> int:
        """MIGRATE every key of ``slot`` from ``source`` to ``to_port``; how many moved."""
        deadline = time.monotonic() + timeout
        admin = self._admin(source)
        moved = 0
        while True:  # bounded: by the deadline, and each batch empties part of the slot
            keys = admin.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100)
            if not keys:
                return moved
            if time.monotonic() > deadline:
                raise ClusterError(f"slot {slot} still has keys on {source} after {timeout} s")
            admin.execute_command("MIGRATE", "127.0.0.1", to_port, "", 0, 5000, "REPLACE", "KEYS", *keys)
            moved += len(keys)

    def end_migration(self, slot: int, to_port: int, timeout: float = 20.0) -> None:
        """Give ``slot`` to ``to_port`` on every master (the new owner first, as
        redis-cli does) and wait until the cluster agrees and is healthy."""
        deadline = time.monotonic() + timeout
        owner = self._ids[to_port]
        self._admin(to_port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", owner)
        for port in self.masters():
            if port != to_port:
                self._admin(port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", owner)

        def agreed() -> bool:
            return self._healthy() and self.master_of(slot) == to_port

        self._until(deadline, f"every node agrees slot {slot} is on {to_port}", agreed)

    def migrate_slot(self, slot: int, to_port: int, timeout: float = 20.0) -> int:
        """Move ``slot`` and its keys to the master at ``to_port``, the way
        ``redis-cli --cluster reshard`` does; returns how many keys moved."""
        source = self.begin_migration(slot, to_port)
        moved = self.move_keys(slot, source, to_port, timeout)
        self.end_migration(slot, to_port, timeout)
        return moved

    def healthy(self) -> bool:
        """Whether the cluster is as ``start()`` left it: every node running, state ok,
        agreement everywhere, ``replicas`` replicas per master, each linked."""
        try:
            if len(self.running()) != len(self.nodes) or not self._healthy():
                return False
            return all(len(self.replicas_of(m)) == self.replicas_count for m in self.masters())
        except Exception:
            return False

    def flush(self) -> None:
        """Empty every master (its replicas follow)."""
        for port in self.masters():
            self._admin(port).flushall()

    def log_tail(self, lines: int = 5) -> str:
        """The last lines of every node's log: what to read when a wait failed."""
        out = []
        for port in self.nodes:
            try:
                with open(os.path.join(self.dir or "", f"{port}.log"), errors="replace") as f:
                    out.append(f"--- {port}\n" + "".join(f.readlines()[-lines:]))
            except OSError:
                pass
        return "\n".join(out)

    # -- internals ---------------------------------------------------------------

    @staticmethod
    def _free_ports(count: int) -> List[int]:
        """``count`` distinct free ports: all held bound until all are chosen."""
        socks = []
        try:
            for _ in range(count):
                sock = socket.socket()
                sock.bind(("127.0.0.1", 0))
                socks.append(sock)
            return [s.getsockname()[1] for s in socks]
        finally:
            for sock in socks:
                sock.close()

    def _spawn(self, port: int) -> None:
        assert self.dir is not None
        self._procs[port] = subprocess.Popen(
            [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1",
             "--cluster-enabled", "yes", "--cluster-port", str(self._bus[port]),
             "--cluster-config-file", f"nodes-{port}.conf", "--dir", self.dir,
             "--logfile", f"{port}.log", "--save", "", "--appendonly", "no",
             "--cluster-node-timeout", str(self.node_timeout_ms),
             "--cluster-replica-validity-factor", "0",
             "--cluster-allow-replica-migration", "no",
             "--repl-diskless-sync-delay", "0",
             *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.dir,
        )

    def _admin(self, port: int) -> Any:
        # One per node, dropped when the node is killed; RESP2 and str replies, so that
        # CLUSTER NODES reads the same whatever redis-py's default protocol.
        admin = self._admins.get(port)
        if admin is None:
            admin = self._admins[port] = self.node_client(port, decode_responses=True, protocol=2)
        return admin

    def _wait_ping(self, port: int, deadline: float) -> None:
        def answers() -> bool:
            proc = self._procs.get(port)
            if proc is None or proc.poll() is not None:
                raise ClusterError(f"redis-server on {port} exited; log:\n{self.log_tail(20)}")
            try:
                return bool(self._admin(port).ping())
            except Exception:
                return False

        self._until(deadline, f"redis-server on {port} answers", answers)

    def _view(self, port: int) -> List[_Node]:
        text = self._admin(port).execute_command("CLUSTER", "NODES")
        return [_Node(line) for line in text.splitlines() if line.strip()]

    @staticmethod
    def _owners(view: List[_Node]) -> List[Tuple[int, int, int]]:
        """(first slot, last slot, master port) of every slot range, sorted."""
        return sorted((a, b, n.port) for n in view if "master" in n.flags for a, b in n.slots)

    def _all_known(self) -> bool:
        running = set(self.running())
        for port in running:
            view = {n.port: n for n in self._view(port)}
            if not running <= set(view) or any(view[p].failing or view[p].link != "connected"
                                               for p in running if p != port):
                return False
        return True

    def _healthy(self) -> bool:
        """Every running node: state ok, the same owners and roles, nobody failing
        among the running, replicas linked; no slot owned by a stopped node."""
        running = self.running()
        agreed = None
        for port in running:
            admin = self._admin(port)
            if "cluster_state:ok" not in admin.execute_command("CLUSTER", "INFO"):
                return False
            view = self._view(port)
            by_port = {n.port: n for n in view}
            if any(p not in by_port or (p != port and (by_port[p].failing or by_port[p].link != "connected"))
                   for p in running):
                return False
            owners = self._owners(view)
            covered = sum(b - a + 1 for a, b, _ in owners)
            if covered != SLOTS or any(owner not in running for _, _, owner in owners):
                return False
            ids = {n.id: n.port for n in view}
            roles = tuple(sorted((p, ids.get(by_port[p].master or "", 0)) for p in running))
            if agreed is None:
                agreed = (owners, roles)
            elif agreed != (owners, roles):
                return False
            me = by_port[port]
            if me.migrating:
                return False
            if me.master is not None and admin.info("replication").get("master_link_status") != "up":
                return False
        return agreed is not None

    def _until(self, deadline: float, what: str, check: Any) -> Any:
        while True:  # bounded: by the deadline
            try:
                value = check()
            except ClusterError:
                raise
            except Exception:  # a node restarting, a view half-written: ask again
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise ClusterError(f"not within the time given: {what}; logs:\n{self.log_tail()}")
            time.sleep(0.02)


def group_on(cluster: RedisCluster, port: int, prefix: str = "room") -> str:
    """A group name ``prefix:N`` whose ``{group}`` hash slot the master at ``port`` owns,
    so that a test can put its groups on the shards it wants."""
    owners = cluster._owners(cluster._view(port))
    for n in range(100_000):  # bounded; a master of a third of the slots needs about 3
        name = f"{prefix}:{n}"
        slot = key_slot("{" + name + "}")
        if any(a <= slot <= b and owner == port for a, b, owner in owners):
            return name
    raise ClusterError(f"the master at {port} owns no slot a {prefix}:N name hashes to")


def _skip_unless_possible() -> None:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    if redis_version() < (7,):
        pytest.skip("Redis Cluster's sharded pub/sub needs redis-server 7 or newer")


def _shared(request: Any, masters: int, replicas: int) -> Iterator[RedisCluster]:
    """The test module's cluster of this shape for one test: started at the module's
    first use, rebuilt when a test left it unhealthy (a killed node), emptied after
    each test, stopped when the module's tests are done."""
    _skip_unless_possible()
    module = request.node.getparent(pytest.Module)
    clusters: Dict[Tuple[int, int], RedisCluster] = module.__dict__.setdefault("_redis_clusters", {})
    cluster = clusters.get((masters, replicas))
    if cluster is None or not cluster.healthy():
        if cluster is None:
            module.addfinalizer(lambda: clusters.pop((masters, replicas), RedisCluster()).stop())
        else:
            cluster.stop()
        cluster = clusters[masters, replicas] = RedisCluster(masters, replicas).start()
    yield cluster
    if cluster.healthy():
        cluster.flush()
    else:
        cluster.stop()


@pytest.fixture
def redis_cluster(request: Any) -> Iterator[RedisCluster]:
    """A 3-master cluster, no replicas, shared by a module's tests (started about
    once per module); every test gets it healthy and empty. A test may kill,
    restart or reshard: a cluster left unhealthy is replaced for the next test."""
    yield from _shared(request, 3, 0)


@pytest.fixture
def redis_cluster_replicas(request: Any) -> Iterator[RedisCluster]:
    """3 masters with a replica each, for failover tests; shared and replaced as
    ``redis_cluster`` is (a failover that killed a master leaves it unhealthy, so
    the next test gets a new one; a manual failover leaves it healthy, roles swapped:
    tests ask ``masters()`` and ``replicas_of()`` rather than assume)."""
    yield from _shared(request, 3, 1)
