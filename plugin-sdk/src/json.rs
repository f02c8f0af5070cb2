//! Small, allocation-free JSON access for decoding venue frames, in wasm and natively.
//!
//! [`Json::parse`] checks the whole document once; after that, lookups walk the original bytes without
//! checking them again (they only look for where each value ends) and hand out borrowed slices.
//! Strings are unescaped only when they contain escapes. [`Json::pick`] finds several members of an
//! object in one pass, which is how a decoder should read a frame. Nothing here panics, whatever the
//! input, and nesting deeper than [`MAX_DEPTH`] is an error rather than a stack overflow.
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
#[derive(Clone, Copy)]
pub struct Json<'a> {
    /// Starts at the value. A string or scalar ends where the value does; an object or array met
    /// while walking its parent runs on to the end of the document, because finding where it ends
    /// costs a scan that reading its members never needs ([`raw`](Self::raw) finds it on demand).
    raw: &'a [u8],
}

impl PartialEq for Json<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.raw() == other.raw()
    }
}

impl Eq for Json<'_> {}

impl std::fmt::Debug for Json<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Json({})", String::from_utf8_lossy(self.raw()))
    }
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

    /// [`parse`](Self::parse) and [`pick`](Self::pick) in one pass: checks `bytes` is exactly one JSON
    /// document, as `parse` does (the same errors), and picks the members named in `keys` from the
    /// root object while checking it, and from the object under the member
    /// [`Keys::with_inner`] names. Reading a frame this way visits each of its bytes once, where a
    /// parse and a pick visit the picked object's twice.
    ///
    /// ```
    /// use plugin_sdk::json::{Json, Keys};
    /// const EVENT: Keys<3> = Keys::new(["data", "s", "p"]).with_inner("data");
    /// let frame = Json::parse_pick(br#"{"stream":"btcusdt@trade","data":{"s":"BTCUSDT","p":"1.5"}}"#, &EVENT)?;
    /// assert!(frame.root[1].is_none());
    /// let [_, s, p] = frame.inner.unwrap();
    /// assert_eq!(s.and_then(|s| s.as_raw_str()), Some("BTCUSDT"));
    /// assert_eq!(p.and_then(|p| p.as_raw_str()), Some("1.5"));
    /// assert!(Json::parse_pick(br#"{"data":{"s":"X"}"#, &EVENT).is_err());
    /// # Ok::<(), plugin_sdk::json::JsonError>(())
    /// ```
    ///
    /// # Errors
    /// [`JsonError`] with the offset of the first problem, as [`parse`](Self::parse).
    pub fn parse_pick<const N: usize>(bytes: &'a [u8], keys: &Keys<'_, N>) -> Result<Picked<'a, N>, JsonError> {
        let start = skip_ws(bytes, 0);
        let mut root = [None; N];
        let mut inner = None;
        let end = match bytes.get(start) {
            Some(b'{') => checked_pick(bytes, start, 0, keys, &mut root, Some(&mut inner))?,
            _ => value_end(bytes, start, 0)?,
        };
        if skip_ws(bytes, end) != bytes.len() {
            return Err(JsonError { offset: skip_ws(bytes, end), expected: "end of document" });
        }
        Ok(Picked { document: Json { raw: &bytes[start..end] }, root, inner })
    }

    /// The value's kind.
    #[inline]
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
        match self.raw.first() {
            Some(b'{' | b'[') => &self.raw[..skip_container(self.raw, 0).min(self.raw.len())],
            _ => self.raw,
        }
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

    /// The members named in `keys`, found in one pass over an object: slot `i` holds the member named
    /// `keys[i]` (the first, if repeated), `None` when absent or when this is not an object. Reading a
    /// frame's fields this way walks it once, where a [`get`](Self::get) per field walks it per field.
    ///
    /// ```
    /// let v = plugin_sdk::json::Json::parse(br#"{"p":"1.5","s":"BTCUSDT","q":"2"}"#).unwrap();
    /// let [s, p, t] = v.pick(["s", "p", "T"]);
    /// assert_eq!(s.and_then(|s| s.as_raw_str()), Some("BTCUSDT"));
    /// assert_eq!(p.and_then(|p| p.as_raw_str()), Some("1.5"));
    /// assert_eq!(t, None);
    /// ```
    ///
    /// Names given as a constant [`Keys`] are prepared when the plugin is compiled, which is the
    /// fastest way to read a frame:
    ///
    /// ```
    /// use plugin_sdk::json::{Json, Keys};
    /// const TRADE: Keys<2> = Keys::new(["s", "p"]);
    /// let v = Json::parse(br#"{"p":"1.5","s":"BTCUSDT"}"#).unwrap();
    /// let [s, p] = v.pick(&TRADE);
    /// assert_eq!(s.and_then(|s| s.as_raw_str()), Some("BTCUSDT"));
    /// assert_eq!(p.and_then(|p| p.as_raw_str()), Some("1.5"));
    /// ```
    #[inline(always)]
    pub fn pick<const N: usize>(&self, keys: impl Names<N>) -> [Option<Json<'a>>; N] {
        keys.pick_from(self.raw)
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
    #[inline]
    pub fn as_raw_str(&self) -> Option<&'a str> {
        let inner = string_inner(self.raw)?;
        if has_backslash(inner) {
            return None;
        }
        Some(parsed_text(inner))
    }

    /// A string's contents, unescaped (borrowed when there was nothing to unescape).
    #[inline]
    pub fn as_str(&self) -> Option<Cow<'a, str>> {
        let inner = string_inner(self.raw)?;
        if !has_backslash(inner) {
            return Some(Cow::Borrowed(parsed_text(inner)));
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
    #[inline]
    pub fn as_u64(&self) -> Option<u64> {
        digits_u64(self.raw)
    }

    /// An integer number that fits in `i64`.
    #[inline]
    pub fn as_i64(&self) -> Option<i64> {
        match self.raw.split_first() {
            Some((b'-', rest)) => {
                let magnitude = digits_u64(rest)?;
                0i64.checked_sub_unsigned(magnitude)
            }
            _ => i64::try_from(digits_u64(self.raw)?).ok(),
        }
    }

    /// An unsigned integer written as a number (`123`) or as a string of digits (`"123"`, as OKX
    /// sends `tradeId` and Bitstamp `microtimestamp`); `None` for anything else or past `u64::MAX`.
    ///
    /// ```
    /// use plugin_sdk::json::Json;
    /// let v = Json::parse(br#"[123, "456", "-1", "1.5", "x"]"#).unwrap();
    /// let read: Vec<Option<u64>> = v.elements().map(|e| e.as_u64_or_digits()).collect();
    /// assert_eq!(read, [Some(123), Some(456), None, None, None]);
    /// ```
    #[inline]
    pub fn as_u64_or_digits(&self) -> Option<u64> {
        match string_inner(self.raw) {
            Some(inner) => digits_u64(inner),
            None => self.as_u64(),
        }
    }

    /// A signed integer written as a number or as a string (`"-12"`), like
    /// [`as_u64_or_digits`](Self::as_u64_or_digits).
    #[inline]
    pub fn as_i64_or_digits(&self) -> Option<i64> {
        match string_inner(self.raw) {
            Some(inner) => Json { raw: inner }.as_i64(),
            None => self.as_i64(),
        }
    }

    /// `true` or `false`.
    #[inline]
    pub fn as_bool(&self) -> Option<bool> {
        match self.raw {
            b"true" => Some(true),
            b"false" => Some(false),
            _ => None,
        }
    }

    /// True for `null`.
    #[inline]
    pub fn is_null(&self) -> bool {
        self.raw == b"null"
    }
}

