// Switching the underlay veths between their default offloads and a
// wire-like configuration, and reading back what the kernel actually set.

use anyhow::{Context, Result};

use crate::report::{OffloadRow, PathId, Underlay};
use crate::topology::{Topology, UnderlayLink};

/// `ethtool -K` features turned off for a wire-like underlay: no TSO, no
/// GSO (frames leave at MTU size), no GRO (they are handled one by one on
/// arrival) and no tx checksum offload (full checksums on the wire, as a
/// real NIC computes them in hardware).
const WIRE_LIKE_OFF: [&str; 4] = ["tso", "gso", "gro", "tx"];

/// The `ethtool -k` lines reported, with the short name used in reports.
const REPORTED_FEATURES: [(&str, &str); 4] = [
    ("tcp-segmentation-offload", "tso"),
    ("generic-segmentation-offload", "gso"),
    ("generic-receive-offload", "gro"),
    ("tx-checksumming", "tx-csum"),
];

/// Configures every underlay link of `topology` for `underlay`.
///
/// The offload mode keeps veth defaults, except for ovl in native XDP mode:
/// XDP frames carry no checksum-offload state, so, as ovl's README says, the
/// hosts' underlay must compute checksums itself (`tx off`) or the
/// receiving container drops partially checksummed TCP.
pub fn apply(topology: &Topology, underlay: Underlay) -> Result<()> {
    for link in &topology.links {
        match underlay {
            Underlay::Offloads => {
                let is_host = !link.label.starts_with("router");
                if topology.path == PathId::OvlNative && is_host {
                    set_features(link, &["tx"], "off")?;
                }
            }
            Underlay::WireLike => set_features(link, &WIRE_LIKE_OFF, "off")?,
        }
    }
    Ok(())
}

/// What `apply` is documented to change beyond the mode itself, for notes.
pub fn path_exception(path: PathId) -> Option<&'static str> {
    (path == PathId::OvlNative).then_some(
        "ovl native XDP: `tx off` on both hosts' eth0 in the offload mode too \
         (README: XDP frames lose checksum-offload state; without it the \
         receiving container drops TCP)",
    )
}

fn set_features(link: &UnderlayLink, features: &[&str], state: &str) -> Result<()> {
    let mut argv = vec!["ethtool", "-K", link.iface.as_str()];
    for feature in features {
        argv.extend([*feature, state]);
    }
    link.netns
        .exec(&argv)
        .with_context(|| format!("set offloads on {}", link.label))?;
    Ok(())
}

/// The offload state of every underlay link of `topology`, as the kernel
/// reports it (native XDP, for one, turns its peer's TSO off by itself).
pub fn read(topology: &Topology, underlay: Underlay) -> Result<Vec<OffloadRow>> {
    topology
        .links
        .iter()
        .map(|link| {
            let output = link.netns.exec(&["ethtool", "-k", &link.iface])?;
            Ok(OffloadRow {
                underlay,
                path: topology.path,
                link: link.label.clone(),
                state: summarise(&String::from_utf8_lossy(&output.stdout)),
            })
        })
        .collect()
}

/// `tso on, gso on, gro off, tx-csum on` from `ethtool -k` output
/// (`tcp-segmentation-offload: on`, `... off [fixed]`).
fn summarise(ethtool_k: &str) -> String {
    REPORTED_FEATURES
        .iter()
        .map(|(name, short)| {
            let state = ethtool_k
                .lines()
                .find_map(|line| line.trim().strip_prefix(&format!("{name}: ")))
                .and_then(|rest| rest.split_whitespace().next())
                .unwrap_or("?");
            format!("{short} {state}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ethtool_state_is_summarised_by_short_names() {
        let text = "Features for eth0:\n\
            rx-checksumming: on\n\
            tx-checksumming: off\n\
            \ttx-checksum-ip-generic: off\n\
            tcp-segmentation-offload: off\n\
            \ttx-tcp-segmentation: off [requested on]\n\
            generic-segmentation-offload: on\n\
            generic-receive-offload: off [fixed]\n";
        assert_eq!(summarise(text), "tso off, gso on, gro off, tx-csum off");
    }
}
