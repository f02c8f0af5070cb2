//! Exact decimal strings to fixed-point integers, never through floating point.

use core::fmt;

use crate::json::{digits_end, digits_value};

/// Why a decimal string could not be read as a fixed-point number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecimalError {
    /// The string is empty (or only a sign).
    Empty,
    /// A character that is not part of a decimal number, at this byte offset.
    InvalidChar(usize),
    /// More significant decimal places than the scale keeps; the value would be rounded.
    TooPrecise {
        /// How many decimal places the scale keeps.
        scale: u32,
    },
    /// The value does not fit in an `i64` at this scale.
    Overflow,
}

impl fmt::Display for DecimalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecimalError::Empty => f.write_str("empty decimal"),
            DecimalError::InvalidChar(at) => write!(f, "invalid character at byte {at} of decimal"),
            DecimalError::TooPrecise { scale } => {
                write!(f, "decimal has more than {scale} significant decimal places")
            }
            DecimalError::Overflow => f.write_str("decimal overflows a 64-bit fixed-point value"),
        }
    }
}

impl std::error::Error for DecimalError {}

/// Parses a decimal string into an integer with eight implied decimals: `"0.35280000"` is `35_280_000`.
///
/// Accepts an optional sign, digits with an optional `.` and an optional exponent (`1.5e-3`).
/// Trailing zeros past the eighth decimal are fine (the value stays exact); a non-zero digit there is
/// an error rather than silent rounding.
///
/// # Errors
/// [`DecimalError`] for empty input, stray characters, too many significant decimals or overflow.
///
/// ```
/// use plugin_sdk::{parse_e8, DecimalError};
/// assert_eq!(parse_e8("13.80480000"), Ok(1_380_480_000));
/// assert_eq!(parse_e8("0.00000638"), Ok(638));
/// assert_eq!(parse_e8("-2.5e-3"), Ok(-250_000));
/// assert_eq!(parse_e8("0.123456789"), Err(DecimalError::TooPrecise { scale: 8 }));
/// assert_eq!(parse_e8("92233720368.54775808"), Err(DecimalError::Overflow));
/// ```
pub fn parse_e8(s: &str) -> Result<i64, DecimalError> {
    parse_fixed(s.as_bytes(), 8)
}

/// A fixed-point value with eight decimals as a plain decimal, trailing zeros dropped: the inverse
/// of [`parse_e8`] for messages (a reject's reason, say).
///
/// ```
/// use plugin_sdk::decimal::format_e8;
/// assert_eq!(format_e8(150_000_000), "1.5");
/// assert_eq!(format_e8(-300_000_000), "-3");
/// assert_eq!(format_e8(638), "0.00000638");
/// ```
pub fn format_e8(v: i64) -> String {
    let digits = format_fixed(u128::from(v.unsigned_abs()), 8);
    if v < 0 { format!("-{digits}") } else { digits }
}

/// `v / 10^decimals` as a plain decimal, trailing zeros dropped.
///
/// ```
/// use plugin_sdk::decimal::format_fixed;
/// assert_eq!(format_fixed(1_250, 2), "12.5");
/// assert_eq!(format_fixed(700, 2), "7");
/// ```
pub fn format_fixed(v: u128, decimals: u32) -> String {
    let unit = 10u128.pow(decimals);
    let (int, frac) = (v / unit, v % unit);
    if frac == 0 {
        return int.to_string();
    }
    let frac = format!("{frac:0width$}", width = decimals as usize);
    format!("{int}.{}", frac.trim_end_matches('0'))
}

/// `value * numerator / denominator`, exactly (rounded toward zero), or `None` when the result does
/// not fit an `i64` or `denominator` is 0. For rescaling fixed-point values by a ratio.
///
/// When the product fits 63 bits (almost always for prices and volumes) this is one multiply and one
/// divide; only larger products go through 128-bit arithmetic, which inside wasm is a library call.
///
/// ```
/// use plugin_sdk::decimal::mul_div;
/// assert_eq!(mul_div(400_000_000, 1, 4), Some(100_000_000));
/// assert_eq!(mul_div(900_000_000_000_000_000, 3, 2), Some(1_350_000_000_000_000_000));
/// assert_eq!(mul_div(i64::MAX, 2, 1), None);
/// assert_eq!(mul_div(1, 1, 0), None);
/// ```
#[inline]
pub fn mul_div(value: i64, numerator: i64, denominator: i64) -> Option<i64> {
    if denominator == 0 {
        return None;
    }
    // |value| < 2^(64 - a) and |numerator| < 2^(64 - b), so with a + b >= 65 the product's magnitude is
    // below 2^63 and fits.
    if value.unsigned_abs().leading_zeros() + numerator.unsigned_abs().leading_zeros() >= 65 {
        return (value * numerator).checked_div(denominator);
    }
    let wide = i128::from(value) * i128::from(numerator) / i128::from(denominator);
    i64::try_from(wide).ok()
}

