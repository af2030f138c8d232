//! The inbox log damaged on disk — a flipped byte, a cut tail, a segment
//! truncated to nothing or deleted — after ~2,000 accepted messages over
//! several segments: each gives its documented outcome, and a recovering
//! start keeps every intact message and never reuses a sequence number.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::manifest;
use crate::{FjallStore, FjallStoreOptions, InboxKey, Store, StoreError};

const USERS: [&str; 4] = ["a-1", "a-2", "a-3", "a-4"];
const MESSAGES: usize = 2_000;
/// Messages per append: one log frame each.
const BATCH: usize = 10;

fn options(recover: bool) -> FjallStoreOptions {
    FjallStoreOptions {
        // ~600 KB of frames: four full segments and the live one half full.
        segment_bytes: 128 * 1024,
        recover,
        ..FjallStoreOptions::default()
    }
}

/// What each inbox was given: seq → content.
type Sent = BTreeMap<&'static str, BTreeMap<u64, String>>;

async fn write_messages(dir: &Path) -> Sent {
    let store = FjallStore::open(dir, options(false)).expect("open");
    let mut sent: Sent = BTreeMap::new();
    let body = "d".repeat(120);
    for batch in 0..MESSAGES / BATCH {
        let msgs: Vec<_> = (0..BATCH)
            .map(|i| {
                let n = batch * BATCH + i;
                crate::contract::message(USERS[n % USERS.len()], &format!("{n:05}{body}"))
            })
            .collect();
        let seqs = store
            .append("a", &msgs, &[])
            .await
            .expect("append")
            .into_iter()
            .filter_map(crate::Appended::seq)
            .collect::<Vec<u64>>();
        for (msg, seq) in msgs.into_iter().zip(seqs) {
            let user = USERS.iter().find(|u| **u == msg.to).expect("user");
            sent.entry(user).or_default().insert(seq, msg.content);
        }
    }
    store.close().await.expect("close");
    sent
}

fn log_dir(dir: &Path) -> PathBuf {
    dir.join("inbox.log")
}

/// The segments the manifest names, oldest first: `(id, path, sealed)`.
fn segments(dir: &Path) -> Vec<(u64, PathBuf, bool)> {
    manifest::read(&log_dir(dir))
        .expect("manifest")
        .expect("a manifest")
        .into_iter()
        .map(|e| {
            let path = log_dir(dir).join(format!("{:016}.log", e.id));
            (e.id, path, e.sealed)
        })
        .collect()
}

/// The newest segment holding frames (the live one when the store
/// stopped) and where its frames end.
fn newest_with_frames(dir: &Path) -> (PathBuf, usize) {
    segments(dir)
        .into_iter()
        .rev()
        .find_map(|(id, path, _)| {
            let bytes = std::fs::read(&path).ok()?;
            let end = crate::hot::frames_end(&bytes, id);
            (end > 0).then_some((path, end))
        })
        .expect("a segment with frames")
}

async fn fetched(store: &FjallStore) -> Sent {
    let mut out: Sent = BTreeMap::new();
    for user in USERS {
        let page = store
            .fetch(&InboxKey::new("a", user), 0, 10 * MESSAGES)
            .await
            .expect("fetch");
        assert_eq!(page.left, 0);
        out.insert(
            user,
            page.messages
                .into_iter()
                .map(|m| (m.seq, m.content))
                .collect(),
        );
    }
    out
}

/// Every fetched message is one that was sent, unchanged, under its own
/// seq; returns how many are missing.
fn missing(sent: &Sent, got: &Sent) -> usize {
    let mut missing = 0;
    for (user, messages) in sent {
        let got = &got[user];
        for (seq, content) in got {
            assert_eq!(messages.get(seq), Some(content), "{user} seq {seq}");
        }
        missing += messages.len() - got.len();
    }
    missing
}

/// The next append to every inbox gets a seq above every seq given out
/// before the damage, in any inbox.
async fn next_seqs_are_new(store: &FjallStore, sent: &mut Sent) {
    let highest = sent
        .values()
        .filter_map(|m| m.keys().next_back())
        .max()
        .copied()
        .expect("seqs");
    for user in USERS {
        let seqs = store
            .append("a", &[crate::contract::message(user, "after")], &[])
            .await
            .expect("append")
            .into_iter()
            .filter_map(crate::Appended::seq)
            .collect::<Vec<u64>>();
        assert!(seqs[0] > highest, "{user}: seq {} reuses a number", seqs[0]);
        sent.entry(user)
            .or_default()
            .insert(seqs[0], "after".into());
    }
}

