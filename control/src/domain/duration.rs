//! Go `time.ParseDuration` text, parsed exactly (integers, no floating point): durations reach
//! the journal from API text (snapshot retention, cluster configuration) and must stay inside
//! the range clients decode them back into.

use crate::limits::API_DURATION_SECS_MAX;

const NS_PER_SEC: u128 = 1_000_000_000;
/// Fraction digits that can still matter at nanosecond precision for the largest unit (hours).
const FRACTION_DIGITS_MAX: usize = 20;

/// Why a duration was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DurationError {
    /// Not Go duration text, or negative.
    Malformed,
    /// Longer than [`API_DURATION_SECS_MAX`], the protobuf `Duration` range.
    TooLong,
}

/// Parses `"86400s"`, `"24h"`, `"1h30m"`, `"1.5h"`, `"500ms"` (and `"0"` alone, as Go does) into
/// nanoseconds, truncating below a nanosecond as Go does.
pub fn parse_go_duration_ns(text: &str) -> Result<u128, DurationError> {
    let mut rest = text.strip_prefix('+').unwrap_or(text);
    if rest == "0" {
        return Ok(0);
    }
    if rest.is_empty() {
        return Err(DurationError::Malformed);
    }
    let max_ns = u128::from(API_DURATION_SECS_MAX) * NS_PER_SEC;
    let mut total = 0u128;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or(DurationError::Malformed)?;
        let (number, after) = rest.split_at(num_end);
        let unit_end = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_end);
        let unit_ns: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => NS_PER_SEC,
            "m" => 60 * NS_PER_SEC,
            "h" => 3600 * NS_PER_SEC,
            _ => return Err(DurationError::Malformed),
        };
        total = total
            .checked_add(term_ns(number, unit_ns)?)
            .ok_or(DurationError::TooLong)?;
        if total > max_ns {
            return Err(DurationError::TooLong);
        }
        rest = next;
    }
    Ok(total)
}

/// `number` (digits with at most one `.`) times `unit_ns`.
fn term_ns(number: &str, unit_ns: u128) -> Result<u128, DurationError> {
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty()) || !digits(whole) || !digits(fraction) {
        return Err(DurationError::Malformed);
    }
    // Anything past u128 is far past the bound anyway.
    let whole: u128 = match whole {
        "" => 0,
        w => w.parse().map_err(|_| DurationError::TooLong)?,
    };
    let fraction = &fraction[..fraction.len().min(FRACTION_DIGITS_MAX)];
    let fraction_ns = match fraction {
        "" => 0,
        f => {
            let scale = 10u128.pow(f.len() as u32);
            let f: u128 = f.parse().map_err(|_| DurationError::Malformed)?;
            f * unit_ns / scale
        }
    };
    whole
        .checked_mul(unit_ns)
        .and_then(|w| w.checked_add(fraction_ns))
        .ok_or(DurationError::TooLong)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_parse_exactly() {
        for (text, ns) in [
            ("0", 0u128),
            ("86400s", 86_400 * NS_PER_SEC),
            ("24h", 86_400 * NS_PER_SEC),
            ("1h30m", 5_400 * NS_PER_SEC),
            ("1.5h", 5_400 * NS_PER_SEC),
            (".5s", 500_000_000),
            ("500ms", 500_000_000),
            ("1us", 1_000),
            ("1.0000000001s", NS_PER_SEC),
            ("+2m", 120 * NS_PER_SEC),
            ("315576000000s", 315_576_000_000 * NS_PER_SEC),
        ] {
            assert_eq!(parse_go_duration_ns(text), Ok(ns), "{text}");
        }
        for text in [
            "", "10", "h", "-1s", "1d", "1 h", ".s", "1..5s", "1.5.5h", "1e5s",
        ] {
            assert_eq!(
                parse_go_duration_ns(text),
                Err(DurationError::Malformed),
                "{text}"
            );
        }
        for text in [
            "99999999999999999999h",
            "315576000001s",
            "315576000000s1ns",
            "87660001h",
            &format!("{}s", "9".repeat(60)),
        ] {
            assert_eq!(
                parse_go_duration_ns(text),
                Err(DurationError::TooLong),
                "{text}"
            );
        }
    }
}