/// Parses a decimal string into an integer with `scale` implied decimals (`scale` at most 18).
///
/// # Errors
/// As [`parse_e8`].
///
/// ```
/// assert_eq!(plugin_sdk::decimal::parse_fixed(b"1618678142.557535", 3), Err(plugin_sdk::DecimalError::TooPrecise { scale: 3 }));
/// assert_eq!(plugin_sdk::decimal::parse_fixed(b"1618678142.557", 3), Ok(1_618_678_142_557));
/// ```
#[inline]
pub fn parse_fixed(s: &[u8], scale: u32) -> Result<i64, DecimalError> {
    match plain_fixed(s, scale) {
        Some(v) => Ok(v),
        None => parse_fixed_any(s, scale),
    }
}

/// Powers of ten that fit a `u64` below 10^19.
const POW10: [u64; 19] = {
    let mut p = [1u64; 19];
    let mut i = 1;
    while i < 19 {
        p[i] = p[i - 1] * 10;
        i += 1;
    }
    p
};

/// What venues send almost always, read without a loop per digit: `digits` or `digits.digits`, no
/// sign, no exponent, at most `scale` decimals and a result below 10^18. `None` hands anything else,
/// errors included, to [`parse_fixed_any`], which reads every form.
#[inline(always)]
fn plain_fixed(s: &[u8], scale: u32) -> Option<i64> {
    let scale = scale.min(18) as usize;
    let int_len = digits_end(s, 0);
    if int_len == 0 || int_len + scale > 18 {
        return None;
    }
    let int = digits_value(s.get(..int_len)?);
    let frac = match s.get(int_len) {
        None => 0,
        Some(b'.') => {
            let digits = s.get(int_len + 1..)?;
            let len = digits_end(digits, 0);
            if len == 0 || len != digits.len() || len > scale {
                return None;
            }
            digits_value(digits) * POW10[scale - len]
        }
        Some(_) => return None,
    };
    // Below 10^18, so the sum fits an i64.
    i64::try_from(int * POW10[scale] + frac).ok()
}

/// [`parse_fixed`] for every form it accepts, one digit at a time.
fn parse_fixed_any(s: &[u8], scale: u32) -> Result<i64, DecimalError> {
    let scale = scale.min(18);
    let (negative, digits_start) = match s.first() {
        Some(b'-') => (true, 1),
        Some(b'+') => (false, 1),
        _ => (false, 0),
    };
    let mantissa = Mantissa::read(s, digits_start, scale)?;
    mantissa.to_fixed(negative, scale)
}

/// A decimal's digits as an unsigned magnitude, with how many of them follow the point and the
/// exponent after them: the value is `magnitude * 10^(exponent - frac_digits)`.
struct Mantissa {
    /// The first 18 digits in 64-bit arithmetic (128-bit multiplies are library calls in wasm).
    small: u64,
    /// Whether there were more digits than `small` takes, so `magnitude` holds them instead.
    wide: bool,
    /// Every digit, once `wide`.
    magnitude: u128,
    /// Digits read after the point.
    frac_digits: i64,
    /// The number after an `e`, or 0.
    exponent: i64,
}

impl Mantissa {
    /// Reads `s` from `start` (after any sign): digits with at most one point, then an optional
    /// exponent. `scale` only names the error of a mantissa too long to hold.
    fn read(s: &[u8], start: usize, scale: u32) -> Result<Self, DecimalError> {
        let mut m = Mantissa { small: 0, wide: false, magnitude: 0, frac_digits: 0, exponent: 0 };
        let mut seen_digit = false;
        let mut seen_point = false;
        let mut i = start;
        while i < s.len() {
            let c = s[i];
            match c {
                b'0'..=b'9' => {
                    seen_digit = true;
                    m.push(c - b'0', seen_point, scale)?;
                }
                b'.' if !seen_point => seen_point = true,
                b'e' | b'E' if seen_digit => {
                    m.exponent = parse_exponent(&s[i + 1..]).map_err(|at| DecimalError::InvalidChar(i + 1 + at))?;
                    break;
                }
                _ => return Err(DecimalError::InvalidChar(i)),
            }
            i += 1;
        }
        if !seen_digit {
            return Err(if s.len() <= start { DecimalError::Empty } else { DecimalError::InvalidChar(start) });
        }
        Ok(m)
    }

