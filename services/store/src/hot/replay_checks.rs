//! Properties of the inbox log's replay, for the fuzz targets (fuzz/) and
//! the property tests: checked with `assert!`, so a violation is a crash
//! the fuzzer reports. Reached through [`crate::fuzzing`].

use super::{
    APPEND, CLIENT_ID, HEADER, REMOVE, Record, TRAILER, checksum, put_prefix, records, scan, seal,
};

/// A record as written, owned: `(tag, prefix, seq, value)`.
type Owned = (u8, Vec<u8>, u64, Option<Vec<u8>>);

fn owned(r: &Record<'_>) -> Owned {
    match r {
        Record::Append(p, s, v) => (APPEND, p.to_vec(), *s, Some(v.to_vec())),
        Record::Remove(p, s) => (REMOVE, p.to_vec(), *s, None),
        Record::ClientId(k, at) => (CLIENT_ID, k.to_vec(), *at, None),
    }
}

/// Reads fuzz input as small integers and slices; zeros past the end.
struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn byte(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        b
    }

    fn bytes(&mut self, max: usize) -> &'a [u8] {
        let n = usize::from(self.byte()).min(max).min(self.0.len());
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        head
    }

    fn u64(&mut self) -> u64 {
        (0..8).fold(0, |acc, _| acc << 8 | u64::from(self.byte()))
    }
}

/// Replays arbitrary bytes as a segment file: whatever they hold, the scan
/// stays inside them, its frames and damaged stretches are in order and do
/// not overlap, and every frame's records parse or are refused whole.
pub fn check_arbitrary_segment(bytes: &[u8], id: u64, legacy: bool) {
    let found = scan(bytes, id, legacy, &[]);
    assert!(
        found.end <= bytes.len(),
        "end {} past {}",
        found.end,
        bytes.len()
    );
    let mut last = 0;
    for d in &found.damaged {
        assert!(d.offset >= last, "damage out of order");
        assert!(d.bytes > 0, "empty damage");
        assert!(d.offset + d.bytes <= bytes.len(), "damage past the end");
        last = d.offset + d.bytes;
    }
    for payload in &found.frames {
        assert!(!payload.is_empty());
        let _ = records(payload);
    }
}

/// A segment as the writer writes it, from fuzz input: its bytes (whole
/// frames, then the zeros a preallocated file holds), where each frame
/// starts, each frame's payload and records.
struct Built {
    bytes: Vec<u8>,
    end: usize,
    starts: Vec<usize>,
    payloads: Vec<Vec<u8>>,
    written: Vec<Vec<Owned>>,
}

fn build(input: &mut Input<'_>, id: u64, max_frames: usize) -> Built {
    let mut b = Built {
        bytes: Vec::new(),
        end: 0,
        starts: Vec::new(),
        payloads: Vec::new(),
        written: Vec::new(),
    };
    while !input.0.is_empty() && b.written.len() < max_frames {
        let n = usize::from(input.byte() % 4) + 1;
        let mut payload = Vec::new();
        let mut recs = Vec::new();
        for _ in 0..n {
            let tag = [APPEND, REMOVE, CLIENT_ID][usize::from(input.byte() % 3)];
            // Few distinct inboxes and numbers, so removals meet appends.
            let prefix = input.bytes(8);
            let seq = u64::from(input.byte() % 8);
            put_prefix(&mut payload, tag, prefix, seq);
            let value = (tag == APPEND).then(|| {
                let value = input.bytes(255);
                payload.extend_from_slice(&(value.len() as u32).to_le_bytes());
                payload.extend_from_slice(value);
                value.to_vec()
            });
            recs.push((tag, prefix.to_vec(), seq, value));
        }
        b.starts.push(b.bytes.len());
        let len = payload.len() as u32;
        b.bytes.extend_from_slice(&len.to_le_bytes());
        b.bytes
            .extend_from_slice(&checksum(&payload, id).to_le_bytes());
        b.bytes.extend_from_slice(&payload);
        b.bytes.extend_from_slice(&seal(len, id).to_le_bytes());
        b.written.push(recs);
        b.payloads.push(payload);
    }
    b.end = b.bytes.len();
    b.bytes.extend_from_slice(&[0; HEADER]);
    b
}