/// An object key as written, compared without allocating.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key<'a> {
    raw: Json<'a>,
    /// Whether the key has a backslash (known from the walk that found it).
    escaped: bool,
}

impl<'a> Key<'a> {
    /// True when the key equals `s` (escapes resolved).
    pub fn eq_str(&self, s: &str) -> bool {
        match self.plain() {
            Some(k) => k == s.as_bytes(),
            None => self.raw.as_str().is_some_and(|k| k == s),
        }
    }

    /// The key's bytes when it has no escapes (the parse checked they are UTF-8), else `None`. The
    /// fast way to match keys: `match key.plain() { Some(b"s") => ..., }`.
    pub fn plain(&self) -> Option<&'a [u8]> {
        if self.escaped { None } else { string_inner(self.raw.raw) }
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
    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        let key = self.inner.next_value()?;
        let escaped = self.inner.escaped;
        let value = self.inner.next_value()?;
        Some((Key { raw: key, escaped }, value))
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
    /// The last value handed out was an object or array starting at `pos`, not yet skipped: it is
    /// skipped only if the walk goes on past it.
    pending: bool,
    /// The last value handed out was a string with a backslash.
    escaped: bool,
}

impl<'a> Items<'a> {
    fn new(raw: &'a [u8], open: u8) -> Self {
        let pos = if raw.first() == Some(&open) { 1 } else { raw.len() };
        Items { buf: raw, pos, pending: false, escaped: false }
    }

    #[inline(always)]
    fn next_value(&mut self) -> Option<Json<'a>> {
        if self.pending {
            self.pos = skip_container(self.buf, self.pos);
            self.pending = false;
        }
        // A validated document has only whitespace and one separator between values.
        let mut pos = self.pos;
        while self.buf.get(pos).is_some_and(|&c| is_ws(c) || c == b',' || c == b':') {
            pos += 1;
        }
        match self.buf.get(pos) {
            None | Some(b'}' | b']') => {
                self.pos = self.buf.len();
                None
            }
            // Only ever a validated document here, so finding the end is enough.
            Some(b'{' | b'[') => {
                self.pos = pos;
                self.pending = true;
                self.buf.get(pos..).map(|raw| Json { raw })
            }
            Some(&first) => {
                let end = if first == b'"' {
                    let (end, escaped) = skip_string(self.buf, pos);
                    self.escaped = escaped;
                    end
                } else {
                    skip_scalar(self.buf, pos)
                };
                self.pos = end;
                self.buf.get(pos..end).map(|raw| Json { raw })
            }
        }
    }
}

