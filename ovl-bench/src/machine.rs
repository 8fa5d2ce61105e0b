// The machine a benchmark ran on, the tools it used and the code it
// measured: the report's first table, so figures are never read alone.

use std::fs;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use ovl_tests::command;

/// `(what, value)` rows: date, kernel, CPU model, cores, memory, tool
/// versions and the ovl commit. Unreadable facts say so instead of failing
/// the run.
pub fn describe() -> Vec<(String, String)> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map_or_else(
            || "unknown".to_string(),
            |(_, name)| name.trim().to_string(),
        );
    let cores = cpuinfo
        .lines()
        .filter(|line| line.starts_with("processor"))
        .count();
    let memory = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let kib: f64 = text
                .lines()
                .find_map(|line| line.strip_prefix("MemTotal:"))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            Some(format!("{:.1} GiB", kib / 1024.0 / 1024.0))
        })
        .unwrap_or_else(|| "unknown".to_string());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".to_string(), |text| text.trim().to_string());
    let virtualisation = if cpuinfo.contains(" hypervisor") {
        "virtual machine (hypervisor flag set)"
    } else {
        "bare metal (no hypervisor flag)"
    };
    vec![
        ("date (UTC)".to_string(), utc_date_time()),
        ("kernel".to_string(), kernel),
        ("CPU".to_string(), model),
        ("cores".to_string(), cores.to_string()),
        ("machine".to_string(), virtualisation.to_string()),
        ("memory".to_string(), memory),
        ("iperf3".to_string(), first_line("iperf3", &["--version"])),
        (
            "sockperf".to_string(),
            first_line("sockperf", &["--version"]),
        ),
        ("ovl commit".to_string(), commit()),
    ]
}

fn first_line(program: &str, args: &[&str]) -> String {
    command::capture(Command::new(program).args(args))
        .ok()
        .map(|output| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            text.lines()
                .find(|line| !line.trim().is_empty())
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_else(|| "not installed".to_string())
}

/// `abc1234`, with `+ uncommitted changes` when the work tree is dirty.
fn commit() -> String {
    let git = |args: &[&str]| {
        command::stdout_of(
            Command::new("git")
                .arg("-C")
                .arg(ovl_tests::workspace_root())
                .args(args),
        )
    };
    match (
        git(&["rev-parse", "--short", "HEAD"]),
        git(&["status", "--porcelain"]),
    ) {
        (Ok(hash), Ok(status)) if status.trim().is_empty() => hash.trim().to_string(),
        (Ok(hash), Ok(_)) => format!("{} + uncommitted changes", hash.trim()),
        _ => "unknown (not a git work tree)".to_string(),
    }
}

/// Seconds since the epoch, now.
fn now_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// Today's date, `YYYY-MM-DD` (UTC): the results file's name.
pub fn utc_date() -> String {
    let (year, month, day) = civil_from_days(now_seconds() / 86_400);
    format!("{year:04}-{month:02}-{day:02}")
}

/// `YYYY-MM-DD HH:MM` (UTC).
fn utc_date_time() -> String {
    let seconds = now_seconds();
    let (year, month, day) = civil_from_days(seconds / 86_400);
    let minute_of_day = seconds % 86_400 / 60;
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}",
        minute_of_day / 60,
        minute_of_day % 60
    )
}

/// Proleptic Gregorian (year, month, day) of a day count since 1970-01-01
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_since_epoch_become_calendar_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(59), (1970, 3, 1));
        // 2000-02-29: a leap day of a century divisible by 400.
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
    }
}
