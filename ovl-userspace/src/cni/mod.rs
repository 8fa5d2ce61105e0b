//! ovl as a CNI plugin (spec 1.0.0 and 1.1.0): the `ovl` binary run with no
//! arguments and `CNI_COMMAND` set. Reads CNI_* and the configuration on
//! stdin, attaches through [`crate::attachment`] like `ovl connect`, and
//! answers with the spec's result or error JSON on stdout.
//!
//! Wire types are plain serde types written against the spec
//! ([`types`]): the Rust CNI crates either stop at spec 1.0 (cni-plugin
//! 0.2, unmaintained since 2021: no STATUS, no GC) or are a one-person
//! pre-1.0 project that redesigned its API three times in two years
//! (rscni/rscni-plugin), and serde_json already does all the parsing.

mod add;
mod check;
mod del;
pub mod env;
pub mod error;
mod gc;
pub mod install;
mod result;
mod sandbox;
mod settings;
mod status;
pub mod types;
pub mod version;

use std::{
    io::{Read, Write},
    process::ExitCode,
};

use error::{CniError, Code};
use types::{ErrorResult, NetConf, VersionResult};
use version::SpecVersion;

/// A CNI operation (`CNI_COMMAND`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Gc,
    Status,
    Version,
}

impl Command {
    fn parse(raw: &str) -> Option<Command> {
        Some(match raw {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            "VERSION" => Command::Version,
            _ => return None,
        })
    }

    /// The name as `CNI_COMMAND` spells it.
    pub const fn name(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Gc => "GC",
            Command::Status => "STATUS",
            Command::Version => "VERSION",
        }
    }
}

/// True when this process was started by a container runtime as a CNI
/// plugin: no arguments, `CNI_COMMAND` in the environment.
pub fn invoked_as_plugin() -> bool {
    std::env::args_os().len() == 1 && std::env::var_os("CNI_COMMAND").is_some()
}

/// What the plugin prints and how it exits.
#[derive(Debug)]
pub struct Reply {
    /// The result, version or error JSON (empty for a silent success).
    pub stdout: String,
    pub success: bool,
}

/// The plugin's `main`: stdin and the environment in, JSON on stdout, the
/// exit status. Logs go to stderr, which runtimes keep for diagnosis.
pub fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let mut stdin = Vec::new();
    let input = std::io::stdin().read_to_end(&mut stdin).map(|_| stdin);
    let reply = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(respond(&|k| std::env::var(k).ok(), input)),
        Err(e) => error_reply(
            &SpecVersion::NEWEST.to_string(),
            &CniError::new(Code::Internal, format!("cannot start the runtime: {e}")),
        ),
    };
    let mut out = std::io::stdout().lock();
    // DEL, CHECK, GC and STATUS print nothing on success.
    let written = if reply.stdout.is_empty() {
        Ok(())
    } else {
        writeln!(out, "{}", reply.stdout).and_then(|()| out.flush())
    };
    if reply.success && written.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Answers one invocation: `get` reads a CNI_* (or OVL_*) variable,
/// `stdin` is what the runtime wrote.
pub async fn respond(
    get: &dyn Fn(&str) -> Option<String>,
    stdin: std::io::Result<Vec<u8>>,
) -> Reply {
    let mut reported_version = SpecVersion::NEWEST.to_string();
    match dispatch(get, stdin, &mut reported_version).await {
        Ok(stdout) => Reply {
            stdout,
            success: true,
        },
        Err(e) => {
            log::warn!("{e}");
            error_reply(&reported_version, &e)
        }
    }
}

fn error_reply(version: &str, e: &CniError) -> Reply {
    let body = ErrorResult {
        cni_version: version.to_owned(),
        code: e.code.number(),
        msg: e.code.message().to_owned(),
        details: e.details.clone(),
    };
    Reply {
        stdout: serde_json::to_string(&body).expect("an error result serialises"),
        success: false,
    }
}