/// What [`Json::parse_pick`] read.
#[derive(Clone, Copy, Debug)]
pub struct Picked<'a, const N: usize> {
    /// The whole document, as [`Json::parse`] returns it.
    pub document: Json<'a>,
    /// The root object's members, slot by slot (all `None` when the root is not an object).
    pub root: [Option<Json<'a>>; N],
    /// The members of the object under the root's member [`Keys::with_inner`] names, when there is
    /// one and it is an object.
    pub inner: Option<[Option<Json<'a>>; N]>,
}

/// The member names one [`Json::pick`] looks for, each prepared for matching as whole words. Build
/// it as a constant (`const EVENT: Keys<3> = Keys::new(["e", "s", "p"]);`) so that is done when the
/// plugin is compiled; an array of names works too, prepared on each call.
#[derive(Clone, Copy, Debug)]
pub struct Keys<'k, const N: usize> {
    names: [&'k str; N],
    /// [`Packed::LONG`] for names too long to pack.
    packed: [Packed; N],
    /// The slot whose object [`Json::parse_pick`] picks from too.
    inner: Option<usize>,
}

impl<'k, const N: usize> Keys<'k, N> {
    /// Prepares `names`; slot `i` of a pick's result is the member named `names[i]`.
    pub const fn new(names: [&'k str; N]) -> Self {
        Self::prepare(names, None)
    }

    /// The same names, and [`Json::parse_pick`] also picks them from the object under the root's
    /// member `name` (one of them), as in a combined-stream envelope `{"stream":...,"data":{...}}`.
    ///
    /// # Panics
    /// When `name` is not one of the names; in a constant, that stops the plugin from compiling.
    pub const fn with_inner(self, name: &str) -> Self {
        let mut i = 0;
        while i < N {
            if bytes_eq(self.names[i].as_bytes(), name.as_bytes()) {
                return Self::prepare(self.names, Some(i));
            }
            i += 1;
        }
        panic!("the inner member must be one of the names")
    }

    /// The slot of the key whose opening quote is at `start` and which ends (past its closing quote)
    /// at `end`; `escaped` when it has a backslash.
    #[inline(always)]
    fn slot_of(&self, buf: &[u8], start: usize, end: usize, escaped: bool) -> Option<usize> {
        let len = end.saturating_sub(start + 2);
        if escaped {
            let key = Json { raw: buf.get(start..end).unwrap_or_default() };
            return self.names.iter().position(|name| key.as_str().is_some_and(|k| k == *name));
        }
        match Packed::at(buf, start + 1, len) {
            Some(key) => self.packed.iter().position(|name| *name == key),
            None => {
                let key = buf.get(start + 1..start + 1 + len).unwrap_or_default();
                self.names.iter().position(|name| name.as_bytes() == key)
            }
        }
    }

    const fn prepare(names: [&'k str; N], inner: Option<usize>) -> Self {
        let mut packed = [Packed::LONG; N];
        let mut i = 0;
        while i < N {
            if let Some(name) = Packed::of(names[i].as_bytes()) {
                packed[i] = name;
            }
            i += 1;
        }
        Keys { names, packed, inner }
    }
}

const fn bytes_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// What [`Json::pick`] takes: an array of names, or a reference to prepared [`Keys`] (a constant's
/// reference points at the prepared words where the plugin keeps them, so nothing is copied).
pub trait Names<const N: usize> {
    /// The members of the object `raw` named here; see [`Json::pick`].
    #[doc(hidden)]
    fn pick_from<'a>(self, raw: &'a [u8]) -> [Option<Json<'a>>; N];
}

impl<const N: usize> Names<N> for [&str; N] {
    #[inline(always)]
    fn pick_from<'a>(self, raw: &'a [u8]) -> [Option<Json<'a>>; N] {
        pick_members(raw, &Keys::new(self))
    }
}

impl<const N: usize> Names<N> for &Keys<'_, N> {
    #[inline(always)]
    fn pick_from<'a>(self, raw: &'a [u8]) -> [Option<Json<'a>>; N] {
        pick_members(raw, self)
    }
}

/// An object key of up to 15 bytes as two words: equal exactly when the bytes are. Keys are mostly a
/// few bytes, so matching a member against a wanted name is two integer compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Packed {
    lo: u64,
    hi: u64,
}

impl Packed {
    const MAX: usize = 15;
    /// Stands for a name longer than [`MAX`](Self::MAX): no packed key has a length byte past 15.
    const LONG: Packed = Packed { lo: 0, hi: u64::MAX };

    /// `None` for names longer than [`MAX`](Self::MAX).
    #[inline(always)]
    const fn of(bytes: &[u8]) -> Option<Packed> {
        if bytes.len() > Self::MAX {
            return None;
        }
        let (mut lo, mut hi) = (0u64, (bytes.len() as u64) << 56);
        let mut i = 0;
        while i < bytes.len() {
            if i < 8 {
                lo |= (bytes[i] as u64) << (8 * i);
            } else {
                hi |= (bytes[i] as u64) << (8 * (i - 8));
            }
            i += 1;
        }
        Some(Packed { lo, hi })
    }

    /// The key `buf[start..start + len]`, read as two whole words where the buffer has 16 bytes there.
    #[inline(always)]
    fn at(buf: &[u8], start: usize, len: usize) -> Option<Packed> {
        if len > Self::MAX {
            return None;
        }
        match (word_at(buf, start), word_at(buf, start + 8)) {
            (Some(lo), Some(hi)) => Some(Packed {
                lo: lo & low_bytes(len),
                hi: (hi & low_bytes(len.saturating_sub(8))) | ((len as u64) << 56),
            }),
            _ => buf.get(start..start + len).and_then(Packed::of),
        }
    }
}

