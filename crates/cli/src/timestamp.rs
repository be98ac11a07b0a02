//! Times for people. Every time a command prints as text is RFC 3339 to the second: in
//! UTC with `Z` (`2026-12-02T06:35:05Z`), or with `--local-time` in the local zone with its
//! offset (`2026-12-02T07:35:05+01:00`). JSON keeps the stored RFC 3339 UTC times whatever
//! the flag says, so scripts never parse two forms.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

static LOCAL: AtomicBool = AtomicBool::new(false);

/// `--local-time`: print times in the local zone from now on.
pub fn set_local(on: bool) {
    LOCAL.store(on, Ordering::Relaxed);
}

/// A stored RFC 3339 time (`2026-12-02T06:35:05.123456Z`) for people; text that is not
/// one is shown as it is.
pub fn show(stored: &str) -> String {
    match humantime::parse_rfc3339_weak(stored.trim_end_matches('Z')) {
        Ok(t) => show_time(t),
        Err(_) => stored.to_string(),
    }
}

/// Seconds after the Unix epoch (negative: before it) for people. Beyond the years
/// 0–9999 (a damaged or odd filesystem time): `N s after the epoch`.
pub fn show_unix(secs: i64) -> String {
    const YEAR_10000: i64 = 253_402_300_800;
    const YEAR_0: i64 = -62_167_219_200;
    if !(YEAR_0..YEAR_10000).contains(&secs) {
        return format!("{secs} s after the epoch");
    }
    if secs >= 0 {
        if let Some(t) = UNIX_EPOCH.checked_add(Duration::from_secs(secs.unsigned_abs())) {
            return show_time(t);
        }
    }
    // Before 1970 (humantime formats only later times): always UTC.
    blockproof_fs::Timestamp { secs, nanos: 0 }.rfc3339()
}

fn show_time(t: SystemTime) -> String {
    if LOCAL.load(Ordering::Relaxed) {
        if let Some(local) = local(t) {
            return local;
        }
    }
    humantime::format_rfc3339_seconds(t).to_string()
}

/// `t` in the local zone, `YYYY-MM-DDTHH:MM:SS+HH:MM`.
fn local(t: SystemTime) -> Option<String> {
    let secs: libc::time_t = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs().try_into().ok()?,
        Err(e) => -libc::time_t::try_from(e.duration().as_secs()).ok()?,
    };
    // SAFETY: localtime_r only writes into `tm`, which is plain data we own.
    let tm = unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&secs, &mut tm).is_null() {
            return None;
        }
        tm
    };
    let off = tm.tm_gmtoff / 60;
    let sign = if off < 0 { '-' } else { '+' };
    Some(format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}{sign}{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
        off.abs() / 60,
        off.abs() % 60
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_to_the_second_with_z() {
        assert_eq!(show("2026-12-02T06:35:05.123456Z"), "2026-12-02T06:35:05Z");
        assert_eq!(show("2026-12-02T06:35:05Z"), "2026-12-02T06:35:05Z");
        assert_eq!(show("2026-12-02T06:35:05"), "2026-12-02T06:35:05Z");
        assert_eq!(show("not a time"), "not a time");
        assert_eq!(show_unix(0), "1970-01-01T00:00:00Z");
        assert_eq!(show_unix(i64::MAX), format!("{} s after the epoch", i64::MAX));
        assert_eq!(show_unix(-1), "1969-12-31T23:59:59Z");
        assert_eq!(show_unix(i64::MIN), format!("{} s after the epoch", i64::MIN));
    }

    #[test]
    fn local_time_carries_its_offset() {
        let t = local(UNIX_EPOCH + Duration::from_secs(1_780_000_000)).unwrap();
        assert_eq!(t.len(), "2026-05-28T20:26:40+00:00".len(), "{t}");
        assert!(t.contains('T') && (t[19..].starts_with('+') || t[19..].starts_with('-')), "{t}");
    }
}