fn refused(dir: &Path) -> (PathBuf, u64, String) {
    match FjallStore::open(dir, options(false)) {
        Err(e @ StoreError::Damaged { .. }) => {
            let text = e.to_string();
            assert!(text.contains("--store-recover"), "{text}");
            let StoreError::Damaged { file, offset, .. } = e else {
                unreachable!("matched above")
            };
            assert!(text.contains(&file.display().to_string()), "{text}");
            (file, offset, text)
        }
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("a damaged log was opened without recover"),
    }
}

/// Captures what the store logs while `f` runs on this thread.
fn logged<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl Write for Buf {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8_lossy(
        &buf.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    )
    .into_owned();
    (out, text)
}

fn recover(dir: &Path) -> (FjallStore, String) {
    let (store, log) = logged(|| FjallStore::open(dir, options(true)));
    (store.expect("recovering open"), log)
}

#[tokio::test]
async fn the_messages_span_several_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sent = write_messages(dir.path()).await;
    assert!(
        segments(dir.path()).len() >= 4,
        "{:?}",
        segments(dir.path())
    );
    let store = FjallStore::open(dir.path(), options(false)).expect("open");
    assert_eq!(missing(&sent, &fetched(&store).await), 0);
    store.close().await.expect("close");
}

#[tokio::test]
async fn a_flipped_byte_in_the_live_log_refuses_the_start_and_recover_keeps_the_rest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sent = write_messages(dir.path()).await;
    let (live, end) = newest_with_frames(dir.path());
    let flip = end / 2;
    let mut bytes = std::fs::read(&live).expect("read");
    bytes[flip] ^= 0x40;
    std::fs::write(&live, bytes).expect("damage");

    let (file, offset, _) = refused(dir.path());
    assert_eq!(file, live);
    assert!(
        offset <= flip as u64 && flip as u64 - offset < 4096,
        "offset {offset}, flipped byte {flip}"
    );

    let (store, log) = recover(dir.path());
    assert!(
        log.contains("ERROR") && log.contains(&live.display().to_string()),
        "{log}"
    );
    assert!(log.contains(&format!("offset={offset}")), "{log}");
    let lost = missing(&sent, &fetched(&store).await);
    assert_eq!(lost, BATCH, "one batch lost");
    next_seqs_are_new(&store, &mut sent).await;
    store.close().await.expect("close");
    drop(store);
    // The damage accepted once is not reported again.
    let store = FjallStore::open(dir.path(), options(false)).expect("reopen");
    assert_eq!(missing(&sent, &fetched(&store).await), lost);
    store.close().await.expect("close");
}

#[tokio::test]
async fn a_flipped_byte_in_an_older_segment_refuses_the_start_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sent = write_messages(dir.path()).await;
    let (id, older, sealed) = segments(dir.path()).into_iter().nth(1).expect("segment");
    assert!(sealed);
    let mut bytes = std::fs::read(&older).expect("read");
    let flip = crate::hot::frames_end(&bytes, id) / 3;
    bytes[flip] ^= 0x01;
    std::fs::write(&older, bytes).expect("damage");
    let (file, offset, _) = refused(dir.path());
    assert_eq!(file, older);
    assert!(offset <= flip as u64);
    let (store, _) = recover(dir.path());
    let lost = missing(&sent, &fetched(&store).await);
    assert!((1..=BATCH).contains(&lost), "{lost} missing");
    next_seqs_are_new(&store, &mut sent).await;
    store.close().await.expect("close");
}

#[tokio::test]
async fn a_cut_tail_is_cut_back_with_a_warning_and_numbers_stay_new() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sent = write_messages(dir.path()).await;
    let (live, end) = newest_with_frames(dir.path());
    // Mid-frame, well past the first (which the manifest recorded).
    let cut = end - 700;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&live)
        .and_then(|f| f.set_len(cut as u64))
        .expect("truncate");

    let (store, log) = logged(|| FjallStore::open(dir.path(), options(false)));
    let store = store.expect("a cut tail does not refuse the start");
    assert!(
        log.contains("WARN")
            && log.contains("torn tail")
            && log.contains(&live.display().to_string()),
        "{log}"
    );
    assert!(log.contains("dropped="), "{log}");
    let lost = missing(&sent, &fetched(&store).await);
    assert!((1..=2 * BATCH).contains(&lost), "{lost} missing");
    next_seqs_are_new(&store, &mut sent).await;
    store.close().await.expect("close");
}