/// A mask of the low `n` bytes of a word (all of it from 8).
#[inline(always)]
fn low_bytes(n: usize) -> u64 {
    if n >= 8 { u64::MAX } else { (1u64 << (8 * n)) - 1 }
}

/// [`Json::pick`]'s walk: one tight loop over the object's members, with nothing but positions kept
/// between them (no iterator state handed back and forth), which is what makes it cheap in wasm.
#[inline(always)]
fn pick_members<'a, const N: usize>(buf: &'a [u8], keys: &Keys<'_, N>) -> [Option<Json<'a>>; N] {
    let mut found = [None; N];
    let mut missing = N;
    if buf.first() != Some(&b'{') {
        return found;
    }
    let mut p = 1;
    loop {
        // A validated document: whitespace, then a key or the closing brace.
        p = skip_ws(buf, p);
        if buf.get(p) != Some(&b'"') {
            return found;
        }
        let (key_end, escaped) = skip_string(buf, p);
        let mut v = key_end;
        while buf.get(v).is_some_and(|&c| is_ws(c) || c == b':') {
            v += 1;
        }
        let (end, value) = match buf.get(v) {
            Some(b'"') => {
                let end = skip_string(buf, v).0;
                (end, buf.get(v..end))
            }
            // Found where it ends only if the walk goes past it.
            Some(b'{' | b'[') => (0, buf.get(v..)),
            Some(_) => {
                let end = skip_scalar(buf, v);
                (end, buf.get(v..end))
            }
            None => return found,
        };
        let Some(value) = value.map(|raw| Json { raw }) else {
            return found;
        };
        let slot = keys.slot_of(buf, p, key_end, escaped);
        if let Some(i) = slot
            && let Some(free @ None) = found.get_mut(i)
        {
            *free = Some(value);
            missing -= 1;
            if missing == 0 {
                return found;
            }
        }
        p = if end == 0 { skip_container(buf, v) } else { end };
        p = skip_ws(buf, p);
        if buf.get(p) != Some(&b',') {
            return found;
        }
        p += 1;
    }
}

/// The 8 bytes at `p`, if there are 8.
#[inline(always)]
fn word_at(buf: &[u8], p: usize) -> Option<u64> {
    match buf.get(p..p + 8) {
        Some(&[a, b, c, d, e, f, g, h]) => Some(u64::from_le_bytes([a, b, c, d, e, f, g, h])),
        _ => None,
    }
}

/// Past the number or literal at `pos`: up to the next delimiter (`,`, `}`, `]` or whitespace).
#[inline(always)]
fn skip_scalar(buf: &[u8], pos: usize) -> usize {
    let mut p = pos + 1;
    while let Some(word) = word_at(buf, p) {
        // Delimiters are the bytes up to 0x20, 0x2c, 0x5d and 0x7d; no number or literal has them.
        let delimiter = (word.wrapping_sub(ONES * 0x21) & !word & HIGH)
            | has_zero(word ^ (ONES * u64::from(b',')))
            | has_zero(word ^ (ONES * u64::from(b']')))
            | has_zero(word ^ (ONES * u64::from(b'}')));
        if delimiter != 0 {
            return p + (delimiter.trailing_zeros() / 8) as usize;
        }
        p += 8;
    }
    while buf.get(p).is_some_and(|c| !matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')) {
        p += 1;
    }
    p
}

/// Past the object or array at `pos`, jumping from one quote or bracket to the next.
fn skip_container(buf: &[u8], pos: usize) -> usize {
    let mut depth = 0usize;
    let mut p = pos;
    loop {
        // Find the next quote or bracket, 8 bytes at a time where there are 8.
        let next = match word_at(buf, p) {
            Some(word) => {
                // `{` and `[` differ only in bit 5, as do `}` and `]`.
                let folded = word | (ONES * 0x20);
                let hits = has_zero(word ^ (ONES * u64::from(b'"')))
                    | has_zero(folded ^ (ONES * u64::from(b'{')))
                    | has_zero(folded ^ (ONES * u64::from(b'}')));
                if hits == 0 {
                    p += 8;
                    continue;
                }
                p + (hits.trailing_zeros() / 8) as usize
            }
            None => match buf
                .get(p..)
                .and_then(|rest| rest.iter().position(|c| matches!(c, b'"' | b'{' | b'}' | b'[' | b']')))
            {
                Some(k) => p + k,
                None => return buf.len(),
            },
        };
        match buf.get(next) {
            Some(b'"') => {
                p = skip_string(buf, next).0;
                continue;
            }
            Some(b'{' | b'[') => depth += 1,
            Some(_) => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return next + 1;
                }
            }
            None => return buf.len(),
        }
        p = next + 1;
    }
}

