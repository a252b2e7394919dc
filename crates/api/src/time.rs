//! RFC 3339 timestamps (UTC, nanoseconds), as the API writes them.

use std::time::{SystemTime, UNIX_EPOCH};

/// The zero time the API uses for "never" (Go's zero `time.Time`).
pub const ZERO: &str = "0001-01-01T00:00:00Z";

/// Now, as `2026-11-22T00:06:16.976127723Z`.
pub fn now() -> String {
    format(SystemTime::now())
}

/// A time as RFC 3339 in UTC with nanoseconds (before 1970: [`ZERO`]).
pub fn format(t: SystemTime) -> String {
    let Ok(d) = t.duration_since(UNIX_EPOCH) else { return ZERO.to_string() };
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z", rem / 3600, rem % 3600 / 60, rem % 60, d.subsec_nanos())
}

/// Parses what [`format`] writes (and `Z` times without fractions) back
/// into seconds since the epoch.
pub fn parse_unix(s: &str) -> Option<i64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let time = time.split('.').next()?;
    let mut t = time.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (h, mi, se) = (t.next()??, t.next()??, t.next()??);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    Some(days_from_civil(y, m, day) * 86_400 + h * 3600 + mi * 60 + se)
}

// Howard Hinnant's civil-date algorithms (public domain).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn round_trip() {
        let t = UNIX_EPOCH + Duration::new(1_795_305_976, 976_127_723);
        let s = format(t);
        assert_eq!(s, "2026-11-22T00:06:16.976127723Z");
        assert_eq!(parse_unix(&s), Some(1_795_305_976));
        assert_eq!(format(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(parse_unix("2000-02-29T12:00:00Z"), Some(951_825_600));
        assert_eq!(parse_unix("garbage"), None);
        assert_eq!(parse_unix("2000-13-01T00:00:00Z"), None);
    }
}
