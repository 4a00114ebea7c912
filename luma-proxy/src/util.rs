//! Small parsing helpers shared by the CLI flags and the admin API.

/// Parses a human duration (one definition, shared with the CLI).
pub use luma_api::parse_duration;

/// Parses a byte size: `64KiB`, `1MiB`, or a bare number of bytes.
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, ""),
    };
    let n: usize = num
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected e.g. 65536, 64KiB, 1MiB"))?;
    match unit {
        "" | "B" => Ok(n),
        "KiB" | "K" | "k" => Ok(n * 1024),
        "MiB" | "M" => Ok(n * 1024 * 1024),
        _ => Err(format!("invalid size {s:?}: unit must be KiB or MiB")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("2h").is_err());
        assert!(parse_duration("fast").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("64KiB").unwrap(), 65536);
        assert_eq!(parse_bytes("100").unwrap(), 100);
        assert!(parse_bytes("1GiB").is_err());
    }
}
