//! Bytes the store writes per RELIABLE message: appends and removes
//! 100,000 messages of 1,000 characters (batches of 100, each removed after
//! it is stored, as deliveries do), then reads this process's I/O counters.
//! `cargo run --release -p switchboard-store --example bytes_per_message -- [client-ids]`
//! With `client-ids`, every message carries its own client id (indexed).

use std::path::Path;

use switchboard_store::{FjallStore, FjallStoreOptions, InboxKey, InboxMessage, Store};

/// `(wchar, write_bytes)` of this process: bytes handed to write calls, and
/// bytes sent to the block layer.
fn io_counters() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/self/io").unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    (field("wchar:"), field("write_bytes:"))
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    const MESSAGES: usize = 100_000;
    const BATCH: usize = 100;
    let client_ids = std::env::args().any(|a| a == "client-ids");
    let dir = tempfile::tempdir()?;
    let store = FjallStore::open(dir.path(), FjallStoreOptions::default())?;
    let inbox = InboxKey::new("demo", "demo-bob");
    let content = "x".repeat(1000);
    let flags = vec![client_ids; BATCH];
    let before = io_counters();
    for batch in 0..MESSAGES / BATCH {
        let messages: Vec<InboxMessage> = (0..BATCH)
            .map(|i| InboxMessage {
                id: format!("client-{batch}-{i}"),
                from: "demo-ann".into(),
                to: "demo-bob".into(),
                content: content.clone(),
                ts: 1_764_000_000_000,
                feature: 1,
                ..Default::default()
            })
            .collect();
        let seqs: Vec<u64> = store
            .append("demo", &messages, &flags)
            .await?
            .into_iter()
            .filter_map(|a| a.seq())
            .collect();
        store.remove(&inbox, &seqs, None).await?;
    }
    store.close().await?;
    drop(store);
    let after = io_counters();
    let per = |b: u64| b as f64 / MESSAGES as f64;
    let (wchar, block) = (after.0 - before.0, after.1 - before.1);
    println!(
        "client_ids={client_ids} messages={MESSAGES} wchar={wchar} ({:.0} B/msg) write_bytes={block} ({:.0} B/msg) data_dir_after={} B",
        per(wchar),
        per(block),
        dir_bytes(dir.path())
    );
    Ok(())
}
