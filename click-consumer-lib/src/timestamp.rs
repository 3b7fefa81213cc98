//! ISO 8601 / RFC 3339 timestamps to ClickHouse `DateTime` (seconds since the epoch, UTC).
//!
//! Accepted: `YYYY-MM-DD[T|t| ]HH:MM:SS[.fraction][Z|z|±HH:MM|±HHMM|±HH]`. Without an
//! offset the time is read as UTC. The fraction is dropped (not rounded). The result must
//! fit `DateTime`: 1970-01-01 00:00:00 to 2106-02-07 06:28:15 UTC.

use std::fmt;

/// Why a timestamp was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InvalidTimestamp(&'static str);

impl fmt::Display for InvalidTimestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

const SHAPE: InvalidTimestamp = InvalidTimestamp(
    "expected ISO 8601 like 2024-01-15T10:30:00Z, 2024-01-15T10:30:00+02:00 or 2024-01-15 10:30:00",
);

/// Parses `s` into seconds since 1970-01-01 00:00:00 UTC.
pub(crate) fn parse(s: &str) -> Result<u32, InvalidTimestamp> {
    let b = s.as_bytes();
    if b.len() < 19 {
        return Err(SHAPE);
    }
    let year = digits(b, 0, 4)?;
    let month = digits(b, 5, 2)?;
    let day = digits(b, 8, 2)?;
    let hour = digits(b, 11, 2)?;
    let minute = digits(b, 14, 2)?;
    let second = digits(b, 17, 2)?;
    if b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return Err(SHAPE);
    }
    if b[13] != b':' || b[16] != b':' {
        return Err(SHAPE);
    }
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return Err(InvalidTimestamp("the date does not exist"));
    }
    if hour > 23 || minute > 59 || second > 59 {
        return Err(InvalidTimestamp("the time of day is out of range"));
    }
    let rest = skip_fraction(&b[19..])?;
    let offset = parse_offset(rest)?;
    let local =
        days_from_civil(year, month, day) * 86_400 + i64::from(hour * 3600 + minute * 60 + second);
    u32::try_from(local - offset).map_err(|_| {
        InvalidTimestamp("outside ClickHouse DateTime's range (1970-01-01 to 2106-02-07 UTC)")
    })
}

/// Parses `YYYY-MM-DD` into days since 1970-01-01 (ClickHouse `Date`: up to 2149-06-06).
pub(crate) fn parse_date(s: &str) -> Result<u16, InvalidTimestamp> {
    let b = s.as_bytes();
    const DATE_SHAPE: InvalidTimestamp = InvalidTimestamp("expected a date like 2024-01-15");
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return Err(DATE_SHAPE);
    }
    let digits = |at, len| digits(b, at, len).map_err(|_| DATE_SHAPE);
    let (year, month, day) = (digits(0, 4)?, digits(5, 2)?, digits(8, 2)?);
    if !(1..=12).contains(&month) || day == 0 || day > days_in_month(year, month) {
        return Err(InvalidTimestamp("the date does not exist"));
    }
    u16::try_from(days_from_civil(year, month, day))
        .map_err(|_| InvalidTimestamp("outside ClickHouse Date's range (1970-01-01 to 2149-06-06)"))
}

/// Parses `s` by the rules of [`parse`] into ticks of 10^-`precision` seconds since the
/// epoch (ClickHouse `DateTime64(precision)`), keeping the fraction up to `precision`
/// digits (further digits are dropped).
pub(crate) fn parse_ticks(s: &str, precision: u32) -> Result<i64, InvalidTimestamp> {
    let seconds = parse(s)?;
    let scale = 10i64.pow(precision);
    let mut fraction = 0i64;
    if let Some((b'.' | b',', tail)) = s.as_bytes().get(19..).and_then(<[u8]>::split_first) {
        let digits = tail.iter().take_while(|c| c.is_ascii_digit());
        for (i, &d) in digits.enumerate() {
            if i as u32 >= precision {
                break;
            }
            fraction += i64::from(d - b'0') * 10i64.pow(precision - 1 - i as u32);
        }
    }
    Ok(i64::from(seconds) * scale + fraction)
}

fn digits(b: &[u8], at: usize, len: usize) -> Result<u32, InvalidTimestamp> {
    b[at..at + len].iter().try_fold(0u32, |acc, &c| {
        if c.is_ascii_digit() {
            Ok(acc * 10 + u32::from(c - b'0'))
        } else {
            Err(SHAPE)
        }
    })
}

fn skip_fraction(rest: &[u8]) -> Result<&[u8], InvalidTimestamp> {
    match rest.split_first() {
        Some((b'.' | b',', tail)) => {
            let n = tail.iter().take_while(|c| c.is_ascii_digit()).count();
            if n == 0 {
                return Err(SHAPE);
            }
            Ok(&tail[n..])
        }
        _ => Ok(rest),
    }
}

