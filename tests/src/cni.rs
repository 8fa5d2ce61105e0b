// Calling CNI plugins the way a container runtime does: CNI_* variables,
// the configuration on stdin, the result or error JSON on stdout.

//! There is no cnitool package; these calls stand in for it. Each runs the
//! plugin in a host's network namespace (`nsenter --net`, as runtimes run
//! plugins in theirs) with a clean environment: only PATH and what the
//! call names, so no OVL_* variable of the test process leaks in.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::Netns;

/// What a plugin printed and how it exited.
#[derive(Debug)]
pub struct CniOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CniOutput {
    /// stdout as JSON (`Null` when empty).
    pub fn json(&self) -> Result<Value> {
        if self.stdout.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&self.stdout)
            .with_context(|| format!("plugin stdout is not JSON: {self:?}"))
    }

    /// The JSON of a successful call; fails, showing everything, otherwise.
    pub fn ok(&self) -> Result<Value> {
        if !self.status.success() {
            bail!("plugin failed: {self:?}");
        }
        self.json()
    }

    /// The error code of a failed call (the error result's `code`).
    pub fn error_code(&self) -> Result<u64> {
        if self.status.success() {
            bail!("plugin succeeded where it should fail: {self:?}");
        }
        self.json()?["code"]
            .as_u64()
            .with_context(|| format!("no numeric code in the error result: {self:?}"))
    }
}

/// One plugin executable, run in `host`'s network namespace.
pub struct CniPlugin {
    path: PathBuf,
    host: Netns,
}

impl CniPlugin {
    pub fn new(path: &Path, host: &Netns) -> CniPlugin {
        CniPlugin {
            path: path.to_owned(),
            host: host.clone(),
        }
    }

    /// Runs the plugin with `CNI_COMMAND=command`, the variables `env`
    /// (`CNI_CONTAINERID`, ...) and `stdin`.
    pub fn call(&self, command: &str, env: &[(&str, &str)], stdin: &str) -> Result<CniOutput> {
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.host.name()))
            .arg(&self.path)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run {}", self.path.display()))?;
        child
            .stdin
            .take()
            .context("plugin stdin")?
            .write_all(stdin.as_bytes())
            .context("write the configuration to the plugin")?;
        let out = child.wait_with_output().context("wait for the plugin")?;
        Ok(CniOutput {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// The CNI_* variables of an attachment operation.
    pub fn attachment_env<'a>(
        container_id: &'a str,
        netns: &'a str,
        ifname: &'a str,
    ) -> Vec<(&'a str, &'a str)> {
        vec![
            ("CNI_CONTAINERID", container_id),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", ifname),
            ("CNI_PATH", crate::podman::REFERENCE_PLUGIN_DIR),
        ]
    }
}
