//! The contract between ovl's kernel programs and its agent: map names, map
//! key/value layouts, counter and drop-reason indices, and protocol constants.
//!
//! Every struct here is part of the kernel/userspace ABI: `#[repr(C)]`, no
//! implicit padding (bytemuck checks it), a size assertion, and integers only
//! (no `bool`, enum or `Option` fields). Addresses are kept in network byte
//! order as `[u8; N]`; VNIs, ifindexes and counters are host-order integers.
#![no_std]

pub mod counters;
pub mod maps;
pub mod wire;

pub use counters::{DropReason, UnderlayCounters, VniCounters};
pub use maps::{
    Endpoint, Iface, NetworkInfo, NextHop, NodeConfig, PathMtu, SubnetInfo, VniAddr, VtepInfo,
};
