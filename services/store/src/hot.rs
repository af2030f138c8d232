//! The hot tier of the LSM store: a log of segment files and an in-memory
//! index of the messages in them that are still undelivered.
//!
//! Nearly every inbox message is deleted moments after it is written: its
//! recipient is online and gets it pushed. Writing such a message into the
//! LSM tree costs two memtable inserts (value and tombstone), a flush and a
//! compaction, for nothing. Here it costs one record appended to a log
//! (synced with its batch, so an accepted message survives a crash) and one
//! entry in memory, and its delivery one short removal record. A segment
//! whose messages are all gone is deleted. What stays undelivered — the
//! inboxes of users who are offline — is moved into the tree in bulk when
//! the index passes its memory budget or the log its segment count (a
//! *spill*), and the segment deleted after the tree is synced.
//!
//! A segment is a sequence of frames, one per committed batch:
//! `len: u32 | xxh3(payload, seed: segment id): u64 | payload | seal: u64`,
//! all little-endian; a payload is records `APPEND prefix seq value`,
//! `REMOVE prefix seq` and `CLIENT_ID key accepted_ms` (an id index entry,
//! in the frame of the message it was accepted with). A frame is applied
//! whole or not at all. Replay cuts a torn tail of the newest segment back
//! to its last whole frame (and numbers continue above the high-water
//! mark); any other frame that does not check is damage: the start is
//! refused, or with `recover` the frame is skipped and the loss logged.
//!
//! Id index entries stay in memory while their segment lives and move into
//! the tree with its retirement, whatever the segment's messages do: memory
//! holds at most the entries of the live segments, and they count towards
//! the hot tier's budget.

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use fjall::Slice;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::StoreError;
use crate::manifest::{self, SegmentEntry};

pub(crate) mod replay_checks;

/// Record tags. They stay within 1..=32: the search for the next frame
/// past damage (`frame_at`) checks a payload's first byte against that
/// before its checksum.
const APPEND: u8 = 1;
const REMOVE: u8 = 2;
const CLIENT_ID: u8 = 3;
/// Memory an id index entry costs besides its key: its map slot and the
/// key's copy in its segment's list, roughly.
const CLIENT_ID_OVERHEAD: usize = 96;
const HEADER: usize = 12;
/// After the payload: `xxh3(len, seed: segment id)`. A frame whose seal is
/// in place was written whole, so a checksum that fails is damage, not a
/// write torn by a crash (which leaves what the file held there before).
/// Segments written before the seal existed (`legacy`) have none.
const TRAILER: usize = 8;
const EXTENSION: &str = "log";
/// A retired segment file kept for reuse.
const SPARE: &str = "spare";
/// Retired segment files kept for reuse.
const SPARES: usize = 2;
/// A spare being written full of zeros in the background, and its name
/// once done.
const PREPARING: &str = "fresh.tmp";
const PREPARED: &str = "fresh.spare";

fn io(e: std::io::Error) -> StoreError {
    StoreError::Backend(format!("inbox log: {e}"))
}

/// One undelivered message of the hot tier.
#[derive(Clone)]
struct Entry {
    value: Slice,
    segment: u64,
    /// Whether the message carries a reference: a removal reads (and its
    /// follow-up decodes) only such a message's value.
    referenced: bool,
}

/// Undelivered messages of the log, by inbox prefix and sequence number.
/// Shared between the writer thread (which changes it once per batch) and
/// readers (fetch).
#[derive(Default)]
pub(crate) struct HotIndex {
    inboxes: HashMap<Vec<u8>, BTreeMap<u64, Entry>>,
    bytes: usize,
}

impl HotIndex {
    /// The first `limit` messages of an inbox after `after_seq`, oldest
    /// first, and how many more there are.
    pub(crate) fn after(
        &self,
        prefix: &[u8],
        after_seq: u64,
        limit: usize,
    ) -> (Vec<(u64, Slice)>, u64) {
        let Some(messages) = self.inboxes.get(prefix) else {
            return (Vec::new(), 0);
        };
        let mut range = messages.range(after_seq.saturating_add(1)..);
        let page = range
            .by_ref()
            .take(limit)
            .map(|(&seq, e)| (seq, e.value.clone()))
            .collect();
        (page, range.count() as u64)
    }

    /// Bytes of undelivered message values held.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    fn get(&self, prefix: &[u8], seq: u64) -> Option<&Entry> {
        self.inboxes.get(prefix)?.get(&seq)
    }

    fn insert(&mut self, prefix: &[u8], seq: u64, entry: Entry) -> Option<Entry> {
        self.bytes += entry.value.len();
        let old = match self.inboxes.get_mut(prefix) {
            Some(m) => m.insert(seq, entry),
            None => {
                self.inboxes
                    .insert(prefix.to_vec(), BTreeMap::from([(seq, entry)]));
                None
            }
        };
        if let Some(old) = &old {
            self.bytes -= old.value.len();
        }
        old
    }

    /// Applies one inbox's part of a committed batch with one lookup of the
    /// inbox; the segments of the entries it drops go into `released`.
    fn apply(&mut self, prefix: &[u8], staged: StagedInbox, segment: u64, released: &mut Vec<u64>) {
        let messages = match self.inboxes.get_mut(prefix) {
            Some(m) => m,
            None if staged.added.is_empty() => return,
            None => self.inboxes.entry(prefix.to_vec()).or_default(),
        };
        for seq in staged.removed {
            if let Some(old) = messages.remove(&seq) {
                self.bytes -= old.value.len();
                released.push(old.segment);
            }
        }
        for (seq, (value, referenced)) in staged.added {
            self.bytes += value.len();
            let entry = Entry {
                value,
                segment,
                referenced,
            };
            if let Some(old) = messages.insert(seq, entry) {
                self.bytes -= old.value.len();
                released.push(old.segment);
            }
        }
        if messages.is_empty() {
            self.inboxes.remove(prefix);
        }
    }

    fn remove(&mut self, prefix: &[u8], seq: u64) -> Option<Entry> {
        let m = self.inboxes.get_mut(prefix)?;
        let entry = m.remove(&seq)?;
        if m.is_empty() {
            self.inboxes.remove(prefix);
        }
        self.bytes -= entry.value.len();
        Some(entry)
    }
}

pub(crate) type SharedIndex = Arc<Mutex<HotIndex>>;

pub(crate) fn lock(index: &SharedIndex) -> MutexGuard<'_, HotIndex> {
    index.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One segment file.
struct Segment {
    id: u64,
    /// Messages appended in it and still in the index.
    live: usize,
    bytes: u64,
    /// Inboxes with a message in it: their sequence counters are written to
    /// the tree before the segment is deleted, so numbers are never reused.
    inboxes: HashSet<Vec<u8>>,
    /// When it stopped taking appends (its newest message is this old);
    /// `None` while it is the current segment.
    sealed: Option<Instant>,
    /// Its file's size when begun (see [`SegmentEntry::size`]).
    size: u64,
    /// Messages appended in it, for the manifest.
    appends: u64,
    /// Bytes the manifest says are synced, while it is the current segment.
    synced: u64,
    /// Damage a recovering start accepted: skipped by later starts.
    holes: Vec<(u64, u64)>,
    /// Written before frames were sealed (see [`TRAILER`]).
    legacy: bool,
    /// Id index keys written in it: moved into the tree with its retirement.
    client_ids: Vec<Vec<u8>>,
}

