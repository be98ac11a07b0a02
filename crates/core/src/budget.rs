//! Budgets: how much extra reading an operation may do (`--read-data=BUDGET`, and
//! `--verify BUDGET` once verification lands).
//!
//! Syntax: `10%` | `2GiB` | `500ios` | `30s` | `until=06:00` | `all` | `none`, or several
//! joined by commas; when several limits are given the smallest wins. `until=` is a time
//! window: the work must end by a clock time — `HH:MM[:SS]` is the next such local time
//! (within 24 hours), or an RFC 3339 timestamp (`2026-12-02T06:00:00Z`). A limit of zero (`0%`, `0`,
//! `0ios`, `0s`, ...) is refused: nothing at all is written `none`, so that a typo or a
//! templating accident never turns verification off without a word.

use std::time::{Duration, Instant, SystemTime};

/// A parsed budget. `None` fields are unlimited.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Budget {
    /// Fraction of the total, 0.0..=1.0.
    pub fraction: Option<f64>,
    pub bytes: Option<u64>,
    /// Read operations (for check: pack files).
    pub ios: Option<u64>,
    pub time: Option<Duration>,
    /// The end of the time window (`until=`).
    pub until: Option<SystemTime>,
    /// `none`: nothing at all.
    pub nothing: bool,
}

/// Which time limit of a budget ends the work first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeLimit {
    /// The duration (`30s`).
    Duration,
    /// The window (`until=06:00`).
    Window,
}

impl Budget {
    /// Unlimited.
    pub fn all() -> Self {
        Budget::default()
    }

    pub fn is_unlimited(&self) -> bool {
        !self.nothing
            && self.fraction.is_none()
            && self.bytes.is_none()
            && self.ios.is_none()
            && self.time.is_none()
            && self.until.is_none()
    }

    /// Whether the budget has a time limit (a duration or a window).
    pub fn is_timed(&self) -> bool {
        self.time.is_some() || self.until.is_some()
    }

    /// When work that starts at `started` must stop, and which limit says so (`None`: no
    /// time limit). A window already past means at once.
    pub fn deadline(&self, started: Instant) -> Option<(Instant, TimeLimit)> {
        // A limit beyond what the clock can add is no limit (not a panic).
        let by_time = self.time.and_then(|t| Some((started.checked_add(t)?, TimeLimit::Duration)));
        let by_window = self.until.and_then(|u| {
            let left = u.duration_since(SystemTime::now()).unwrap_or_default();
            Some((Instant::now().checked_add(left)?, TimeLimit::Window))
        });
        [by_time, by_window].into_iter().flatten().min_by_key(|(at, _)| *at)
    }

    /// The byte limit for a total of `total` bytes (fraction and bytes, smallest wins).
    pub fn byte_limit(&self, total: u64) -> u64 {
        if self.nothing {
            return 0;
        }
        let by_fraction = self.fraction.map(|f| (total as f64 * f).ceil() as u64);
        [by_fraction, self.bytes].into_iter().flatten().min().unwrap_or(u64::MAX).min(total)
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        let mut b = Budget::default();
        if s.trim().is_empty() {
            return Err("empty budget".into());
        }
        for part in s.split(',') {
            let p = part.trim().to_ascii_lowercase();
            let bad = || format!("invalid budget {part:?}: use 10%, 2GiB, 500ios, 30s, until=06:00, all or none");
            let zero = || format!("budget {:?} is zero: write none to read nothing", part.trim());
            if let Some(when) = part.trim().strip_prefix("until=") {
                let at = parse_until(when.trim()).ok_or_else(|| {
                    format!("invalid window {part:?}: use until=HH:MM (local time) or until=2026-12-02T06:00:00Z")
                })?;
                b.until = Some(b.until.map_or(at, |x| x.min(at)));
            } else if p == "all" {
                continue;
            } else if p == "none" {
                b.nothing = true;
            } else if let Some(n) = p.strip_suffix('%') {
                let v: f64 = n.trim().parse().map_err(|_| bad())?;
                if !(0.0..=100.0).contains(&v) {
                    return Err(format!("invalid budget {part:?}: a percentage must be between 0 and 100"));
                }
                if v == 0.0 {
                    return Err(zero());
                }
                b.fraction = Some(b.fraction.map_or(v / 100.0, |f: f64| f.min(v / 100.0)));
            } else if let Some(n) = p.strip_suffix("ios") {
                let v: u64 = n.trim().parse().map_err(|_| bad())?;
                if v == 0 {
                    return Err(zero());
                }
                b.ios = Some(b.ios.map_or(v, |x| x.min(v)));
            } else if let Some(v) = parse_duration(&p) {
                if v.is_zero() {
                    return Err(zero());
                }
                b.time = Some(b.time.map_or(v, |x| x.min(v)));
            } else {
                let v = parse_size(&p).ok_or_else(bad)?;
                if v == 0 {
                    return Err(zero());
                }
                b.bytes = Some(b.bytes.map_or(v, |x| x.min(v)));
            }
        }
        Ok(b)
    }
}

