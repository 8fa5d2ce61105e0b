//! The host ends of local container veths as the data path needs them:
//! TSO off, so decapsulated frames sent through them are merged (GRO).

use std::collections::{BTreeMap, BTreeSet};

use crate::netlink;

/// Host ends already brought in line by this agent, by ifindex: each is
/// looked at once, not at every apply.
#[derive(Default)]
pub struct HostEnds {
    checked: BTreeSet<u32>,
}

impl HostEnds {
    /// Turns TSO off on every host end in `ends` (ifindex → name) not yet
    /// looked at: a veth made by an agent older than that setting keeps
    /// TSO on, and veth skips GRO for frames from a sending end with TSO on
    /// (`veth_skb_is_eligible_for_gro`), so decapsulated TCP would reach
    /// the container unmerged until the container reconnected. Forgets the
    /// ends that are no longer local endpoints'. Failures are logged and
    /// retried at the next apply: forwarding works either way.
    pub fn ensure_tso_off(&mut self, ends: &BTreeMap<u32, String>) {
        self.checked.retain(|i| ends.contains_key(i));
        for (ifindex, name) in ends {
            if self.checked.contains(ifindex) {
                continue;
            }
            match turn_tso_off(name) {
                Ok(changed) => {
                    if changed {
                        log::info!(
                            "turned TSO off on {name} (made by an older agent): decapsulated frames to its container are merged (GRO) again"
                        );
                    }
                    self.checked.insert(*ifindex);
                }
                Err(e) => log::warn!("{e:#}; decapsulated TCP to {name} is not merged (GRO)"),
            }
        }
    }
}

/// Turns TSO off on `ifname`; true when it was on.
fn turn_tso_off(ifname: &str) -> anyhow::Result<bool> {
    if !netlink::tso(ifname)? {
        return Ok(false);
    }
    netlink::set_tso(ifname, false)?;
    Ok(true)
}
