//! Small, allocation-free JSON access for decoding venue frames, in wasm and natively.
//!
//! [`Json::parse`] checks the whole document once; after that, lookups walk the original bytes and
//! hand out borrowed slices. Strings are unescaped only when they contain escapes. Nothing here panics,
//! whatever the input, and nesting deeper than [`MAX_DEPTH`] is an error rather than a stack overflow.
//!
//! ```
//! use plugin_sdk::json::Json;
//! let frame = Json::parse(br#"{"s":"BTCUSDT","p":"65000.10","t":[1,2]}"#)?;
//! assert_eq!(frame.get("s").and_then(|s| s.as_raw_str()), Some("BTCUSDT"));
//! assert_eq!(frame.get("t").and_then(|t| t.at(1)).and_then(|v| v.as_u64()), Some(2));
//! # Ok::<(), plugin_sdk::json::JsonError>(())
//! ```

use std::borrow::Cow;
use std::fmt;

/// How deep arrays and objects may nest.
pub const MAX_DEPTH: usize = 64;

/// Why bytes are not a JSON document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JsonError {
    /// Byte offset of the problem.
    pub offset: usize,
    /// What was expected there.
    pub expected: &'static str,
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid JSON at byte {}: expected {}", self.offset, self.expected)
    }
}

impl std::error::Error for JsonError {}

/// The kind of a JSON value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `{...}`
    Object,
    /// `[...]`
    Array,
    /// `"..."`
    String,
    /// `-1.5e3`
    Number,
    /// `true` or `false`
    Bool,
    /// `null`
    Null,
}

/// One JSON value, borrowed from the document's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Json<'a> {
    raw: &'a [u8],
}

impl<'a> Json<'a> {
    /// Checks `bytes` is exactly one JSON value (surrounding whitespace allowed) and returns it.
    ///
    /// # Errors
    /// [`JsonError`] with the offset of the first problem.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, JsonError> {
        let start = skip_ws(bytes, 0);
        let end = value_end(bytes, start, 0)?;
        if skip_ws(bytes, end) != bytes.len() {
            return Err(JsonError { offset: skip_ws(bytes, end), expected: "end of document" });
        }
        Ok(Json { raw: &bytes[start..end] })
    }

    /// The value's kind.
    pub fn kind(&self) -> Kind {
        match self.raw.first() {
            Some(b'{') => Kind::Object,
            Some(b'[') => Kind::Array,
            Some(b'"') => Kind::String,
            Some(b't' | b'f') => Kind::Bool,
            Some(b'n') => Kind::Null,
            _ => Kind::Number,
        }
    }

    /// The value's JSON text.
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    /// The member `key` of an object (the first, if repeated); `None` for other kinds.
    ///
    /// ```
    /// let v = plugin_sdk::json::Json::parse(br#"{"a\u0062":1}"#).unwrap();
    /// assert_eq!(v.get("ab").and_then(|v| v.as_u64()), Some(1));
    /// ```
    pub fn get(&self, key: &str) -> Option<Json<'a>> {
        self.members().find(|(k, _)| k.eq_str(key)).map(|(_, v)| v)
    }

    /// Element `index` of an array; `None` for other kinds or past the end.
    pub fn at(&self, index: usize) -> Option<Json<'a>> {
        self.elements().nth(index)
    }

    /// The members of an object, in document order (empty for other kinds).
    pub fn members(&self) -> Members<'a> {
        Members { inner: Items::new(self.raw, b'{') }
    }

    /// The elements of an array, in order (empty for other kinds).
    pub fn elements(&self) -> Elements<'a> {
        Elements { inner: Items::new(self.raw, b'[') }
    }

    /// A string's contents without unescaping, or `None` when it is not a string or contains escapes.
    /// The fast path for numbers-as-strings and plain symbols.
    pub fn as_raw_str(&self) -> Option<&'a str> {
        let inner = string_inner(self.raw)?;
        if inner.contains(&b'\\') {
            return None;
        }
        std::str::from_utf8(inner).ok()
    }

    /// A string's contents, unescaped (borrowed when there was nothing to unescape).
    pub fn as_str(&self) -> Option<Cow<'a, str>> {
        let inner = string_inner(self.raw)?;
        if !inner.contains(&b'\\') {
            return std::str::from_utf8(inner).ok().map(Cow::Borrowed);
        }
        unescape(inner).map(Cow::Owned)
    }

    /// A number's text (e.g. to read it exactly with [`parse_e8`](crate::parse_e8)).
    pub fn as_number_text(&self) -> Option<&'a str> {
        if self.kind() != Kind::Number {
            return None;
        }
        std::str::from_utf8(self.raw).ok()
    }

    /// An integer number that fits in `u64`.
    pub fn as_u64(&self) -> Option<u64> {
        self.as_number_text()?.parse().ok()
    }

    /// An integer number that fits in `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        self.as_number_text()?.parse().ok()
    }

    /// `true` or `false`.
    pub fn as_bool(&self) -> Option<bool> {
        match self.raw {
            b"true" => Some(true),
            b"false" => Some(false),
            _ => None,
        }
    }

    /// True for `null`.
    pub fn is_null(&self) -> bool {
        self.raw == b"null"
    }
}