    /// Appends one digit, `after_point` or before it.
    fn push(&mut self, digit: u8, after_point: bool, scale: u32) -> Result<(), DecimalError> {
        // `magnitude` takes over from `small` only for longer mantissas.
        if !self.wide {
            if self.small < 100_000_000_000_000_000 {
                self.small = self.small * 10 + u64::from(digit);
                if after_point {
                    self.frac_digits += 1;
                }
                return Ok(());
            }
            self.wide = true;
            self.magnitude = u128::from(self.small);
        }
        if self.magnitude < (1u128 << 100) {
            self.magnitude = self.magnitude * 10 + u128::from(digit);
            if after_point {
                self.frac_digits += 1;
            }
        } else if after_point {
            // Too many digits to hold: only zeros may follow without loss.
            if digit != 0 {
                return Err(DecimalError::TooPrecise { scale });
            }
        } else {
            return Err(DecimalError::Overflow);
        }
        Ok(())
    }

    /// The value with `scale` implied decimals, negated when `negative`, exactly or not at all.
    fn to_fixed(&self, negative: bool, scale: u32) -> Result<i64, DecimalError> {
        // value = magnitude * 10^(scale - frac_digits + exponent)
        let shift = i64::from(scale) - self.frac_digits + self.exponent;
        if !self.wide {
            // The common case, in 64 bits: a short mantissa scaled up by at most 10^18.
            let factor = u32::try_from(shift).ok().and_then(|s| 10u64.checked_pow(s));
            if let Some(scaled) = factor.and_then(|f| self.small.checked_mul(f)) {
                return match negative {
                    true if scaled <= i64::MAX as u64 + 1 => Ok((scaled as i64).wrapping_neg()),
                    false if scaled <= i64::MAX as u64 => Ok(scaled as i64),
                    _ => Err(DecimalError::Overflow),
                };
            }
        }
        let magnitude = if self.wide { self.magnitude } else { u128::from(self.small) };
        let scaled = if shift >= 0 {
            if magnitude == 0 {
                0
            } else {
                let factor =
                    u32::try_from(shift).ok().and_then(|s| 10u128.checked_pow(s)).ok_or(DecimalError::Overflow)?;
                magnitude.checked_mul(factor).ok_or(DecimalError::Overflow)?
            }
        } else {
            let divisor = u32::try_from(-shift).ok().and_then(|s| 10u128.checked_pow(s));
            match divisor {
                Some(d) if magnitude.is_multiple_of(d) => magnitude / d,
                None if magnitude == 0 => 0,
                _ => return Err(DecimalError::TooPrecise { scale }),
            }
        };
        if negative {
            if scaled > i64::MAX as u128 + 1 {
                return Err(DecimalError::Overflow);
            }
            Ok((scaled as i128).wrapping_neg() as i64)
        } else {
            i64::try_from(scaled).map_err(|_| DecimalError::Overflow)
        }
    }
}

