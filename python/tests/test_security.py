"""Keyed workers refuse every RPC without a fresh proof of the key — checked
with grpcio, a gRPC client that shares no code with dfship — and TLS keeps
plaintext and certificate-less clients out. UDFs never see the key, and what
they return is validated before the engine uses it."""

from __future__ import annotations

import hashlib
import hmac
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cloudpickle
import datafusion
import grpc
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import PLAN_FORMS, plan_in_form

import dfship

# Workers cannot import this module: its functions travel by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

KEY = "a shared secret of enough length"
METHODS = {
    "/worker.WorkerService/GetWorkerInfo": "unary_unary",
    "/worker.WorkerService/ExecuteTask": "unary_stream",
    "/worker.WorkerService/CoordinatorChannel": "stream_stream",
    # datafusion-distributed's progress service, behind the same check.
    "/observability.ObservabilityService/Ping": "unary_unary",
}


def rpc_key(key: str | bytes) -> bytes:
    raw = key.encode() if isinstance(key, str) else key
    return hmac.new(raw, b"dfship-rpc-auth-v1", hashlib.sha256).digest()


def proof(key: str | bytes, path: str, millis: int, nonce: bytes, worker: bytes) -> str:
    """The documented proof (crates/dfship-distributed/src/rpc_auth.rs), computed here independently."""
    message = b"dfship-rpc\nv2\n" + path.encode() + b"\n" + str(millis).encode() + b"\n" + nonce + worker
    tag = hmac.new(rpc_key(key), message, hashlib.sha256).hexdigest()
    return f"v2.{millis}.{nonce.hex()}.{worker.hex()}.{tag}"


def tagged(key: str | bytes, nonce: bytes, messages: list[bytes]) -> list[bytes]:
    """The request messages with the tag each carries (crates/dfship-distributed/src/signed_body.rs)."""
    out = []
    for index, message in enumerate(messages):
        prefix = b"\x00" + len(message).to_bytes(4, "big")
        covered = b"dfship-frame\nv2\n" + nonce + index.to_bytes(8, "little") + prefix + message
        out.append(message + hmac.new(rpc_key(key), covered, hashlib.sha256).digest())
    return out


