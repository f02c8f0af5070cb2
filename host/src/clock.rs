//! Wall-clock time as the pipeline stamps it: microseconds (and milliseconds) since the Unix epoch,
//! 0 for a clock set before 1970, saturating far in the future; and the calendar arithmetic that
//! writes such times as RFC 3339 (proleptic Gregorian, UTC).

use std::time::{SystemTime, UNIX_EPOCH};

/// Now, in microseconds since the Unix epoch.
pub fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// Now, in milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    now_us() / 1000
}

/// Days since 1970-01-01 to a (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Days since 1970-01-01 of a (year, month, day) in the proleptic Gregorian calendar (Howard
/// Hinnant's `days_from_civil`); the inverse of [`civil_from_days`].
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let (m, d) = (i64::from(month), i64::from(day));
    let y = if m <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `2026-12-01T14:00:00.000Z` from milliseconds since the Unix epoch (before it too).
pub fn rfc3339_ms(ms: i64) -> String {
    let (days, day_ms) = (ms.div_euclid(86_400_000), ms.rem_euclid(86_400_000));
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        day_ms / 3_600_000,
        day_ms % 3_600_000 / 60_000,
        day_ms % 60_000 / 1_000,
        day_ms % 1_000
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn days_and_dates_round_trip_and_print_as_rfc3339() {
        for days in [-800_000, -1, 0, 1, 10_957, 11_016, 20_788, 47_540] {
            let (y, m, d) = super::civil_from_days(days);
            assert_eq!(super::days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
        assert_eq!(super::civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(super::rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(super::rfc3339_ms(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(super::rfc3339_ms(1_796_140_800_123), "2026-12-01T16:00:00.123Z");
        for ms in [0, -1, 1_796_140_800_123, 951_782_400_001] {
            assert_eq!(plugin_sdk::time::rfc3339_to_ms(&super::rfc3339_ms(ms)).unwrap(), ms);
        }
    }

    #[test]
    fn microseconds_and_milliseconds_agree() {
        let (us, ms) = (super::now_us(), super::now_ms());
        assert!(us > 1_700_000_000_000_000, "{us}");
        assert!((ms - us / 1000).abs() < 1000, "{ms} vs {us}");
    }
}