#[tokio::test]
async fn a_live_segment_truncated_to_zero_refuses_the_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sent = write_messages(dir.path()).await;
    let (live, _) = newest_with_frames(dir.path());
    let in_live = std::fs::metadata(&live).expect("meta").len();
    assert!(in_live > 0);
    std::fs::File::create(&live).expect("truncate to zero");

    let (file, offset, text) = refused(dir.path());
    assert_eq!((file, offset), (live.clone(), 0), "{text}");

    let (store, log) = recover(dir.path());
    assert!(log.contains(&live.display().to_string()), "{log}");
    let lost = missing(&sent, &fetched(&store).await);
    assert!(lost > 0 && lost < MESSAGES / 2, "{lost} missing");
    next_seqs_are_new(&store, &mut sent).await;
    store.close().await.expect("close");
}

#[tokio::test]
async fn a_deleted_older_segment_refuses_the_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sent = write_messages(dir.path()).await;
    let (_, older, _) = segments(dir.path()).into_iter().nth(1).expect("segment");
    std::fs::remove_file(&older).expect("delete");

    let (file, offset, text) = refused(dir.path());
    assert_eq!((file, offset), (older.clone(), 0));
    assert!(text.contains("missing"), "{text}");

    let (store, log) = recover(dir.path());
    assert!(
        log.contains("missing") && log.contains("messages="),
        "{log}"
    );
    let lost = missing(&sent, &fetched(&store).await);
    assert!(lost > 0 && lost < MESSAGES / 2, "{lost} missing");
    next_seqs_are_new(&store, &mut sent).await;
    store.close().await.expect("close");
    drop(store);
    let store = FjallStore::open(dir.path(), options(false)).expect("reopen after recovery");
    assert_eq!(missing(&sent, &fetched(&store).await), lost);
    next_seqs_are_new(&store, &mut sent).await;
    store.close().await.expect("close");
}

#[tokio::test]
async fn a_damaged_manifest_refuses_the_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sent = write_messages(dir.path()).await;
    let path = log_dir(dir.path()).join(manifest::FILE);
    let mut bytes = std::fs::read(&path).expect("read");
    bytes[10] ^= 0x04;
    std::fs::write(&path, bytes).expect("damage");
    let (file, _, _) = refused(dir.path());
    assert_eq!(file, path);
    let (store, _) = recover(dir.path());
    assert_eq!(missing(&sent, &fetched(&store).await), 0);
    next_seqs_are_new(&store, &mut sent).await;
    store.close().await.expect("close");
}

#[tokio::test]
async fn a_deleted_manifest_refuses_the_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sent = write_messages(dir.path()).await;
    let path = log_dir(dir.path()).join(manifest::FILE);
    std::fs::remove_file(&path).expect("delete");
    let (file, offset, _) = refused(dir.path());
    assert_eq!((file, offset), (path, 0));
    let (store, _) = recover(dir.path());
    assert_eq!(missing(&sent, &fetched(&store).await), 0, "read as found");
    next_seqs_are_new(&store, &mut sent).await;
    store.close().await.expect("close");
}

#[tokio::test]
async fn a_deleted_log_directory_refuses_the_start_and_numbers_stay_new() {
    // Nothing of the log is left to say it existed: the tree's high-water
    // mark does.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sent = write_messages(dir.path()).await;
    std::fs::remove_dir_all(log_dir(dir.path())).expect("delete the log");
    let (file, offset, text) = refused(dir.path());
    assert_eq!(
        (file, offset),
        (log_dir(dir.path()).join(manifest::FILE), 0)
    );
    assert!(text.contains("deleted or lost"), "{text}");
    let (store, log) = recover(dir.path());
    assert!(log.contains("deleted or lost"), "{log}");
    // What was only in the log is gone; no number given out is reused.
    next_seqs_are_new(&store, &mut sent).await;
    store.close().await.expect("close");
}