impl Segment {
    fn new(id: u64, size: u64) -> Self {
        Segment {
            id,
            live: 0,
            bytes: 0,
            inboxes: HashSet::new(),
            sealed: None,
            size,
            appends: 0,
            synced: 0,
            holes: Vec::new(),
            legacy: false,
            client_ids: Vec::new(),
        }
    }

    /// What the manifest says of it.
    fn entry(&self) -> SegmentEntry {
        let sealed = self.sealed.is_some();
        SegmentEntry {
            id: self.id,
            sealed,
            len: if sealed { self.bytes } else { self.synced },
            size: self.size,
            appends: self.appends,
            holes: self.holes.clone(),
            legacy: self.legacy,
        }
    }

    /// Whether every message in it is at least `age` old.
    fn older_than(&self, age: Duration) -> bool {
        self.sealed.is_some_and(|t| t.elapsed() >= age)
    }
}

/// A segment to retire: its live messages go into the tree, its inboxes'
/// counters too, then [`HotLog::retired`] deletes it.
pub(crate) struct Retirement {
    pub(crate) id: u64,
    /// `(prefix, seq, value)` of the messages still undelivered.
    pub(crate) entries: Vec<(Vec<u8>, u64, Slice)>,
    pub(crate) inboxes: Vec<Vec<u8>>,
    /// `(key, accepted_ms)` of the id index entries written in it (those
    /// not written again later).
    pub(crate) client_ids: Vec<(Vec<u8>, u64)>,
}

/// Tuning of the hot tier.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HotOptions {
    /// Bytes of undelivered message values kept in memory before the oldest
    /// segment is spilled into the tree — once its messages are older than
    /// `spill_after`.
    pub(crate) budget: usize,
    /// Younger messages are in flight (about to be delivered): spilling them
    /// would cost a tree insert and a tombstone each, moments before their
    /// removal. Under overload that made deliveries collapse (docs/
    /// benchmarks.md), so they stay in memory past the budget, up to
    /// `max_segments`.
    pub(crate) spill_after: Duration,
    /// A segment file is closed and a new one begun past this size.
    pub(crate) segment_bytes: u64,
    /// Most segment files kept: past it the oldest is spilled whatever its
    /// age (bounds the log on disk and the index in memory).
    pub(crate) max_segments: usize,
}

/// The writer thread's side: the open segment, the batch being built, and
/// the list of segments.
pub(crate) struct HotLog {
    dir: PathBuf,
    options: HotOptions,
    index: SharedIndex,
    segments: VecDeque<Segment>,
    file: File,
    frame: Vec<u8>,
    staged: Staged,
    /// Whether a spare is being prepared in the background.
    preparing: Arc<std::sync::atomic::AtomicBool>,
    /// The newest segment with an append to each inbox: a retiring segment
    /// writes the counters of the inboxes whose newest it is (replay finds
    /// the others' higher numbers in later segments).
    newest_append: HashMap<Vec<u8>, u64>,
    /// Id index entries of the live segments: key → (accepted at, Unix ms;
    /// segment). Only the writer thread reads it.
    client_ids: HashMap<Vec<u8>, (u64, u64)>,
    /// Memory held by `client_ids`, counted against the budget.
    client_id_bytes: usize,
    /// A write or sync of the current segment failed: its end may hold a
    /// partial frame, and after a failed sync the kernel may have dropped
    /// pages of it. Nothing more is written there; every batch is refused
    /// until a new segment is begun (the old one is sealed at its last
    /// whole, synced frame).
    needs_rotation: bool,
}

/// Memory an id index entry holds.
fn client_id_cost(key: &[u8]) -> usize {
    key.len() * 2 + CLIENT_ID_OVERHEAD
}

/// What the batch being built does to the index, applied once its frame is
/// written: by inbox, so that the index and the writer's maps are looked up
/// once per inbox and batch, not once per message.
#[derive(Default)]
struct Staged {
    inboxes: HashMap<Vec<u8>, StagedInbox>,
    appends: usize,
    /// Id index entries: key → accepted at (Unix ms).
    client_ids: HashMap<Vec<u8>, u64>,
}

impl Staged {
    /// The batch's part for an inbox.
    fn inbox(&mut self, prefix: &[u8]) -> &mut StagedInbox {
        if !self.inboxes.contains_key(prefix) {
            self.inboxes.insert(prefix.to_vec(), StagedInbox::default());
        }
        self.inboxes.get_mut(prefix).expect("inserted above")
    }
}

/// One inbox's part of the batch being built.
#[derive(Default)]
struct StagedInbox {
    /// Appended: value, and whether the message carries a reference.
    added: BTreeMap<u64, (Slice, bool)>,
    /// Removed from the index (not those appended in this batch).
    removed: BTreeSet<u64>,
}

/// A message taken out of the hot tier by [`HotLog::stage_remove`].
#[derive(Debug)]
pub(crate) enum Taken {
    /// Without a reference: nothing can follow it, its value is not read.
    Plain,
    /// With a reference (or not known to have none): its value, for a
    /// follow-up.
    Referenced(Slice),
}

impl Taken {
    fn of(value: &Slice, referenced: bool) -> Self {
        if referenced {
            Taken::Referenced(value.clone())
        } else {
            Taken::Plain
        }
    }
}

/// What the replay of the log found.
pub(crate) struct Recovered {
    pub(crate) log: HotLog,
    /// The highest sequence number in the log per inbox prefix.
    pub(crate) last_seqs: HashMap<Vec<u8>, u64>,
    /// Whether acknowledged messages may have been lost (damage skipped by
    /// a recovering start, a file cut short): numbers must then continue
    /// above every number given out before.
    pub(crate) lost: bool,
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016}.{EXTENSION}"))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io)
}

fn put_prefix(buf: &mut Vec<u8>, tag: u8, prefix: &[u8], seq: u64) {
    buf.push(tag);
    let len = u16::try_from(prefix.len()).unwrap_or(u16::MAX);
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&prefix[..usize::from(len)]);
    buf.extend_from_slice(&seq.to_le_bytes());
}

/// Reads little-endian fields from a frame payload.
struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