/// An object key as written, compared without allocating.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key<'a> {
    raw: Json<'a>,
}

impl<'a> Key<'a> {
    /// True when the key equals `s` (escapes resolved).
    pub fn eq_str(&self, s: &str) -> bool {
        match self.raw.as_raw_str() {
            Some(k) => k == s,
            None => self.raw.as_str().is_some_and(|k| k == s),
        }
    }

    /// The key, unescaped.
    pub fn as_str(&self) -> Cow<'a, str> {
        self.raw.as_str().unwrap_or(Cow::Borrowed(""))
    }
}

/// Iterator over an object's members; see [`Json::members`].
#[derive(Clone, Debug)]
pub struct Members<'a> {
    inner: Items<'a>,
}

impl<'a> Iterator for Members<'a> {
    type Item = (Key<'a>, Json<'a>);
    fn next(&mut self) -> Option<Self::Item> {
        let key = self.inner.next_value()?;
        let value = self.inner.next_value()?;
        Some((Key { raw: key }, value))
    }
}

/// Iterator over an array's elements; see [`Json::elements`].
#[derive(Clone, Debug)]
pub struct Elements<'a> {
    inner: Items<'a>,
}

impl<'a> Iterator for Elements<'a> {
    type Item = Json<'a>;
    fn next(&mut self) -> Option<Self::Item> {
        self.inner.next_value()
    }
}

/// Walks the values inside a validated container, skipping separators.
#[derive(Clone, Debug)]
struct Items<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Items<'a> {
    fn new(raw: &'a [u8], open: u8) -> Self {
        if raw.first() == Some(&open) { Items { buf: raw, pos: 1 } } else { Items { buf: raw, pos: raw.len() } }
    }

    fn next_value(&mut self) -> Option<Json<'a>> {
        let mut pos = skip_ws(self.buf, self.pos);
        if matches!(self.buf.get(pos), Some(b',' | b':')) {
            pos = skip_ws(self.buf, pos + 1);
        }
        match self.buf.get(pos) {
            None | Some(b'}' | b']') => {
                self.pos = self.buf.len();
                None
            }
            Some(_) => match value_end(self.buf, pos, 1) {
                Ok(end) => {
                    self.pos = end;
                    Some(Json { raw: &self.buf[pos..end] })
                }
                Err(_) => {
                    self.pos = self.buf.len();
                    None
                }
            },
        }
    }
}

fn skip_ws(buf: &[u8], mut pos: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = buf.get(pos) {
        pos += 1;
    }
    pos
}

fn err(offset: usize, expected: &'static str) -> JsonError {
    JsonError { offset, expected }
}

