//! What authenticating an RPC costs: making a proof of the cluster key on
//! the client, and checking it (HMAC, clock window, replay cache) on the
//! worker, per request.
//!
//! Every accepted nonce stays in the worker's replay cache for two minutes,
//! so each sample checks its proofs on a fresh worker: otherwise the
//! hundreds of thousands of proofs criterion makes would fill the cache to
//! its limit, a rate no cluster reaches.

use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use dfship_codec::ClusterKey;
use dfship_distributed::RpcAuthenticator;
use http::HeaderValue;

const PATH: &str = "/worker.WorkerService/ExecuteTask";

fn proofs(client: &RpcAuthenticator, count: u64) -> Vec<HeaderValue> {
    (0..count)
        .map(|_| HeaderValue::from_str(&client.proof(PATH)).expect("a proof is ASCII"))
        .collect()
}

fn bench(c: &mut Criterion) {
    let key = ClusterKey::new(vec![7u8; 32]).expect("a 32-byte key");
    let client = RpcAuthenticator::new(&key);
    let mut group = c.benchmark_group("rpc_auth");
    group.bench_function("proof", |b| b.iter(|| client.proof(PATH)));
    group.bench_function("verify", |b| {
        b.iter_custom(|iters| {
            let proofs = proofs(&client, iters);
            let worker = RpcAuthenticator::new(&key);
            let started = Instant::now();
            for proof in &proofs {
                worker
                    .verify(PATH, Some(proof))
                    .expect("a fresh proof passes");
            }
            started.elapsed()
        })
    });
    group.bench_function("proof_and_verify", |b| {
        b.iter_custom(|iters| {
            let worker = RpcAuthenticator::new(&key);
            let started = Instant::now();
            for _ in 0..iters {
                let proof = HeaderValue::from_str(&client.proof(PATH)).expect("a proof is ASCII");
                worker
                    .verify(PATH, Some(&proof))
                    .expect("a fresh proof passes");
            }
            started.elapsed()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