/// One record of a frame.
enum Record<'a> {
    Append(&'a [u8], u64, &'a [u8]),
    Remove(&'a [u8], u64),
    /// An id index key and when it was accepted (Unix ms).
    ClientId(&'a [u8], u64),
}

/// The records of a payload, or `None` when it does not parse (then none is
/// applied).
fn records(payload: &[u8]) -> Option<Vec<Record<'_>>> {
    let mut c = Cursor { buf: payload };
    let mut out = Vec::new();
    while !c.buf.is_empty() {
        let tag = c.take(1)?[0];
        let len = usize::from(c.u16()?);
        let prefix = c.take(len)?;
        let seq = c.u64()?;
        out.push(match tag {
            APPEND => {
                let len = usize::try_from(c.u32()?).ok()?;
                Record::Append(prefix, seq, c.take(len)?)
            }
            REMOVE => Record::Remove(prefix, seq),
            CLIENT_ID => Record::ClientId(prefix, seq),
            _ => return None,
        });
    }
    Some(out)
}

/// The checksum of a frame of segment `id`: seeded with the id, so the
/// frames a reused file held in an earlier life never pass for its own.
fn checksum(payload: &[u8], id: u64) -> u64 {
    xxh3_64_with_seed(payload, id)
}

/// The seal of a frame with a `len`-byte payload in segment `id`.
fn seal(len: u32, id: u64) -> u64 {
    xxh3_64_with_seed(&len.to_le_bytes(), id)
}

/// The frame at byte `at` if it was written whole (its seal in place;
/// always, for a legacy segment): its payload, whose checksum is not yet
/// checked, and its length on disk.
fn sealed_at(bytes: &[u8], at: usize, id: u64, legacy: bool) -> Option<(&[u8], usize)> {
    let header = bytes.get(at..at.checked_add(HEADER)?)?;
    let len32 = u32::from_le_bytes(header[..4].try_into().ok()?);
    // No batch is empty: zeros (a preallocated file's) are never a frame.
    let len = usize::try_from(len32).ok().filter(|&len| len > 0)?;
    let start = at + HEADER;
    let payload = bytes.get(start..start.checked_add(len)?)?;
    if legacy {
        return Some((payload, HEADER + len));
    }
    let trailer = bytes.get(start + len..start + len + TRAILER)?;
    (trailer == seal(len32, id).to_le_bytes()).then_some((payload, HEADER + len + TRAILER))
}

/// The payload of a whole, intact frame of segment `id` at byte `at`, if
/// one is there, and the frame's length on disk.
fn frame_at(bytes: &[u8], at: usize, id: u64, legacy: bool) -> Option<(&[u8], usize)> {
    let (payload, on_disk) = sealed_at(bytes, at, id, legacy)?;
    let sum = u64::from_le_bytes(bytes.get(at + 4..at + HEADER)?.try_into().ok()?);
    // A record begins with a small non-zero tag: a cheap test before the
    // checksum when searching damaged bytes for the next frame.
    let plausible = payload.first().is_some_and(|&tag| (1..=32).contains(&tag));
    (plausible && checksum(payload, id) == sum).then_some((payload, on_disk))
}

/// Damaged bytes of a segment: a stretch that is not a whole frame of it
/// but has whole frames after it, so it is not a torn tail.
#[derive(Debug, Clone, PartialEq)]
struct Damage {
    offset: usize,
    bytes: usize,
    /// Messages appended in it, when its frame's records still parse
    /// (the damage hit a value or the checksum, not the structure).
    messages: Option<usize>,
}

/// What reading a segment's bytes found.
#[derive(Debug)]
struct Scan<'a> {
    frames: Vec<&'a [u8]>,
    damaged: Vec<Damage>,
    /// The end of the last whole frame: what follows is zeros of a
    /// preallocated file, the frames of a reused file's earlier life, or a
    /// batch torn by a crash (never acknowledged: its sync did not return).
    end: usize,
}

/// Reads the frames of segment `id`, skipping `holes` (damage accepted
/// before). A stretch that is not a frame is damage when a whole frame of
/// this segment follows it, else the end: frames are written one after the
/// other, so only the last can be torn.
fn scan<'a>(bytes: &'a [u8], id: u64, legacy: bool, holes: &[(u64, u64)]) -> Scan<'a> {
    let mut out = Scan {
        frames: Vec::new(),
        damaged: Vec::new(),
        end: 0,
    };
    let mut at = 0;
    while at < bytes.len() {
        if let Some(&(_, len)) = holes.iter().find(|(offset, _)| *offset == at as u64) {
            at = at.saturating_add(usize::try_from(len).unwrap_or(usize::MAX));
            out.end = at.min(bytes.len());
            continue;
        }
        if let Some((payload, on_disk)) = frame_at(bytes, at, id, legacy) {
            out.frames.push(payload);
            at += on_disk;
            out.end = at;
            continue;
        }
        let next = (at + 1..bytes.len()).find(|&p| frame_at(bytes, p, id, legacy).is_some());
        // Without a later frame, a frame written whole (sealed) that fails
        // its checksum is still damage; anything else is the end.
        let whole = match next {
            None if !legacy => sealed_at(bytes, at, id, false),
            _ => None,
        };
        let next = match (next, whole) {
            (Some(next), _) => next,
            (None, Some((_, on_disk))) => at + on_disk,
            (None, None) => break,
        };
        let appends = |payload: &[u8]| {
            records(payload).map(|r| r.iter().filter(|r| matches!(r, Record::Append(..))).count())
        };
        out.damaged.push(Damage {
            offset: at,
            bytes: next - at,
            // Counted when the frame is whole and its records still parse.
            messages: sealed_at(bytes, at, id, legacy)
                .filter(|(_, on_disk)| at + on_disk == next)
                .and_then(|(payload, _)| appends(payload)),
        });
        at = next;
        if whole.is_some() {
            out.end = at;
        }
    }
    out
}

/// Where the whole frames of segment `id` end (for tests that damage them).
#[cfg(test)]
pub(crate) fn frames_end(bytes: &[u8], id: u64) -> usize {
    scan(bytes, id, false, &[]).end
}

/// Bytes after `end` up to the first run of zeros a frame header long (or
/// the end of the file): what a cut-back tail drops.
fn torn_bytes(bytes: &[u8], end: usize) -> usize {
    let rest = bytes.get(end..).unwrap_or_default();
    rest.windows(HEADER)
        .position(|w| w.iter().all(|&b| b == 0))
        .unwrap_or(rest.len())
}

/// The loss a start-up found: refused, or with `recover` logged and
/// skipped.
struct Losses {
    recover: bool,
    /// Whether anything acknowledged may be lost: sequence numbers then
    /// continue above the high-water mark.
    any: bool,
}

impl Losses {
    /// Damage at `offset` of `path`: an error, or (recovering) an error log.
    fn report(
        &mut self,
        path: &Path,
        offset: u64,
        bytes: u64,
        messages: Option<u64>,
        detail: &str,
    ) -> Result<(), StoreError> {
        if !self.recover {
            return Err(StoreError::Damaged {
                file: path.to_path_buf(),
                offset,
                detail: format!("{detail} ({bytes} bytes)"),
            });
        }
        self.any = true;
        match messages {
            Some(messages) => tracing::error!(
                file = %path.display(),
                offset,
                bytes,
                messages,
                "store recovery: {detail}; skipped, every intact record kept"
            ),
            None => tracing::error!(
                file = %path.display(),
                offset,
                bytes,
                messages = "unknown",
                "store recovery: {detail}; skipped, every intact record kept"
            ),
        }
        Ok(())
    }
}

