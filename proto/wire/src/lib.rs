//! The protobuf wire format of `sluice.v1.StreamData` (`proto/sluice.proto`), read in place and
//! written without allocation: the one definition the plugin SDK (which re-exports [`Record`],
//! [`Records`], [`StreamDataView`] and [`WireError`] to plugin authors) and the host share.
//!
//! Batches are length-delimited: every record is preceded by its byte length as a varint. The readers
//! here never panic, whatever the bytes: a malformed record is a [`WireError`]. Like the SDK, this
//! crate depends on no other, so a plugin builds offline.

use core::fmt;

/// A `sluice.v1.StreamData` record as plain values.
///
/// Prices and volumes are fixed-point with eight decimals: `1.5` is `150_000_000`. Use
/// the SDK's `parse_e8` to get them from a venue's decimal strings.
///
/// ```
/// use sluice_wire::Record;
/// let trade = Record { symbol_id: 7, price_e8: 150_000_000, is_buy: true, ..Record::default() };
/// assert_eq!(trade.volume_e8, 0);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Record {
    /// The source the trade came from; the host sets it after `decode`.
    pub source_id: u32,
    /// The symbol's id from the SDK's `symbol_id`.
    pub symbol_id: u32,
    /// Trade price times 10^8.
    pub price_e8: i64,
    /// Traded quantity times 10^8.
    pub volume_e8: i64,
    /// The venue's trade time in milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    /// True when the taker (aggressor) bought.
    pub is_buy: bool,
    /// The venue's trade id, 0 when it sends none.
    pub trade_id: u64,
    /// When the host read the frame, microseconds since the Unix epoch; the host sets it.
    pub received_at_us: i64,
}

/// Why bytes are not a valid record or batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireError {
    /// The bytes end inside a varint, a field or a record.
    Truncated,
    /// A varint is longer than ten bytes or overflows 64 bits.
    VarintOverflow,
    /// A field uses a wire type protobuf does not define (or the deprecated groups).
    BadWireType(u8),
    /// A field number of 0, which protobuf forbids.
    ZeroFieldNumber,
    /// A known field arrives with the wrong wire type, e.g. `price_e8` as bytes.
    WrongWireType {
        /// The field number.
        field: u32,
    },
    /// A `uint32` field holds a value above `u32::MAX`.
    OutOfRange {
        /// The field number.
        field: u32,
    },
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Truncated => f.write_str("record is truncated"),
            WireError::VarintOverflow => f.write_str("varint is longer than 10 bytes"),
            WireError::BadWireType(t) => write!(f, "unsupported wire type {t}"),
            WireError::ZeroFieldNumber => f.write_str("field number 0"),
            WireError::WrongWireType { field } => write!(f, "field {field} has the wrong wire type"),
            WireError::OutOfRange { field } => write!(f, "field {field} is out of range for uint32"),
        }
    }
}

impl std::error::Error for WireError {}

/// Reads a varint at `*pos`, advancing it.
///
/// One-byte varints take a single compare; longer ones are read eight bytes at a time when the buffer
/// has them, finding the last byte from the continuation bits instead of looping byte by byte.
///
/// # Errors
/// [`WireError::Truncated`] or [`WireError::VarintOverflow`].
#[inline(always)]
pub fn read_varint(buf: &[u8], pos: &mut usize) -> Result<u64, WireError> {
    let (value, next) = varint_at(buf, *pos)?;
    *pos = next;
    Ok(value)
}

/// Reads the varint at `pos`; returns it and the position after it.
///
/// Positions go in and out by value so that they stay in registers (in wasm, in locals): a position
/// behind a pointer handed to a function that is not inlined would live in linear memory.
#[inline(always)]
fn varint_at(buf: &[u8], pos: usize) -> Result<(u64, usize), WireError> {
    match buf.get(pos) {
        None => return Err(WireError::Truncated),
        Some(&b) if b < 0x80 => return Ok((u64::from(b), pos + 1)),
        Some(_) => {}
    }
    // One eight-byte load (an `i64.load` in wasm), not eight byte loads.
    if let Some(Ok(bytes)) = buf.get(pos..pos + 8).map(<[u8; 8]>::try_from) {
        let word = u64::from_le_bytes(bytes);
        let stops = !word & 0x8080_8080_8080_8080;
        if stops != 0 {
            let len = (stops.trailing_zeros() / 8 + 1) as usize;
            let word = if len == 8 { word } else { word & ((1u64 << (len * 8)) - 1) };
            return Ok((compact(word), pos + len));
        }
    }
    varint_slow(buf, pos)
}