async fn dispatch(
    get: &dyn Fn(&str) -> Option<String>,
    stdin: std::io::Result<Vec<u8>>,
    reported_version: &mut String,
) -> Result<String, CniError> {
    let raw = get("CNI_COMMAND").unwrap_or_default();
    let command = Command::parse(&raw).ok_or_else(|| {
        CniError::env(format!(
            "CNI_COMMAND {raw:?} is not one of ADD, DEL, CHECK, GC, STATUS, VERSION"
        ))
    })?;
    if command == Command::Version {
        return Ok(version_reply(stdin.as_deref().unwrap_or_default()));
    }
    let inv = env::Invocation::read(command, get)?;
    let stdin = stdin.map_err(|e| {
        CniError::new(
            Code::Io,
            format!("cannot read the network configuration from stdin: {e}"),
        )
    })?;
    // Errors answer in the configuration's version, even one whose other
    // keys do not decode (the spec: output in the input's cniVersion).
    if let Some(v) = declared_version(&stdin)
        && SpecVersion::SUPPORTED.contains(&v)
    {
        *reported_version = v.to_string();
    }
    let conf: NetConf = serde_json::from_slice(&stdin).map_err(|e| {
        CniError::decode(format!(
            "the network configuration on stdin is not a JSON object CNI describes: {e}"
        ))
    })?;
    let version = SpecVersion::declared(conf.cni_version.as_deref())?;
    if SpecVersion::SUPPORTED.contains(&version) {
        *reported_version = version.to_string();
    }
    version.check(command)?;
    check_name(conf.name.as_deref())?;
    if let Some((key, value)) = conf.unsupported_key() {
        let hint = match key.as_str() {
            "ipam" => {
                "; ovl allocates addresses itself from the ovl network's subnet: remove \"ipam\""
            }
            "ipMasq" => "; ovl networks are not masqueraded",
            _ => "; ovl reads network, store, node, apiSocket, pinRoot and dns",
        };
        return Err(CniError::new(
            Code::UnsupportedField,
            format!("unsupported key {key:?} = {value}{hint}"),
        ));
    }
    let settings = settings::Settings::resolve(&conf, get)?;
    match command {
        Command::Add => add::add(&inv, &conf, &settings, version).await,
        Command::Check => check::check(&inv, &conf, &settings)
            .await
            .map(|()| String::new()),
        Command::Del => del::del(&inv, &settings).await.map(|()| String::new()),
        Command::Gc => gc::gc(&conf, &settings).await.map(|()| String::new()),
        Command::Status => status::status(&settings).await.map(|()| String::new()),
        Command::Version => unreachable!("answered above"),
    }
}

/// The spec's rule for network names: an alphanumeric, then alphanumerics,
/// `_`, `.`, `-`.
fn check_name(name: Option<&str>) -> Result<(), CniError> {
    let name = name.unwrap_or_default();
    if name.is_empty() {
        return Err(CniError::config(
            "the configuration has no network name (\"name\")",
        ));
    }
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(CniError::config(format!(
            "network name {name:?} is invalid: it must start with a letter or digit, followed by letters, digits, '_', '.' or '-'"
        )))
    }
}

/// The `cniVersion` a JSON object on stdin names, whatever else it holds.
fn declared_version(stdin: &[u8]) -> Option<SpecVersion> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        cni_version: Option<String>,
    }
    serde_json::from_slice::<Probe>(stdin)
        .ok()?
        .cni_version?
        .parse()
        .ok()
}

