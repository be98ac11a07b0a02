//! When a job runs: every N hours (N dividing 24) from a time of day, local time. The
//! schedule gives the number of runs a day, which turns a detection objective into a
//! verification budget, and the systemd timer (`OnCalendar=`, `Persistent=true`) or
//! cron line that runs the job. blockproof has no daemon of its own.

use std::path::Path;
use std::time::Duration;

/// A parsed `[schedule]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    /// Hours between runs: 1, 2, 3, 4, 6, 8, 12 or 24.
    pub every_hours: u32,
    /// The time of day of the first run (hour, minute), local time.
    pub at: (u32, u32),
    /// A random delay added to each start (systemd's `RandomizedDelaySec=`), so that many
    /// hosts do not start at once.
    pub randomized_delay: Option<Duration>,
}

impl Schedule {
    /// Checks the interval (`1d`, `12h`, `6h`, ...) and the time of day (`HH:MM`).
    pub fn new(every: Duration, at: &str, randomized_delay: Option<Duration>) -> Result<Self, String> {
        let secs = every.as_secs();
        let hours = (secs / 3600) as u32;
        if !secs.is_multiple_of(3600) || hours == 0 || !24u32.is_multiple_of(hours) || every.subsec_nanos() != 0 {
            return Err(format!(
                "every = {:?}: the interval must be a number of hours dividing a day (1h, 2h, 3h, 4h, 6h, 8h, 12h) \
                 or 1d",
                humantime::format_duration(every).to_string()
            ));
        }
        let (h, m) = at
            .split_once(':')
            .and_then(|(h, m)| Some((h.parse::<u32>().ok()?, m.parse::<u32>().ok()?)))
            .filter(|&(h, m)| h < 24 && m < 60 && at.len() == 5)
            .ok_or_else(|| format!("at = {at:?}: a time of day HH:MM, e.g. \"01:30\""))?;
        Ok(Schedule { every_hours: hours, at: (h, m), randomized_delay })
    }

    /// Runs a day.
    pub fn runs_per_day(&self) -> u64 {
        u64::from(24 / self.every_hours)
    }

    /// The interval between runs.
    pub fn interval(&self) -> Duration {
        Duration::from_secs(u64::from(self.every_hours) * 3600)
    }

    /// systemd's `OnCalendar=` expression.
    pub fn on_calendar(&self) -> String {
        let (h, m) = self.at;
        if self.every_hours == 24 {
            format!("*-*-* {h:02}:{m:02}:00")
        } else {
            format!("*-*-* {:02}/{}:{m:02}:00", h % self.every_hours, self.every_hours)
        }
    }

    /// The crontab line running `command` on this schedule.
    pub fn cron_line(&self, command: &str) -> String {
        let (h, m) = self.at;
        let hours = if self.every_hours == 24 {
            h.to_string()
        } else {
            format!("{}-23/{}", h % self.every_hours, self.every_hours)
        };
        format!("{m} {hours} * * * {command}")
    }

    /// The systemd service and timer (their texts) that run `blockproof run JOB` on this
    /// schedule; `unit` names them (`UNIT.service`, `UNIT.timer`).
    pub fn systemd_units(&self, unit: &str, exe: &Path, job: &Path) -> (String, String) {
        let service = format!(
            "[Unit]\n\
             Description=blockproof job {unit}\n\
             Wants=network-online.target\n\
             After=network-online.target\n\
             \n\
             [Service]\n\
             Type=oneshot\n\
             ExecStart={} run {}\n\
             # Backups yield to the workload.\n\
             Nice=10\n\
             IOSchedulingClass=best-effort\n\
             IOSchedulingPriority=7\n",
            quote(exe),
            quote(job)
        );
        let delay = self.randomized_delay.map(|d| format!("RandomizedDelaySec={}\n", d.as_secs())).unwrap_or_default();
        let timer = format!(
            "[Unit]\n\
             Description=Run blockproof job {unit} every {} h from {:02}:{:02}\n\
             \n\
             [Timer]\n\
             OnCalendar={}\n\
             # A run missed while the machine was off starts at the next boot.\n\
             Persistent=true\n\
             {delay}\
             \n\
             [Install]\n\
             WantedBy=timers.target\n",
            self.every_hours,
            self.at.0,
            self.at.1,
            self.on_calendar()
        );
        (service, timer)
    }
}

/// A path for a systemd command line: quoted when it holds spaces or quotes.
fn quote(p: &Path) -> String {
    let s = p.display().to_string();
    if s.chars().any(|c| c.is_whitespace() || c == '"' || c == '\\') {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: u64) -> Duration {
        Duration::from_secs(n * 3600)
    }

    #[test]
    fn calendars_and_cron_lines() {
        let nightly = Schedule::new(h(24), "01:30", None).unwrap();
        assert_eq!(nightly.runs_per_day(), 1);
        assert_eq!(nightly.on_calendar(), "*-*-* 01:30:00");
        assert_eq!(nightly.cron_line("blockproof run /etc/j.toml"), "30 1 * * * blockproof run /etc/j.toml");
        let six = Schedule::new(h(6), "07:05", Some(Duration::from_secs(600))).unwrap();
        assert_eq!(six.runs_per_day(), 4);
        assert_eq!(six.on_calendar(), "*-*-* 01/6:05:00");
        assert_eq!(six.cron_line("x"), "5 1-23/6 * * * x");
        let (service, timer) =
            six.systemd_units("blockproof-fleet", Path::new("/usr/bin/blockproof"), Path::new("/etc/a b.toml"));
        assert!(service.contains("ExecStart=/usr/bin/blockproof run \"/etc/a b.toml\"\n"), "{service}");
        assert!(timer.contains("OnCalendar=*-*-* 01/6:05:00\n") && timer.contains("Persistent=true\n"), "{timer}");
        assert!(timer.contains("RandomizedDelaySec=600\n"), "{timer}");
    }

    #[test]
    fn refuses_intervals_that_do_not_divide_a_day_and_bad_times() {
        for bad in [h(5), h(48), Duration::from_secs(90 * 60), Duration::ZERO] {
            assert!(Schedule::new(bad, "01:00", None).is_err(), "{bad:?}");
        }
        for bad in ["1:00", "24:00", "01:60", "0100", "aa:bb"] {
            assert!(Schedule::new(h(24), bad, None).is_err(), "{bad}");
        }
    }
}