impl HotLog {
    /// Opens the log in `dir`, replaying every segment into a new index and
    /// checking each against the manifest. A torn tail of the newest
    /// segment is cut back (with a warning); any other damage refuses the
    /// start with [`StoreError::Damaged`], unless `recover`: then every
    /// intact frame is kept and what was lost is logged.
    /// `in_tree` says whether a message is already in the tree (spilled just
    /// before a crash, before its segment was deleted): such a message is
    /// not taken into the index twice.
    pub(crate) fn open(
        dir: &Path,
        options: HotOptions,
        recover: bool,
        in_tree: impl Fn(&[u8], u64) -> Result<bool, StoreError>,
    ) -> Result<Recovered, StoreError> {
        std::fs::create_dir_all(dir).map_err(io)?;
        // A spare whose preparation a stop interrupted.
        let _ = std::fs::remove_file(dir.join(PREPARING));
        let mut ids = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            if path.extension().and_then(|e| e.to_str()) != Some(EXTENSION) {
                continue;
            }
            if let Some(id) = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse::<u64>().ok())
            {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        let mut losses = Losses {
            recover,
            any: false,
        };
        let mut manifest_missing_reported = false;
        let listed = match manifest::read(dir) {
            Ok(listed) => listed,
            Err(e @ StoreError::Damaged { .. }) if recover => {
                losses.any = true;
                manifest_missing_reported = true;
                tracing::error!(error = %e, "store recovery: the manifest is damaged; every segment file is read as found");
                None
            }
            Err(e) => return Err(e),
        };
        // What to read: the segments the manifest names, and files newer
        // than it (begun just before a crash). Without a manifest (a new
        // log, or one written before manifests): every file, as found.
        let listed_none = listed.is_none();
        let plan: Vec<(u64, Option<SegmentEntry>)> = match listed {
            None => ids.iter().map(|&id| (id, None)).collect(),
            Some(entries) => {
                let oldest = entries.first().map_or(u64::MAX, |e| e.id);
                let newest = entries.last().map_or(0, |e| e.id);
                let mut plan: Vec<_> = entries.into_iter().map(|e| (e.id, Some(e))).collect();
                for &id in &ids {
                    if id > newest {
                        plan.push((id, None));
                    } else if id < oldest {
                        // Retired: the manifest dropped it, then a crash
                        // came before the file went. Its messages are in
                        // the tree.
                        tracing::debug!(segment = id, "inbox log: removing a retired segment");
                        std::fs::remove_file(segment_path(dir, id)).map_err(io)?;
                    } else if !plan.iter().any(|(listed, _)| *listed == id) {
                        tracing::warn!(
                            file = %segment_path(dir, id).display(),
                            "inbox log: a segment file the manifest does not name; left alone, not read"
                        );
                    }
                }
                plan.sort_by_key(|(id, _)| *id);
                plan
            }
        };
        let mut index = HotIndex::default();
        let mut segments = VecDeque::new();
        let mut last_seqs: HashMap<Vec<u8>, u64> = HashMap::new();
        let mut newest_append: HashMap<Vec<u8>, u64> = HashMap::new();
        let mut client_ids: HashMap<Vec<u8>, (u64, u64)> = HashMap::new();
        let mut client_id_bytes = 0;
        let mut bytes = Vec::new();
        for (id, entry) in &plan {
            let id = *id;
            let path = segment_path(dir, id);
            bytes.clear();
            let read = File::open(&path).and_then(|mut f| f.read_to_end(&mut bytes));
            let entry = entry.clone().unwrap_or_default();
            match read {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if entry.sealed || entry.len > 0 {
                        losses.report(
                            &path,
                            0,
                            entry.len,
                            Some(entry.appends),
                            "segment file missing: the manifest names it (messages: how many were appended in it, some may have been delivered)",
                        )?;
                    }
                    continue;
                }
                read => {
                    read.map_err(io)?;
                }
            }
            let file_len = bytes.len() as u64;
            if entry.sealed && file_len < entry.len {
                losses.report(
                    &path,
                    file_len,
                    entry.len - file_len,
                    None,
                    &format!("segment file cut short: {file_len} bytes, the manifest recorded {} bytes of frames", entry.len),
                )?;
            }
            let limit = if entry.sealed {
                usize::try_from(entry.len)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len())
            } else {
                bytes.len()
            };
            // Without a manifest, segments are from before it existed
            // (unsealed frames) — unless they begin with a sealed frame:
            // then the manifest was lost.
            let legacy = if listed_none {
                let sealed = frame_at(&bytes, 0, id, false).is_some();
                if sealed && !manifest_missing_reported {
                    manifest_missing_reported = true;
                    losses.report(
                        &dir.join(manifest::FILE),
                        0,
                        0,
                        None,
                        "manifest missing, but the log's segments were written with one",
                    )?;
                }
                !sealed
            } else {
                entry.legacy
            };
            let found = scan(&bytes[..limit], id, legacy, &entry.holes);
            let mut holes = entry.holes.clone();
            for damage in &found.damaged {
                losses.report(
                    &path,
                    damage.offset as u64,
                    damage.bytes as u64,
                    damage.messages.map(|n| n as u64),
                    "damaged frame (whole frames follow it, so it is not a torn tail)",
                )?;
                holes.push((damage.offset as u64, damage.bytes as u64));
            }
            let end = found.end as u64;
            let recorded = if entry.sealed {
                entry.len.min(file_len)
            } else {
                entry.len
            };
            if end < recorded {
                losses.report(
                    &path,
                    end,
                    recorded - end,
                    None,
                    &format!(
                        "frames end at byte {end}, the manifest recorded {recorded} bytes of frames"
                    ),
                )?;
            }
            if !entry.sealed {
                // The newest segment(s): what follows the last whole frame
                // is a torn batch, never acknowledged, or nothing.
                let torn = torn_bytes(&bytes, found.end);
                let cut = entry.size > 0 && file_len < entry.size;
                if torn > 0 || cut {
                    tracing::warn!(
                        file = %path.display(),
                        offset = end,
                        dropped = torn,
                        "inbox log: torn tail cut back to the last whole frame"
                    );
                }
                if torn > 0 {
                    // Usually a batch whose sync never returned; but damage
                    // to the last frame's length or seal reads the same, and
                    // that frame may have been acknowledged. Numbers go on
                    // above the high-water mark either way (gaps are
                    // allowed), so none can be given out twice.
                    losses.any = true;
                }
                if cut {
                    // Not what a crash does to a preallocated file: the
                    // cut may have taken acknowledged messages.
                    losses.any = true;
                    tracing::warn!(
                        file = %path.display(),
                        size = file_len,
                        begun_with = entry.size,
                        "inbox log: segment file shorter than it was begun; sequence numbers continue above the high-water mark"
                    );
                }
            }
            tracing::debug!(segment = id, valid = end, "inbox log: segment replayed");
            let mut segment = Segment::new(id, entry.size);
            segment.legacy = legacy;
            segment.holes = holes;
            segment.appends = entry.appends;
            segments.push_back(segment);
            let mut appends = 0;
            for payload in found.frames {
                let Some(records) = records(payload) else {
                    // Its checksum passed: written so, not damaged.
                    tracing::warn!(segment = id, "inbox log: ignoring an unreadable frame");
                    continue;
                };
                for record in records {
                    match record {
                        Record::Append(prefix, seq, value) => {
                            appends += 1;
                            let last = last_seqs.entry(prefix.to_vec()).or_default();
                            *last = (*last).max(seq);
                            newest_append.insert(prefix.to_vec(), id);
                            // Not known without decoding: read at removal.
                            let entry = Entry {
                                value: Slice::from(value),
                                segment: id,
                                referenced: true,
                            };
                            if let Some(old) = index.insert(prefix, seq, entry) {
                                release(&mut segments, old.segment);
                            }
                            if let Some(seg) = segments.back_mut() {
                                seg.live += 1;
                                seg.inboxes.insert(prefix.to_vec());
                            }
                        }
                        Record::Remove(prefix, seq) => {
                            if let Some(old) = index.remove(prefix, seq) {
                                release(&mut segments, old.segment);
                            }
                        }
                        Record::ClientId(key, at) => {
                            if client_ids.insert(key.to_vec(), (at, id)).is_none() {
                                client_id_bytes += client_id_cost(key);
                            }
                            if let Some(seg) = segments.back_mut() {
                                seg.client_ids.push(key.to_vec());
                            }
                        }
                    }
                }
            }
            if let Some(seg) = segments.back_mut() {
                seg.bytes = end;
                seg.appends = seg.appends.max(appends);
                seg.sealed = Some(Instant::now());
            }
        }
        // Messages spilled into the tree just before a crash.
        let mut spilled = Vec::new();
        for (prefix, messages) in &index.inboxes {
            for &seq in messages.keys() {
                if in_tree(prefix, seq)? {
                    spilled.push((prefix.clone(), seq));
                }
            }
        }
        for (prefix, seq) in spilled {
            if let Some(old) = index.remove(&prefix, seq) {
                release(&mut segments, old.segment);
            }
        }
        let id = plan
            .iter()
            .map(|(id, _)| *id)
            .chain(ids.iter().copied())
            .max()
            .map_or(1, |last| last + 1);
        let (file, size) = open_segment(dir, id, options.segment_bytes)?;
        segments.push_back(Segment::new(id, size));
        let log = HotLog {
            dir: dir.to_path_buf(),
            options,
            index: Arc::new(Mutex::new(index)),
            segments,
            file,
            frame: Vec::new(),
            staged: Staged::default(),
            preparing: Arc::default(),
            newest_append,
            client_ids,
            client_id_bytes,
            needs_rotation: false,
        };
        Ok(Recovered {
            log,
            last_seqs,
            lost: losses.any,
        })
    }

    /// Ends the start-up: from here the manifest names exactly what was
    /// replayed (sealed at the lengths read, with any damage accepted by a
    /// recovering start as holes) and the new segment. Called once the
    /// loss, if any, is recorded where numbers are given out: a crash in
    /// between must find the damage again.
    pub(crate) fn begin(&self) -> Result<(), StoreError> {
        self.write_manifest(None)
    }

    /// Rewrites the manifest from the segment list (without `retiring`).
    fn write_manifest(&self, retiring: Option<u64>) -> Result<(), StoreError> {
        let entries: Vec<SegmentEntry> = self
            .segments
            .iter()
            .filter(|s| Some(s.id) != retiring)
            .map(Segment::entry)
            .collect();
        manifest::write(&self.dir, &entries)
    }

    /// Bytes in memory (undelivered messages and id index entries) and
    /// segment files, for the metrics.
    pub(crate) fn footprint(&self) -> (usize, usize) {
        (
            lock(&self.index).bytes() + self.client_id_bytes,
            self.segments.len(),
        )
    }

    pub(crate) fn index(&self) -> SharedIndex {
        Arc::clone(&self.index)
    }

    fn current_id(&self) -> u64 {
        self.segments.back().map_or(0, |s| s.id)
    }

    fn record(&mut self, tag: u8, prefix: &[u8], seq: u64) {
        if self.frame.is_empty() {
            self.frame.resize(HEADER, 0);
        }
        put_prefix(&mut self.frame, tag, prefix, seq);
    }

    /// Adds a message to the batch being built; `referenced`: whether it
    /// carries a reference.
    pub(crate) fn stage_append(&mut self, prefix: &[u8], seq: u64, value: Slice, referenced: bool) {
        self.record(APPEND, prefix, seq);
        let len = u32::try_from(value.len()).unwrap_or(u32::MAX);
        self.frame.extend_from_slice(&len.to_le_bytes());
        self.frame.extend_from_slice(&value);
        self.staged.appends += 1;
        self.staged
            .inbox(prefix)
            .added
            .insert(seq, (value, referenced));
    }

    /// Indexes a client id in the batch being built (in the frame of the
    /// message it comes with); `at`: Unix ms.
    pub(crate) fn stage_client_id(&mut self, key: &[u8], at: u64) {
        self.record(CLIENT_ID, key, at);
        self.staged.client_ids.insert(key.to_vec(), at);
    }

    /// When a client id was accepted (Unix ms), if the batch being built or
    /// a live segment has it (the tree may have older ones).
    pub(crate) fn client_id_at(&self, key: &[u8]) -> Option<u64> {
        self.staged
            .client_ids
            .get(key)
            .copied()
            .or_else(|| self.client_ids.get(key).map(|&(at, _)| at))
    }

    /// Takes a message out, in the batch being built, if the hot tier has
    /// it; `None` if it does not (it is in the tree, or gone).
    pub(crate) fn stage_remove(&mut self, prefix: &[u8], seq: u64) -> Option<Taken> {
        let staged = self.staged.inbox(prefix);
        let taken = match staged.added.remove(&seq) {
            Some((value, referenced)) => Taken::of(&value, referenced),
            None => {
                if staged.removed.contains(&seq) {
                    return None;
                }
                let taken = {
                    let index = lock(&self.index);
                    let entry = index.get(prefix, seq)?;
                    Taken::of(&entry.value, entry.referenced)
                };
                staged.removed.insert(seq);
                taken
            }
        };
        self.record(REMOVE, prefix, seq);
        Some(taken)
    }

    /// Whether the batch being built appends anything (then it is synced).
    pub(crate) fn appends_staged(&self) -> bool {
        self.staged.appends > 0
    }

    /// Writes the batch's frame — synced if asked — and applies it to the
    /// index. On an error nothing of it is applied.
    pub(crate) fn commit(&mut self, sync: bool) -> Result<(), StoreError> {
        if self.frame.is_empty() {
            return Ok(());
        }
        if self.needs_rotation
            && let Err(e) = self.rotate()
        {
            self.abort();
            return Err(e);
        }
        let payload_len = u32::try_from(self.frame.len() - HEADER)
            .map_err(|_| StoreError::Backend("inbox log: batch too large".into()))?;
        let sum = checksum(&self.frame[HEADER..], self.current_id());
        self.frame[..4].copy_from_slice(&payload_len.to_le_bytes());
        self.frame[4..HEADER].copy_from_slice(&sum.to_le_bytes());
        let seal = seal(payload_len, self.current_id());
        self.frame.extend_from_slice(&seal.to_le_bytes());
        let frame_len = self.frame.len() as u64;
        // Zeros a header long after the frame (overwritten by the next one):
        // after a crash, bytes that are not zeros there are a torn batch, not
        // the earlier life of a reused file.
        self.frame.extend_from_slice(&[0; HEADER]);
        let at = self.segments.back().map_or(0, |s| s.bytes);
        let written = std::os::unix::fs::FileExt::write_all_at(&self.file, &self.frame, at)
            .and_then(|()| if sync { self.file.sync_data() } else { Ok(()) });
        self.frame.clear();
        let staged = std::mem::take(&mut self.staged);
        if let Err(e) = written {
            // Refused, nothing applied. The next frame goes to a new
            // segment; if none can be begun now (a full disk), the next
            // batch tries again, and is refused while it cannot.
            self.needs_rotation = true;
            if let Err(again) = self.rotate() {
                tracing::debug!(error = %again, "inbox log: no new segment after a failed write yet");
            }
            return Err(io(e));
        }
        let current = self.current_id();
        let mut index = lock(&self.index);
        let mut released = Vec::new();
        let mut added = 0;
        let mut inboxes = Vec::new();
        for (prefix, inbox) in staged.inboxes {
            let appended = inbox.added.len();
            index.apply(&prefix, inbox, current, &mut released);
            if appended == 0 {
                continue;
            }
            added += appended;
            match self.newest_append.get_mut(&prefix) {
                Some(newest) => *newest = current,
                None => {
                    self.newest_append.insert(prefix.clone(), current);
                }
            }
            inboxes.push(prefix);
        }
        drop(index);
        for id in released {
            release(&mut self.segments, id);
        }
        let mut keys = Vec::with_capacity(staged.client_ids.len());
        for (key, at) in staged.client_ids {
            if self.client_ids.insert(key.clone(), (at, current)).is_none() {
                self.client_id_bytes += client_id_cost(&key);
            }
            keys.push(key);
        }
        let mut first_sync = false;
        if let Some(seg) = self.segments.back_mut() {
            seg.live += added;
            seg.appends += added as u64;
            seg.bytes += frame_len;
            seg.inboxes.extend(inboxes);
            seg.client_ids.extend(keys);
            if sync && seg.synced == 0 {
                seg.synced = seg.bytes;
                first_sync = true;
            }
        }
        if first_sync {
            // The manifest learns the segment holds acknowledged frames, so
            // a start that finds it emptied refuses. Once per segment.
            if let Err(e) = self.write_manifest(None) {
                tracing::error!(error = %e, "inbox log: cannot record the new segment in the manifest");
            }
        }
        Ok(())
    }

    /// Forgets the batch being built.
    pub(crate) fn abort(&mut self) {
        self.frame.clear();
        self.staged = Staged::default();
    }

    /// Closes the current segment and begins a new one.
    fn rotate(&mut self) -> Result<(), StoreError> {
        // Removal-only frames are not synced as written: the manifest is
        // about to record the sealed length, so it must be on disk.
        if let Err(e) = self.file.sync_data() {
            tracing::error!(error = %e, "inbox log: cannot sync the segment being sealed");
        }
        // The new file first: while it cannot be begun, the current segment
        // stays the current one (unsealed), so that no manifest records a
        // sealed length that later frames would pass.
        let id = self.current_id() + 1;
        let (file, size) = open_segment(&self.dir, id, self.options.segment_bytes)?;
        if let Some(current) = self.segments.back_mut() {
            current.sealed = Some(Instant::now());
        }
        self.file = file;
        self.segments.push_back(Segment::new(id, size));
        self.needs_rotation = false;
        // The new file first, then the manifest: a crash between leaves a
        // file newer than the manifest, which is read as found.
        self.write_manifest(None)?;
        self.prepare_spare();
        Ok(())
    }

    /// Without a spare left, writes the next one in the background, so that
    /// the next rotation does not write a segment's worth of zeros on the
    /// writer thread (~10 ms here) while every caller waits.
    fn prepare_spare(&self) {
        use std::sync::atomic::Ordering;
        if !spares(&self.dir).is_ok_and(|s| s.is_empty())
            || self.preparing.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let dir = self.dir.clone();
        let bytes = self.options.segment_bytes;
        let preparing = Arc::clone(&self.preparing);
        let spawned = std::thread::Builder::new()
            .name("store-log-spare".into())
            .spawn(move || {
                let tmp = dir.join(PREPARING);
                let done = File::create(&tmp)
                    .map_err(io)
                    .and_then(|mut f| fill_zeros(&mut f, bytes))
                    .and_then(|()| std::fs::rename(&tmp, dir.join(PREPARED)).map_err(io))
                    .and_then(|()| sync_dir(&dir));
                if let Err(e) = done {
                    tracing::debug!(error = %e, "inbox log: no spare segment prepared");
                    let _ = std::fs::remove_file(&tmp);
                }
                preparing.store(false, Ordering::Release);
            });
        if spawned.is_err() {
            self.preparing.store(false, Ordering::Release);
        }
    }

    /// The next segment to retire, if any: the oldest one when it has no
    /// undelivered message left, or when memory or the segment count is
    /// over budget. Begins a new segment first when the current one is full
    /// or is the one to retire.
    pub(crate) fn next_retirement(&mut self) -> Result<Option<Retirement>, StoreError> {
        let full = self
            .segments
            .back()
            .is_some_and(|s| s.bytes >= self.options.segment_bytes);
        let over_budget = lock(&self.index).bytes + self.client_id_bytes > self.options.budget;
        let too_many = self.segments.len() > self.options.max_segments;
        if full || (over_budget && self.segments.len() == 1) {
            self.rotate()?;
        }
        let Some(oldest) = self.segments.front() else {
            return Ok(None);
        };
        let spill = too_many || (over_budget && oldest.older_than(self.options.spill_after));
        if self.segments.len() == 1 || (oldest.live > 0 && !spill) {
            return Ok(None);
        }
        let mut entries = Vec::with_capacity(oldest.live);
        if oldest.live > 0 {
            let index = lock(&self.index);
            for prefix in &oldest.inboxes {
                if let Some(messages) = index.inboxes.get(prefix) {
                    for (&seq, e) in messages {
                        if e.segment == oldest.id {
                            entries.push((prefix.clone(), seq, e.value.clone()));
                        }
                    }
                }
            }
        }
        // An entry written again in a later segment (its window had passed)
        // goes with that one.
        let client_ids = oldest
            .client_ids
            .iter()
            .filter_map(|key| match self.client_ids.get(key) {
                Some(&(at, segment)) if segment == oldest.id => Some((key.clone(), at)),
                _ => None,
            })
            .collect();
        Ok(Some(Retirement {
            id: oldest.id,
            entries,
            client_ids,
            // A later segment with an append to the inbox holds a higher
            // number, which replay finds: only the inboxes whose newest
            // append is here need their counter written (with many inboxes
            // each sending rarely, most are in the next segment too).
            inboxes: oldest
                .inboxes
                .iter()
                .filter(|p| self.newest_append.get(*p) == Some(&oldest.id))
                .cloned()
                .collect(),
        }))
    }

    /// Whether a live segment holds an append to the inbox: its counter in
    /// the tree may be behind, replay would find the higher one.
    pub(crate) fn appends_to(&self, prefix: &[u8]) -> bool {
        self.newest_append.contains_key(prefix)
    }

    /// Deletes a retired segment once its messages and counters are synced
    /// into the tree, and drops its messages from memory.
    pub(crate) fn retired(&mut self, retirement: Retirement) -> Result<(), StoreError> {
        {
            let mut index = lock(&self.index);
            for (prefix, seq, _) in &retirement.entries {
                index.remove(prefix, *seq);
            }
        }
        // The file goes before the segment leaves the list: later segments
        // hold the removal records of its messages, so they must never be
        // deleted while it remains (a failure here is retried, in order).
        // The manifest forgets it first: a crash between leaves a file older
        // than the manifest, which the next start removes.
        self.write_manifest(Some(retirement.id))?;
        let path = segment_path(&self.dir, retirement.id);
        if spares(&self.dir)?.len() < SPARES {
            std::fs::rename(&path, path.with_extension(SPARE)).map_err(io)?;
        } else {
            std::fs::remove_file(&path).map_err(io)?;
        }
        sync_dir(&self.dir)?;
        if self.segments.front().is_some_and(|s| s.id == retirement.id) {
            self.segments.pop_front();
        }
        // Their counters are in the tree now; no live segment appends to them.
        for prefix in &retirement.inboxes {
            self.newest_append.remove(prefix);
        }
        // So are its id index entries.
        for (key, _) in &retirement.client_ids {
            if self
                .client_ids
                .get(key)
                .is_some_and(|&(_, segment)| segment == retirement.id)
            {
                self.client_ids.remove(key);
                self.client_id_bytes = self.client_id_bytes.saturating_sub(client_id_cost(key));
            }
        }
        Ok(())
    }
}