/// The offset east of UTC, in seconds.
fn parse_offset(rest: &[u8]) -> Result<i64, InvalidTimestamp> {
    let (sign, hh_mm) = match rest {
        [] | [b'Z' | b'z'] => return Ok(0),
        [b'+', tail @ ..] => (1, tail),
        [b'-', tail @ ..] => (-1, tail),
        _ => return Err(SHAPE),
    };
    let (hours, minutes) = match hh_mm.len() {
        2 => (digits(hh_mm, 0, 2)?, 0),
        4 => (digits(hh_mm, 0, 2)?, digits(hh_mm, 2, 2)?),
        5 if hh_mm[2] == b':' => (digits(hh_mm, 0, 2)?, digits(hh_mm, 3, 2)?),
        _ => return Err(SHAPE),
    };
    if hours > 23 || minutes > 59 {
        return Err(InvalidTimestamp("the UTC offset is out of range"));
    }
    Ok(sign * i64::from(hours * 3600 + minutes * 60))
}

fn is_leap(year: u32) -> bool {
    year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400))
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: u32, month: u32, day: u32) -> i64 {
    let y = i64::from(year) - i64::from(month <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_forms() {
        let cases = [
            ("1970-01-01T00:00:00Z", 0),
            ("2024-01-15T10:30:00Z", 1_705_314_600),
            ("2024-01-15T10:30:00z", 1_705_314_600),
            ("2024-01-15t10:30:00Z", 1_705_314_600),
            ("2024-01-15T10:30:00", 1_705_314_600),
            ("2024-01-15 10:30:00", 1_705_314_600),
            ("2024-01-15T10:30:00.999999Z", 1_705_314_600),
            ("2024-01-15T10:30:00,5Z", 1_705_314_600),
            ("2024-01-15T10:30:00.123456", 1_705_314_600),
            ("2024-01-15T12:30:00+02:00", 1_705_314_600),
            ("2024-01-15T12:30:00+0200", 1_705_314_600),
            ("2024-01-15T12:30:00+02", 1_705_314_600),
            ("2024-01-15T05:00:00-05:30", 1_705_314_600),
            ("2024-01-15T10:30:00.5+00:00", 1_705_314_600),
            ("2024-02-29T00:00:00Z", 1_709_164_800),
            ("2000-02-29T00:00:00Z", 951_782_400),
            ("2106-02-07T06:28:15Z", u32::MAX),
            ("1970-01-01T01:00:00+01:00", 0),
        ];
        for (text, expected) in cases {
            assert_eq!(parse(text), Ok(expected), "parsing {text}");
        }
    }

    #[test]
    fn refused_forms() {
        for text in [
            "",
            "2024-01-15",
            "2024-01-15T10:30",
            "2024/01/15 10:30:00",
            "2024-01-15X10:30:00",
            "2024-1-15T10:30:00Z",
            "2024-01-15T10:30:00.Z",
            "2024-01-15T10:30:00 Z",
            "2024-01-15T10:30:00+2:00",
            "2024-01-15T10:30:00+02:0",
            "2024-01-15T10:30:00+24:00",
            "2024-01-15T10:30:00+02:60",
            "2024-01-15T10:30:00Zjunk",
            "2024-13-01T00:00:00Z",
            "2024-00-01T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2024-04-31T00:00:00Z",
            "2024-01-00T00:00:00Z",
            "2024-01-15T24:00:00Z",
            "2024-01-15T10:60:00Z",
            "2024-01-15T10:30:60Z",
            "1969-12-31T23:59:59Z",
            "1970-01-01T00:30:00+01:00",
            "2106-02-07T06:28:16Z",
            "9999-12-31T23:59:59Z",
            "0000-01-01T00:00:00Z",
            "１９７０-01-01T00:00:00Z",
            "1700000000",
        ] {
            assert!(parse(text).is_err(), "{text:?} must be refused");
        }
    }

    #[test]
    fn days_match_a_reference_walk() {
        // Walk day by day from 1970 to 2106 and check the closed formula.
        let mut expected = 0i64;
        for year in 1970..2107 {
            for month in 1..=12 {
                for day in 1..=days_in_month(year, month) {
                    assert_eq!(days_from_civil(year, month, day), expected);
                    expected += 1;
                }
            }
        }
    }
}

/// Formats seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub(crate) fn format_rfc3339(seconds: u32) -> String {
    let days = i64::from(seconds / 86_400);
    let secs = seconds % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// The current time, formatted by [`format_rfc3339`].
pub(crate) fn now_rfc3339() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format_rfc3339(u32::try_from(now).unwrap_or(u32::MAX))
}

/// The inverse of [`days_from_civil`].
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

#[cfg(test)]
mod format_tests {
    use super::*;

    #[test]
    fn format_inverts_parse() {
        for seconds in [0, 1, 951_782_400, 1_705_314_600, 1_709_164_800, u32::MAX] {
            let text = format_rfc3339(seconds);
            assert_eq!(parse(&text), Ok(seconds), "{text}");
        }
        assert_eq!(format_rfc3339(1_705_314_600), "2024-01-15T10:30:00Z");
    }
}