/// Where the string whose opening quote is at `pos` ends (past its closing quote), in a validated
/// document, and whether it has a backslash.
#[inline(always)]
fn skip_string(buf: &[u8], pos: usize) -> (usize, bool) {
    let mut p = pos + 1;
    let mut escaped = false;
    loop {
        while let Some(word) = word_at(buf, p) {
            let hits = quote_or_backslash(word);
            if hits != 0 {
                p += (hits.trailing_zeros() / 8) as usize;
                break;
            }
            p += 8;
        }
        match buf.get(p) {
            None => return (buf.len(), escaped),
            Some(b'"') => return (p + 1, escaped),
            Some(b'\\') => {
                escaped = true;
                p += 2;
            }
            Some(_) => p += 1,
        }
    }
}

/// A JSON integer's digits (no sign, fraction or exponent) as a `u64`, `None` past `u64::MAX`.
#[inline]
pub(crate) fn digits_u64(raw: &[u8]) -> Option<u64> {
    if raw.is_empty() || raw.len() > 20 || digits_end(raw, 0) != raw.len() {
        return None;
    }
    // Up to 19 digits cannot overflow.
    match raw.split_at_checked(19) {
        Some((head, [c])) => digits_value(head).checked_mul(10)?.checked_add(u64::from(c - b'0')),
        _ => Some(digits_value(raw)),
    }
}

/// The value of at most 19 ASCII digits (checked by the caller), eight at a time where there are
/// eight.
#[inline(always)]
pub(crate) fn digits_value(digits: &[u8]) -> u64 {
    let mut n: u64 = 0;
    let mut rest = digits;
    while let Some((chunk, tail)) = rest.split_first_chunk::<8>() {
        n = n.wrapping_mul(100_000_000).wrapping_add(eight_digits(u64::from_le_bytes(*chunk)));
        rest = tail;
    }
    for &c in rest {
        n = n.wrapping_mul(10).wrapping_add(u64::from(c.wrapping_sub(b'0')));
    }
    n
}

/// The value of eight ASCII digits read as a little-endian word (the first digit in the low byte).
#[inline(always)]
pub(crate) fn eight_digits(word: u64) -> u64 {
    // Pairs, then fours, then all eight; the high products wrap away by design.
    const LOW: u64 = 0x0000_00FF_0000_00FF;
    let v = word.wrapping_sub(ONES * u64::from(b'0'));
    let v = v.wrapping_mul(10).wrapping_add(v >> 8);
    (v & LOW).wrapping_mul(100 + (1_000_000 << 32)).wrapping_add(((v >> 16) & LOW).wrapping_mul(1 + (10_000 << 32)))
        >> 32
}

/// Past the run of ASCII digits at `p`, eight bytes at a time where there are eight.
#[inline(always)]
pub(crate) fn digits_end(buf: &[u8], mut p: usize) -> usize {
    while let Some(word) = word_at(buf, p) {
        let other = non_digits(word);
        if other != 0 {
            return p + (other.trailing_zeros() / 8) as usize;
        }
        p += 8;
    }
    while buf.get(p).is_some_and(u8::is_ascii_digit) {
        p += 1;
    }
    p
}

/// The high bit of every byte of `word` that is not an ASCII digit.
#[inline(always)]
fn non_digits(word: u64) -> u64 {
    // Digits become 0..=9; adding 0x76 to the low seven bits carries into bit 7 from 10 up, and
    // never into the next byte.
    let x = word ^ (ONES * u64::from(b'0'));
    (((x & (ONES * 0x7f)) + ONES * 0x76) | x) & HIGH
}

#[inline(always)]
fn skip_ws(buf: &[u8], mut pos: usize) -> usize {
    while buf.get(pos).is_some_and(|&c| is_ws(c)) {
        pos += 1;
    }
    pos
}

/// JSON whitespace, tested without a jump table: venues send compact JSON, so the first compare
/// answers for almost every byte, and in wasm a `match` on bytes becomes an indirect jump.
#[inline(always)]
fn is_ws(c: u8) -> bool {
    const WS: u64 = 1 << b' ' | 1 << b'\t' | 1 << b'\n' | 1 << b'\r';
    c <= b' ' && WS & (1 << c) != 0
}

fn err(offset: usize, expected: &'static str) -> JsonError {
    JsonError { offset, expected }
}

/// Validates the value starting at `pos` and returns where it ends.
fn value_end(buf: &[u8], pos: usize, depth: usize) -> Result<usize, JsonError> {
    match buf.get(pos) {
        Some(b'{' | b'[') => container_end(buf, pos, depth),
        _ => scalar_end(buf, pos),
    }
}

/// Validates the string, number or literal at `pos` and returns where it ends.
#[inline(always)]
fn scalar_end(buf: &[u8], pos: usize) -> Result<usize, JsonError> {
    match buf.get(pos) {
        Some(b'"') => string_end(buf, pos),
        Some(b'-' | b'0'..=b'9') => number_end(buf, pos),
        Some(b't') => literal(buf, pos, b"true"),
        Some(b'f') => literal(buf, pos, b"false"),
        Some(b'n') => literal(buf, pos, b"null"),
        _ => Err(err(pos, "a value")),
    }
}

