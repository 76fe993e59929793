//! Go-style duration strings as Consul uses them (`"10s"`, `"1m30s"`,
//! `"500ms"`, `"1.5h"`). Pure parsing, no clocks; a bare number is refused
//! (Consul's API wants a unit).

use std::time::Duration;

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason} (use e.g. \"10s\", \"1m30s\", \"500ms\")")]
pub struct DurationError {
    input: String,
    reason: &'static str,
}

/// Longest accepted duration, in seconds (about 31 years).
const MAX_SECS: u128 = 1_000_000_000;

/// Parses a non-negative Go duration. Integer arithmetic only: the health
/// sweep reads every check's TTL several times a second.
pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    let err = |reason| DurationError {
        input: input.chars().take(64).collect(),
        reason,
    };
    let s = input.trim();
    if s.is_empty() {
        return Err(err("empty"));
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total_ns: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| err("missing unit"))?;
        let (int, frac) = match rest[..num_len].split_once('.') {
            Some((i, f)) => (i, f),
            None => (&rest[..num_len], ""),
        };
        if (int.is_empty() && frac.is_empty()) || frac.contains('.') {
            return Err(err("bad number"));
        }
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit_ns: u128 = match &rest[..unit_len] {
            "ns" => 1,
            "us" | "µs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(err("unknown unit")),
        };
        rest = &rest[unit_len..];
        // Digits beyond these cannot matter (or overflow) below MAX_SECS.
        if int.len() > 20 {
            return Err(err("too large"));
        }
        let whole: u128 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| err("bad number"))?
        };
        let frac = &frac[..frac.len().min(18)];
        let frac_ns = if frac.is_empty() {
            0
        } else {
            let f: u128 = frac.parse().map_err(|_| err("bad number"))?;
            f * unit_ns / 10u128.pow(frac.len() as u32)
        };
        total_ns = total_ns
            .saturating_add(whole.saturating_mul(unit_ns))
            .saturating_add(frac_ns);
        if total_ns > MAX_SECS * 1_000_000_000 {
            return Err(err("too large"));
        }
    }
    let secs = u64::try_from(total_ns / 1_000_000_000).map_err(|_| err("too large"))?;
    let nanos = u32::try_from(total_ns % 1_000_000_000).expect("below one second");
    Ok(Duration::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration(".5s"), Ok(Duration::from_millis(500)));
        assert_eq!(
            parse_duration("1h2m3.25s"),
            Ok(Duration::from_millis(3_723_250))
        );
        assert_eq!(parse_duration("1500us"), Ok(Duration::from_micros(1500)));
    }

    #[test]
    fn refuses_garbage() {
        for bad in [
            "",
            "10",
            "s",
            "ten",
            "5d",
            "-1s",
            "1e400s",
            ".s",
            "1.2.3s",
            "99999999999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }
}