/// `HH:MM[:SS]`: the next such local time after now (today's, or tomorrow's once it has
/// passed); or an RFC 3339 timestamp.
fn parse_until(s: &str) -> Option<SystemTime> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        if s.contains('T') || s.contains(' ') {
            return Some(t);
        }
    }
    let mut parts = s.split(':');
    let h: i32 = parts.next()?.parse().ok()?;
    let m: i32 = parts.next()?.parse().ok()?;
    let sec: i32 = match parts.next() {
        Some(x) => x.parse().ok()?,
        None => 0,
    };
    if parts.next().is_some() || !(0..24).contains(&h) || !(0..60).contains(&m) || !(0..60).contains(&sec) {
        return None;
    }
    let now = SystemTime::now();
    for day in 0..2 {
        let at = local_time_today(h, m, sec, day)?;
        if at > now {
            return Some(at);
        }
    }
    None
}

/// Today's (plus `days`) `h:m:s` in the machine's local time zone.
fn local_time_today(h: i32, m: i32, s: i32, days: i32) -> Option<SystemTime> {
    let now: libc::time_t = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs() as libc::time_t;
    // SAFETY: localtime_r and mktime only read and write the structs passed to them.
    unsafe {
        let mut tm: libc::tm = std::mem::zeroed();
        if libc::localtime_r(&now, &mut tm).is_null() {
            return None;
        }
        tm.tm_hour = h;
        tm.tm_min = m;
        tm.tm_sec = s;
        tm.tm_mday += days;
        tm.tm_isdst = -1;
        let t = libc::mktime(&mut tm);
        (t >= 0).then(|| SystemTime::UNIX_EPOCH + Duration::from_secs(t as u64))
    }
}

fn parse_duration(p: &str) -> Option<Duration> {
    let (num, mult) = if let Some(n) = p.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = p.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = p.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = p.strip_suffix('h') {
        (n, 3600.0)
    } else {
        return None;
    };
    let v: f64 = num.trim().parse().ok()?;
    // Beyond what a Duration holds (`1e30s`): refused, not a panic.
    Duration::try_from_secs_f64(v * mult).ok()
}

