// ovl's network-namespace test library: labs that clean up after
// themselves, underlay topologies, the reference overlay and traffic probes.

//! Every scenario builds its world inside a [`Lab`]: namespaces named
//! `ovlt-<tag>-<pid>-<n>-<role>`, documentation addresses only (underlay
//! 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24; overlay 198.18.0.0/15),
//! and traffic only between namespaces the lab made. Requires root.

mod binary;
pub mod bpf;
mod cluster;
mod cmd;
mod cni;
pub mod command;
mod dns_upstream;
mod docker;
mod ecn;
mod etcd;
mod footprint;
mod hooks;
mod interrupt;
mod lab;
mod maps;
mod netns;
mod ovl;
mod pki;
mod podman;
mod probe;
mod process;
mod reference;
mod stale;
mod topology;

pub use binary::{OVL_BIN_ENV, UPGRADE_OBJECT_ENV, ovl_binary, upgrade_object, workspace_root};
pub use cluster::{AGENT_METRICS, Cluster, Pair, ThreeHosts, TwoHosts};
pub use cmd::{run, run_unchecked};
pub use cni::{CniOutput, CniPlugin};
pub use dns_upstream::DnsUpstream;
pub use docker::{
    BUSYBOX_IMAGE, Container as DockerContainer, DOCKER_CLI, DockerCluster, Dockerd,
    DockerdOptions, StoreKind, ovl_network_argv, plugin_call,
};
pub use ecn::{
    CE, ECN_MASK, ECT0, ECT1, NOT_ECT, Received, TosReceiver, clear_congestion, mark_congestion,
    send_udp_with_tos,
};
pub use etcd::{ETCD_CLIENT_PORT, ETCD_PEER_PORT, Etcd, EtcdCluster, EtcdTls};
pub use footprint::Footprint;
pub use hooks::{HookedProgram, hooked_programs};
pub use interrupt::remove_labs_on_interrupt;
pub use lab::{CleanupStage, LAB_NAME_PREFIX, Lab, require_root};
pub use maps::{
    CONFIG_MAP, ENDPOINTS_MAP, MapEndpoint, MapNextHop, MapNodeConfig, NEXT_HOPS_MAP,
    dump_endpoints, dump_next_hop_entries, dump_next_hops, dump_node_config,
};
pub use netns::Netns;
pub use ovl::{Agent, NetCounters, Ovl};
pub use pki::{Ca, CertFiles};
pub use podman::{Container, Podman, REFERENCE_PLUGIN_DIR};
pub use probe::{BackgroundPing, PingResult, iperf3_server, ping, ping_host, wait_until};
pub use process::{ChildHandle, Signal};
pub use reference::{
    CONTAINER_IFACE, MacAddr, OVERLAY_MTU, REF_BRIDGE, REF_VXLAN, RefOverlayNode, VXLAN_OVERHEAD,
    VXLAN_PORT, mac_for,
};
pub use stale::{remove_cgroup_tree, remove_stale_labs};
pub use topology::{
    HOST_IFACE, Host, L2_MAX_HOSTS, SWITCH_BRIDGE, UNDERLAY_MTU, UNDERLAY_PREFIX_LEN, cidr,
    create_veth,
};