/// Validates the object or array at `pos` and returns where it ends. Members that are strings,
/// numbers or literals are checked in the loop; only nested containers recurse.
/// The checking walk of [`container_end`] over the object at `pos`, picking as it goes: the members
/// named in `keys` into `found`, and (given `inner`) those of the object under the member
/// [`Keys::with_inner`] names. Checks and errors are exactly `container_end`'s.
fn checked_pick<'a, const N: usize>(
    buf: &'a [u8],
    pos: usize,
    depth: usize,
    keys: &Keys<'_, N>,
    found: &mut [Option<Json<'a>>; N],
    mut inner: Option<&mut Option<[Option<Json<'a>>; N]>>,
) -> Result<usize, JsonError> {
    if depth >= MAX_DEPTH {
        return Err(err(pos, "less nesting"));
    }
    let mut p = skip_ws(buf, pos + 1);
    if buf.get(p) == Some(&b'}') {
        return Ok(p + 1);
    }
    loop {
        if buf.get(p) != Some(&b'"') {
            return Err(err(p, "a string key"));
        }
        let key = p;
        let key_end = string_end(buf, p)?;
        p = skip_ws(buf, key_end);
        if buf.get(p) != Some(&b':') {
            return Err(err(p, "':'"));
        }
        p = skip_ws(buf, p + 1);
        let escaped = has_backslash(buf.get(key + 1..key_end - 1).unwrap_or_default());
        // Only the first member of a name is picked, as `pick` does.
        let slot = keys.slot_of(buf, key, key_end, escaped).filter(|&i| found.get(i).is_some_and(Option::is_none));
        let end = match buf.get(p) {
            Some(b'{') if slot.is_some() && slot == keys.inner && inner.is_some() => {
                let mut members = [None; N];
                let end = checked_pick(buf, p, depth + 1, keys, &mut members, None)?;
                if let Some(inner) = inner.take() {
                    *inner = Some(members);
                }
                end
            }
            Some(b'{' | b'[') => container_end(buf, p, depth + 1)?,
            _ => scalar_end(buf, p)?,
        };
        if let Some(i) = slot
            && let (Some(free), Some(raw)) = (found.get_mut(i), buf.get(p..end))
        {
            *free = Some(Json { raw });
        }
        p = skip_ws(buf, end);
        match buf.get(p) {
            Some(b',') => p = skip_ws(buf, p + 1),
            Some(b'}') => return Ok(p + 1),
            _ => return Err(err(p, "',' or '}'")),
        }
    }
}

fn container_end(buf: &[u8], pos: usize, depth: usize) -> Result<usize, JsonError> {
    match buf.get(pos) {
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
                let end = match buf.get(p) {
                    Some(b'{' | b'[') => container_end(buf, p, depth + 1)?,
                    _ => scalar_end(buf, p)?,
                };
                p = skip_ws(buf, end);
                match buf.get(p) {
                    Some(b',') => p = skip_ws(buf, p + 1),
                    Some(c) if *c == close => return Ok(p + 1),
                    _ => return Err(err(p, if is_object { "',' or '}'" } else { "',' or ']'" })),
                }
            }
        }
        _ => Err(err(pos, "a value")),
    }
}

#[inline(always)]
fn literal(buf: &[u8], pos: usize, word: &'static [u8]) -> Result<usize, JsonError> {
    if buf.get(pos..pos + word.len()) == Some(word) {
        Ok(pos + word.len())
    } else {
        Err(err(pos, "true, false or null"))
    }
}

