//! The hot frame's JSON, written by hand: serde_json escapes a string one
//! byte at a time through a table, which was ~10 % of a gateway worker's
//! time for 1,000-character messages. Here a string is scanned eight bytes
//! at a time and copied in runs; the output is byte for byte what
//! serde_json writes (tested against it).

const LO: u64 = 0x0101_0101_0101_0101;
const HI: u64 = 0x8080_8080_8080_8080;

/// The high bit of each byte of `w` that may be a control character, `"`
/// or `\\` (none set: none is).
#[inline]
fn escape_bits(w: u64) -> u64 {
    // Bytes below 0x20 (exact for any byte values, n <= 0x80).
    let control = w.wrapping_sub(LO * 0x20) & !w;
    let quote = w ^ (LO * u64::from(b'"'));
    let backslash = w ^ (LO * u64::from(b'\\'));
    let zero = |v: u64| v.wrapping_sub(LO) & !v;
    (control | zero(quote) | zero(backslash)) & HI
}

#[inline]
fn needs_escape(w: u64) -> bool {
    escape_bits(w) != 0
}

#[inline]
fn word(bytes: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(w)
}

/// The first byte at or after `from` that must be escaped.
#[inline]
fn next_escape(bytes: &[u8], mut from: usize) -> usize {
    // 32 bytes per test while none needs escaping (the usual case).
    while from + 32 <= bytes.len() {
        let any = escape_bits(word(bytes, from))
            | escape_bits(word(bytes, from + 8))
            | escape_bits(word(bytes, from + 16))
            | escape_bits(word(bytes, from + 24));
        if any != 0 {
            break;
        }
        from += 32;
    }
    while from + 8 <= bytes.len() {
        if needs_escape(word(bytes, from)) {
            break;
        }
        from += 8;
    }
    while from < bytes.len() {
        let b = bytes[from];
        if b < 0x20 || b == b'"' || b == b'\\' {
            return from;
        }
        from += 1;
    }
    from
}

/// Appends `s` as a JSON string, quoted and escaped as serde_json does.
pub(crate) fn push_str(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(s.len() + 2);
    out.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    loop {
        let at = next_escape(bytes, start);
        // Split only at ASCII bytes: both sides stay valid UTF-8.
        out.push_str(&s[start..at]);
        let Some(&b) = bytes.get(at) else { break };
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            0x08 => out.push_str("\\b"),
            0x0c => out.push_str("\\f"),
            _ => {
                out.push_str("\\u00");
                out.push(char::from(HEX[usize::from(b >> 4)]));
                out.push(char::from(HEX[usize::from(b & 0xf)]));
            }
        }
        start = at + 1;
    }
    out.push('"');
}

/// A JSON object being written: `{"key":value,...}`. Keys are this
/// module's callers' constants and are written as they are.
pub(crate) struct Object<'a> {
    out: &'a mut String,
    first: bool,
}

impl<'a> Object<'a> {
    pub(crate) fn begin(out: &'a mut String) -> Self {
        out.push('{');
        Object { out, first: true }
    }

    fn key(&mut self, key: &str) {
        if !self.first {
            self.out.push(',');
        }
        self.first = false;
        self.out.push('"');
        self.out.push_str(key);
        self.out.push_str("\":");
    }

    pub(crate) fn str(&mut self, key: &str, value: &str) -> &mut Self {
        self.key(key);
        push_str(self.out, value);
        self
    }

    pub(crate) fn opt_str(&mut self, key: &str, value: Option<&str>) -> &mut Self {
        if let Some(value) = value {
            self.str(key, value);
        }
        self
    }

    pub(crate) fn int(&mut self, key: &str, value: i64) -> &mut Self {
        self.key(key);
        self.out.push_str(itoa::Buffer::new().format(value));
        self
    }

    pub(crate) fn opt_uint(&mut self, key: &str, value: Option<u64>) -> &mut Self {
        if let Some(value) = value {
            self.key(key);
            self.out.push_str(itoa::Buffer::new().format(value));
        }
        self
    }

    /// A list of strings; nothing when it is empty.
    pub(crate) fn str_list(&mut self, key: &str, values: &[String]) -> &mut Self {
        if values.is_empty() {
            return self;
        }
        self.key(key);
        self.out.push('[');
        for (i, v) in values.iter().enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            push_str(self.out, v);
        }
        self.out.push(']');
        self
    }

    /// A nested object under `key`, written by `f`.
    pub(crate) fn object(&mut self, key: &str, f: impl FnOnce(&mut Object<'_>)) -> &mut Self {
        self.key(key);
        let mut inner = Object::begin(self.out);
        f(&mut inner);
        inner.end();
        self
    }

    pub(crate) fn end(&mut self) {
        self.out.push('}');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serde(s: &str) -> String {
        serde_json::to_string(s).expect("serialize")
    }

    fn ours(s: &str) -> String {
        let mut out = String::new();
        push_str(&mut out, s);
        out
    }

    #[test]
    fn strings_are_written_as_serde_json_writes_them() {
        let mut cases: Vec<String> = vec![
            String::new(),
            "plain".into(),
            "a\"b\\c/d".into(),
            "\u{7f}é👋 — ünïcödé".into(),
            "x".repeat(1000),
        ];
        // Every control character and escape at every offset of a word.
        for b in (0u8..0x20).chain([b'"', b'\\']) {
            for offset in 0..70 {
                let mut s = "y".repeat(offset);
                s.push(char::from(b));
                s.push_str("tail👋 end");
                cases.push(s);
            }
        }
        // Multi-byte characters whose bytes look like escapes to a naive
        // scan (none of UTF-8's continuation bytes is below 0x80).
        cases.push("\u{2028}\u{2029}\u{ffff}\u{10ffff}".repeat(9));
        for s in &cases {
            assert_eq!(ours(s), serde(s), "{s:?}");
        }
    }

    #[test]
    fn scan_finds_each_byte_that_needs_escaping() {
        for b in 0u8..=0x7f {
            let needs = b < 0x20 || b == b'"' || b == b'\\';
            for at in 0..8 {
                let mut word = [b'a'; 8];
                word[at] = b;
                assert_eq!(
                    needs_escape(u64::from_le_bytes(word)),
                    needs,
                    "{b:#x} at {at}"
                );
            }
        }
        // High bytes (UTF-8 lead and continuation bytes) never need it.
        for b in 0x80u8..=0xff {
            assert!(!needs_escape(u64::from_le_bytes([b; 8])), "{b:#x}");
        }
    }
}