/// Parses the digits after an `e`: an optional sign and at most four digits. Errors give the offset.
fn parse_exponent(s: &[u8]) -> Result<i64, usize> {
    let (negative, start) = match s.first() {
        Some(b'-') => (true, 1),
        Some(b'+') => (false, 1),
        _ => (false, 0),
    };
    let digits = &s[start.min(s.len())..];
    if digits.is_empty() || digits.len() > 4 {
        return Err(start);
    }
    let mut e: i64 = 0;
    for (k, &c) in digits.iter().enumerate() {
        if !c.is_ascii_digit() {
            return Err(start + k);
        }
        e = e * 10 + i64::from(c - b'0');
    }
    Ok(if negative { -e } else { e })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plain_path_agrees_with_the_general_one() {
        let parts: &[&str] = &["0", "1", "9", "00", "12345678", "987654321", ".", "-", "+", "e", "5", "x", ""];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut plain = 0;
        for _ in 0..50_000 {
            let mut text = String::new();
            for _ in 0..1 + x % 5 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                text.push_str(parts[(x % parts.len() as u64) as usize]);
            }
            for scale in [0, 2, 8, 18] {
                let fast = plain_fixed(text.as_bytes(), scale);
                let any = parse_fixed_any(text.as_bytes(), scale);
                if let Some(v) = fast {
                    plain += 1;
                    assert_eq!(Ok(v), any, "{text:?} at scale {scale}");
                }
                assert_eq!(parse_fixed(text.as_bytes(), scale), any, "{text:?} at scale {scale}");
            }
        }
        // Most generated numbers take the plain path, so the comparison above covered it.
        assert!(plain > 20_000, "{plain}");
    }

    #[test]
    fn exact_values() {
        let cases: &[(&str, i64)] = &[
            ("0", 0),
            ("1", 100_000_000),
            ("0.35280000", 35_280_000),
            ("58.00000000", 5_800_000_000),
            ("15979.71727919", 1_597_971_727_919),
            ("0.000007", 700),
            ("1008.2", 100_820_000_000),
            (".5", 50_000_000),
            ("5.", 500_000_000),
            ("+7", 700_000_000),
            ("-0.00000001", -1),
            ("0.042990000000", 4_299_000),
            ("1e2", 10_000_000_000),
            ("92233720368.54775807", i64::MAX),
            ("-92233720368.54775808", i64::MIN),
            ("0.000000000000000000000000000000000000000000", 0),
            ("000000000000000000000000000000000000000001", 100_000_000),
        ];
        for &(s, want) in cases {
            assert_eq!(parse_e8(s), Ok(want), "{s}");
        }
    }

    #[test]
    fn clear_errors() {
        assert_eq!(parse_e8(""), Err(DecimalError::Empty));
        assert_eq!(parse_e8("-"), Err(DecimalError::Empty));
        assert_eq!(parse_e8("."), Err(DecimalError::InvalidChar(0)));
        assert_eq!(parse_e8("1.2.3"), Err(DecimalError::InvalidChar(3)));
        assert_eq!(parse_e8("12a"), Err(DecimalError::InvalidChar(2)));
        assert_eq!(parse_e8(" 1"), Err(DecimalError::InvalidChar(0)));
        assert_eq!(parse_e8("1e"), Err(DecimalError::InvalidChar(2)));
        assert_eq!(parse_e8("e5"), Err(DecimalError::InvalidChar(0)));
        assert_eq!(parse_e8("0.123456789"), Err(DecimalError::TooPrecise { scale: 8 }));
        assert_eq!(parse_e8("92233720368.54775808"), Err(DecimalError::Overflow));
        assert_eq!(parse_e8("1e9999"), Err(DecimalError::Overflow));
        assert_eq!(parse_e8("99999999999999999999999999999999999999999999"), Err(DecimalError::Overflow));
        assert_eq!(parse_e8("1.5E-8"), Err(DecimalError::TooPrecise { scale: 8 }));
        assert_eq!(parse_e8("NaN"), Err(DecimalError::InvalidChar(0)));
    }

    #[test]
    fn other_scales() {
        assert_eq!(parse_fixed(b"1618678142.557535", 6), Ok(1_618_678_142_557_535));
        assert_eq!(parse_fixed(b"2", 0), Ok(2));
        assert_eq!(parse_fixed(b"2.5", 0), Err(DecimalError::TooPrecise { scale: 0 }));
    }

    #[test]
    fn never_panics() {
        let alphabet = b"0123456789.-+eE x";
        let mut s = Vec::new();
        for a in alphabet {
            for b in alphabet {
                for c in alphabet {
                    for d in alphabet {
                        s.clear();
                        s.extend_from_slice(&[*a, *b, *c, *d]);
                        let _ = parse_fixed(&s, 8);
                    }
                }
            }
        }
    }

    #[test]
    fn mul_div_agrees_with_wide_arithmetic() {
        let values =
            [0, 1, -1, 7, 99_999, 6_500_000_000_000, -6_500_000_000_000, 1 << 40, (1 << 62) - 1, i64::MAX, i64::MIN];
        let ratios = [(1, 1), (1, 4), (3, 2), (-5, 3), (1 << 20, 7), (i64::MAX, 1), (2, -1), (1, 0), (-1, 1)];
        for &v in &values {
            for &(n, d) in &ratios {
                let expected =
                    if d == 0 { None } else { i64::try_from(i128::from(v) * i128::from(n) / i128::from(d)).ok() };
                assert_eq!(mul_div(v, n, d), expected, "{v} * {n} / {d}");
            }
        }
    }

    #[test]
    fn random_decimals_read_exactly() {
        let mut x = 0x853c_49e6_748f_ea9bu64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let int = (x >> 20) % 10u64.pow((x % 11) as u32);
            let digits = (x >> 8) % 12;
            let frac = (x >> 30) % 10u64.pow(digits as u32);
            let negative = x & 1 == 1;
            let text = if digits == 0 {
                format!("{}{int}", if negative { "-" } else { "" })
            } else {
                format!("{}{int}.{frac:0width$}", if negative { "-" } else { "" }, width = digits as usize)
            };
            let exact = i128::from(int) * 100_000_000 * 10i128.pow(digits as u32) + i128::from(frac) * 100_000_000;
            let divisor = 10i128.pow(digits as u32);
            let expected = if exact % divisor != 0 {
                Err(DecimalError::TooPrecise { scale: 8 })
            } else {
                let v = exact / divisor;
                Ok(i64::try_from(if negative { -v } else { v }).unwrap())
            };
            assert_eq!(parse_e8(&text), expected, "{text}");
        }
    }
}