#[inline(always)]
fn number_end(buf: &[u8], mut pos: usize) -> Result<usize, JsonError> {
    let digits = |buf: &[u8], p: usize| -> Result<usize, JsonError> {
        let end = digits_end(buf, p);
        if end == p { Err(err(p, "a digit")) } else { Ok(end) }
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
#[inline(always)]
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
        while let Some(word) = word_at(buf, p) {
            let hits = special_or_non_ascii(word);
            if hits != 0 {
                // The lowest marked byte is exact; the bytes before it are plain.
                p += (hits.trailing_zeros() / 8) as usize;
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

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// The high bit set in each byte of `v` that is zero (and possibly in bytes above a marked one, so
/// "none marked" is exact).
#[inline(always)]
fn has_zero(v: u64) -> u64 {
    v.wrapping_sub(ONES) & !v & HIGH
}

/// Non-zero when `word` holds a `"` or a `\\`.
#[inline(always)]
fn quote_or_backslash(word: u64) -> u64 {
    has_zero(word ^ (ONES * u64::from(b'"'))) | has_zero(word ^ (ONES * u64::from(b'\\')))
}

/// A mask with the high bit set in each byte of `word` that is `"`, `\\`, below 0x20 or above 0x7f.
#[inline(always)]
fn special_or_non_ascii(word: u64) -> u64 {
    // A byte is zero after the xor exactly when it equals the searched byte.
    let control = word.wrapping_sub(ONES * 0x20) & !word & HIGH;
    quote_or_backslash(word) | control | (word & HIGH)
}

/// Whether a string's contents have an escape (an inline loop: short strings, and `contains` is a
/// library call in wasm).
#[inline(always)]
#[allow(clippy::manual_contains)] // `contains` on bytes is a `memchr` call, which wasm profiles showed.
fn has_backslash(inner: &[u8]) -> bool {
    let mut rest = inner;
    while let Some((chunk, tail)) = rest.split_first_chunk::<8>() {
        if has_zero(u64::from_le_bytes(*chunk) ^ (ONES * u64::from(b'\\'))) != 0 {
            return true;
        }
        rest = tail;
    }
    rest.iter().any(|&c| c == b'\\')
}

/// The contents of a string of a parsed document as text, without checking them again: checking
/// every string twice was a twentieth of a decode call.
#[inline(always)]
fn parsed_text(inner: &[u8]) -> &str {
    debug_assert!(std::str::from_utf8(inner).is_ok());
    // SAFETY: `inner` is the contents of a string value of a document `Json::parse` accepted. Only
    // `parse` and the walks over what it returned construct a `Json` (its one field is private),
    // and `string_end` refused the document unless the bytes of every string between its escapes
    // were UTF-8; escapes are ASCII, so the contents as written are UTF-8 too.
    unsafe { std::str::from_utf8_unchecked(inner) }
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

    /// A random JSON value and its text: strings with escaped quotes and brackets, nested
    /// containers, numbers in every form, and whitespace between tokens.
    enum Gen {
        Scalar,
        Array(Vec<(String, Gen)>),
        Object(Vec<(String, String, Gen)>),
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
        fn ws(&mut self) -> &'static str {
            [" ", "", "", "\n\t", "\r "][self.next(5) as usize]
        }
        fn string(&mut self) -> String {
            let parts = ["a", "\\\"", "{", "]", "\\\\", "\\u00e9", "é", ",", ":", "abcdefghij", "\\/"];
            let n = self.next(6);
            let body: String = (0..n).map(|_| parts[self.next(parts.len() as u64) as usize]).collect();
            format!("\"{body}\"")
        }
        fn value(&mut self, depth: u32) -> (String, Gen) {
            match if depth > 3 { self.next(2) } else { self.next(4) } {
                0 => {
                    let numbers = ["0", "-1", "12.5e-3", "1633998523963", "18446744073709551615", "-9.0E+2"];
                    let literals = ["true", "false", "null"];
                    let t = match self.next(3) {
                        0 => self.string(),
                        1 => literals[self.next(3) as usize].to_string(),
                        _ => numbers[self.next(numbers.len() as u64) as usize].to_string(),
                    };
                    (t, Gen::Scalar)
                }
                1 => {
                    let t = self.string();
                    (t, Gen::Scalar)
                }
                2 => {
                    let items: Vec<(String, Gen)> = (0..self.next(5)).map(|_| self.value(depth + 1)).collect();
                    let body: Vec<String> =
                        items.iter().map(|(t, _)| format!("{}{t}{}", self.ws(), self.ws())).collect();
                    (format!("[{}]", body.join(",")), Gen::Array(items))
                }
                _ => {
                    let members: Vec<(String, String, Gen)> = (0..self.next(5))
                        .map(|_| {
                            let key = self.string();
                            let (t, g) = self.value(depth + 1);
                            (key, t, g)
                        })
                        .collect();
                    let body: Vec<String> = members
                        .iter()
                        .map(|(k, t, _)| format!("{}{k}{}:{}{t}{}", self.ws(), self.ws(), self.ws(), self.ws()))
                        .collect();
                    (format!("{{{}}}", body.join(",")), Gen::Object(members))
                }
            }
        }
    }

    /// The walk finds exactly the values the document was built from, with their exact text.
    fn check_walk(v: Json<'_>, text: &str, g: &Gen) {
        assert_eq!(v.raw(), text.as_bytes());
        match g {
            Gen::Scalar => assert!(v.members().next().is_none() && v.elements().next().is_none()),
            Gen::Array(items) => {
                let found: Vec<Json<'_>> = v.elements().collect();
                assert_eq!(found.len(), items.len(), "{text}");
                for (f, (t, g)) in found.iter().zip(items) {
                    check_walk(*f, t, g);
                }
            }
            Gen::Object(members) => {
                let found: Vec<(Key<'_>, Json<'_>)> = v.members().collect();
                assert_eq!(found.len(), members.len(), "{text}");
                for ((key, value), (k, t, g)) in found.iter().zip(members) {
                    assert_eq!(key.raw.raw(), k.as_bytes());
                    assert_eq!(key.plain().is_none(), k.contains('\\'), "{k}");
                    check_walk(*value, t, g);
                }
            }
        }
    }

    #[test]
    fn the_walk_agrees_with_how_the_document_was_built() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..5_000 {
            let (text, g) = rng.value(0);
            let doc = format!(" {text}\n");
            let v = Json::parse(doc.as_bytes()).unwrap_or_else(|e| panic!("{doc}: {e}"));
            check_walk(v, &text, &g);
        }
    }

    #[test]
    fn pick_agrees_with_get_on_generated_objects() {
        let mut rng = Rng(0x2545_f491_4f6c_dd1d);
        let mut checked = 0;
        for _ in 0..5_000 {
            let (text, g) = rng.value(0);
            let Gen::Object(members) = g else { continue };
            let doc = format!("{text} ");
            let v = Json::parse(doc.as_bytes()).unwrap();
            // Names from the object (escaped ones unescaped), a long one and an absent one.
            let mut names: Vec<String> = members
                .iter()
                .map(|(k, _, _)| Json::parse(k.as_bytes()).unwrap().as_str().unwrap().into_owned())
                .collect();
            names.extend(["absent".to_string(), "a_name_longer_than_fifteen".to_string()]);
            // A pick names each member once.
            let mut seen = std::collections::HashSet::new();
            names.retain(|n| seen.insert(n.clone()));
            while names.len() < 4 {
                names.push(format!("pad{}", names.len()));
            }
            let keys: [&str; 4] = [&names[0], &names[1], &names[2], &names[names.len() - 1]];
            let want = keys.map(|k| v.get(k));
            assert_eq!(v.pick(keys), want, "{text}");
            assert_eq!(v.pick(&Keys::new(keys)), want, "{text}");
            checked += 1;
        }
        assert!(checked > 500, "{checked}");
    }

    #[test]
    fn parse_pick_agrees_with_parse_then_pick() {
        // Generated documents as they are and with one byte cut, doubled or replaced, so that
        // errors are compared too.
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let names = ["a", "", "{é", "abcdefghij", "/"];
        let keys = Keys::new(names).with_inner("a");
        let mut inner_seen = 0;
        for i in 0..20_000u64 {
            let (text, _) = rng.value(0);
            let text = match i % 4 {
                0 => format!(r#"{{"a":{text},"abcdefghij":{text}}}"#),
                1 => text,
                _ => {
                    let mut bytes = text.into_bytes();
                    if !bytes.is_empty() {
                        let at = (rng.next(bytes.len() as u64)) as usize;
                        match i % 3 {
                            0 => _ = bytes.remove(at),
                            1 => bytes.insert(at, bytes[at]),
                            _ => bytes[at] = b"{}[]\":,x1"[rng.next(9) as usize],
                        }
                    }
                    String::from_utf8_lossy(&bytes).into_owned()
                }
            };
            let doc = text.as_bytes();
            let (fused, plain) = (Json::parse_pick(doc, &keys), Json::parse(doc));
            match (fused, plain) {
                (Err(a), Err(b)) => assert_eq!(a, b, "{text}"),
                (Ok(picked), Ok(v)) => {
                    assert_eq!(picked.document, v);
                    let root = v.pick(names);
                    assert_eq!(picked.root, root, "{text}");
                    let inner = root[0].filter(|a| a.kind() == Kind::Object).map(|a| a.pick(names));
                    inner_seen += usize::from(inner.is_some());
                    assert_eq!(picked.inner, inner, "{text}");
                }
                (a, b) => panic!("{text}: {a:?} against {b:?}"),
            }
        }
        assert!(inner_seen > 1_000, "{inner_seen}");
    }

    #[test]
    fn pick_reads_keys_of_every_length_at_the_end_of_a_document() {
        // Keys up to and past the packed width, near the end of the buffer where a whole-word read
        // does not fit.
        for len in 1..=20 {
            let key = "k".repeat(len - 1) + "z";
            let doc = format!(r#"{{"{key}":1,"x":2}}"#);
            let v = Json::parse(doc.as_bytes()).unwrap();
            let [a, b] = v.pick([key.as_str(), "x"]);
            assert_eq!((a.and_then(|a| a.as_u64()), b.and_then(|b| b.as_u64())), (Some(1), Some(2)), "{doc}");
            // A name that differs only past the eighth byte is another key.
            let other = "k".repeat(len - 1) + "y";
            assert_eq!(v.pick([other.as_str()]), [None], "{doc}");
        }
    }

    #[test]
    fn pick_takes_the_first_of_repeated_keys_and_reads_escaped_ones() {
        let v = Json::parse(br#"{"a":1,"b":{"a":9},"a":2,"c\u0064":[3],"long_key_name":4}"#).unwrap();
        let [a, b, d, long, none] = v.pick(["a", "b", "cd", "long_key_name", "z"]);
        assert_eq!(a.and_then(|a| a.as_u64()), Some(1));
        assert_eq!(b.map(|b| b.raw()), Some(&br#"{"a":9}"#[..]));
        assert_eq!(d.and_then(|d| d.at(0)).and_then(|d| d.as_u64()), Some(3));
        assert_eq!(long.and_then(|l| l.as_u64()), Some(4));
        assert_eq!(none, None);
        assert_eq!(Json::parse(b"[1]").unwrap().pick(["a"]), [None]);
    }

    #[test]
    fn integers_are_read_exactly_at_their_limits() {
        fn n(t: &str) -> Json<'_> {
            Json::parse(t.as_bytes()).unwrap()
        }
        assert_eq!(n("18446744073709551615").as_u64(), Some(u64::MAX));
        assert_eq!(n("18446744073709551616").as_u64(), None);
        assert_eq!(n("-9223372036854775808").as_i64(), Some(i64::MIN));
        assert_eq!(n("9223372036854775807").as_i64(), Some(i64::MAX));
        assert_eq!(n("9223372036854775808").as_i64(), None);
        assert_eq!(n("-9223372036854775809").as_i64(), None);
        assert_eq!(n("-1").as_u64(), None);
        assert_eq!(n("1.0").as_u64(), None);
        assert_eq!(n("1e3").as_i64(), None);
        assert_eq!(n("\"1\"").as_u64(), None);
        assert_eq!(n("-0").as_i64(), Some(0));
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
