//! The store append path: one durable append alone (one fsync each) against
//! many appends queued together (group commit: one fsync per batch).

use std::sync::Arc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use switchboard_store::{FjallStore, FjallStoreOptions, InboxKey, InboxMessage, Store};

fn message(to: &str) -> InboxMessage {
    InboxMessage {
        id: "0199a0b1-1111-7222-8333-444455556666".into(),
        from: "demo-bench-0".into(),
        to: to.into(),
        content: "x".repeat(1000),
        ts: 1_764_000_000_000,
        ..Default::default()
    }
}

fn append(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let fjall: Arc<dyn Store> = Arc::new(
        FjallStore::open(&dir.path().join("fjall"), FjallStoreOptions::default())
            .expect("open fjall store"),
    );
    bench_store(c, "fjall", fjall);
}

fn bench_store(c: &mut Criterion, engine: &str, store: Arc<dyn Store>) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut group = c.benchmark_group(format!("store_append_{engine}"));
    group.sample_size(20);

    group.throughput(Throughput::Elements(1));
    group.bench_function("one_durable_append", |b| {
        b.iter(|| {
            rt.block_on(store.append("demo", &[message("demo-1")], &[]))
                .expect("append")
        })
    });

    for concurrent in [64usize, 512] {
        group.throughput(Throughput::Elements(concurrent as u64));
        group.bench_function(format!("group_commit_{concurrent}_concurrent"), |b| {
            b.iter_batched(
                || (),
                |()| {
                    rt.block_on(async {
                        let mut tasks = Vec::with_capacity(concurrent);
                        for i in 0..concurrent {
                            let store = store.clone();
                            tasks.push(tokio::spawn(async move {
                                store
                                    .append("demo", &[message(&format!("demo-{}", i % 100))], &[])
                                    .await
                            }));
                        }
                        for t in tasks {
                            t.await.expect("join").expect("append");
                        }
                    })
                },
                BatchSize::PerIteration,
            )
        });
    }

    group.throughput(Throughput::Elements(1));
    group.bench_function("append_then_remove", |b| {
        let inbox = InboxKey::new("demo", "demo-rm");
        b.iter(|| {
            rt.block_on(async {
                let seqs: Vec<u64> = store
                    .append("demo", &[message("demo-rm")], &[])
                    .await
                    .expect("append")
                    .into_iter()
                    .filter_map(|a| a.seq())
                    .collect();
                store.remove(&inbox, &seqs, None).await.expect("remove")
            })
        })
    });
    group.finish();
    rt.block_on(store.close()).expect("close");
}

criterion_group!(benches, append);
criterion_main!(benches);