/// Joins the 7-bit groups of up to eight varint bytes (continuation bits included, unused high bytes
/// zero) into the value: byte k's low 7 bits move to bit 7k. Pairs, then quads, then halves are
/// closed up, three steps instead of one shift per byte.
#[inline(always)]
fn compact(word: u64) -> u64 {
    let x = word & 0x7f7f_7f7f_7f7f_7f7f;
    let x = (x & 0x007f_007f_007f_007f) | ((x & 0x7f00_7f00_7f00_7f00) >> 1);
    let x = (x & 0x0000_3fff_0000_3fff) | ((x & 0x3fff_0000_3fff_0000) >> 2);
    (x & 0x0fff_ffff) | ((x & 0x0fff_ffff_0000_0000) >> 4)
}

/// The inverse of [`compact`] for values below 2^56: bit 7k starts byte k (continuation bits left
/// clear).
#[inline(always)]
fn spread(v: u64) -> u64 {
    let x = (v & 0x0fff_ffff) | ((v & 0x00ff_ffff_f000_0000) << 4);
    let x = (x & 0x0000_3fff_0000_3fff) | ((x & 0x0fff_c000_0fff_c000) << 2);
    (x & 0x007f_007f_007f_007f) | ((x & 0x3f80_3f80_3f80_3f80) << 1)
}

/// Varints longer than eight bytes (negative numbers) or near the end of the buffer.
#[cold]
fn varint_slow(buf: &[u8], pos: usize) -> Result<(u64, usize), WireError> {
    let mut value: u64 = 0;
    let mut i = pos;
    for shift in (0..70).step_by(7) {
        let Some(&byte) = buf.get(i) else {
            return Err(WireError::Truncated);
        };
        i += 1;
        if shift == 63 && byte > 1 {
            return Err(WireError::VarintOverflow);
        }
        value |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Ok((value, i));
        }
    }
    Err(WireError::VarintOverflow)
}

