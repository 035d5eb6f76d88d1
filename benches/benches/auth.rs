//! What authenticating an RPC costs: making a proof of the cluster key on
//! the client, and checking it (HMAC, clock window, replay cache, worker
//! identity) on the worker, per request; answering and checking an
//! identity challenge (once per connection); and the message tags, per
//! byte of a request body (an HMAC-SHA256 over each message, on each side).
//!
//! Every accepted nonce stays in the worker's replay cache for two minutes,
//! so each sample checks its proofs on a fresh worker: otherwise the
//! hundreds of thousands of proofs criterion makes would fill the cache to
//! its limit, a rate no cluster reaches.

use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use dfship_codec::ClusterKey;
use dfship_distributed::{RpcAuthenticator, WorkerId};
use http::HeaderValue;

const PATH: &str = "/worker.WorkerService/ExecuteTask";

fn proofs(client: &RpcAuthenticator, worker: &WorkerId, count: u64) -> Vec<HeaderValue> {
    (0..count)
        .map(|_| HeaderValue::from_str(&client.proof(PATH, worker).0).expect("a proof is ASCII"))
        .collect()
}

fn bench(c: &mut Criterion) {
    let key = ClusterKey::new(vec![7u8; 32]).expect("a 32-byte key");
    let client = RpcAuthenticator::new(&key);
    let id = RpcAuthenticator::for_worker(&key, "bench:1")
        .identity()
        .expect("a worker has an identity");
    let mut group = c.benchmark_group("rpc_auth");
    group.bench_function("proof", |b| b.iter(|| client.proof(PATH, &id)));
    group.bench_function("verify", |b| {
        b.iter_custom(|iters| {
            let proofs = proofs(&client, &id, iters);
            let worker = RpcAuthenticator::for_worker(&key, "bench:1");
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
            let worker = RpcAuthenticator::for_worker(&key, "bench:1");
            let started = Instant::now();
            for _ in 0..iters {
                let proof =
                    HeaderValue::from_str(&client.proof(PATH, &id).0).expect("a proof is ASCII");
                worker
                    .verify(PATH, Some(&proof))
                    .expect("a fresh proof passes");
            }
            started.elapsed()
        })
    });
    let worker = RpcAuthenticator::for_worker(&key, "bench:1");
    group.bench_function("identity_challenge", |b| {
        b.iter(|| {
            let challenge = RpcAuthenticator::challenge();
            let answer = worker.answer(&challenge).expect("a worker answers");
            client
                .check_answer(&challenge, &answer)
                .expect("a real worker's answer passes")
        })
    });
    // A message tag is one HMAC-SHA256 over the message: the cost of a
    // 1 MiB stage plan, per side.
    let message = vec![7u8; 1 << 20];
    group.throughput(criterion::Throughput::Bytes(message.len() as u64));
    group.bench_function("message_tag_1MiB", |b| {
        b.iter(|| {
            key.sign(&[
                b"dfship-frame\nv2\n",
                &[0; 16],
                &0u64.to_le_bytes(),
                &message,
            ])
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