/// Builds a segment of whole frames from the input (records as the writer
/// stages them), checks that replay reads back exactly those records, then
/// damages one byte and checks that replay reports it: never a frame that
/// was not written, every other frame kept, damage before the last frame
/// reported as damage at the byte.
pub fn check_written_segment(data: &[u8]) {
    let mut input = Input(data);
    let id = input.u64() % 1024;
    let flip_at = usize::from(input.byte()) << 8 | usize::from(input.byte());
    let flip_bits = input.byte() | 1;
    let Built {
        mut bytes,
        end,
        starts,
        payloads,
        written,
    } = build(&mut input, id, 16);

    let found = scan(&bytes, id, false, &[]);
    assert!(found.damaged.is_empty(), "intact frames read as damage");
    assert_eq!(found.end, end);
    let read: Vec<Vec<Owned>> = found
        .frames
        .iter()
        .map(|p| {
            records(p)
                .expect("a written frame parses")
                .iter()
                .map(owned)
                .collect()
        })
        .collect();
    assert_eq!(
        read, written,
        "replay reads other records than were written"
    );

    if end == 0 {
        return;
    }
    let at = flip_at % end;
    bytes[at] ^= flip_bits;
    let hit = starts.iter().rposition(|&s| s <= at).unwrap_or(0);
    let found = scan(&bytes, id, false, &[]);
    let kept: Vec<&[u8]> = payloads
        .iter()
        .enumerate()
        .filter(|(k, _)| *k != hit)
        .map(|(_, p)| p.as_slice())
        .collect();
    if hit + 1 < payloads.len() {
        // Whole frames follow: damage, never a torn tail.
        assert_eq!(found.frames, kept, "damage changed other frames");
        assert!(
            found
                .damaged
                .iter()
                .any(|d| d.offset <= at && at < d.offset + d.bytes),
            "a damaged byte at {at} (frame {hit}) was not reported"
        );
    } else {
        // The last frame: damage, or a torn tail cut back before it.
        assert_eq!(found.frames, kept, "damage changed other frames");
        assert!(
            found.end <= starts[hit] || !found.damaged.is_empty(),
            "a damaged last frame was neither cut nor reported"
        );
        assert!(found.end <= starts[hit] + HEADER + payloads[hit].len() + TRAILER);
    }
}

/// What an index holds: `(inbox prefix, seq) -> value`.
type Contents = std::collections::BTreeMap<(Vec<u8>, u64), Vec<u8>>;

fn contents(index: &super::HotIndex) -> Contents {
    index
        .inboxes
        .iter()
        .flat_map(|(prefix, messages)| {
            messages
                .iter()
                .map(move |(seq, e)| ((prefix.clone(), *seq), e.value.to_vec()))
        })
        .collect()
}