/// The number of bytes `value` takes as a varint.
#[inline(always)]
pub fn varint_len(value: u64) -> usize {
    // 1 + floor(bits / 7), with 0 taking one byte.
    let bits = 64 - (value | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Appends `value` as a varint.
#[inline(always)]
pub fn write_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Skips the payload of a field of `wire_type` at `*pos`.
fn skip_field(buf: &[u8], pos: &mut usize, wire_type: u8) -> Result<(), WireError> {
    let len = match wire_type {
        0 => {
            read_varint(buf, pos)?;
            return Ok(());
        }
        1 => 8,
        2 => usize::try_from(read_varint(buf, pos)?).map_err(|_| WireError::Truncated)?,
        5 => 4,
        other => return Err(WireError::BadWireType(other)),
    };
    let end = pos.checked_add(len).ok_or(WireError::Truncated)?;
    if end > buf.len() {
        return Err(WireError::Truncated);
    }
    *pos = end;
    Ok(())
}

/// A `StreamData` record read in place from its bytes.
///
/// Reading decodes the scalar fields once; the original bytes stay available through
/// [`as_bytes`](Self::as_bytes), so a plugin that passes a record through copies it unchanged.
/// Unknown fields are skipped, so records from a newer schema still read.
///
/// ```
/// use sluice_wire::{Record, Records, StreamDataView};
/// let mut out = Records::new();
/// out.push(&Record { symbol_id: 3, price_e8: 42, ..Record::default() });
/// let view = out.iter().next().unwrap().unwrap();
/// assert_eq!(view.price_e8, 42);
/// assert_eq!(StreamDataView::parse(view.as_bytes()).unwrap().symbol_id, 3);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamDataView<'a> {
    bytes: &'a [u8],
    record: Record,
}

impl<'a> StreamDataView<'a> {
    /// Reads one record (without its length prefix).
    ///
    /// # Errors
    /// A [`WireError`] when the bytes are not a valid `StreamData`.
    #[inline]
    pub fn parse(bytes: &'a [u8]) -> Result<Self, WireError> {
        let mut r = Record::default();
        let mut pos = 0;
        // Writers (ours and protobuf's) emit fields in number order, so try that first: a straight
        // run of predictable branches. Whatever remains (unknown fields, other orders) goes through
        // the general loop below, which gives the same result for any order.
        macro_rules! in_order {
            ($key:literal, $field:ident, $conv:expr) => {
                if bytes.get(pos) == Some(&$key) {
                    pos += 1;
                    let v = read_varint(bytes, &mut pos)?;
                    r.$field = $conv(v)?;
                }
            };
        }
        in_order!(0x08, source_id, |v| u32_field(v, 1));
        in_order!(0x10, symbol_id, |v| u32_field(v, 2));
        in_order!(0x18, price_e8, |v| Ok::<_, WireError>(v as i64));
        in_order!(0x20, volume_e8, |v| Ok::<_, WireError>(v as i64));
        in_order!(0x28, timestamp_ms, |v| Ok::<_, WireError>(v as i64));
        in_order!(0x30, is_buy, |v| Ok::<_, WireError>(v != 0));
        in_order!(0x38, trade_id, Ok::<_, WireError>);
        in_order!(0x40, received_at_us, |v| Ok::<_, WireError>(v as i64));
        while pos < bytes.len() {
            let key = read_varint(bytes, &mut pos)?;
            let field = key >> 3;
            let wire_type = (key & 7) as u8;
            if field == 0 {
                return Err(WireError::ZeroFieldNumber);
            }
            if (1..=8).contains(&field) {
                if wire_type != 0 {
                    return Err(WireError::WrongWireType { field: field as u32 });
                }
                let v = read_varint(bytes, &mut pos)?;
                match field {
                    1 => r.source_id = u32_field(v, 1)?,
                    2 => r.symbol_id = u32_field(v, 2)?,
                    3 => r.price_e8 = v as i64,
                    4 => r.volume_e8 = v as i64,
                    5 => r.timestamp_ms = v as i64,
                    6 => r.is_buy = v != 0,
                    7 => r.trade_id = v,
                    _ => r.received_at_us = v as i64,
                }
            } else {
                skip_field(bytes, &mut pos, wire_type)?;
            }
        }
        Ok(StreamDataView { bytes, record: r })
    }

    /// The record's encoded bytes, exactly as read.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The record's values.
    pub fn record(&self) -> Record {
        self.record
    }
}

impl core::ops::Deref for StreamDataView<'_> {
    type Target = Record;
    fn deref(&self) -> &Record {
        &self.record
    }
}

#[inline(always)]
fn u32_field(v: u64, field: u32) -> Result<u32, WireError> {
    u32::try_from(v).map_err(|_| WireError::OutOfRange { field })
}

/// Iterates over the length-delimited items of a buffer: frames for `decode`, records for
/// `transform`. Stops after the first framing error.
///
/// ```
/// use sluice_wire::Delimited;
/// let items: Vec<_> = Delimited::new(&[2, b'h', b'i', 0]).collect();
/// assert_eq!(items, vec![Ok(&b"hi"[..]), Ok(&b""[..])]);
/// ```
#[derive(Clone, Debug)]
pub struct Delimited<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Delimited<'a> {
    /// Iterates over `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Delimited { buf, pos: 0 }
    }
}

impl<'a> Iterator for Delimited<'a> {
    type Item = Result<&'a [u8], WireError>;

    #[inline(always)]
    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.buf.len() {
            return None;
        }
        let item = read_varint(self.buf, &mut self.pos).and_then(|len| {
            let end = usize::try_from(len)
                .ok()
                .and_then(|len| self.pos.checked_add(len))
                .filter(|&end| end <= self.buf.len())
                .ok_or(WireError::Truncated)?;
            let item = &self.buf[self.pos..end];
            self.pos = end;
            Ok(item)
        });
        if item.is_err() {
            self.pos = self.buf.len();
        }
        Some(item)
    }
}

