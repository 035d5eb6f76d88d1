//! What authenticating an RPC costs: making a proof of the cluster key on
//! the client, and checking it (HMAC, clock window, replay cache) on the
//! worker, per request.

use criterion::{criterion_group, criterion_main, Criterion};
use dfship_codec::ClusterKey;
use dfship_distributed::RpcAuthenticator;

fn bench(c: &mut Criterion) {
    let key = ClusterKey::new(vec![7u8; 32]).unwrap();
    let client = RpcAuthenticator::new(&key);
    let worker = RpcAuthenticator::new(&key);
    let path = "/worker.WorkerService/ExecuteTask";
    let mut group = c.benchmark_group("rpc_auth");
    group.bench_function("proof", |b| b.iter(|| client.proof(path)));
    group.bench_function("proof_and_verify", |b| {
        b.iter(|| {
            let proof = http::HeaderValue::from_str(&client.proof(path)).unwrap();
            worker.verify(path, Some(&proof)).unwrap();
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
