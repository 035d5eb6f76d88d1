"""Tables and results on an S3-compatible server (moto, on 127.0.0.1) and
over plain HTTP, read by a 3-worker local cluster: the query matrix with
inline Python UDFs equals the same queries on local files; `COPY … TO
s3://` writes back; credentials stay in each process (none in what the
coordinator sends a worker); a process without credentials fails at once,
saying which process, which URL and what to set."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import sorted_rows
from s3server import S3Server
from test_matrix import MATRIX, UDFS

import dfship

BUCKET = "dfship-test"
TWICE = dfship.udf(lambda a: pc.multiply(a, 2), [pa.int64()], pa.int64(), "immutable", name="twice")


@pytest.fixture(scope="module")
def s3(dataset: Path) -> Iterator[S3Server]:
    server = S3Server()
    try:
        server.upload(BUCKET, dataset)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3_cluster(s3: S3Server) -> Iterator[dfship.LocalCluster]:
    """Workers that know the server from the standard AWS variables only."""
    with dfship.LocalCluster(workers=3, env=s3.env()) as running:
        yield running


def s3_context(cluster: dfship.LocalCluster, s3: S3Server, **options: object) -> dfship.ClusterContext:
    """A coordinator that knows the server from explicit storage options."""
    ctx = cluster.context(bytes_per_partition=1, storage_options=s3.storage_options(), **options)
    for udf_name, func, inputs, output in UDFS:
        ctx.register_udf(dfship.udf(func, inputs, output, "immutable", name=udf_name))
    return ctx


def local_context(cluster: dfship.LocalCluster, dataset: Path) -> dfship.ClusterContext:
    ctx = cluster.context(bytes_per_partition=1)
    for udf_name, func, inputs, output in UDFS:
        ctx.register_udf(dfship.udf(func, inputs, output, "immutable", name=udf_name))
    ctx.register_parquet("facts", dataset / "facts")
    ctx.register_parquet("dim", dataset / "dim")
    return ctx


def test_query_matrix_on_s3_equals_local_files(
    s3_cluster: dfship.LocalCluster, s3: S3Server, dataset: Path
) -> None:
    remote = s3_context(s3_cluster, s3)
    remote.register_parquet("facts", f"s3://{BUCKET}/facts/")
    remote.register_parquet("dim", f"s3://{BUCKET}/dim/")
    local = local_context(s3_cluster, dataset)
    for name, query in sorted(MATRIX.items()):
        expected = local.sql(query).collect()
        actual = remote.sql(query).collect()
        assert expected.num_rows > 0, name
        assert sorted_rows(actual) == sorted_rows(expected), name
    # The scans ran on the workers, each reading the bucket with its own store.
    readers = [i for i in range(3) if any(f"s3://{BUCKET}/" in line for line in s3_cluster.logs(i))]
    assert len(readers) >= 2, [s3_cluster.logs(i)[-5:] for i in range(3)]


def test_copy_to_s3_writes_a_result_that_reads_back(s3_cluster: dfship.LocalCluster, s3: S3Server) -> None:
    ctx = s3_context(s3_cluster, s3)
    ctx.register_parquet("facts", f"s3://{BUCKET}/facts/")
    query = "SELECT id, py_double(id) AS d, py_upper(category) AS c FROM facts WHERE id % 3 = 0"
    expected = ctx.sql(query).collect()
    written = ctx.sql(f"COPY ({query}) TO 's3://{BUCKET}/out/doubled/' STORED AS PARQUET").collect()
    assert written.column("count").to_pylist() == [expected.num_rows]
    keys = s3.keys(BUCKET, "out/doubled/")
    assert keys and all(k.endswith(".parquet") for k in keys), keys
    ctx.register_parquet("doubled", f"s3://{BUCKET}/out/doubled/")
    back = ctx.sql("SELECT * FROM doubled").collect()
    assert sorted_rows(back) == sorted_rows(expected)


def test_a_single_parquet_file_over_http_with_range_requests(
    s3_cluster: dfship.LocalCluster, s3: S3Server, dataset: Path
) -> None:
    # A public object of moto's answers anonymous HEAD and Range GETs: a
    # plain HTTP server of a Parquet file, as a public bucket's URL is.
    s3.client.put_object_acl(Bucket=BUCKET, Key="facts/part-2.parquet", ACL="public-read")
    ctx = s3_cluster.context()
    ctx.register_udf(TWICE)
    ctx.register_parquet("part", f"{s3.endpoint}/{BUCKET}/facts/part-2.parquet")
    actual = ctx.sql("SELECT id, twice(id) AS t FROM part WHERE id % 7 = 0").collect()
    table = pq.read_table(dataset / "facts" / "part-2.parquet")
    ids = [i for i in table.column("id").to_pylist() if i % 7 == 0]
    assert ids and sorted_rows(actual) == sorted(((i, 2 * i) for i in ids), key=repr)


class RecordingProxy:
    """Forwards 127.0.0.1:port to a worker and keeps every byte the
    coordinator (or another worker) sends it."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").rstrip("/").rsplit(":", 1)
        self.target = (host, int(port))
        self.sent = bytearray()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, record: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if record:
                    with self._lock:
                        self.sent += chunk
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._listener.close()