/// VERSION: the versions ovl speaks, under the version the input names.
fn version_reply(stdin: &[u8]) -> String {
    let asked = declared_version(stdin)
        .unwrap_or(SpecVersion::NEWEST)
        .to_string();
    serde_json::to_string(&VersionResult {
        cni_version: asked,
        supported_versions: SpecVersion::SUPPORTED
            .iter()
            .map(|v| v.to_string())
            .collect(),
    })
    .expect("a version result serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(vars: &[(&str, &str)], stdin: &str) -> (bool, serde_json::Value) {
        let get = |k: &str| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let reply = rt.block_on(respond(&get, Ok(stdin.as_bytes().to_vec())));
        let json = if reply.stdout.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_str(&reply.stdout).unwrap()
        };
        (reply.success, json)
    }

    const ADD: [(&str, &str); 4] = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_NETNS", "/nonexistent/netns"),
        ("CNI_IFNAME", "eth0"),
    ];

    #[test]
    fn version_lists_what_ovl_speaks_under_the_asked_version() {
        let (ok, v) = call(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"1.0.0"}"#);
        assert!(ok);
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(
            v["supportedVersions"],
            serde_json::json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
        let (_, v) = call(&[("CNI_COMMAND", "VERSION")], "");
        assert_eq!(v["cniVersion"], "1.1.0");
    }

    #[test]
    fn a_configuration_that_does_not_decode_is_answered_in_its_version() {
        let (ok, v) = call(
            &ADD,
            r#"{"cniVersion":"1.0.0","name":"n","dns":5,"runtimeConfig":{"portMappings":"x"}}"#,
        );
        assert!(!ok);
        assert_eq!(v["code"], 6, "{v}");
        assert_eq!(v["cniVersion"], "1.0.0", "{v}");
    }

    #[test]
    fn input_errors_come_back_as_spec_error_results() {
        let conf = r#"{"cniVersion":"1.0.0","name":"n","type":"ovl"}"#;
        /// (environment, stdin, code, a piece of the details)
        type Case<'a> = (Vec<(&'a str, &'a str)>, &'a str, u64, &'a str);
        let cases: Vec<Case> = vec![
            (vec![("CNI_COMMAND", "FROB")], conf, 4, "FROB"),
            (ADD[..3].to_vec(), conf, 4, "CNI_IFNAME"),
            (ADD.to_vec(), "{not json", 6, "JSON"),
            (
                ADD.to_vec(),
                r#"{"cniVersion":"9.9.9","name":"n"}"#,
                1,
                "9.9.9",
            ),
            (ADD.to_vec(), r#"{"name":"n"}"#, 1, "0.1.0"),
            (ADD.to_vec(), r#"{"cniVersion":"one","name":"n"}"#, 6, "one"),
            (
                ADD.to_vec(),
                r#"{"cniVersion":"1.0.0","name":"n","ipam":{"type":"host-local"}}"#,
                2,
                "ipam",
            ),
            (
                ADD.to_vec(),
                r#"{"cniVersion":"1.0.0","name":"n","stroe":"etcd://x:1"}"#,
                2,
                "stroe",
            ),
            (
                vec![
                    ("CNI_COMMAND", "DEL"),
                    ("CNI_CONTAINERID", "c1"),
                    ("CNI_IFNAME", "eth0"),
                ],
                r#"{"cniVersion":"1.0.0","name":"n","store":"consul://x"}"#,
                7,
                "consul",
            ),
            (
                ADD.to_vec(),
                r#"{"cniVersion":"1.0.0","name":"-n"}"#,
                7,
                "-n",
            ),
            (
                ADD.to_vec(),
                r#"{"cniVersion":"1.0.0","name":"n"}"#,
                3,
                "/nonexistent/netns",
            ),
            (ADD.to_vec(), r#"{"cniVersion":"1.0.0"}"#, 7, "name"),
        ];
        for (vars, stdin, code, piece) in cases {
            let (ok, v) = call(&vars, stdin);
            assert!(!ok, "{vars:?} {stdin}");
            assert_eq!(v["code"], code, "{vars:?} {stdin}: {v}");
            assert!(v["msg"].as_str().is_some_and(|m| !m.is_empty()));
            assert!(
                v["details"].as_str().unwrap().contains(piece),
                "{piece}: {v}"
            );
            assert!(v["cniVersion"].is_string());
        }
    }
}