/// Appends `item` to `out` with its length prefix.
///
/// ```
/// let mut buf = Vec::new();
/// sluice_wire::push_delimited(&mut buf, b"hi");
/// assert_eq!(buf, [2, b'h', b'i']);
/// ```
pub fn push_delimited(out: &mut Vec<u8>, item: &[u8]) {
    write_varint(out, item.len() as u64);
    out.extend_from_slice(item);
}

/// Checks that `batch` is a valid sequence of length-delimited `StreamData` records and counts them.
///
/// Accepts exactly what [`StreamDataView::parse`] accepts, but skips over values instead of
/// decoding them where it can: the host runs this on every plugin output.
///
/// # Errors
/// The index of the first invalid record and why.
pub fn validate_batch(batch: &[u8]) -> Result<usize, (usize, WireError)> {
    let mut n = 0;
    for item in Delimited::new(batch) {
        item.and_then(validate_record).map_err(|e| (n, e))?;
        n += 1;
    }
    Ok(n)
}

#[inline]
fn validate_record(bytes: &[u8]) -> Result<&[u8], WireError> {
    let mut pos = 0;
    // The fields in number order, as writers emit them, checked in a straight line; anything else
    // (unknown fields, other orders, errors) goes to the full reader, which decides.
    for key in [0x08u8, 0x10] {
        if bytes.get(pos) == Some(&key) {
            pos += 1;
            u32_field(read_varint(bytes, &mut pos)?, u32::from(key >> 3))?;
        }
    }
    // Written out rather than looped over an array of keys: a straight line of predictable branches.
    macro_rules! skip_if {
        ($key:literal) => {
            if bytes.get(pos) == Some(&$key) {
                pos += 1;
                skip_varint(bytes, &mut pos)?;
            }
        };
    }
    skip_if!(0x18);
    skip_if!(0x20);
    skip_if!(0x28);
    skip_if!(0x30);
    skip_if!(0x38);
    skip_if!(0x40);
    if pos == bytes.len() { Ok(bytes) } else { StreamDataView::parse(bytes).map(|_| bytes) }
}

/// Skips a varint, finding its end eight bytes at a time when the buffer allows.
#[inline(always)]
fn skip_varint(buf: &[u8], pos: &mut usize) -> Result<(), WireError> {
    if let Some(Ok(bytes)) = buf.get(*pos..*pos + 8).map(<[u8; 8]>::try_from) {
        let stops = !u64::from_le_bytes(bytes) & 0x8080_8080_8080_8080;
        if stops != 0 {
            *pos += (stops.trailing_zeros() / 8 + 1) as usize;
            return Ok(());
        }
    }
    read_varint(buf, pos).map(|_| ())
}

/// Length-delimited `StreamData` records being written: a plugin's output.
///
/// Encoding matches protobuf's (fields in number order, zero values left out), so the bytes equal
/// what `prost` writes for the same record.
///
/// ```
/// use sluice_wire::{Record, Records};
/// let mut out = Records::new();
/// out.push(&Record { trade_id: 9, ..Record::default() });
/// assert_eq!(out.len(), 1);
/// assert_eq!(out.iter().next().unwrap().unwrap().trade_id, 9);
/// ```
#[derive(Clone, Debug, Default)]
pub struct Records {
    /// The records in `buf[..used]`; the bytes after them are initialised but hold nothing, room
    /// [`push`](Self::push) writes into without zeroing it first.
    buf: Vec<u8>,
    used: usize,
    len: usize,
}