#[tokio::test]
async fn a_log_from_before_the_manifest_is_read_as_it_was() {
    // Frames without seals and no manifest: a data dir written before
    // this version. Its messages are read, and a manifest begins.
    let dir = tempfile::tempdir().expect("tempdir");
    let log = log_dir(dir.path());
    std::fs::create_dir_all(&log).expect("log dir");
    let mut bytes = Vec::new();
    let prefix = {
        let mut p = Vec::new();
        for part in ["a", "a-1"] {
            p.extend_from_slice(&(part.len() as u16).to_be_bytes());
            p.extend_from_slice(part.as_bytes());
        }
        p
    };
    for seq in 1..=3u64 {
        let value = crate::fjall_store::Prepared::new(
            &crate::contract::message("a-1", &format!("old{seq}")),
            "a",
            false,
        )
        .value;
        let mut payload = vec![1u8];
        payload.extend_from_slice(&(prefix.len() as u16).to_le_bytes());
        payload.extend_from_slice(&prefix);
        payload.extend_from_slice(&seq.to_le_bytes());
        payload.extend_from_slice(&(value.len() as u32).to_le_bytes());
        payload.extend_from_slice(&value);
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&xxhash_rust::xxh3::xxh3_64_with_seed(&payload, 1).to_le_bytes());
        bytes.extend_from_slice(&payload);
    }
    bytes.resize(64 * 1024, 0);
    std::fs::write(log.join(format!("{:016}.log", 1)), bytes).expect("legacy segment");
    let store = FjallStore::open(dir.path(), options(false)).expect("open");
    let page = store
        .fetch(&InboxKey::new("a", "a-1"), 0, 10)
        .await
        .expect("fetch");
    let contents: Vec<&str> = page.messages.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(contents, ["old1", "old2", "old3"]);
    store.close().await.expect("close");
    drop(store);
    assert!(manifest::read(&log).expect("manifest").is_some());
    let store = FjallStore::open(dir.path(), options(false)).expect("reopen");
    assert_eq!(
        store
            .count(&InboxKey::new("a", "a-1"))
            .await
            .expect("count"),
        3
    );
    let seqs = store
        .append("a", &[crate::contract::message("a-1", "new")], &[])
        .await
        .expect("append")
        .into_iter()
        .filter_map(crate::Appended::seq)
        .collect::<Vec<u64>>();
    assert_eq!(seqs, vec![4]);
    store.close().await.expect("close");
}

#[tokio::test]
async fn restarts_without_damage_log_no_warning() {
    // Retired segments are reused: a restart whose live segment is a
    // reused file with nothing written yet finds no torn tail in what the
    // file held before.
    let dir = tempfile::tempdir().expect("tempdir");
    let small = || FjallStoreOptions {
        segment_bytes: 4096,
        ..options(false)
    };
    let store = FjallStore::open(dir.path(), small()).expect("open");
    let inbox = InboxKey::new("a", "a-1");
    let body = "r".repeat(300);
    for _ in 0..60 {
        let seqs = store
            .append("a", &[crate::contract::message("a-1", &body)], &[])
            .await
            .expect("append")
            .into_iter()
            .filter_map(crate::Appended::seq)
            .collect::<Vec<u64>>();
        store.remove(&inbox, &seqs, None).await.expect("remove");
    }
    store.close().await.expect("close");
    drop(store);
    let spares = std::fs::read_dir(log_dir(dir.path()))
        .expect("log dir")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "spare"))
        })
        .count();
    assert!(spares > 0, "retired files are kept for reuse");
    for _ in 0..3 {
        let (store, log) = logged(|| FjallStore::open(dir.path(), small()));
        let store = store.expect("open");
        assert!(!log.contains("WARN") && !log.contains("ERROR"), "{log}");
        store.close().await.expect("close");
    }
}

#[tokio::test]
async fn damage_is_accepted_only_once_the_floor_is_recorded() {
    // A recovering start that stops (crashes) after its replay but before
    // the sequence floor is synced has not accepted the damage: the next
    // start finds it again.
    let dir = tempfile::tempdir().expect("tempdir");
    write_messages(dir.path()).await;
    let (live, end) = newest_with_frames(dir.path());
    let mut bytes = std::fs::read(&live).expect("read");
    bytes[end / 2] ^= 0x08;
    std::fs::write(&live, bytes).expect("damage");
    let options = crate::hot::HotOptions {
        budget: 1 << 30,
        spill_after: std::time::Duration::from_secs(5),
        segment_bytes: 128 * 1024,
        max_segments: 64,
    };
    let replayed = crate::hot::HotLog::open(&log_dir(dir.path()), options, true, |_, _| Ok(false))
        .expect("a recovering replay");
    assert!(replayed.lost);
    drop(replayed);
    let (file, _, _) = refused(dir.path());
    assert_eq!(file, live);
}