def hello(channel: grpc.Channel, key: str | bytes) -> bytes:
    """Asks a worker who it is and checks its answer; its worker id."""
    challenge = os.urandom(16)
    _, call_ = channel.unary_unary("/dfship.Auth/Hello").with_call(
        b"", metadata=[("dfship-hello", challenge.hex())], timeout=10
    )
    answer = dict(call_.initial_metadata())["dfship-identity"]
    worker_hex, tag = answer.split(".")
    worker = bytes.fromhex(worker_hex)
    expected = hmac.new(rpc_key(key), b"dfship-hello\nv1\n" + challenge + worker, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(tag, expected), "the worker proved the key"
    return worker


def signed(key: str | bytes, path: str, worker: bytes, messages: list[bytes] | None = None) -> dict[str, Any]:
    """A fresh proof and tagged messages for one call of `path` on `worker`."""
    nonce = os.urandom(16)
    return {
        "metadata": [("dfship-auth", proof(key, path, now_millis(), nonce, worker))],
        "messages": tagged(key, nonce, [b""] if messages is None else messages),
    }


def now_millis() -> int:
    return int(time.time() * 1000)


def call(
    channel: grpc.Channel,
    path: str,
    metadata: list[tuple[str, str]] | None = None,
    messages: list[bytes] | None = None,
    kind: str | None = None,
) -> grpc.StatusCode:
    """Calls `path` with `messages` (one empty message by default); the status code it ends with."""
    kind = kind or METHODS[path]
    messages = [b""] if messages is None else messages
    try:
        if kind == "unary_unary":
            channel.unary_unary(path)(messages[0], metadata=metadata, timeout=10)
        elif kind == "unary_stream":
            list(channel.unary_stream(path)(messages[0], metadata=metadata, timeout=10))
        else:
            list(channel.stream_stream(path)(iter(messages), metadata=metadata, timeout=10))
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def keyed() -> Iterator[dfship.LocalCluster]:
    with dfship.LocalCluster(workers=2, env={"DFSHIP_CLUSTER_KEY": KEY}) as cluster:
        yield cluster


def test_every_method_refuses_a_client_without_the_key(keyed: dfship.LocalCluster) -> None:
    with grpc.insecure_channel(keyed.urls[0].removeprefix("http://")) as channel:
        worker = hello(channel, KEY)
        for path in METHODS:
            assert call(channel, path) == grpc.StatusCode.UNAUTHENTICATED, path
            wrong = signed("another secret of enough length", path, worker)
            assert call(channel, path, **wrong) == grpc.StatusCode.UNAUTHENTICATED, path
            garbage = [("dfship-auth", "v2.0.00.00.00")]
            assert call(channel, path, garbage) == grpc.StatusCode.UNAUTHENTICATED, path
            old_version = [("dfship-auth", "v1.0.00.00")]
            assert call(channel, path, old_version) == grpc.StatusCode.UNAUTHENTICATED, path


def test_a_flood_of_refused_requests_with_long_paths_logs_little(keyed: dfship.LocalCluster) -> None:
    """Each refused request used to log its client-chosen path in full, with
    no limit: now at most a line a second, the path cut short, the rest
    counted; and the cluster keeps only its workers' latest lines."""
    long_path = "/" + "x" * 8000
    METHODS[long_path] = "unary_unary"
    try:
        started = time.monotonic()
        with grpc.insecure_channel(keyed.urls[1].removeprefix("http://")) as channel:
            for _ in range(300):
                assert call(channel, long_path) == grpc.StatusCode.UNAUTHENTICATED
        took = time.monotonic() - started
    finally:
        del METHODS[long_path]
    time.sleep(0.5)
    logs = keyed.logs(1)
    refusals = [line for line in logs if "refused an unauthenticated request" in line]
    assert 1 <= len(refusals) <= took + 2, refusals
    assert all(len(line) < 1000 for line in logs), max(len(line) for line in logs)
    assert len(logs) <= dfship.cluster.LOG_LINES


def test_a_proof_opens_one_worker_once_for_one_body(keyed: dfship.LocalCluster) -> None:
    path = "/worker.WorkerService/GetWorkerInfo"
    with (
        grpc.insecure_channel(keyed.urls[0].removeprefix("http://")) as first,
        grpc.insecure_channel(keyed.urls[1].removeprefix("http://")) as second,
    ):
        worker = hello(first, KEY)
        assert hello(second, KEY) != worker, "each worker has its own identity"
        fresh = signed(KEY, path, worker)
        assert call(first, path, **fresh) == grpc.StatusCode.OK, "a valid proof passes"
        assert call(first, path, **fresh) == grpc.StatusCode.UNAUTHENTICATED, "but only once"
        assert call(second, path, **signed(KEY, path, worker)) == grpc.StatusCode.UNAUTHENTICATED, (
            "and only on the worker it names"
        )
        nonce = os.urandom(16)
        old = [("dfship-auth", proof(KEY, path, now_millis() - 10 * 60 * 1000, nonce, worker))]
        assert call(first, path, old, tagged(KEY, nonce, [b""])) == grpc.StatusCode.UNAUTHENTICATED, (
            "and not after the window"
        )
        other = signed(KEY, "/worker.WorkerService/ExecuteTask", worker)
        assert call(first, path, **other) == grpc.StatusCode.UNAUTHENTICATED, "nor for another method"
        # The body is bound to the proof: another message, a message tagged
        # for another request, or one without a tag are refused.
        altered = signed(KEY, path, worker)
        altered["messages"] = [b"\x08\x01" + altered["messages"][0]]
        assert call(first, path, **altered) == grpc.StatusCode.UNAUTHENTICATED, "nor with another body"
        foreign = signed(KEY, path, worker)
        foreign["messages"] = signed(KEY, path, worker)["messages"]
        assert call(first, path, **foreign) == grpc.StatusCode.UNAUTHENTICATED, "nor another request's body"
        bare = signed(KEY, path, worker)
        bare["messages"] = [b""]
        assert call(first, path, **bare) == grpc.StatusCode.UNAUTHENTICATED, "nor an untagged body"


class Impostor(grpc.GenericRpcHandler):
    """An endpoint in a keyed coordinator's worker list that is no worker of
    the cluster (a typo, a stale DNS record, a spoofed address). It keeps
    every request it gets: method, metadata and messages. With
    `relay_challenges_to`, it passes identity challenges on to that real
    worker and hands back its answers: the strongest impostor that does not
    hold the key."""

    def __init__(self, relay_challenges_to: str | None = None) -> None:
        self.harvest: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.relay = grpc.insecure_channel(relay_challenges_to) if relay_challenges_to else None
        self.server = grpc.server(ThreadPoolExecutor(max_workers=16), handlers=[self])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.stop(0)
        if self.relay is not None:
            self.relay.close()

    def service(self, details: Any) -> Any:
        method, metadata = details.method, list(details.invocation_metadata)
        if method == "/dfship.Auth/Hello":
            return grpc.unary_unary_rpc_method_handler(lambda request, context: self.hello(metadata, context))
        if self.relay is not None and method == "/worker.WorkerService/GetWorkerInfo":
            # Passes probes on too, so the coordinator plans on it.
            return grpc.unary_unary_rpc_method_handler(
                lambda request, context: self.forward(method, metadata, request)
            )

        def keep(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
            entry: dict[str, Any] = {"method": method, "metadata": metadata, "messages": []}
            with self.lock:
                self.harvest.append(entry)
            for message in requests:
                entry["messages"].append(message)
                break  # one message is enough to keep; a stream would wait for more
            context.abort(grpc.StatusCode.UNAVAILABLE, "an impostor")
            yield b""  # never reached

        return grpc.stream_stream_rpc_method_handler(keep)

    def forward(self, method: str, metadata: list[tuple[str, str]], request: bytes) -> bytes:
        assert self.relay is not None
        with self.lock:
            entry = {"method": method, "metadata": metadata, "messages": [request], "forwarded": True}
            self.harvest.append(entry)
        passed = [(name, value) for name, value in metadata if name.startswith("dfship-")]
        response: bytes = self.relay.unary_unary(method)(request, metadata=passed, timeout=10)
        return response

    def hello(self, metadata: list[tuple[str, str]], context: grpc.ServicerContext) -> bytes:
        with self.lock:
            self.harvest.append({"method": "/dfship.Auth/Hello", "metadata": metadata, "messages": []})
        if self.relay is None:
            # Claims an identity it cannot prove.
            context.send_initial_metadata([("dfship-identity", os.urandom(16).hex() + "." + "0" * 64)])
            return b""
        challenge = self.relay.unary_unary("/dfship.Auth/Hello")
        _, relayed = challenge.with_call(b"", metadata=metadata, timeout=10)
        answer = dict(relayed.initial_metadata())["dfship-identity"]
        context.send_initial_metadata([("dfship-identity", answer)])
        return b""


def impostor_context(impostor: Impostor, keyed: dfship.LocalCluster, dataset: Path) -> Any:
    """A keyed coordinator whose worker list is the impostor and worker 1."""
    ctx = dfship.ClusterContext(
        [impostor.url, keyed.urls[1]], cluster_key=KEY.encode(), bytes_per_partition=1
    )
    ctx.register_parquet("facts", dataset / "facts")
    triple = dfship.udf(lambda a: pc.multiply(a, 3), [pa.int64()], pa.int64(), "immutable", name="triple_it")
    ctx.register_udf(triple)
    return ctx


def kind_of(method: str) -> str:
    return METHODS.get(method, "stream_stream")


def test_an_impostor_in_the_worker_list_gets_nothing_signed(
    keyed: dfship.LocalCluster, dataset: Path
) -> None:
    impostor = Impostor()
    try:
        ctx = impostor_context(impostor, keyed, dataset)
        try:
            rows = ctx.sql("SELECT sum(triple_it(id)) AS s FROM facts").collect().to_pylist()
            assert rows == [{"s": 3 * sum(range(1, 2401))}], "the query ran on the real worker"
        except dfship.AuthenticationError as error:
            assert "did not prove that it holds the cluster key" in str(error), error
            assert impostor.url.removeprefix("http://") in str(error), error
        with impostor.lock:
            harvest = list(impostor.harvest)
        assert harvest, "the impostor was asked who it is"
        methods = [entry["method"] for entry in harvest]
        assert all(method == "/dfship.Auth/Hello" for method in methods), methods
        assert not any(name == "dfship-auth" for entry in harvest for name, _ in entry["metadata"])
    finally:
        impostor.close()


def test_what_a_relaying_impostor_harvests_opens_no_other_worker_and_no_other_body(
    keyed: dfship.LocalCluster, dataset: Path
) -> None:
    """An impostor that relays identity challenges to worker 0 is taken for
    it and sent signed requests. Within the proofs' 60 s window, none of
    them opens worker 1 (also with :authority rewritten to worker 0's), none
    opens worker 0 with another body, and none opens it twice."""
    real = [url.removeprefix("http://") for url in keyed.urls]
    impostor = Impostor(relay_challenges_to=real[0])
    try:
        ctx = impostor_context(impostor, keyed, dataset)
        try:
            ctx.sql("SELECT sum(triple_it(id)) AS s FROM facts").collect()
        except dfship.DfshipError:
            pass  # the impostor answers no request; whether the query survives is not the point here
        harvested_at = time.monotonic()
        with impostor.lock:
            harvest = [entry for entry in impostor.harvest if entry["method"] != "/dfship.Auth/Hello"]
    finally:
        impostor.close()
    signed_requests = [
        entry
        for entry in harvest
        if not entry.get("forwarded") and any(name == "dfship-auth" for name, _ in entry["metadata"])
    ]
    methods = {entry["method"] for entry in signed_requests}
    assert "/worker.WorkerService/CoordinatorChannel" in methods, (
        "the relay was taken for worker 0 and sent stage plans",
        methods,
    )
    assert any(entry["messages"] for entry in signed_requests), "with their messages"
    with grpc.insecure_channel(real[0]) as first:
        worker0 = hello(first, KEY)
    with (
        grpc.insecure_channel(real[1]) as second,
        grpc.insecure_channel(real[1], options=[("grpc.default_authority", real[0])]) as second_as_first,
        grpc.insecure_channel(real[0]) as first,
    ):
        for entry in signed_requests:
            method, messages = entry["method"], entry["messages"]
            metadata = [(name, value) for name, value in entry["metadata"] if name == "dfship-auth"]
            assert metadata[0][1].split(".")[3] == worker0.hex(), "the proof names worker 0"
            kind = kind_of(method)
            for channel in (second, second_as_first):
                code = call(channel, method, metadata, messages or [], kind)
                assert code == grpc.StatusCode.UNAUTHENTICATED, (method, code)
            if messages:
                head = messages[0]
                if len(head) > 32:  # flip a bit of the message, keep its tag
                    altered = [head[:-33] + bytes([head[-33] ^ 1]) + head[-32:], *messages[1:]]
                else:  # an empty message: give it a byte
                    altered = [b"\x08" + head, *messages[1:]]
                code = call(first, method, metadata, altered, kind)
                assert code == grpc.StatusCode.UNAUTHENTICATED, ("altered", method, code)
            # What a man in the middle can do: deliver the request to the
            # worker it was meant for (the altered attempt above already
            # used its proof, so that too is refused now).
            code = call(first, method, metadata, messages or [], kind)
            assert code == grpc.StatusCode.UNAUTHENTICATED, ("replayed", method, code)
    assert time.monotonic() - harvested_at < 60, "all within the proofs' window"


def test_the_keyed_coordinator_runs_queries(keyed: dfship.LocalCluster, dataset: Path) -> None:
    ctx = keyed.context(bytes_per_partition=1, cluster_key=KEY.encode())
    ctx.register_parquet("facts", dataset / "facts")
    ctx.register_udf(dfship.udf(lambda a: pc.add(a, 1), [pa.int64()], pa.int64(), "immutable", name="inc"))
    assert ctx.sql("SELECT sum(inc(id)) AS s FROM facts").collect().to_pylist() == [
        {"s": sum(range(1, 2401)) + 2400}
    ]
    unkeyed = keyed.context(bytes_per_partition=1)
    unkeyed.register_parquet("facts", dataset / "facts")
    # A scan, so the workers must take part (count(*) alone may come from Parquet metadata).
    with pytest.raises(dfship.AuthenticationError, match="requires the cluster key"):
        unkeyed.sql("SELECT sum(id) FROM facts WHERE category = 'cat_1'").collect()


@pytest.mark.parametrize("form", PLAN_FORMS)
def test_the_keyed_coordinator_runs_datafusion_python_plans(
    keyed: dfship.LocalCluster, dataset: Path, form: str
) -> None:
    """The user's own datafusion-python plan is trusted by its coordinator, which
    signs its UDFs for the keyed workers (DFPYUDF itself has no signature)."""
    local = datafusion.SessionContext()
    local.register_parquet("facts", str(dataset / "facts"))
    local.register_udf(
        datafusion.udf(lambda a: pc.multiply(a, 3), [pa.int64()], pa.int64(), "immutable", name="band")
    )
    query = "SELECT category, sum(band(id)) AS s FROM facts WHERE band(id) % 2 = 0 GROUP BY category"
    plan = plan_in_form(local.sql(query), form)
    expected = local.sql(query).to_arrow_table()
    ctx = keyed.context(bytes_per_partition=1, cluster_key=KEY.encode())
    before = ctx.shipped()
    actual = ctx.execute_datafusion_plan(plan).collect()
    assert expected.num_rows > 0
    assert sorted(actual.to_pylist(), key=str) == sorted(expected.to_pylist(), key=str)
    assert ctx.shipped()[1] > before[1], "the UDF reached the keyed workers inline, signed"


def test_a_refused_udf_in_a_datafusion_python_plan_is_a_sentence(
    keyed: dfship.LocalCluster, dataset: Path
) -> None:
    local = datafusion.SessionContext()
    local.register_parquet("facts", str(dataset / "facts"))
    local.register_udf(datafusion.udf(lambda a: a, [pa.int64()], pa.int64(), "immutable", name="band"))
    data = local.sql("SELECT band(id) FROM facts").logical_plan().to_bytes()
    at = data.index(b"DFPYUDF") + len(b"DFPYUDF")
    future = data[:at] + bytes([data[at] + 1]) + data[at + 1 :]  # a format version from the future
    ctx = keyed.context(bytes_per_partition=1, cluster_key=KEY.encode())
    with pytest.raises(dfship.PayloadRefusedError) as refused:
        ctx.execute_datafusion_plan(future)
    message = str(refused.value)
    assert "'band'" in message and "format version" in message, message
    assert "External(" not in message and "{ name" not in message, f"no Rust debug form: {message}"


@pytest.mark.parametrize("mode", ["pool", "in-process"])
def test_udfs_do_not_see_the_key(dataset: Path, mode: str) -> None:
    env = {"DFSHIP_CLUSTER_KEY": KEY}
    with dfship.LocalCluster(workers=2, env=env, worker_args=["--python-mode", mode]) as cluster:
        ctx = cluster.context(bytes_per_partition=1, cluster_key=KEY.encode())
        ctx.register_parquet("facts", dataset / "facts")

        def sees_key(values: pa.Array) -> pa.Array:
            import os

            return pa.array(["DFSHIP_CLUSTER_KEY" in os.environ] * len(values), pa.bool_())

        ctx.register_udf(dfship.udf(sees_key, [pa.int64()], pa.bool_(), "immutable", name="sees_key"))
        rows = ctx.sql("SELECT sees_key(id) AS seen, count(*) AS n FROM facts GROUP BY 1").collect()
        assert rows.to_pylist() == [{"seen": False, "n": 2400}]


def test_tls_keeps_out_plaintext_and_certificate_less_clients(dataset: Path) -> None:
    # Mutual TLS alone (no key), so a call that passes TLS is answered.
    with dfship.LocalCluster(workers=2, tls=True, key=False) as cluster:
        assert all(url.startswith("https://") for url in cluster.urls)
        assert cluster.tls is not None
        ctx = cluster.context(bytes_per_partition=1)
        ctx.register_parquet("facts", dataset / "facts")
        assert ctx.sql("SELECT count(*) AS n FROM facts").collect().to_pylist() == [{"n": 2400}]

        target = cluster.urls[0].removeprefix("https://")
        path = "/worker.WorkerService/GetWorkerInfo"
        with grpc.insecure_channel(target) as plaintext:
            assert call(plaintext, path) == grpc.StatusCode.UNAVAILABLE
        ca = Path(cluster.tls["ca"]).read_bytes()
        without_certificate = grpc.ssl_channel_credentials(root_certificates=ca)
        with grpc.secure_channel(target, without_certificate) as channel:
            assert call(channel, path) == grpc.StatusCode.UNAVAILABLE
        with_certificate = grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=Path(cluster.tls["key"]).read_bytes(),
            certificate_chain=Path(cluster.tls["cert"]).read_bytes(),
        )
        with grpc.secure_channel(target, with_certificate) as channel:
            assert call(channel, path) == grpc.StatusCode.OK, "the cluster's own certificate gets in"

        # A coordinator without the TLS settings says what is missing.
        with pytest.raises(dfship.DfshipError, match="--tls-ca"):
            bare = dfship.ClusterContext(cluster.urls, bytes_per_partition=1)
            bare.register_parquet("facts", dataset / "facts")
            bare.sql("SELECT sum(id) FROM facts WHERE category = 'cat_1'").collect()


INVALID = {
    "bad_utf8": (pa.string(), lambda a: pa.array([b"\xff\xfe"] * len(a), pa.binary()).view(pa.string())),
    "bad_offsets": (
        pa.string(),
        lambda a: pa.Array.from_buffers(
            pa.string(),
            len(a),
            [
                None,
                pa.py_buffer(pa.array([0, 5, 2] + [2] * (len(a) - 2), pa.int32()).buffers()[1]),
                pa.py_buffer(b"hello"),
            ],
        ),
    ),
    "bad_nested_nulls": (
        pa.struct([pa.field("x", pa.int64(), nullable=False)]),
        lambda a: pa.StructArray.from_arrays(
            [pa.array([None] * len(a), pa.int64())], fields=[pa.field("x", pa.int64(), nullable=False)]
        ),
    ),
}


@pytest.mark.parametrize("name", list(INVALID))
def test_invalid_results_are_refused_and_the_workers_keep_serving(
    ctx: dfship.ClusterContext, name: str
) -> None:
    returns, body = INVALID[name]
    ctx.register_udf(dfship.udf(body, [pa.int64()], returns, "immutable", name=name))
    with pytest.raises(dfship.UdfResultError, match=f"'{name}'"):
        ctx.sql(f"SELECT {name}(id) FROM facts").collect()
    assert ctx.sql("SELECT count(*) AS c FROM facts").collect().to_pylist() == [{"c": 2400}]


def test_a_default_local_cluster_is_keyed_and_its_key_is_on_no_command_line(dataset: Path) -> None:
    with dfship.LocalCluster(workers=2) as cluster:
        assert cluster.key_file is not None
        key_file = Path(cluster.key_file)
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert key_file.parent.stat().st_mode & 0o777 == 0o700
        key = key_file.read_bytes().strip()
        # Another local user's raw call, on every method: refused.
        with grpc.insecure_channel(cluster.urls[0].removeprefix("http://")) as channel:
            for path in METHODS:
                assert call(channel, path) == grpc.StatusCode.UNAUTHENTICATED, path
        # The cluster's own context holds the key and runs queries.
        ctx = cluster.context(bytes_per_partition=1)
        ctx.register_parquet("facts", dataset / "facts")
        assert ctx.sql("SELECT count(*) AS n FROM facts").collect().to_pylist() == [{"n": 2400}]
        # No process shows the key on its command line or in its environment.
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            for name in ("cmdline", "environ"):
                try:
                    text = (proc / name).read_bytes()
                except OSError:
                    continue
                assert key not in text, f"the key is in /proc/{proc.name}/{name}"
    assert not key_file.exists(), "the key file goes with the cluster"

    # Opting out is explicit, and then a raw call is answered.
    with dfship.LocalCluster(workers=1, key=False) as open_cluster:
        assert open_cluster.key_file is None
        with grpc.insecure_channel(open_cluster.urls[0].removeprefix("http://")) as channel:
            assert call(channel, "/worker.WorkerService/GetWorkerInfo") == grpc.StatusCode.OK


def hunt_for_the_key(values: pa.Array) -> pa.Array:
    """What a hostile UDF can find: every ancestor's environment and command
    line, and the key files those command lines name."""
    import json
    import os

    report: dict[str, Any] = {"uid": os.getuid(), "read": {}, "key_files": [], "opened": {}}
    pid = os.getpid()
    while True:
        for name in ("environ", "cmdline"):
            try:
                with open(f"/proc/{pid}/{name}", "rb") as source:
                    data = source.read()
            except OSError as error:
                report["read"][f"{pid}/{name}"] = type(error).__name__
                continue
            report["read"][f"{pid}/{name}"] = data.decode(errors="replace")
            parts = data.split(b"\0")
            for i, part in enumerate(parts):
                if part == b"--cluster-key-file" and i + 1 < len(parts):
                    report["key_files"].append(parts[i + 1].decode())
                elif part.startswith(b"--cluster-key-file="):
                    report["key_files"].append(part.split(b"=", 1)[1].decode())
        if pid <= 1:
            break
        with open(f"/proc/{pid}/stat") as stat:
            pid = int(stat.read().rsplit(")", 1)[1].split()[1])
    report["tampered"] = {}
    for path in report["key_files"]:
        try:
            with open(path, "rb") as source:
                report["opened"][path] = source.read().decode(errors="replace")
        except OSError as error:
            report["opened"][path] = type(error).__name__
        # Put another key in its place, for the worker's next start.
        for how, tamper in (
            ("append", lambda p: open(p, "ab").close()),
            ("rename", lambda p: os.rename(p, p + ".old")),
            ("remove", os.remove),
        ):
            try:
                tamper(path)
                report["tampered"][how] = "done"
            except OSError as error:
                report["tampered"][how] = type(error).__name__
    return pa.array([json.dumps(report)] * len(values), pa.string())


@pytest.mark.parametrize("where", ["environment", "file"])
def test_a_udf_cannot_find_the_key_in_any_ancestor_or_key_file(dataset: Path, where: str) -> None:
    import json

    env = {"DFSHIP_CLUSTER_KEY": KEY} if where == "environment" else {}
    with dfship.LocalCluster(workers=2, env=env) as cluster:
        key = KEY if where == "environment" else Path(str(cluster.key_file)).read_text().strip()
        options = {"cluster_key": KEY.encode()} if where == "environment" else {}
        ctx = cluster.context(bytes_per_partition=1, **options)
        ctx.register_parquet("facts", dataset / "facts")
        ctx.register_udf(dfship.udf(hunt_for_the_key, [pa.int64()], pa.string(), "volatile", name="hunt"))
        reports = ctx.sql("SELECT DISTINCT hunt(id) AS r FROM facts").collect().column("r").to_pylist()
        # The worker's own environment block no longer holds the key either
        # (read here as the test's user, who may read it).
        for pid in cluster.pids:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            assert key.encode() not in environ, f"worker {pid}'s environ still holds the key"
        logs = "\n".join(line for i in range(2) for line in cluster.logs(i))
        if where == "file":
            assert Path(str(cluster.key_file)).read_text().strip() == key, "the key file is intact"
    assert reports
    for text in reports:
        report = json.loads(text)
        if where == "file":
            assert report["key_files"], "the key file's path is on the worker's command line"
        # The key file is closed to runners whoever they run as (Landlock,
        # crates/dfship-runtime/src/landlock.rs): not read, not replaced.
        assert set(report["opened"].values()) <= {"PermissionError"}, report["opened"]
        assert set(report["tampered"].values()) <= {"PermissionError"}, report["tampered"]
        assert key not in text, f"a UDF found the key: {text[:2000]}"
        if report["uid"] != 0:
            # UDFs run as another user (nobody, for a root worker): the
            # worker's /proc files are closed to them too.
            worker_environ = [v for k, v in report["read"].items() if k.endswith("/environ")][1]
            assert worker_environ == "PermissionError", report["read"]
        else:
            # Root runners (this machine's Python lives where nobody cannot
            # run it, e.g. under /root): the worker says so at start-up; its
            # environment block holds no key (erased before it was unset).
            assert "UDF runners run as root" in logs, logs[-3000:]


def plant_in_runner(values: pa.Array) -> pa.Array:
    """A hostile UDF: patches a builtin, plants a module and starts a thread
    in its runner, for later queries' UDFs to find; returns its pid."""
    import builtins
    import os
    import threading
    import time as clock
    import types

    builtins.dfship_planted = True  # type: ignore[attr-defined]
    sys.modules["planted_module"] = types.ModuleType("planted_module")
    threading.Thread(target=clock.sleep, args=(3600,), name="planted", daemon=True).start()
    return pa.array([os.getpid()] * len(values), pa.int64())


def probe_runner(values: pa.Array) -> pa.Array:
    """What a UDF finds of earlier calls in its runner: `pid:builtin:module:thread`."""
    import builtins
    import os
    import threading

    seen = (
        f"{os.getpid()}:{int(hasattr(builtins, 'dfship_planted'))}:{int('planted_module' in sys.modules)}:"
        f"{sum(t.name == 'planted' for t in threading.enumerate())}"
    )
    return pa.array([seen] * len(values), pa.string())


@pytest.mark.parametrize("isolation", ["shared", "query"])
def test_what_a_query_plants_in_its_runners_reaches_the_next_query_only_when_runners_are_shared(
    dataset: Path, isolation: str
) -> None:
    args = ["--python-runners", "1", "--runner-isolation", isolation]
    with dfship.LocalCluster(workers=2, worker_args=args) as cluster:
        ctx = cluster.context(bytes_per_partition=1)
        ctx.register_parquet("facts", dataset / "facts")
        ctx.register_udf(dfship.udf(plant_in_runner, [pa.int64()], pa.int64(), "volatile", name="plant"))
        ctx.register_udf(dfship.udf(probe_runner, [pa.int64()], pa.string(), "volatile", name="probe"))
        planted = set(ctx.sql("SELECT DISTINCT plant(id) AS p FROM facts").collect().column("p").to_pylist())
        assert len(planted) == 2, "each worker's runner ran the planting UDF"
        time.sleep(0.5)  # the first query's tasks end on the workers
        seen = ctx.sql("SELECT DISTINCT probe(id) AS s FROM facts").collect().column("s").to_pylist()
    probes = [tuple(int(part) for part in text.split(":")) for text in seen]
    assert probes
    if isolation == "shared":
        # Control: the same runners serve the next query, plants and all.
        assert {probe[0] for probe in probes} == planted
        assert all(probe[1:3] == (1, 1) and probe[3] >= 1 for probe in probes), probes
    else:
        # Fresh processes that never ran user code serve the next query.
        assert not {probe[0] for probe in probes} & planted, (probes, planted)
        assert all(probe[1:] == (0, 0, 0) for probe in probes), probes


def hold_a_secret(values: pa.Array) -> pa.Array:
    """Query B: keeps a secret in its runner's memory while it works."""
    import os
    import time as clock

    secret = b"SECRET-OF-QUERY-B-" + os.urandom(8).hex().encode()
    clock.sleep(2.5)
    return pa.array([len(secret)] * len(values), pa.int64())


def attack_other_runners(values: pa.Array) -> pa.Array:
    """Query A: reads the memory of, and SIGKILLs, every other runner of its
    worker it can find, and leaves a double-forked daemon (which tries to
    start a session of its own). Answers `mem_reads:kills:tried:daemon`."""
    import os
    import signal as signals
    import time as clock

    me, parent = os.getpid(), os.getppid()
    tried = reads = kills = 0
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        pid = int(name)
        try:
            with open(f"/proc/{pid}/stat") as stat:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid != parent:
            continue  # not a sibling runner of this worker
        tried += 1
        try:
            with open(f"/proc/{pid}/maps") as maps:
                start = int(maps.readline().split("-")[0], 16)
            with open(f"/proc/{pid}/mem", "rb") as mem:
                mem.seek(start)
                reads += int(len(mem.read(16)) > 0)
        except (OSError, ValueError):
            pass
        try:
            os.kill(pid, signals.SIGKILL)
            kills += 1
        except OSError:
            pass
    r, w = os.pipe()
    if os.fork() == 0:
        if os.fork() == 0:
            try:
                os.setsid()
            except OSError:
                pass
            os.write(w, str(os.getpid()).encode().ljust(16))
            clock.sleep(3600)
        os._exit(0)
    daemon = int(os.read(r, 16).decode().strip())
    return pa.array([f"{reads}:{kills}:{tried}:{daemon}"] * len(values), pa.string())


def _runs(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_with_the_key_in_the_environment_a_query_cannot_read_or_kill_another_querys_runners(
    dataset: Path,
) -> None:
    # No key file, so nothing is hidden: each runner is still a Landlock
    # domain of its own, non-dumpable, in a process group killed whole.
    args = ["--python-runners", "2", "--runner-isolation", "query"]
    env = {"DFSHIP_CLUSTER_KEY": KEY}
    with dfship.LocalCluster(workers=2, env=env, worker_args=args) as cluster:
        ctx = cluster.context(bytes_per_partition=1, cluster_key=KEY.encode())
        ctx.register_parquet("facts", dataset / "facts")
        ctx.register_udf(dfship.udf(hold_a_secret, [pa.int64()], pa.int64(), "volatile", name="hold"))
        ctx.register_udf(
            dfship.udf(attack_other_runners, [pa.int64()], pa.string(), "volatile", name="attack")
        )
        with ThreadPoolExecutor(1) as pool:
            query_b = pool.submit(lambda: ctx.sql("SELECT DISTINCT hold(id) AS n FROM facts").collect())
            time.sleep(1.0)  # B's calls are running on both workers
            reports = ctx.sql("SELECT DISTINCT attack(id) AS r FROM facts").collect().column("r").to_pylist()
            b_rows = query_b.result(timeout=60)
        assert b_rows.column("n").to_pylist() == [34], "query B ran to its end, unharmed"
        parsed = [tuple(int(part) for part in report.split(":")) for report in reports]
        assert parsed
        assert sum(p[2] for p in parsed) >= 1, f"A found no other runner to attack: {parsed}"
        assert all(p[0] == 0 and p[1] == 0 for p in parsed), f"A read or killed another runner: {parsed}"
        daemons = [p[3] for p in parsed]
        # Query A ended: its runners retire, and their process groups with them.
        deadline = time.monotonic() + 10
        while any(_runs(pid) for pid in daemons) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in daemons if _runs(pid)], "a UDF's daemon outlived its runner"


def test_key_folders_of_killed_local_clusters_are_removed_at_the_next_start(tmp_path: Path) -> None:
    from dfship.cluster import remove_stale_key_folders

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live, foreign = (tmp_path / f"dfship-key-{n}" for n in ("stale", "live", "other"))
    for folder, pid in ((stale, dead.pid), (live, os.getpid())):
        folder.mkdir()
        (folder / "cluster.key").write_text("k")
        (folder / "owner.pid").write_text(str(pid))
    foreign.mkdir()  # no owner.pid: not a local cluster's, left alone
    assert remove_stale_key_folders(str(tmp_path)) == [str(stale)]
    assert not stale.exists() and live.exists() and foreign.exists()


def test_a_udf_swapping_the_staged_copy_for_a_link_to_the_key_gets_nothing(
    dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir(mode=0o777)
    out.chmod(0o777)  # runners may run as another user
    marker = tmp_path / "swapped"
    with dfship.LocalCluster(workers=2) as cluster:
        key_file = Path(str(cluster.key_file))
        key = key_file.read_text()
        key_dir, out_dir, marker_path = str(key_file.parent), str(out), str(marker)

        def swap_staging(values: pa.Array) -> pa.Array:
            """Leaves a daemon that waits for the COPY's staged file, then swaps
            the staging folder for one whose `result.csv` links to the key's
            folder and makes the target a folder, before the commit."""
            import os
            import time as clock

            try:
                os.close(os.open(marker_path + ".started", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return values
            if os.fork() == 0:
                deadline = clock.monotonic() + 30
                while clock.monotonic() < deadline:
                    for name in os.listdir(out_dir):
                        staged = os.path.join(out_dir, name, "result.csv")
                        if name.startswith(".dfship-staging-") and os.path.isfile(staged):
                            os.rename(os.path.join(out_dir, name), os.path.join(out_dir, "moved"))
                            os.mkdir(os.path.join(out_dir, name))
                            os.symlink(key_dir, staged)
                            os.mkdir(os.path.join(out_dir, "result.csv"))
                            with open(marker_path, "w") as done:
                                done.write("swapped")
                            os._exit(0)
                    clock.sleep(0.0005)
                os._exit(0)
            return values

        ctx = cluster.context(bytes_per_partition=1)
        ctx.register_parquet("facts", dataset / "facts")
        ctx.register_udf(dfship.udf(swap_staging, [pa.int64()], pa.int64(), "volatile", name="swap"))
        copy = f"COPY (SELECT swap(id) AS id FROM facts) TO '{out / 'result.csv'}' STORED AS CSV"
        try:
            ctx.sql(copy).collect()
            failure = None
        except Exception as error:  # noqa: BLE001 - what the COPY says is checked below
            failure = str(error)
        deadline = time.monotonic() + 5
        while not marker.exists() and failure is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert key_file.read_text() == key, "the key file is in place and unchanged"
        found = [p for p in out.rglob("*") if p.name == key_file.name and not p.is_symlink()]
        assert not found, f"the key was moved into the COPY's target: {found}"
        if marker.exists() and marker.read_text() == "swapped" and failure is None:
            # The swap came after the commit: the output is where it was asked.
            assert (out / "result.csv").is_file(), list(out.iterdir())
        elif failure is not None:
            assert "not committed" in failure, failure
