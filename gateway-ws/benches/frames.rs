//! Frame parse and render: the JSON work on the hot path of every message.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use switchboard_gateway::frames;
use switchboard_mesh::pb;

fn message_frame(payload: usize) -> String {
    serde_json::json!({
        "type": "MESSAGE",
        "data": {"to": "demo-bench-1", "content": "x".repeat(payload)},
        "feature": "RELIABLE",
        "reference": "ref-123",
    })
    .to_string()
}

fn parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame_parse");
    for payload in [16, 1000] {
        let text = message_frame(payload);
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_function(format!("message_{payload}"), |b| {
            b.iter(|| {
                let mut f = frames::parse(black_box(&text)).expect("valid frame");
                black_box(f.command().expect("valid command"))
            })
        });
    }
    group.finish();
}

fn render(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame_render");
    for payload in [16, 1000] {
        let msg = pb::InboxMessage {
            id: "0199a0b1-1111-7222-8333-444455556666".into(),
            from: "demo-bench-0".into(),
            to: "demo-bench-1".into(),
            content: "x".repeat(payload),
            reference: "ref-123".into(),
            ts: 1_764_000_000_000,
            seq: 42,
            ..Default::default()
        };
        let item = pb::PushItem::default();
        group.bench_function(format!("message_{payload}"), |b| {
            b.iter(|| black_box(frames::render_push(black_box(&item), black_box(&msg))))
        });
    }
    group.finish();
}

criterion_group!(benches, parse, render);
criterion_main!(benches);