/// One message of segment `id` left the index. Live segments have
/// consecutive ids (a new one is the current one's + 1, and only the oldest
/// is retired), so the segment is found by its offset from the oldest.
fn release(segments: &mut VecDeque<Segment>, id: u64) {
    let Some(oldest) = segments.front().map(|s| s.id) else {
        return;
    };
    // Ids are consecutive, except after a recovering start skipped a
    // missing segment: then the segment is searched for.
    let at = id
        .checked_sub(oldest)
        .and_then(|d| usize::try_from(d).ok())
        .filter(|&at| segments.get(at).is_some_and(|s| s.id == id))
        .or_else(|| segments.iter().position(|s| s.id == id));
    if let Some(seg) = at.and_then(|at| segments.get_mut(at)) {
        seg.live = seg.live.saturating_sub(1);
    }
}

/// Retired segment files in `dir`.
fn spares(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        if path.extension().and_then(|e| e.to_str()) == Some(SPARE) {
            out.push(path);
        }
    }
    Ok(out)
}

/// Opens segment `id` for writing from its start: a retired file renamed,
/// or a new one written full of zeros first. A sync of data written into
/// space the file already has needs no update of its size or extents, which
/// makes the sync of every batch cheaper (~35 % less wall time, ~25 % less
/// CPU on this machine's ext4; docs/benchmarks.md).
/// Returns the file and its size.
fn open_segment(dir: &Path, id: u64, bytes: u64) -> Result<(File, u64), StoreError> {
    let path = segment_path(dir, id);
    let file = match spares(dir)?.pop() {
        Some(spare) => {
            std::fs::rename(&spare, &path).map_err(io)?;
            let opened = OpenOptions::new().write(true).open(&path).and_then(|file| {
                // Zeros where its first frame goes (as after every frame): a
                // restart before that frame finds an empty segment, not what
                // the file held in its earlier life taken for a torn batch.
                std::os::unix::fs::FileExt::write_all_at(&file, &[0; HEADER], 0)?;
                Ok(file)
            });
            match opened {
                Ok(file) => file,
                Err(e) => {
                    // Still a spare: a later rotation takes it again.
                    let _ = std::fs::rename(&path, &spare);
                    return Err(io(e));
                }
            }
        }
        None => {
            // A file of this id is what an earlier attempt left when it
            // failed (a segment's id is above every file's when begun, and
            // nothing is written to it before it is): not a segment.
            if path.exists() {
                std::fs::remove_file(&path).map_err(io)?;
            }
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(io)?;
            // A partial file would make every later rotation to this id fail.
            let filled = fill_zeros(&mut file, bytes)
                .and_then(|()| file.seek(SeekFrom::Start(0)).map_err(io));
            if let Err(e) = filled {
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
            file
        }
    };
    let size = sync_dir(dir).and_then(|()| file.metadata().map_err(io));
    match size {
        Ok(meta) => Ok((file, meta.len())),
        Err(e) => {
            // Not begun: a later rotation begins it again (from a spare,
            // or written anew).
            let _ = std::fs::rename(&path, path.with_extension(SPARE));
            Err(e)
        }
    }
}

/// Writes `bytes` zeros from the file's position and syncs them.
fn fill_zeros(file: &mut File, bytes: u64) -> Result<(), StoreError> {
    let zeros = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        file.write_all(&zeros[..n]).map_err(io)?;
        left -= n as u64;
    }
    file.sync_all().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write that fails (a read-only handle stands in for a full disk)
    /// is refused; so is every batch while no new segment can be begun
    /// (a directory in the next segment's place stands in for no space).
    /// Then the log takes writes in a new segment, and a restart finds
    /// every accepted message and none of the refused ones.
    #[test]
    fn after_a_failed_write_nothing_is_written_until_a_new_segment_is_begun() {
        let dir = tempfile::tempdir().expect("tempdir");
        let options = HotOptions {
            budget: 1 << 20,
            spill_after: Duration::from_secs(60),
            segment_bytes: 4096,
            max_segments: 64,
        };
        let open = |dir: &Path| HotLog::open(dir, options, false, |_, _| Ok(false)).expect("open");
        let append = |log: &mut HotLog, seq: u64| {
            let value = Slice::from(format!("m{seq}").as_bytes());
            log.stage_append(b"inbox", seq, value, false);
            log.commit(true)
        };
        let mut log = open(dir.path()).log;
        log.begin().expect("begin");
        append(&mut log, 1).expect("first write");
        let next = segment_path(dir.path(), 2);
        std::fs::create_dir(&next).expect("block the next segment");
        log.file = File::open(segment_path(dir.path(), 1)).expect("read-only handle");
        assert!(append(&mut log, 2).is_err(), "the failed write is refused");
        assert!(
            append(&mut log, 3).is_err(),
            "refused while no new segment can be begun"
        );
        std::fs::remove_dir(&next).expect("unblock");
        append(&mut log, 4).expect("taken in a new segment");
        drop(log);
        let recovered = open(dir.path());
        let index = recovered.log.index();
        let (page, left) = lock(&index).after(b"inbox", 0, 10);
        let seqs: Vec<u64> = page.iter().map(|(seq, _)| *seq).collect();
        assert_eq!((seqs, left), (vec![1, 4], 0));
        assert!(!recovered.lost, "nothing acknowledged was lost");
    }

    #[test]
    fn a_release_finds_its_segment_past_a_skipped_one() {
        // Segment 2 was missing at a recovering start: 1, 3, 4 remain.
        let mut segments: VecDeque<Segment> = [1, 3, 4]
            .into_iter()
            .map(|id| {
                let mut s = Segment::new(id, 0);
                s.live = 2;
                s
            })
            .collect();
        release(&mut segments, 4);
        release(&mut segments, 3);
        release(&mut segments, 2);
        let live: Vec<(u64, usize)> = segments.iter().map(|s| (s.id, s.live)).collect();
        assert_eq!(live, [(1, 2), (3, 1), (4, 1)]);
    }

    /// Frames of segment 5 whose payloads are single REMOVE records.
    fn segment(n: usize) -> (Vec<u8>, Vec<usize>) {
        let mut bytes = Vec::new();
        let mut starts = Vec::new();
        for i in 0..n {
            let mut payload = Vec::new();
            put_prefix(&mut payload, REMOVE, b"inbox", i as u64);
            starts.push(bytes.len());
            bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&checksum(&payload, 5).to_le_bytes());
            bytes.extend_from_slice(&payload);
            bytes.extend_from_slice(&seal(payload.len() as u32, 5).to_le_bytes());
        }
        (bytes, starts)
    }

    #[test]
    fn a_torn_last_frame_ends_the_segment_quietly() {
        let (bytes, starts) = segment(3);
        let all = scan(&bytes, 5, false, &[]);
        assert_eq!((all.frames.len(), all.end), (3, bytes.len()));
        assert!(all.damaged.is_empty());
        let torn = scan(&bytes[..bytes.len() - 1], 5, false, &[]);
        assert_eq!((torn.frames.len(), torn.end), (2, starts[2]));
        assert!(torn.damaged.is_empty(), "a torn tail is not damage");
        // Zeros of a preallocated file end the frames.
        let mut padded = bytes.clone();
        padded.extend_from_slice(&[0; 64]);
        let found = scan(&padded, 5, false, &[]);
        assert_eq!((found.frames.len(), found.end), (3, bytes.len()));
        assert_eq!(torn_bytes(&padded, found.end), 0);
        // The same bytes in a reused file (another segment id) are stale.
        let stale = scan(&bytes, 6, false, &[]);
        assert!(stale.frames.is_empty() && stale.damaged.is_empty());
    }

    #[test]
    fn a_bad_frame_with_whole_frames_after_it_is_damage() {
        let (bytes, starts) = segment(3);
        let mut corrupt = bytes.clone();
        corrupt[starts[1] + HEADER + 3] ^= 1; // inside the second payload
        let found = scan(&corrupt, 5, false, &[]);
        assert_eq!(found.frames.len(), 2, "the frames around it are kept");
        assert_eq!(
            found.damaged,
            vec![Damage {
                offset: starts[1],
                bytes: starts[2] - starts[1],
                messages: Some(0),
            }]
        );
        assert_eq!(found.end, bytes.len());
        // Accepted as a hole, it is skipped silently.
        let hole = [(starts[1] as u64, (starts[2] - starts[1]) as u64)];
        let again = scan(&corrupt, 5, false, &hole);
        assert!(again.damaged.is_empty());
        assert_eq!((again.frames.len(), again.end), (2, bytes.len()));
        // The last frame written whole (sealed) but failing its checksum is
        // damage too, not a torn write.
        let mut last = bytes.clone();
        last[starts[2] + HEADER + 1] ^= 1;
        let found = scan(&last, 5, false, &[]);
        assert_eq!(found.frames.len(), 2);
        assert_eq!(found.damaged.len(), 1);
        assert_eq!(found.damaged[0].offset, starts[2]);
        // A torn write of it (what the file held before remains after the
        // written part) is not.
        let mut torn = bytes[..starts[2] + HEADER + 4].to_vec();
        torn.extend_from_slice(&[0; 64]);
        let found = scan(&torn, 5, false, &[]);
        assert!(found.damaged.is_empty());
        assert_eq!(found.end, starts[2]);
        // A zeroed stretch mid-file is damage too.
        let mut zeroed = bytes.clone();
        zeroed[starts[0]..starts[1]].fill(0);
        assert_eq!(scan(&zeroed, 5, false, &[]).damaged.len(), 1);
    }

    #[test]
    fn legacy_segments_are_read_without_seals() {
        let mut bytes = Vec::new();
        for i in 0..3u64 {
            let mut payload = Vec::new();
            put_prefix(&mut payload, REMOVE, b"inbox", i);
            bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            bytes.extend_from_slice(&checksum(&payload, 5).to_le_bytes());
            bytes.extend_from_slice(&payload);
        }
        let found = scan(&bytes, 5, true, &[]);
        assert_eq!((found.frames.len(), found.end), (3, bytes.len()));
        assert!(scan(&bytes, 5, false, &[]).frames.is_empty());
    }

    #[test]
    fn records_round_trip_and_reject_garbage() {
        let mut buf = Vec::new();
        put_prefix(&mut buf, APPEND, b"inbox", 7);
        buf.extend_from_slice(&3u32.to_le_bytes());
        buf.extend_from_slice(b"abc");
        put_prefix(&mut buf, REMOVE, b"inbox", 7);
        put_prefix(&mut buf, CLIENT_ID, b"app/from/id", 1_764_000_000_000);
        let records = records(&buf).expect("parses");
        assert!(matches!(records[0], Record::Append(b"inbox", 7, b"abc")));
        assert!(matches!(records[1], Record::Remove(b"inbox", 7)));
        assert!(matches!(
            records[2],
            Record::ClientId(b"app/from/id", 1_764_000_000_000)
        ));
        assert!(super::records(&buf[..buf.len() - 1]).is_none());
        assert!(super::records(&[9, 0, 0]).is_none());
    }
}
