//! Reading a decoder's fields from JSON, with errors that name the field.
//!
//! ```
//! use plugin_sdk::{field, json::Json};
//! let trade = Json::parse(br#"{"s":"BTCUSDT","p":"65000.5","q":"-1"}"#).unwrap();
//! assert_eq!(field::text("s", trade.get("s")).unwrap(), "BTCUSDT");
//! assert_eq!(field::non_negative_e8("p", trade.get("p")).unwrap(), 6_500_050_000_000);
//! assert_eq!(field::non_negative_e8("q", trade.get("q")).unwrap_err().as_str(), "q: negative decimal");
//! assert_eq!(field::required("T", trade.get("T")).unwrap_err().as_str(), "T: missing");
//! let okx = Json::parse(br#"{"tradeId":"130639474","ts":"1630048897897"}"#).unwrap();
//! assert_eq!(field::unsigned("tradeId", okx.get("tradeId")).unwrap(), 130_639_474);
//! assert_eq!(field::integer("ts", okx.get("ts")).unwrap(), 1_630_048_897_897);
//! assert_eq!(field::unsigned("s", trade.get("s")).unwrap_err().as_str(), "s: expected an unsigned integer");
//! ```

use std::borrow::Cow;

use crate::json::Json;
use crate::{Reason, parse_e8};

/// The value, or `"<name>: missing"`.
///
/// # Errors
/// When `value` is `None`.
#[inline]
pub fn required<'a>(name: &str, value: Option<Json<'a>>) -> Result<Json<'a>, Reason> {
    value.ok_or_else(|| Reason::field(name, "missing"))
}

/// A string value, borrowed unless it contains escapes.
///
/// # Errors
/// When it is missing or not a string.
#[inline]
pub fn text<'a>(name: &str, value: Option<Json<'a>>) -> Result<Cow<'a, str>, Reason> {
    required(name, value)?.as_str().ok_or_else(|| Reason::field(name, "expected a string"))
}

/// A decimal string read exactly with eight implied decimals, refusing negative values (prices and
/// quantities).
///
/// # Errors
/// When it is missing, not a string, not an exact decimal, or negative.
#[inline]
pub fn non_negative_e8(name: &str, value: Option<Json<'_>>) -> Result<i64, Reason> {
    match parse_e8(&text(name, value)?) {
        Ok(v) if v >= 0 => Ok(v),
        Ok(_) => Err(Reason::field(name, "negative decimal")),
        Err(e) => Err(Reason::field(name, e)),
    }
}

/// An unsigned integer, written as a number or as a string of digits (venues differ, and some send
/// ids as strings so that JavaScript does not round them).
///
/// # Errors
/// When it is missing, or neither form of an unsigned integer that fits `u64`.
#[inline]
pub fn unsigned(name: &str, value: Option<Json<'_>>) -> Result<u64, Reason> {
    required(name, value)?.as_u64_or_digits().ok_or_else(|| Reason::field(name, "expected an unsigned integer"))
}

/// A signed integer, written as a number or as a string (epoch times such as OKX `ts`).
///
/// # Errors
/// When it is missing, or neither form of an integer that fits `i64`.
#[inline]
pub fn integer(name: &str, value: Option<Json<'_>>) -> Result<i64, Reason> {
    required(name, value)?.as_i64_or_digits().ok_or_else(|| Reason::field(name, "expected an integer"))
}