/// Validates the value starting at `pos` and returns where it ends.
fn value_end(buf: &[u8], pos: usize, depth: usize) -> Result<usize, JsonError> {
    match buf.get(pos) {
        None => Err(err(pos, "a value")),
        Some(b'"') => string_end(buf, pos),
        Some(open @ (b'{' | b'[')) => {
            if depth >= MAX_DEPTH {
                return Err(err(pos, "less nesting"));
            }
            let (close, is_object) = if *open == b'{' { (b'}', true) } else { (b']', false) };
            let mut p = skip_ws(buf, pos + 1);
            if buf.get(p) == Some(&close) {
                return Ok(p + 1);
            }
            loop {
                if is_object {
                    if buf.get(p) != Some(&b'"') {
                        return Err(err(p, "a string key"));
                    }
                    p = skip_ws(buf, string_end(buf, p)?);
                    if buf.get(p) != Some(&b':') {
                        return Err(err(p, "':'"));
                    }
                    p = skip_ws(buf, p + 1);
                }
                p = skip_ws(buf, value_end(buf, p, depth + 1)?);
                match buf.get(p) {
                    Some(b',') => p = skip_ws(buf, p + 1),
                    Some(c) if *c == close => return Ok(p + 1),
                    _ => return Err(err(p, if is_object { "',' or '}'" } else { "',' or ']'" })),
                }
            }
        }
        Some(b't') => literal(buf, pos, b"true"),
        Some(b'f') => literal(buf, pos, b"false"),
        Some(b'n') => literal(buf, pos, b"null"),
        Some(b'-' | b'0'..=b'9') => number_end(buf, pos),
        Some(_) => Err(err(pos, "a value")),
    }
}

fn literal(buf: &[u8], pos: usize, word: &'static [u8]) -> Result<usize, JsonError> {
    if buf.get(pos..pos + word.len()) == Some(word) {
        Ok(pos + word.len())
    } else {
        Err(err(pos, "true, false or null"))
    }
}

fn number_end(buf: &[u8], mut pos: usize) -> Result<usize, JsonError> {
    let digits = |buf: &[u8], mut p: usize| -> Result<usize, JsonError> {
        let start = p;
        while buf.get(p).is_some_and(u8::is_ascii_digit) {
            p += 1;
        }
        if p == start { Err(err(p, "a digit")) } else { Ok(p) }
    };
    if buf.get(pos) == Some(&b'-') {
        pos += 1;
    }
    if buf.get(pos) == Some(&b'0') {
        pos += 1;
    } else {
        pos = digits(buf, pos)?;
    }
    if buf.get(pos) == Some(&b'.') {
        pos = digits(buf, pos + 1)?;
    }
    if matches!(buf.get(pos), Some(b'e' | b'E')) {
        pos += 1;
        if matches!(buf.get(pos), Some(b'+' | b'-')) {
            pos += 1;
        }
        pos = digits(buf, pos)?;
    }
    Ok(pos)
}

/// Validates the string starting at the quote at `pos` (escapes and UTF-8) and returns its end.
fn string_end(buf: &[u8], pos: usize) -> Result<usize, JsonError> {
    let mut p = pos + 1;
    let mut run_start = p;
    // Whether the current run (since the opening quote or the last escape) has a non-ASCII byte; only
    // then does it need a UTF-8 check.
    let mut non_ascii = false;
    let check = |run: &[u8], non_ascii: bool, at: usize| match non_ascii {
        true => std::str::from_utf8(run).map(|_| ()).map_err(|_| err(at, "UTF-8")),
        false => Ok(()),
    };
    loop {
        // Eight plain ASCII bytes (no quote, backslash or control character) at a time.
        while let Some(Ok(bytes)) = buf.get(p..p + 8).map(<[u8; 8]>::try_from) {
            if special_or_non_ascii(u64::from_le_bytes(bytes)) != 0 {
                break;
            }
            p += 8;
        }
        match buf.get(p) {
            None => return Err(err(p, "a closing quote")),
            Some(b'"') => {
                check(&buf[run_start..p], non_ascii, run_start)?;
                return Ok(p + 1);
            }
            Some(b'\\') => {
                check(&buf[run_start..p], non_ascii, run_start)?;
                match buf.get(p + 1) {
                    Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => p += 2,
                    Some(b'u') if buf.get(p + 2..p + 6).is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) => p += 6,
                    _ => return Err(err(p, "a valid escape")),
                }
                run_start = p;
                non_ascii = false;
            }
            Some(c) if *c < 0x20 => return Err(err(p, "no control characters in a string")),
            Some(c) => {
                non_ascii |= *c >= 0x80;
                p += 1;
            }
        }
    }
}