impl Records {
    /// An empty output.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a record.
    #[inline]
    pub fn push(&mut self, r: &Record) {
        // The fields are written with whole-word stores into a fixed-size block of the spare room
        // and the output advances by the record's length. Nothing is zeroed per record (in wasm that
        // is a `memory.fill` call) and nothing written here is read back, so no load waits on these
        // stores. A body is at most 88 bytes, so its length prefix is one byte.
        let start = self.used;
        self.room(SCRATCH);
        let Some(Ok(block)) = self.buf.get_mut(start..start + SCRATCH).map(<&mut [u8; SCRATCH]>::try_from) else {
            // `room` just made the block available.
            return;
        };
        let mut n = 1;
        put(block, &mut n, 1, u64::from(r.source_id));
        put(block, &mut n, 2, u64::from(r.symbol_id));
        put(block, &mut n, 3, r.price_e8 as u64);
        put(block, &mut n, 4, r.volume_e8 as u64);
        put(block, &mut n, 5, r.timestamp_ms as u64);
        put(block, &mut n, 6, u64::from(r.is_buy));
        put(block, &mut n, 7, r.trade_id);
        put(block, &mut n, 8, r.received_at_us as u64);
        block[0] = (n - 1) as u8;
        self.used = start + n;
        self.len += 1;
    }

    /// Appends a record read from the input unchanged, copying its bytes.
    #[inline]
    pub fn push_view(&mut self, view: &StreamDataView<'_>) {
        self.buf.truncate(self.used);
        push_delimited(&mut self.buf, view.as_bytes());
        self.used = self.buf.len();
        self.len += 1;
    }

    /// Makes sure at least `n` bytes of room follow the records, growing geometrically.
    #[inline(always)]
    fn room(&mut self, n: usize) {
        let needed = self.used + n;
        if self.buf.len() < needed {
            self.grow(needed);
        }
    }

    #[cold]
    fn grow(&mut self, needed: usize) {
        self.buf.resize(needed.max(self.buf.len() * 2).max(4096), 0);
    }

    /// How many records were written.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The encoded, length-delimited records.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.used]
    }

    /// Reads the records back.
    pub fn iter(&self) -> impl Iterator<Item = Result<StreamDataView<'_>, WireError>> {
        Delimited::new(self.as_bytes()).map(|item| item.and_then(StreamDataView::parse))
    }

    /// Takes the encoded bytes, leaving the writer empty.
    pub fn take(&mut self) -> Vec<u8> {
        self.buf.truncate(self.used);
        self.used = 0;
        self.len = 0;
        // The next batch is likely the size of this one: one allocation of that size, not a
        // series of doublings (in wasm, every call's output is handed over and freed).
        let next = Vec::with_capacity(self.buf.len() + SCRATCH);
        core::mem::replace(&mut self.buf, next)
    }

    /// Reserves room for `additional` more bytes.
    pub fn reserve(&mut self, additional: usize) {
        self.room(additional.saturating_add(SCRATCH));
    }

    /// Where the output stands now, to [`rollback`](Self::rollback) to (the SDK's runner drops the
    /// output of a call that failed half-way).
    #[doc(hidden)]
    pub fn mark(&self) -> (usize, usize) {
        (self.used, self.len)
    }

    /// Drops everything written since `mark`.
    #[doc(hidden)]
    pub fn rollback(&mut self, mark: (usize, usize)) {
        self.used = mark.0.min(self.used);
        self.len = mark.1;
    }

    /// Empties the writer, keeping its buffer.
    pub fn clear(&mut self) {
        self.used = 0;
        self.len = 0;
    }
}

/// The encoded length of a record's fields (without the length prefix).
#[inline(always)]
pub fn encoded_len(r: &Record) -> usize {
    #[inline(always)]
    fn f(v: u64) -> usize {
        if v == 0 { 0 } else { 1 + varint_len(v) }
    }
    f(u64::from(r.source_id))
        + f(u64::from(r.symbol_id))
        + f(r.price_e8 as u64)
        + f(r.volume_e8 as u64)
        + f(r.timestamp_ms as u64)
        + f(u64::from(r.is_buy))
        + f(r.trade_id)
        + f(r.received_at_us as u64)
}

/// Scratch for one record: a length byte, eight keys and eight ten-byte varints, plus slack so an
/// eight-byte store at the last position stays in bounds.
const SCRATCH: usize = 1 + 8 * 11 + 8;

