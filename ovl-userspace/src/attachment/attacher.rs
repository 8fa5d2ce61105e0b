//! The process that registers an attachment and builds its veth, as its
//! endpoint records it: how an attach killed half-way (its attacher dead)
//! is told from one still in progress.

use crate::model::Attacher;

/// This process, as an endpoint records its attacher; `None` when /proc
/// cannot say (the endpoint is then never reclaimed as abandoned).
pub fn current() -> Option<Attacher> {
    let pid = std::process::id();
    let started = started_of(&std::fs::read_to_string("/proc/self/stat").ok()?)?;
    Some(Attacher { pid, started })
}

/// Whether `attacher` no longer runs on this node: its pid is gone, is
/// another process's now (started at another time), or is a dead one
/// whose parent has not reaped it yet (a zombie). The node's front ends
/// and agent must share one pid namespace for this to tell.
pub fn is_gone(attacher: &Attacher) -> bool {
    match std::fs::read_to_string(format!("/proc/{}/stat", attacher.pid)) {
        Ok(stat) => {
            fields_after_name(&stat)
                .and_then(|mut f| f.next())
                .is_some_and(|state| state == "Z" || state == "X")
                || started_of(&stat) != Some(attacher.started)
        }
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

/// The start time in a `/proc/PID/stat` line: field 22.
fn started_of(stat: &str) -> Option<u64> {
    // Fields 3.. follow the name; the start time is the 20th of them.
    fields_after_name(stat)?.nth(19)?.parse().ok()
}

/// The fields of a `/proc/PID/stat` line from the 3rd (the state) on,
/// after the command name (field 2, in parentheses, which may hold spaces
/// and parentheses itself, so it ends at the last `)`).
fn fields_after_name(stat: &str) -> Option<std::str::SplitWhitespace<'_>> {
    Some(stat[stat.rfind(')')? + 1..].split_whitespace())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_read_past_a_command_name_with_spaces_and_parentheses() {
        let stat =
            "1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(started_of(stat), Some(987_654));
        assert_eq!(started_of("1234 (short) S 1"), None);
    }

    #[test]
    fn this_process_lives_and_another_start_time_or_pid_is_gone() {
        let me = current().expect("/proc/self/stat is readable");
        assert!(!is_gone(&me));
        assert!(is_gone(&Attacher {
            started: me.started + 1,
            ..me
        }));
        // Above any pid_max.
        assert!(is_gone(&Attacher {
            pid: u32::MAX,
            ..me
        }));
    }

    #[test]
    fn a_killed_process_not_yet_reaped_is_gone() {
        let mut child = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .unwrap();
        let pid = child.id();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let it = Attacher {
            pid,
            started: started_of(&stat).unwrap(),
        };
        assert!(!is_gone(&it));
        child.kill().unwrap();
        // A zombie until waited for: its /proc entry stays meanwhile.
        let zombie = (0..200).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(10));
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| fields_after_name(&s).and_then(|mut f| f.next()) == Some("Z"))
        });
        assert!(zombie && is_gone(&it));
        child.wait().unwrap();
        assert!(is_gone(&it));
    }
}