/// A fresh directory under the system's temp dir, removed on drop.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new() -> Scratch {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("sb-replay-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A log directory as a crash, a bad disk or a careless hand may leave it
/// — up to three segments of written frames, one of them damaged or cut,
/// with the manifest that was written for them, a damaged one or none —
/// opened as start-up opens it. Holds: a plain start replays or refuses
/// with [`StoreError::Damaged`](crate::StoreError::Damaged), never a
/// panic; a recovering start always opens; when the plain start opens, the
/// recovering one replays the same; undamaged segments under their
/// manifest replay exactly the records written.
pub fn check_log_open(data: &[u8]) {
    use crate::manifest::{self, SegmentEntry};
    let mut input = Input(data);
    let segments = 1 + u64::from(input.byte() % 3);
    let manifest_mode = input.byte() % 3;
    let damage = input.byte();
    let damage_at = usize::from(input.byte()) << 8 | usize::from(input.byte());
    let mut files = Vec::new();
    let mut entries = Vec::new();
    let mut model = Contents::new();
    for id in 1..=segments {
        let b = build(&mut input, id, 4);
        for recs in &b.written {
            for (tag, prefix, seq, value) in recs {
                match (*tag, value) {
                    (APPEND, Some(v)) => {
                        model.insert((prefix.clone(), *seq), v.clone());
                    }
                    (REMOVE, _) => {
                        model.remove(&(prefix.clone(), *seq));
                    }
                    _ => {}
                }
            }
        }
        // The newest segment is live (what follows its frames is zeros);
        // older ones were sealed at their frames' length.
        let live = id == segments;
        entries.push(SegmentEntry {
            id,
            sealed: !live,
            len: b.end as u64,
            size: if live { b.bytes.len() as u64 } else { 0 },
            appends: b.written.iter().flatten().filter(|r| r.0 == APPEND).count() as u64,
            holes: Vec::new(),
            legacy: false,
        });
        let bytes = if live {
            b.bytes
        } else {
            b.bytes[..b.end].to_vec()
        };
        files.push((id, bytes));
    }
    // One change: a byte flipped, a file cut, a file gone — or none.
    let damaged = !files.is_empty() && damage % 4 != 0;
    if damaged {
        let which = usize::from(damage >> 2) % files.len();
        let bytes = &mut files[which].1;
        match damage % 4 {
            1 if !bytes.is_empty() => {
                let at = damage_at % bytes.len();
                bytes[at] ^= (damage >> 4) | 1;
            }
            2 => bytes.truncate(damage_at % (bytes.len() + 1)),
            _ => bytes.clear(),
        }
        if damage % 4 == 3 {
            files.remove(which);
        }
    }
    let manifest_bytes = match manifest_mode {
        0 => None,
        1 => Some(manifest::encode(&entries)),
        _ => {
            let mut m = manifest::encode(&entries);
            if !m.is_empty() {
                let at = damage_at % m.len();
                m[at] ^= 0x40;
            }
            Some(m)
        }
    };
    let lay_out = || {
        let scratch = Scratch::new();
        std::fs::create_dir_all(&scratch.0).expect("a temp dir");
        for (id, bytes) in &files {
            std::fs::write(super::segment_path(&scratch.0, *id), bytes).expect("a segment");
        }
        if let Some(m) = &manifest_bytes {
            std::fs::write(scratch.0.join(manifest::FILE), m).expect("a manifest");
        }
        scratch
    };
    let options = || super::HotOptions {
        budget: 1 << 20,
        spill_after: std::time::Duration::from_secs(60),
        segment_bytes: 4096,
        max_segments: 8,
    };
    let plain_dir = lay_out();
    let plain = super::HotLog::open(&plain_dir.0, options(), false, |_, _| Ok(false));
    let recover_dir = lay_out();
    let recovered = match super::HotLog::open(&recover_dir.0, options(), true, |_, _| Ok(false)) {
        Ok(r) => r,
        Err(e) => panic!("a recovering start failed: {e}"),
    };
    let recovered_contents = contents(&super::lock(&recovered.log.index));
    match plain {
        Ok(plain) => {
            let plain_contents = contents(&super::lock(&plain.log.index));
            assert_eq!(
                plain_contents, recovered_contents,
                "recovery replays otherwise"
            );
            if !damaged && manifest_mode == 1 {
                assert_eq!(
                    plain_contents, model,
                    "replay differs from what was written"
                );
                assert!(!plain.lost, "an intact log reported a loss");
            }
        }
        Err(crate::StoreError::Damaged { .. }) => {
            assert!(damaged || manifest_mode != 1, "an intact log was refused");
        }
        Err(e) => panic!("a plain start failed otherwise than with damage: {e}"),
    }
}
