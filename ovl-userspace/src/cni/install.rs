//! `ovl cni install` and `ovl cni conflist`: put the plugin where runtimes
//! look for it (a copy of this binary named `ovl` in a CNI bin directory)
//! and write a network configuration list that uses it.

use std::{
    fs,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, ensure};
use serde::Serialize;

use super::version::SpecVersion;

/// Where runtimes look for plugins unless configured otherwise.
pub const DEFAULT_BIN_DIR: &str = "/opt/cni/bin";

/// The plugin's file name: a network configuration's `"type": "ovl"`.
pub const PLUGIN_NAME: &str = "ovl";

/// Copies the running binary to `<dir>/ovl` (atomically: a runtime never
/// runs a half-written plugin). Returns the installed path.
pub fn install(dir: &Path) -> Result<PathBuf> {
    let me = std::env::current_exe().context("find the running ovl binary")?;
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let target = dir.join(PLUGIN_NAME);
    if fs::canonicalize(&target).ok() == fs::canonicalize(&me).ok() {
        return Ok(target);
    }
    let tmp = dir.join(format!(".{PLUGIN_NAME}.{}", std::process::id()));
    let copied = fs::copy(&me, &tmp)
        .and_then(|_| fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)))
        .and_then(|()| fs::File::open(&tmp)?.sync_all())
        .and_then(|()| fs::rename(&tmp, &target));
    if let Err(e) = copied {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("install {} as {}", me.display(), target.display()));
    }
    Ok(target)
}

/// What a network configuration list for ovl names.
pub struct ConflistSpec<'a> {
    /// The CNI network name runtimes use (`podman run --network NAME`).
    pub name: &'a str,
    /// The ovl network it attaches to.
    pub network: &'a str,
    pub store: &'a str,
    pub node: &'a str,
    pub api_socket: &'a Path,
    pub pin_root: &'a Path,
}

/// A `.conflist` with ovl as its only plugin; refused (nothing printed)
/// for a network name ovl never has, or a CNI name runtimes refuse.
pub fn conflist(spec: &ConflistSpec<'_>) -> Result<String> {
    crate::model::validate_name(spec.network)?;
    ensure!(
        // The spec's rule, which has no length limit (ovl's names have).
        crate::model::is_docker_name(spec.name),
        "invalid CNI network name {:?}: runtimes take a letter or digit, then letters, digits, '_', '.' or '-'; pass --name NAME",
        spec.name
    );
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct List<'a> {
        cni_version: String,
        /// The spec's (1.1.0) list of versions the configuration works
        /// with: a runtime that reads it takes the newest it speaks.
        cni_versions: [String; 2],
        name: &'a str,
        plugins: [Plugin<'a>; 1],
    }
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Plugin<'a> {
        #[serde(rename = "type")]
        plugin_type: &'a str,
        network: &'a str,
        store: &'a str,
        node: &'a str,
        api_socket: &'a Path,
        pin_root: &'a Path,
        /// The runtime passes `-p` as `runtimeConfig.portMappings` (and
        /// `--mac-address` as `runtimeConfig.mac`) only to a plugin that
        /// declares it.
        capabilities: Capabilities,
    }
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Capabilities {
        port_mappings: bool,
        mac: bool,
    }
    let list = List {
        cni_version: SpecVersion::CONFLIST.to_string(),
        cni_versions: [SpecVersion::CONFLIST, SpecVersion::NEWEST].map(|v| v.to_string()),
        name: spec.name,
        plugins: [Plugin {
            plugin_type: PLUGIN_NAME,
            network: spec.network,
            store: spec.store,
            node: spec.node,
            api_socket: spec.api_socket,
            pin_root: spec.pin_root,
            capabilities: Capabilities {
                port_mappings: true,
                mac: true,
            },
        }],
    };
    let mut out = serde_json::to_string_pretty(&list).expect("a conflist serialises");
    out.push('\n');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conflist_names_the_plugin_and_every_option() {
        let text = conflist(&ConflistSpec {
            name: "uber-net",
            network: "uber-net",
            store: "etcd://192.0.2.1:2379",
            node: "host-a",
            api_socket: Path::new("/run/ovl/host-a.sock"),
            pin_root: Path::new("/sys/fs/bpf/ovl"),
        })
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["name"], "uber-net");
        assert_eq!(v["plugins"][0]["type"], "ovl");
        assert_eq!(v["plugins"][0]["store"], "etcd://192.0.2.1:2379");
        assert_eq!(v["plugins"][0]["node"], "host-a");
        assert_eq!(v["plugins"][0]["capabilities"]["portMappings"], true);
        assert_eq!(v["plugins"][0]["capabilities"]["mac"], true);
        // Readable by a libcni that stops at 1.0.0 (podman 4.3), with 1.1.0
        // offered to one that reads `cniVersions`.
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["cniVersions"], serde_json::json!(["1.0.0", "1.1.0"]));
    }
}
