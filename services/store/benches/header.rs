//! What a removal reads of a stored message for its follow-up: the borrowed
//! header walk against prost decoding the same fields into Strings (the
//! store's way before session 6) and a full decode.

use criterion::{Criterion, criterion_group, criterion_main};
use prost::Message;
use switchboard_store::{InboxMessage, decode_header};

/// The header as prost decodes it (owned strings; the body skipped).
#[derive(Clone, PartialEq, prost::Message)]
struct OwnedHeader {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(int32, tag = "2")]
    kind: i32,
    #[prost(string, tag = "3")]
    from: String,
    #[prost(string, tag = "4")]
    to: String,
    #[prost(string, tag = "7")]
    reference: String,
}

fn header(c: &mut Criterion) {
    let stored = InboxMessage {
        id: "0193a0c2-7b7e-7c3e-9f1a-2b3c4d5e6f70".into(),
        kind: 0,
        from: "demo-ann".into(),
        to: "demo-bob".into(),
        content: "x".repeat(1000),
        ts: 1_764_000_000_000,
        feature: 1,
        ..Default::default()
    }
    .encode_to_vec();
    let mut group = c.benchmark_group("removal header, 1000-char message");
    group.bench_function("borrowed walk", |b| {
        b.iter(|| decode_header(std::hint::black_box(&stored)).map(|h| h.reference.is_empty()))
    });
    group.bench_function("prost, owned strings", |b| {
        b.iter(|| {
            OwnedHeader::decode(std::hint::black_box(stored.as_slice()))
                .map(|h| h.reference.is_empty())
        })
    });
    group.bench_function("full decode", |b| {
        b.iter(|| {
            InboxMessage::decode(std::hint::black_box(stored.as_slice()))
                .map(|m| m.reference.is_empty())
        })
    });
    group.finish();
}

criterion_group!(benches, header);
criterion_main!(benches);
