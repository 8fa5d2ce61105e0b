// Traffic probes and polling used by scenarios: ping with parsed counts,
// and waiting for a condition with a deadline.

use std::net::Ipv4Addr;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::netns::Netns;
use crate::{ChildHandle, Lab};

/// How often [`wait_until`] re-evaluates its condition.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// What one iputils `ping` run reported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PingResult {
    /// Echo requests sent.
    pub transmitted: u32,
    /// Distinct echo replies received (duplicates not counted).
    pub received: u32,
    /// Duplicate replies (`+N duplicates`), a sign of looping or flooding.
    pub duplicates: u32,
    /// The full ping output, for assertion messages.
    pub output: String,
}

impl PingResult {
    /// Every request got exactly one reply.
    pub fn all_received(&self) -> bool {
        self.transmitted > 0 && self.received == self.transmitted && self.duplicates == 0
    }
}

/// Pings `dst` from inside `from`, `count` times, with extra iputils flags
/// (`-W 2`, `-i 0.2`, `-s 1422 -M do`, ...). Packet loss is a result, not
/// an error; the call fails only when ping's summary line is missing.
pub fn ping(from: &Netns, dst: Ipv4Addr, count: u32, extra_args: &[&str]) -> Result<PingResult> {
    ping_host(from, &dst.to_string(), count, extra_args)
}

/// [`ping`] with `dst` a name (or an address) `from` resolves, as its
/// resolv.conf says.
pub fn ping_host(from: &Netns, dst: &str, count: u32, extra_args: &[&str]) -> Result<PingResult> {
    let count = count.to_string();
    let mut argv = vec!["ping", "-n", "-c", count.as_str()];
    argv.extend_from_slice(extra_args);
    argv.push(dst);
    let output = from.exec_unchecked(&argv)?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    parse_ping_summary(&text).with_context(|| {
        format!(
            "no ping summary from `{}` in {from}:\n{text}",
            argv.join(" ")
        )
    })
}

/// Parses `3 packets transmitted, 2 received, +1 duplicates, ...`.
fn parse_ping_summary(text: &str) -> Option<PingResult> {
    let line = text
        .lines()
        .find(|line| line.contains("packets transmitted"))?;
    let mut transmitted = None;
    let mut received = None;
    let mut duplicates = 0;
    for field in line.split(',') {
        let mut words = field.split_whitespace();
        let (Some(number), Some(label)) = (words.next(), words.next()) else {
            continue;
        };
        match label {
            "packets" => transmitted = number.parse().ok(),
            "received" => received = number.parse().ok(),
            "duplicates" => duplicates = number.trim_start_matches('+').parse().ok()?,
            _ => {}
        }
    }
    Some(PingResult {
        transmitted: transmitted?,
        received: received?,
        duplicates,
        output: text.to_string(),
    })
}

/// A ping left running in the background while a test does something
/// disruptive, then read: how many of its requests got no reply.
pub struct BackgroundPing {
    child: ChildHandle,
    /// How long it runs, roughly.
    duration: Duration,
}

impl BackgroundPing {
    /// Starts `ping -c count -i interval_s -W 2 dst` in `from`.
    pub fn start(
        lab: &Lab,
        from: &Netns,
        dst: Ipv4Addr,
        count: u32,
        interval: Duration,
    ) -> Result<BackgroundPing> {
        let count_s = count.to_string();
        let interval_s = format!("{:.3}", interval.as_secs_f64());
        let dst = dst.to_string();
        let child = lab.spawn(
            from,
            &[
                "ping",
                "-n",
                "-c",
                &count_s,
                "-i",
                &interval_s,
                "-W",
                "2",
                &dst,
            ],
            &[],
        )?;
        Ok(BackgroundPing {
            child,
            duration: interval * count,
        })
    }

    /// Waits for the ping to end and returns its counts.
    pub fn finish(self) -> Result<PingResult> {
        self.child
            .wait_timeout(self.duration + Duration::from_secs(10))
            .context("background ping did not end")?;
        let text = format!("{}{}", self.child.stdout()?, self.child.stderr()?);
        parse_ping_summary(&text).with_context(|| format!("no ping summary in:\n{text}"))
    }
}

/// Polls `condition` until it returns `Ok(true)` or `timeout` passes.
/// Errors from `condition` count as "not yet" (a daemon still starting
/// refuses connections); the last one is reported if time runs out.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match condition() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(error) => last_error = Some(error),
        }
        if Instant::now() >= deadline {
            match last_error {
                Some(error) => bail!("condition not met within {timeout:?}; last error: {error:#}"),
                None => bail!("condition not met within {timeout:?}"),
            }
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Starts `iperf3 -s -1` (one test, then it exits) in `ns` and waits until
/// it listens on 5201. iperf3 buffers its stdout when it is not a terminal,
/// so the kernel's socket table says when it is ready. A one-off server
/// started before must have exited first (it leaves after its test).
pub fn iperf3_server(lab: &Lab, ns: &Netns) -> Result<ChildHandle> {
    let listening = || -> Result<bool> {
        let out = ns.exec(&["ss", "-H", "-l", "-t", "-n", "sport", "=", ":5201"])?;
        Ok(!out.stdout.is_empty())
    };
    wait_until(Duration::from_secs(5), || Ok(!listening()?))
        .context("the last iperf3 server did not exit")?;
    let server = lab.spawn(ns, &["iperf3", "-s", "-1"], &[])?;
    wait_until(Duration::from_secs(10), listening)
        .with_context(|| format!("iperf3 server did not start:\n{}", server.output_report()))?;
    Ok(server)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_summary_counts_are_parsed() {
        let text = "PING 198.18.0.3 (198.18.0.3) 56(84) bytes of data.\n\
            64 bytes from 198.18.0.3: icmp_seq=1 ttl=64 time=0.1 ms\n\n\
            --- 198.18.0.3 ping statistics ---\n\
            3 packets transmitted, 2 received, 33.3333% packet loss, time 402ms\n";
        let result = parse_ping_summary(text).expect("summary present");
        assert_eq!(
            (result.transmitted, result.received, result.duplicates),
            (3, 2, 0)
        );
        assert!(!result.all_received());
    }

    #[test]
    fn ping_duplicates_are_not_a_clean_result() {
        let text = "3 packets transmitted, 3 received, +2 duplicates, 0% packet loss, time 2ms";
        let result = parse_ping_summary(text).expect("summary present");
        assert_eq!(result.duplicates, 2);
        assert!(!result.all_received());
    }

    #[test]
    fn ping_errors_line_is_tolerated() {
        let text = "3 packets transmitted, 0 received, +3 errors, 100% packet loss, time 2ms";
        let result = parse_ping_summary(text).expect("summary present");
        assert_eq!((result.transmitted, result.received), (3, 0));
    }

    #[test]
    fn wait_until_reports_the_last_error() {
        let error = wait_until(Duration::from_millis(60), || bail!("not listening"))
            .expect_err("never true");
        assert!(format!("{error:#}").contains("not listening"));
    }
}
