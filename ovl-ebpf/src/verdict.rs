//! The outcome type every handler returns: an action for the hook, or a
//! drop with the network it is charged to. One exit per program counts drops.

use ovl_common::{
    DropReason,
    counters::{UNATTRIBUTED_SLOT, UNATTRIBUTED_VNI},
};

/// A packet ovl decided to drop, and the network whose counters say so.
#[derive(Clone, Copy)]
pub struct Dropped {
    /// VNI of that network (`UNATTRIBUTED_VNI` when unknown).
    pub vni: u32,
    /// Its counters' slot (`UNATTRIBUTED_SLOT` when unknown).
    pub slot: u32,
    /// Why.
    pub reason: DropReason,
}

impl Dropped {
    /// A drop charged to network `vni`, counted in `slot`.
    #[inline(always)]
    pub const fn on(vni: u32, slot: u32, reason: DropReason) -> Self {
        Self { vni, slot, reason }
    }

    /// A drop that belongs to no known network.
    #[inline(always)]
    pub const fn unattributed(reason: DropReason) -> Self {
        Self {
            vni: UNATTRIBUTED_VNI,
            slot: UNATTRIBUTED_SLOT,
            reason,
        }
    }
}

/// Attaches a network to a bare `DropReason` from the parsing helpers.
pub trait OnVni<T> {
    /// Charges an error to network `vni`, counted in `slot`.
    fn on_vni(self, vni: u32, slot: u32) -> Result<T, Dropped>;
}

impl<T> OnVni<T> for Result<T, DropReason> {
    #[inline(always)]
    fn on_vni(self, vni: u32, slot: u32) -> Result<T, Dropped> {
        self.map_err(|reason| Dropped::on(vni, slot, reason))
    }
}

/// Why a frame to Ethernet destination `dst_mac` whose IPv4 destination is
/// no endpoint it could go to is dropped. One sent to a group address
/// (broadcast or multicast: a subnet's broadcast, mDNS, SSDP, LLMNR) is
/// traffic ovl does not carry at all, since it floods nothing: counted
/// `unsupported`, so that `no_endpoint` keeps meaning a peer that is not
/// there (which an operator goes looking for).
#[inline(always)]
pub const fn no_endpoint_for(dst_mac: [u8; 6]) -> DropReason {
    // The I/G bit (IEEE 802-2014 §8.2): the first octet's least
    // significant bit marks a group address.
    if dst_mac[0] & 1 != 0 {
        DropReason::Unsupported
    } else {
        DropReason::NoEndpoint
    }
}
