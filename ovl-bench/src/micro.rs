// The kernel-program micro-benchmark: `ovl-microbench`, this crate's other
// binary (it links ovl's loader), run as a child; its JSON rows read back.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, ensure};
use ovl_tests::command;
use serde_json::Value;

use crate::report::MicroRow;

/// The micro-benchmark binary, built beside this one.
const BINARY: &str = "ovl-microbench";

/// The micro-benchmark's path: next to the running benchmark (cargo builds
/// both binaries of the crate together).
pub fn binary() -> Result<PathBuf> {
    let me = std::env::current_exe().context("locate the running benchmark")?;
    let binary = me.with_file_name(BINARY);
    ensure!(
        binary.is_file(),
        "{} does not exist; build the crate's binaries together (`cargo build --release -p ovl-bench`)",
        binary.display()
    );
    Ok(binary)
}

/// Runs `binary` with `samples` single runs per case and one call of
/// `repeat` runs; its progress and errors go to the terminal.
pub fn run(binary: &PathBuf, samples: u32, repeat: u32) -> Result<Vec<MicroRow>> {
    let mut cmd = Command::new(binary);
    cmd.args(["--samples", &samples.to_string()])
        .args(["--repeat", &repeat.to_string()])
        .stderr(Stdio::inherit());
    eprintln!("xtask: $ {}", command::line(&cmd));
    let stdout = command::stdout_of(&mut cmd)?;
    parse(&stdout)
}

/// The rows of the micro-benchmark's JSON array.
pub fn parse(json: &str) -> Result<Vec<MicroRow>> {
    let rows: Value = serde_json::from_str(json).context("the micro-benchmark printed no JSON")?;
    let rows = rows
        .as_array()
        .context("the micro-benchmark's JSON is not an array")?;
    rows.iter()
        .map(|row| {
            let text = |key: &str| {
                row[key]
                    .as_str()
                    .map(str::to_string)
                    .with_context(|| format!("micro-benchmark row without {key}: {row}"))
            };
            let number = |key: &str| {
                row[key]
                    .as_u64()
                    .with_context(|| format!("micro-benchmark row without {key}: {row}"))
            };
            Ok(MicroRow {
                hook: text("hook")?,
                program: text("program")?,
                case: text("case")?,
                frame_bytes: number("frame_bytes")?,
                samples: number("samples")?,
                single_median_ns: number("single_median_ns")?,
                single_p90_ns: number("single_p90_ns")?,
                repeat: number("repeat")?,
                repeat_mean_ns: number("repeat_mean_ns")?,
                repeat_same_path: row["repeat_same_path"].as_bool().with_context(|| {
                    format!("micro-benchmark row without repeat_same_path: {row}")
                })?,
                repeat_last_action: number("repeat_last_action")?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micro_benchmark_rows_are_read_from_its_json() {
        let json = r#"[{"case":"decap 64 B","program":"ovl_xdp_decap","hook":"XDP (underlay)",
            "frame_bytes":114,"expected_action":4,"samples":5000,"single_median_ns":510,
            "single_p90_ns":552,"repeat":100000,"repeat_mean_ns":49,"repeat_same_path":false,
            "repeat_last_action":2}]"#;
        let rows = parse(json).expect("parses");
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].single_median_ns, 510);
        assert!(!rows[0].repeat_same_path);
        assert!(parse("[{}]").is_err());
    }
}