/// `n` bytes for people: `512 B`, `1.5 KiB`, `2.0 GiB` (binary units, one decimal) — what
/// the CLI's summaries and the fleet's HTML report print.
pub fn format_size(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Parses `2GiB`, `500MB`, `4096`, `1.5TiB` (binary and decimal units).
pub fn parse_size(p: &str) -> Option<u64> {
    let p = p.trim().to_ascii_lowercase();
    let idx = p.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(p.len());
    let (num, unit) = p.split_at(idx);
    let v: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "kb" => 1e3,
        "m" | "mib" => 1024.0 * 1024.0,
        "mb" => 1e6,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "gb" => 1e9,
        "t" | "tib" => 1024f64.powi(4),
        "tb" => 1e12,
        _ => return None,
    };
    (v >= 0.0 && v.is_finite()).then_some((v * mult) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_for_people() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(1023), "1023 B");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_size(2 << 30), "2.0 GiB");
        assert_eq!(format_size(u64::MAX), "16384.0 PiB");
        assert_eq!(parse_size(&format_size(3 << 20).replace(' ', "")), Some(3 << 20));
    }

    #[test]
    fn parses_every_form() {
        assert_eq!(Budget::parse("10%").unwrap().fraction, Some(0.1));
        assert_eq!(Budget::parse("2GiB").unwrap().bytes, Some(2 << 30));
        assert_eq!(Budget::parse("500ios").unwrap().ios, Some(500));
        assert_eq!(Budget::parse("30s").unwrap().time, Some(Duration::from_secs(30)));
        assert_eq!(Budget::parse("5m").unwrap().time, Some(Duration::from_secs(300)));
        assert!(Budget::parse("all").unwrap().is_unlimited());
        assert!(Budget::parse("none").unwrap().nothing);
        let b = Budget::parse("10%,1MiB,20%").unwrap();
        assert_eq!(b.fraction, Some(0.1));
        assert_eq!(b.byte_limit(100 << 20), 1 << 20);
        assert_eq!(b.byte_limit(1 << 20), 104858);
        assert_eq!(Budget::parse("none").unwrap().byte_limit(100), 0);
        assert_eq!(Budget::all().byte_limit(100), 100);
    }

    #[test]
    fn rejects_nonsense() {
        for bad in ["", "abc", "150%", "-5%", "10xb", "5ios5", ","] {
            assert!(Budget::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn zero_is_refused_in_favour_of_none() {
        for zero in ["0%", "0.0%", "0", "0B", "0GiB", "0.1", "0ios", "0s", "0ms", "0m", "10%,0ios", "0s,1GiB"] {
            let err = Budget::parse(zero).unwrap_err();
            assert!(err.contains("zero") && err.contains("none"), "{zero}: {err}");
        }
        for tiny in ["0.5%", "1", "1ios", "1ms"] {
            assert!(Budget::parse(tiny).is_ok(), "{tiny}");
        }
    }
}

#[cfg(test)]
mod window_tests {
    use super::*;

    #[test]
    fn a_window_is_the_next_such_local_time_or_a_timestamp() {
        let b = Budget::parse("5%,until=06:00").unwrap();
        let at = b.until.unwrap();
        let left = at.duration_since(SystemTime::now()).unwrap();
        assert!(left <= Duration::from_secs(24 * 3600 + 3600), "within a day (DST aside): {left:?}");
        assert_eq!(b.fraction, Some(0.05));
        let b = Budget::parse("until=2020-01-01T00:00:00Z").unwrap();
        assert_eq!(b.until, Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1577836800)));
        // A window in the past ends the work at once.
        let (when, which) = b.deadline(Instant::now()).unwrap();
        assert!(when <= Instant::now() && which == TimeLimit::Window);
        // The earlier limit wins.
        let b = Budget::parse("10s,until=2999-01-01T00:00:00Z").unwrap();
        assert_eq!(b.deadline(Instant::now()).unwrap().1, TimeLimit::Duration);
        for bad in ["until=25:00", "until=6", "until=06:61", "until=tomorrow", "until="] {
            assert!(Budget::parse(bad).is_err(), "{bad}");
        }
        assert!(Budget::parse("until=23:59:59").is_ok());
    }

    #[test]
    fn absurd_durations_are_refused_or_no_limit_never_a_panic() {
        // Beyond what a Duration holds: an error, not a panic.
        for absurd in ["1e30s", "99999999999999999999999h", "1e300ms"] {
            assert!(Budget::parse(absurd).is_err(), "{absurd}");
        }
        // A Duration, but beyond what the clock can add: no deadline.
        let b = Budget::parse("10000000000000000000s").unwrap();
        assert!(b.is_timed());
        assert_eq!(b.deadline(Instant::now()), None);
        // With a window beside it, the window decides.
        let b = Budget::parse("10000000000000000000s,until=2020-01-01T00:00:00Z").unwrap();
        assert_eq!(b.deadline(Instant::now()).unwrap().1, TimeLimit::Window);
    }
}