/// Writes one field. Values below 2^56 (all but negative numbers) are encoded without a loop: the
/// 7-bit groups are spread into a word and stored at once. Loops matter inside wasm, where the
/// runtime checks its deadline on every loop iteration.
#[inline(always)]
fn put(out: &mut [u8; SCRATCH], n: &mut usize, field: u8, v: u64) {
    if v == 0 {
        return;
    }
    let i = *n;
    out[i] = field << 3;
    if v < 1 << 56 {
        let len = varint_len(v);
        // Continuation bits on every byte but the last.
        let more = 0x8080_8080_8080_8080u64 & ((1u64 << (8 * (len - 1))) - 1);
        if let Some(dst) = out.get_mut(i + 1..i + 9) {
            dst.copy_from_slice(&(spread(v) | more).to_le_bytes());
        }
        *n = i + 1 + len;
    } else {
        let mut v = v;
        let mut j = i + 1;
        while v >= 0x80 {
            out[j] = (v as u8) | 0x80;
            v >>= 7;
            j += 1;
        }
        out[j] = v as u8;
        *n = j + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// The same schema as `proto/sluice.proto`, declared by hand so this crate builds without protoc.
    #[derive(Clone, PartialEq, prost::Message)]
    struct StreamData {
        #[prost(uint32, tag = "1")]
        source_id: u32,
        #[prost(uint32, tag = "2")]
        symbol_id: u32,
        #[prost(int64, tag = "3")]
        price_e8: i64,
        #[prost(int64, tag = "4")]
        volume_e8: i64,
        #[prost(int64, tag = "5")]
        timestamp_ms: i64,
        #[prost(bool, tag = "6")]
        is_buy: bool,
        #[prost(uint64, tag = "7")]
        trade_id: u64,
        #[prost(int64, tag = "8")]
        received_at_us: i64,
    }

    fn sample() -> Record {
        Record {
            source_id: 3,
            symbol_id: 70_000,
            price_e8: 6_543_210_000_000,
            volume_e8: -5,
            timestamp_ms: 1_633_998_523_963,
            is_buy: true,
            trade_id: u64::MAX,
            received_at_us: 1_633_998_523_963_123,
        }
    }

    #[test]
    fn writer_matches_prost_byte_for_byte() {
        let mut records = vec![sample(), Record::default(), Record { is_buy: true, ..Record::default() }];
        for bit in 0..64 {
            for v in [1u64 << bit, (1u64 << bit) - 1, (1u64 << bit) + 1] {
                records.push(Record { price_e8: v as i64, trade_id: v, symbol_id: v as u32, ..sample() });
            }
        }
        for r in records {
            let mut ours = Records::new();
            ours.push(&r);
            let theirs = StreamData {
                source_id: r.source_id,
                symbol_id: r.symbol_id,
                price_e8: r.price_e8,
                volume_e8: r.volume_e8,
                timestamp_ms: r.timestamp_ms,
                is_buy: r.is_buy,
                trade_id: r.trade_id,
                received_at_us: r.received_at_us,
            }
            .encode_length_delimited_to_vec();
            assert_eq!(ours.as_bytes(), &theirs[..]);
            assert_eq!(encoded_len(&r) + 1, theirs.len());
            assert_eq!(ours.iter().next().unwrap().unwrap().record(), r);
        }
    }

    #[test]
    fn view_skips_unknown_fields_and_last_value_wins() {
        let mut bytes = Vec::new();
        // field 9 (varint), field 10 (bytes), field 11 (fixed32), field 12 (fixed64)
        bytes.extend_from_slice(&[9 << 3, 1, (10 << 3) | 2, 2, 0xff, 0xff, (11 << 3) | 5, 1, 2, 3, 4]);
        bytes.extend_from_slice(&[(12 << 3) | 1, 0, 0, 0, 0, 0, 0, 0, 0]);
        bytes.extend_from_slice(&[3 << 3, 5, 3 << 3, 6]);
        let v = StreamDataView::parse(&bytes).unwrap();
        assert_eq!(v.price_e8, 6);
    }

    #[test]
    fn view_rejects_malformed_records() {
        assert_eq!(StreamDataView::parse(&[3 << 3]), Err(WireError::Truncated));
        assert_eq!(StreamDataView::parse(&[0]), Err(WireError::ZeroFieldNumber));
        assert_eq!(StreamDataView::parse(&[(3 << 3) | 2, 0]), Err(WireError::WrongWireType { field: 3 }));
        assert_eq!(StreamDataView::parse(&[(9 << 3) | 3]), Err(WireError::BadWireType(3)));
        assert_eq!(StreamDataView::parse(&[(9 << 3) | 2, 5, 1]), Err(WireError::Truncated));
        let mut too_long = vec![3 << 3];
        too_long.extend_from_slice(&[0xff; 11]);
        assert_eq!(StreamDataView::parse(&too_long), Err(WireError::VarintOverflow));
        let big_symbol = [2 << 3, 0x80, 0x80, 0x80, 0x80, 0x10];
        assert_eq!(StreamDataView::parse(&big_symbol), Err(WireError::OutOfRange { field: 2 }));
    }

    #[test]
    fn word_varints_match_byte_by_byte_encoding() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for i in 0..20_000 {
            // Every length from 1 to 10 bytes, with varied bits.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = (x >> (i % 64)).max(1);
            let mut slow = Vec::new();
            let mut w = v;
            while w >= 0x80 {
                slow.push((w as u8) | 0x80);
                w >>= 7;
            }
            slow.push(w as u8);
            let mut r = Records::new();
            r.push(&Record { trade_id: v, ..Record::default() });
            let body = &r.as_bytes()[2..];
            assert_eq!(body, &slow[..], "encoding {v}");
            let padded: Vec<u8> = slow.iter().copied().chain([0xff; 8]).collect();
            assert_eq!(varint_at(&padded, 0), Ok((v, slow.len())), "word read of {v}");
            assert_eq!(varint_at(&slow, 0), Ok((v, slow.len())), "read of {v} at the end of the buffer");
            if v < 1 << 56 {
                assert_eq!(compact(spread(v)), v);
            }
        }
    }

    #[test]
    fn varint_edges() {
        let mut values = vec![0, 1, 127, 128, 16_383, 16_384, u32::MAX as u64, (1 << 56) - 1, 1 << 56, u64::MAX];
        values.extend((0..64).map(|bit| 1u64 << bit));
        values.extend((0..64).map(|bit| (1u64 << bit) - 1));
        for v in values {
            let mut buf = Vec::new();
            write_varint(&mut buf, v);
            assert_eq!(buf.len(), varint_len(v), "{v}");
            let len = buf.len();
            // Exactly sized (byte-by-byte path) and followed by more bytes (word-at-a-time path).
            for padding in [0, 3, 9] {
                buf.truncate(len);
                buf.extend(std::iter::repeat_n(0xff, padding));
                let mut pos = 0;
                assert_eq!(read_varint(&buf, &mut pos), Ok(v), "{v} padded {padding}");
                assert_eq!(pos, len);
            }
        }
        // The tenth byte may only carry the top bit.
        let mut pos = 0;
        let over = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        assert_eq!(read_varint(&over, &mut pos), Err(WireError::VarintOverflow));
    }

    #[test]
    fn delimited_stops_at_a_bad_length() {
        let items: Vec<_> = Delimited::new(&[1, 7, 5, 1]).collect();
        assert_eq!(items, vec![Ok(&[7u8][..]), Err(WireError::Truncated)]);
        assert_eq!(validate_batch(&[5, 1]), Err((0, WireError::Truncated)));
        assert_eq!(validate_batch(&[1, 7]), Err((0, WireError::ZeroFieldNumber)));
        assert_eq!(validate_batch(&[2, 3 << 3, 1, 0]), Ok(2));
    }

    /// Every byte string up to three bytes long, and a pseudo-random sample of longer ones, reads
    /// without a panic.
    #[test]
    fn never_panics_on_arbitrary_bytes() {
        let mut buf = Vec::new();
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                buf.clear();
                buf.extend_from_slice(&[a, b, a ^ b]);
                let _ = StreamDataView::parse(&buf);
                let _ = validate_batch(&buf);
            }
        }
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..2000 {
            buf.clear();
            for _ in 0..len % 40 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                buf.push(x as u8);
            }
            let _ = StreamDataView::parse(&buf);
            let _ = validate_batch(&buf);
        }
    }
}
