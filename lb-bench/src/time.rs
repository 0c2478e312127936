//! Timestamps: the bench's own (whole seconds) and the agent's log lines
//! (RFC 3339 in UTC with a fraction).

use std::time::SystemTime;

/// `2026-11-21T20:12:12Z` (whole seconds).
pub fn rfc3339(t: SystemTime) -> String {
    jiff::Timestamp::try_from(t)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

/// Parses the agent's log timestamps: RFC 3339 in UTC with a fraction,
/// `2026-11-21T20:12:12.267520Z`.
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    s.parse::<jiff::Timestamp>().ok().map(SystemTime::from)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn timestamps_round_trip() {
        let t = parse_rfc3339("2026-11-21T20:12:12.267520Z").unwrap();
        let d = t.duration_since(UNIX_EPOCH).unwrap();
        assert_eq!(d.subsec_micros(), 267_520);
        assert_eq!(rfc3339(t), "2026-11-21T20:12:12Z");
        assert_eq!(
            parse_rfc3339("1970-01-01T00:00:00Z"),
            Some(UNIX_EPOCH),
            "epoch"
        );
        assert_eq!(
            parse_rfc3339("2000-03-01T00:00:01.5Z")
                .unwrap()
                .duration_since(UNIX_EPOCH)
                .unwrap(),
            Duration::new(951_868_801, 500_000_000)
        );
        assert!(parse_rfc3339("2026-13-01T00:00:00Z").is_none());
        assert!(parse_rfc3339("not a time").is_none());
    }
}