def test_credentials_never_travel_in_plans(s3_cluster: dfship.LocalCluster, s3: S3Server) -> None:
    proxies = [RecordingProxy(url) for url in s3_cluster.urls]
    try:
        ctx = dfship.ClusterContext(
            [p.url for p in proxies],
            bytes_per_partition=1,
            storage_options=s3.storage_options(),
            cluster_key_file=s3_cluster.key_file,
        )
        ctx.register_udf(TWICE)
        ctx.register_parquet("facts", f"s3://{BUCKET}/facts/")
        rows = ctx.sql("SELECT category, sum(twice(id)) AS s FROM facts GROUP BY category").collect()
        assert rows.num_rows == 4
    finally:
        for proxy in proxies:
            proxy.close()
    sent = b"".join(bytes(p.sent) for p in proxies)
    # The stage plans went through the proxies (they name the bucket's
    # files), but neither half of the credentials did.
    assert f"s3://{BUCKET}".encode() in sent or f"{BUCKET}/facts/part-".encode() in sent
    assert s3.secret_key.encode() not in sent
    assert s3.access_key.encode() not in sent


@pytest.fixture
def no_aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers started now inherit no AWS settings from this process."""
    import os

    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)


@pytest.mark.usefixtures("no_aws_env")
def test_a_worker_without_credentials_fails_fast_naming_itself_the_url_and_the_remedy(
    s3: S3Server,
) -> None:
    # Endpoint but no credentials: the workers would otherwise ask the
    # instance metadata service (169.254.169.254) for minutes.
    env = {"AWS_ENDPOINT_URL": s3.endpoint, "AWS_ALLOW_HTTP": "true", "AWS_REGION": s3.region}
    with dfship.LocalCluster(workers=2, env=env) as cluster:
        ctx = s3_context(cluster, s3)
        ctx.register_parquet("facts", f"s3://{BUCKET}/facts/")
        started = time.monotonic()
        with pytest.raises(dfship.StorageError) as raised:
            ctx.sql("SELECT id, py_double(id) FROM facts").collect()
        elapsed = time.monotonic() - started
    message = str(raised.value)
    assert elapsed < 20, f"took {elapsed:.1f}s: {message}"
    assert re.search(r"worker 127\.0\.0\.1:\d+ has no credentials for s3://dfship-test/", message), message
    assert "AWS_ACCESS_KEY_ID" in message and "--cloud-metadata" in message, message


@pytest.mark.usefixtures("no_aws_env")
def test_a_coordinator_without_credentials_and_other_storage_mistakes_get_clear_errors(
    s3_cluster: dfship.LocalCluster, s3: S3Server
) -> None:
    bare = s3_cluster.context(storage_options={"aws_endpoint": s3.endpoint, "aws_allow_http": "true"})
    started = time.monotonic()
    with pytest.raises(dfship.StorageError, match="the coordinator has no credentials for s3://dfship-test/"):
        bare.register_parquet("facts", f"s3://{BUCKET}/facts/")
    assert time.monotonic() - started < 10

    ctx = s3_context(s3_cluster, s3)
    with pytest.raises(dfship.StorageError, match="no-such-bucket"):
        ctx.register_parquet("t", "s3://no-such-bucket/t/")
    with pytest.raises(dfship.StorageError, match=r"no object store for hdfs://namenode:8020/.*s3://"):
        ctx.register_parquet("t", "hdfs://namenode:8020/t/")

    # An endpoint nobody answers on: object_store's retries, bounded here.
    dead = s3.storage_options() | {"aws_endpoint": "http://127.0.0.1:9", "max_retries": "1"}
    unreachable = s3_cluster.context(storage_options=dead)
    started = time.monotonic()
    with pytest.raises(dfship.StorageError, match="127.0.0.1:9"):
        unreachable.register_parquet("t", f"s3://{BUCKET}/facts/")
    assert time.monotonic() - started < 30

    with pytest.raises(dfship.PlanningError, match="unknown storage option 'aws_endpont'"):
        s3_cluster.context(storage_options={"aws_endpont": s3.endpoint})


def test_a_datafusion_python_plan_naming_s3_runs_on_the_cluster(
    s3_cluster: dfship.LocalCluster, s3: S3Server
) -> None:
    from datafusion import SessionContext
    from datafusion.object_store import AmazonS3

    # datafusion-python plans with its own store for the bucket; the plan
    # names only the URL, which the coordinator and workers resolve anew.
    local = SessionContext()
    store = AmazonS3(
        bucket_name=BUCKET,
        region=s3.region,
        access_key_id=s3.access_key,
        secret_access_key=s3.secret_key,
        endpoint=s3.endpoint,
        allow_http=True,
    )
    local.register_object_store("s3://", store, BUCKET)
    local.register_parquet("facts", f"s3://{BUCKET}/facts/")
    query = "SELECT category, sum(id) AS s, count(*) AS c FROM facts WHERE id % 2 = 0 GROUP BY category"
    plan = local.sql(query).logical_plan()
    expected = local.sql(query).to_arrow_table()
    ctx = s3_context(s3_cluster, s3)
    distributed = ctx.execute_datafusion_plan(plan.to_bytes())
    assert "Stage" in distributed.explain()
    actual = distributed.collect()
    assert expected.num_rows == 2  # even ids fall in cat_0 and cat_2
    assert sorted_rows(actual) == sorted_rows(expected)
