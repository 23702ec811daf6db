//! Human-friendly durations for flags: `250ms`, `90s`, `5m`, `1h30m`, or a bare number of
//! seconds.

use std::time::Duration;

/// The longest duration a flag takes, in seconds (about 31 years): far beyond any wait, lease
/// or timeout, and far from where adding it to a clock reading overflows.
pub const MAX_SECS: u64 = 1_000_000_000;

/// Parses `250ms`, `90s`, `5m`, `2h`, `1h30m`, `1.5s`, or bare seconds (`30`); at most
/// [`MAX_SECS`] seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err("empty duration; use e.g. 90s, 5m, 250ms".into());
    }
    let too_large = || format!("{text:?}: too large; at most {MAX_SECS} seconds");
    if let Ok(secs) = s.parse::<u64>() {
        if secs > MAX_SECS {
            return Err(too_large());
        }
        return Ok(Duration::from_secs(secs));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("{text:?}: a number needs a unit (ms, s, m, h)"))?;
        if num_len == 0 {
            return Err(format!("{text:?}: expected a number, e.g. 90s, 5m, 250ms"));
        }
        let (num, tail) = rest.split_at(num_len);
        let value: f64 = num
            .parse()
            .map_err(|_| format!("{text:?}: {num:?} is not a number"))?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let scale = match unit {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => {
                return Err(format!(
                    "{text:?}: unknown unit {unit:?}; use ms, s, m or h"
                ))
            }
        };
        let secs = value * scale;
        // MAX_SECS as an f64 (exact).
        if !secs.is_finite() || secs > 1e9 {
            return Err(too_large());
        }
        total = total
            .checked_add(Duration::from_secs_f64(secs))
            .filter(|t| *t <= Duration::from_secs(MAX_SECS))
            .ok_or_else(too_large)?;
        rest = next;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_usual_forms() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn rejects_garbage_with_a_reason() {
        for bad in ["", "s", "5x", "-5s", "5m3", "1e99h", "abc"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn a_bare_number_is_capped_like_one_with_a_unit() {
        assert_eq!(
            parse_duration("1000000000"),
            Ok(Duration::from_secs(MAX_SECS))
        );
        for huge in [
            "1000000001",
            "18446744073709551615",
            "1000000001s",
            "999999999s999999999s",
        ] {
            let err = parse_duration(huge).expect_err(huge);
            assert!(err.contains("too large"), "{huge}: {err}");
        }
    }
}
