//! ovl's agent and CLI as a library: the model and its stores, IPAM,
//! netlink plumbing, the kernel programs' loader and the node agent.

pub mod agent;
pub mod api;
pub mod attachment;
pub mod bpffs;
pub mod capacity;
pub mod cni;
pub mod commands;
pub mod crypto;
pub mod datapath;
pub mod desired;
pub mod dns;
pub mod docker;
pub mod egress_nat;
pub mod exporter;
pub mod files;
pub mod host_firewall;
pub mod http_server;
pub mod ipam;
pub mod metrics;
pub mod model;
pub mod netlink;
pub mod netns;
pub mod next_hops;
pub mod ports;
pub mod random;
pub mod release;
pub mod store;
#[cfg(test)]
pub(crate) mod testutil;
pub mod validate;
