//! The inbox log's manifest: which segment files the log holds and, per
//! sealed segment, how many bytes of it are whole frames. Start-up checks
//! the files against it, so that a missing or truncated segment is damage
//! that stops the start, not data that silently is not there.
//!
//! One small file, `MANIFEST`, rewritten whole and atomically (temp file,
//! fsync, rename, directory fsync): `magic "SBLM" | version u32 | count u32 |
//! entries | xxh3(everything before) u64`, little-endian; an entry is
//! `id u64 | flags u8 (1: sealed, 2: legacy frames) | len u64 | size u64 | appends u64 | holes u32 |
//! (offset u64, bytes u64) × holes`.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::xxh3_64;

use crate::StoreError;

pub(crate) const FILE: &str = "MANIFEST";
const TEMP: &str = "MANIFEST.tmp";
const MAGIC: &[u8; 4] = b"SBLM";
const VERSION: u32 = 1;

/// What the manifest says of one segment file.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct SegmentEntry {
    pub(crate) id: u64,
    /// No longer written to: `len` is exactly its whole frames.
    pub(crate) sealed: bool,
    /// Sealed: bytes of whole frames. The live segment: bytes known to be
    /// synced there (0 until its first synced frame); less is damage.
    pub(crate) len: u64,
    /// The file's size when it was begun (preallocated): a live segment
    /// found shorter was cut, not torn by a crash.
    pub(crate) size: u64,
    /// Messages appended in it (an upper bound of what its loss loses).
    pub(crate) appends: u64,
    /// Damage accepted by a recovering start (`offset`, `bytes`): skipped
    /// from then on, not reported again.
    pub(crate) holes: Vec<(u64, u64)>,
    /// Written before log frames carried a seal: read without one.
    pub(crate) legacy: bool,
}

fn io(e: std::io::Error) -> StoreError {
    StoreError::Backend(format!("inbox log manifest: {e}"))
}

fn damaged(path: PathBuf, offset: u64, detail: &str) -> StoreError {
    StoreError::Damaged {
        file: path,
        offset,
        detail: detail.to_owned(),
    }
}

pub(crate) fn encode(entries: &[SegmentEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + entries.len() * 41 + 8);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        out.extend_from_slice(&e.id.to_le_bytes());
        out.push(u8::from(e.sealed) | u8::from(e.legacy) << 1);
        out.extend_from_slice(&e.len.to_le_bytes());
        out.extend_from_slice(&e.size.to_le_bytes());
        out.extend_from_slice(&e.appends.to_le_bytes());
        out.extend_from_slice(&(e.holes.len() as u32).to_le_bytes());
        for (offset, bytes) in &e.holes {
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&bytes.to_le_bytes());
        }
    }
    let sum = xxh3_64(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

/// Reads little-endian fields, failing past the end.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let bytes = self.buf.get(self.at..self.at + N)?.try_into().ok()?;
        self.at += N;
        Some(bytes)
    }

    fn u64(&mut self) -> Option<u64> {
        self.take().map(u64::from_le_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }
}

/// The entries of a manifest's bytes, or the offset where it is damaged.
pub(crate) fn decode(bytes: &[u8]) -> Result<Vec<SegmentEntry>, (u64, &'static str)> {
    let Some(body_len) = bytes.len().checked_sub(8) else {
        return Err((0, "shorter than a manifest"));
    };
    let (body, sum) = bytes.split_at(body_len);
    let sum = u64::from_le_bytes(sum.try_into().map_err(|_| (0, "no checksum"))?);
    if xxh3_64(body) != sum {
        return Err((0, "checksum mismatch"));
    }
    let mut r = Reader { buf: body, at: 0 };
    if r.take::<4>().as_ref() != Some(MAGIC) {
        return Err((0, "not a manifest"));
    }
    if r.u32() != Some(VERSION) {
        return Err((4, "unknown manifest version"));
    }
    let count = r.u32().ok_or((8, "truncated"))?;
    let mut entries = Vec::new();
    for _ in 0..count {
        let at = r.at as u64;
        let entry = (|| {
            let id = r.u64()?;
            let flags = r.take::<1>()?[0];
            let (sealed, legacy) = (flags & 1 != 0, flags & 2 != 0);
            let (len, size, appends) = (r.u64()?, r.u64()?, r.u64()?);
            let holes = r.u32()?;
            let mut e = SegmentEntry {
                id,
                sealed,
                legacy,
                len,
                size,
                appends,
                holes: Vec::new(),
            };
            for _ in 0..holes {
                e.holes.push((r.u64()?, r.u64()?));
            }
            Some(e)
        })()
        .ok_or((at, "truncated entry"))?;
        entries.push(entry);
    }
    if r.at != body.len() {
        return Err((r.at as u64, "bytes after the last entry"));
    }
    Ok(entries)
}

/// The manifest in `dir`: `None` when there is none (a new log, or one
/// written before manifests existed).
pub(crate) fn read(dir: &Path) -> Result<Option<Vec<SegmentEntry>>, StoreError> {
    let path = dir.join(FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(e)),
    };
    decode(&bytes)
        .map(Some)
        .map_err(|(offset, detail)| damaged(path, offset, detail))
}

/// Replaces the manifest atomically: a crash leaves the old one or the new
/// one, never a mix.
pub(crate) fn write(dir: &Path, entries: &[SegmentEntry]) -> Result<(), StoreError> {
    let temp = dir.join(TEMP);
    let mut file = File::create(&temp).map_err(io)?;
    file.write_all(&encode(entries)).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&temp, dir.join(FILE)).map_err(io)?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_any_flipped_bit_is_caught() {
        let entries = vec![
            SegmentEntry {
                id: 3,
                sealed: true,
                len: 8_000,
                size: 8_192,
                appends: 40,
                holes: vec![(1_000, 120)],
                legacy: true,
            },
            SegmentEntry {
                id: 4,
                len: 0,
                size: 8_192,
                ..SegmentEntry::default()
            },
        ];
        let bytes = encode(&entries);
        assert_eq!(decode(&bytes).expect("decodes"), entries);
        for at in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[at] ^= 0x10;
            assert!(decode(&bad).is_err(), "a flip at byte {at} goes unnoticed");
        }
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn written_atomically_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(read(dir.path()).expect("read"), None);
        let entries = vec![SegmentEntry {
            id: 1,
            ..SegmentEntry::default()
        }];
        write(dir.path(), &entries).expect("write");
        assert_eq!(read(dir.path()).expect("read"), Some(entries));
        assert!(!dir.path().join(TEMP).exists());
        std::fs::write(dir.path().join(FILE), b"SBLM junk").expect("damage");
        let err = read(dir.path()).expect_err("damaged");
        assert!(err.to_string().contains("MANIFEST"), "{err}");
    }
}