/// A mask with the high bit set in each byte of `word` that is `"`, `\\`, below 0x20 or above 0x7f.
#[inline(always)]
fn special_or_non_ascii(word: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // A byte is zero after the xor exactly when it equals the searched byte; `has_zero` marks it (and
    // may mark bytes above it only when a lower one is marked too, so "none marked" is exact).
    let has_zero = |v: u64| v.wrapping_sub(ONES) & !v & HIGH;
    let quote = has_zero(word ^ (ONES * u64::from(b'"')));
    let backslash = has_zero(word ^ (ONES * u64::from(b'\\')));
    let control = word.wrapping_sub(ONES * 0x20) & !word & HIGH;
    quote | backslash | control | (word & HIGH)
}

fn string_inner(raw: &[u8]) -> Option<&[u8]> {
    match raw {
        [b'"', inner @ .., b'"'] => Some(inner),
        _ => None,
    }
}

fn hex4(h: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(h.get(..4)?).ok()?;
    u32::from_str_radix(s, 16).ok()
}

fn unescape(inner: &[u8]) -> Option<String> {
    let mut out = String::with_capacity(inner.len());
    let mut i = 0;
    while i < inner.len() {
        let next = inner[i..].iter().position(|&c| c == b'\\').map_or(inner.len(), |k| i + k);
        out.push_str(std::str::from_utf8(&inner[i..next]).ok()?);
        if next == inner.len() {
            break;
        }
        let c = *inner.get(next + 1)?;
        i = next + 2;
        let ch = match c {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let hi = hex4(inner.get(i..)?)?;
                i += 4;
                if (0xD800..0xDC00).contains(&hi) && inner.get(i..i + 2) == Some(b"\\u") {
                    let lo = hex4(inner.get(i + 2..)?)?;
                    if (0xDC00..0xE000).contains(&lo) {
                        i += 6;
                        char::from_u32(0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)).unwrap_or('\u{FFFD}')
                    } else {
                        '\u{FFFD}'
                    }
                } else {
                    char::from_u32(hi).unwrap_or('\u{FFFD}')
                }
            }
            _ => return None,
        };
        out.push(ch);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The byte-at-a-time reading `string_end` must agree with, fast path or not.
    fn string_end_reference(buf: &[u8], pos: usize) -> Result<usize, ()> {
        let mut p = pos + 1;
        let mut run_start = p;
        loop {
            match buf.get(p) {
                None => return Err(()),
                Some(b'"') => return std::str::from_utf8(&buf[run_start..p]).map(|_| p + 1).map_err(|_| ()),
                Some(b'\\') => {
                    std::str::from_utf8(&buf[run_start..p]).map_err(|_| ())?;
                    match buf.get(p + 1) {
                        Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => p += 2,
                        Some(b'u') if buf.get(p + 2..p + 6).is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) => {
                            p += 6
                        }
                        _ => return Err(()),
                    }
                    run_start = p;
                }
                Some(c) if *c < 0x20 => return Err(()),
                Some(_) => p += 1,
            }
        }
    }

    #[test]
    fn string_scan_agrees_with_byte_at_a_time() {
        let alphabet: &[&[u8]] = &[
            b"a",
            b"Z",
            b"0",
            b" ",
            b"\"",
            b"\\",
            b"\\n",
            b"\\u00e9",
            b"\x1f",
            b"\x7f",
            "é".as_bytes(),
            "€".as_bytes(),
            b"\xff",
            b"\xe2\x82",
        ];
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            let mut buf = vec![b'"'];
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 40) as usize;
            let mut y = x;
            for _ in 0..len {
                y = y.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                buf.extend_from_slice(alphabet[((y >> 33) % alphabet.len() as u64) as usize]);
            }
            buf.push(b'"');
            buf.extend_from_slice(b"  ");
            let fast = string_end(&buf, 0).map_err(|_| ());
            assert_eq!(fast, string_end_reference(&buf, 0), "{:?}", String::from_utf8_lossy(&buf));
        }
    }

    #[test]
    fn reads_a_binance_frame() {
        let frame = br#"{"stream":"nknusdt@aggTrade","data":{"e":"aggTrade","E":1633998523963,"s":"NKNUSDT","a":15683430,"p":"0.35280000","q":"58.00000000","m":false,"M":true}}"#;
        let v = Json::parse(frame).unwrap();
        let data = v.get("data").unwrap();
        assert_eq!(data.kind(), Kind::Object);
        assert_eq!(data.get("s").unwrap().as_raw_str(), Some("NKNUSDT"));
        assert_eq!(data.get("a").unwrap().as_u64(), Some(15_683_430));
        assert_eq!(data.get("m").unwrap().as_bool(), Some(false));
        assert_eq!(data.get("M").unwrap().as_bool(), Some(true));
        assert_eq!(data.get("missing"), None);
        assert_eq!(v.members().count(), 2);
    }

    #[test]
    fn arrays_and_nesting() {
        let v = Json::parse(br#" [993, [["354.11", "0.89"]], "trade", "XMR/USD", null, -1.5e3] "#).unwrap();
        assert_eq!(v.kind(), Kind::Array);
        assert_eq!(v.elements().count(), 6);
        assert_eq!(v.at(0).unwrap().as_u64(), Some(993));
        assert_eq!(v.at(1).unwrap().at(0).unwrap().at(1).unwrap().as_raw_str(), Some("0.89"));
        assert_eq!(v.at(3).unwrap().as_raw_str(), Some("XMR/USD"));
        assert!(v.at(4).unwrap().is_null());
        assert_eq!(v.at(5).unwrap().as_number_text(), Some("-1.5e3"));
        assert_eq!(v.at(5).unwrap().as_u64(), None);
        assert_eq!(v.at(6), None);
        assert_eq!(v.get("x"), None);
    }

    #[test]
    fn escapes() {
        let v = Json::parse(br#"{"k":"a\"b\\c\n\u00e9\ud83d\ude00","x\/y":true}"#).unwrap();
        let k = v.get("k").unwrap();
        assert_eq!(k.as_raw_str(), None);
        assert_eq!(k.as_str().unwrap(), "a\"b\\c\né😀");
        assert_eq!(v.get("x/y").unwrap().as_bool(), Some(true));
    }

    #[test]
    fn rejects_malformed_documents() {
        let bad: &[(&[u8], usize)] = &[
            (b"", 0),
            (b"{", 1),
            (b"{\"a\"}", 4),
            (b"{\"a\":1,}", 7),
            (b"[1 2]", 3),
            (b"\"abc", 4),
            (b"\"a\\x\"", 2),
            (b"01", 1),
            (b"-", 1),
            (b"1.", 2),
            (b"tru", 0),
            (b"{} {}", 3),
            (b"\"\x01\"", 1),
            (b"\"\xff\"", 1),
        ];
        for (doc, offset) in bad {
            let e = Json::parse(doc).unwrap_err();
            assert_eq!(e.offset, *offset, "{:?}: {e}", String::from_utf8_lossy(doc));
        }
        let deep = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        assert_eq!(Json::parse(deep.as_bytes()).unwrap_err().expected, "less nesting");
        let ok = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        assert!(Json::parse(ok.as_bytes()).is_ok());
    }

    #[test]
    fn never_panics_on_arbitrary_bytes() {
        let alphabet = br#"{}[]":,\u0e1 -."#;
        let mut doc = Vec::new();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for len in 0..20_000usize {
            doc.clear();
            for _ in 0..len % 24 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                doc.push(alphabet[(x % alphabet.len() as u64) as usize]);
            }
            if let Ok(v) = Json::parse(&doc) {
                let _ = v.get("u");
                let _ = v.at(1).map(|e| e.as_str());
                v.members().for_each(|(k, v)| drop((k.as_str(), v.as_str())));
            }
        }
    }
}
