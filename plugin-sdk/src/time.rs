//! Venue timestamps to Unix milliseconds, exactly and without a clock.

use core::fmt;

/// Why a timestamp could not be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeError {
    /// The text is not an RFC 3339 date-time (e.g. `2021-04-17T16:43:30.244075Z`).
    NotRfc3339,
    /// A field is out of its range (month 13, minute 61, ...).
    OutOfRange,
    /// Seconds since the epoch that are not a plain decimal number.
    BadSeconds,
}

impl fmt::Display for TimeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TimeError::NotRfc3339 => "timestamp is not RFC 3339",
            TimeError::OutOfRange => "timestamp field out of range",
            TimeError::BadSeconds => "timestamp is not decimal seconds",
        })
    }
}

impl std::error::Error for TimeError {}

/// Parses an RFC 3339 date-time into milliseconds since the Unix epoch, truncating sub-millisecond
/// digits. Accepts `Z` or a `±hh:mm` offset, `T`, `t` or a space between date and time.
///
/// # Errors
/// [`TimeError::NotRfc3339`] or [`TimeError::OutOfRange`].
///
/// ```
/// use plugin_sdk::time::rfc3339_to_ms;
/// assert_eq!(rfc3339_to_ms("2021-04-17T16:43:30.244075Z"), Ok(1_618_677_810_244));
/// assert_eq!(rfc3339_to_ms("1970-01-01T01:00:00+01:00"), Ok(0));
/// ```
pub fn rfc3339_to_ms(s: &str) -> Result<i64, TimeError> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return Err(TimeError::NotRfc3339);
    }
    let num = |from: usize, len: usize| -> Result<i64, TimeError> {
        let mut v = 0i64;
        for &c in b.get(from..from + len).ok_or(TimeError::NotRfc3339)? {
            if !c.is_ascii_digit() {
                return Err(TimeError::NotRfc3339);
            }
            v = v * 10 + i64::from(c - b'0');
        }
        Ok(v)
    };
    let sep = |at: usize, ok: &[u8]| if ok.contains(&b[at]) { Ok(()) } else { Err(TimeError::NotRfc3339) };
    sep(4, b"-")?;
    sep(7, b"-")?;
    sep(10, b"Tt ")?;
    sep(13, b":")?;
    sep(16, b":")?;
    let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (hour, minute, second) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return Err(TimeError::OutOfRange);
    }
    let mut i = 19;
    let mut millis = 0i64;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 3 {
                millis = millis * 10 + i64::from(b[i] - b'0');
            }
            i += 1;
        }
        match i - start {
            0 => return Err(TimeError::NotRfc3339),
            1 => millis *= 100,
            2 => millis *= 10,
            _ => {}
        }
    }
    let offset_s = match b.get(i..) {
        Some(b"Z" | b"z") => 0,
        Some([sign @ (b'+' | b'-'), _, _, b':', _, _]) => {
            let (h, m) = (num(i + 1, 2)?, num(i + 4, 2)?);
            if h > 23 || m > 59 {
                return Err(TimeError::OutOfRange);
            }
            let off = h * 3600 + m * 60;
            if *sign == b'+' { off } else { -off }
        }
        _ => return Err(TimeError::NotRfc3339),
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_s;
    Ok(secs * 1000 + millis)
}

/// Parses seconds since the epoch written as a decimal (`"1618678142.557535"`, as Kraken sends) into
/// milliseconds, truncating sub-millisecond digits.
///
/// # Errors
/// [`TimeError::BadSeconds`] when the text is not an unsigned decimal of at most 12 integer digits.
///
/// ```
/// assert_eq!(plugin_sdk::time::decimal_seconds_to_ms("1618678142.557535"), Ok(1_618_678_142_557));
/// ```
pub fn decimal_seconds_to_ms(s: &str) -> Result<i64, TimeError> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty()
        || int.len() > 12
        || !int.bytes().all(|c| c.is_ascii_digit())
        || !frac.bytes().all(|c| c.is_ascii_digit())
    {
        return Err(TimeError::BadSeconds);
    }
    let secs = int.bytes().fold(0i64, |v, c| v * 10 + i64::from(c - b'0'));
    let mut millis = 0i64;
    for k in 0..3 {
        millis = millis * 10 + frac.as_bytes().get(k).map_or(0, |c| i64::from(c - b'0'));
    }
    Ok(secs * 1000 + millis)
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Microseconds since the epoch (Bitstamp `microtimestamp`, Coinbase Advanced) to milliseconds,
/// rounded toward the past, so a time just before the epoch stays before it.
///
/// ```
/// assert_eq!(plugin_sdk::time::micros_to_ms(1_630_048_897_897_123), 1_630_048_897_897);
/// assert_eq!(plugin_sdk::time::micros_to_ms(-1), -1);
/// ```
pub fn micros_to_ms(micros: i64) -> i64 {
    micros.div_euclid(1_000)
}

/// Nanoseconds since the epoch to milliseconds, rounded toward the past.
///
/// ```
/// assert_eq!(plugin_sdk::time::nanos_to_ms(1_630_048_897_897_123_456), 1_630_048_897_897);
/// ```
pub fn nanos_to_ms(nanos: i64) -> i64 {
    nanos.div_euclid(1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_values() {
        assert_eq!(rfc3339_to_ms("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(rfc3339_to_ms("2000-03-01T00:00:00.5Z"), Ok(951_868_800_500));
        assert_eq!(rfc3339_to_ms("2024-02-29T23:59:59.999999999Z"), Ok(1_709_251_199_999));
        assert_eq!(rfc3339_to_ms("2021-04-17 18:43:30.244-00:30"), Ok(1_618_686_810_244));
        assert_eq!(rfc3339_to_ms("1969-12-31T23:59:59Z"), Ok(-1000));
    }

    #[test]
    fn rfc3339_errors() {
        assert_eq!(rfc3339_to_ms("2021-02-29T00:00:00Z"), Err(TimeError::OutOfRange));
        assert_eq!(rfc3339_to_ms("2021-13-01T00:00:00Z"), Err(TimeError::OutOfRange));
        assert_eq!(rfc3339_to_ms("2021-04-17T16:43:30"), Err(TimeError::NotRfc3339));
        assert_eq!(rfc3339_to_ms("2021-04-17T16:43:30.Z"), Err(TimeError::NotRfc3339));
        assert_eq!(rfc3339_to_ms("2021-04-17T16:43:30+0100"), Err(TimeError::NotRfc3339));
        assert_eq!(rfc3339_to_ms("2021-04-17X16:43:30Z"), Err(TimeError::NotRfc3339));
        assert_eq!(rfc3339_to_ms("２021-04-17T16:43:30Z"), Err(TimeError::NotRfc3339));
    }

    #[test]
    fn seconds_values() {
        assert_eq!(decimal_seconds_to_ms("1618678145"), Ok(1_618_678_145_000));
        assert_eq!(decimal_seconds_to_ms("1618678145.7"), Ok(1_618_678_145_700));
        assert_eq!(decimal_seconds_to_ms("-1"), Err(TimeError::BadSeconds));
        assert_eq!(decimal_seconds_to_ms(""), Err(TimeError::BadSeconds));
        assert_eq!(decimal_seconds_to_ms("1.2.3"), Err(TimeError::BadSeconds));
    }
}
