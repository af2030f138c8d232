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
    let mut written: Vec<Vec<Owned>> = Vec::new();
    let mut bytes = Vec::new();
    let mut starts = Vec::new();
    let mut payloads = Vec::new();
    while !input.0.is_empty() && written.len() < 16 {
        let n = usize::from(input.byte() % 4) + 1;
        let mut payload = Vec::new();
        let mut recs = Vec::new();
        for _ in 0..n {
            let tag = [APPEND, REMOVE, CLIENT_ID][usize::from(input.byte() % 3)];
            let prefix = input.bytes(64);
            let seq = input.u64();
            put_prefix(&mut payload, tag, prefix, seq);
            let value = (tag == APPEND).then(|| {
                let value = input.bytes(255);
                payload.extend_from_slice(&(value.len() as u32).to_le_bytes());
                payload.extend_from_slice(value);
                value.to_vec()
            });
            recs.push((tag, prefix.to_vec(), seq, value));
        }
        starts.push(bytes.len());
        let len = payload.len() as u32;
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.extend_from_slice(&checksum(&payload, id).to_le_bytes());
        bytes.extend_from_slice(&payload);
        bytes.extend_from_slice(&seal(len, id).to_le_bytes());
        written.push(recs);
        payloads.push(payload);
    }
    // What a preallocated file holds after the last frame.
    let end = bytes.len();
    bytes.extend_from_slice(&[0; HEADER]);

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
