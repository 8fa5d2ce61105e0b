//! `ovl`: the command line of the overlay. Parses arguments and dispatches
//! to `ovl_userspace::commands` and the agent; nothing else lives here.

use std::{io::Write, net::Ipv4Addr, path::PathBuf, process::ExitCode};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ovl_userspace::{
    agent::{self, AgentOptions},
    bpffs::DEFAULT_PIN_ROOT,
    commands,
    datapath::DecapMode,
    ipam::Subnet,
    model::MacAddr,
    store::Store,
};

/// VXLAN overlay networks switched by eBPF/XDP: Docker's overlay data
/// path without the bridge and the vxlan device.
#[derive(Parser)]
#[command(name = "ovl", version, about)]
struct Cli {
    /// Where the state lives: file:///PATH (embedded, one machine) or
    /// etcd://HOST:PORT[,HOST:PORT...] (a cluster).
    #[arg(
        long,
        env = "OVL_STORE",
        default_value = "file:///var/lib/ovl",
        global = true
    )]
    store: String,
    /// This node's name [default: the hostname].
    #[arg(long, env = "OVL_NODE", global = true)]
    node: Option<String>,
    /// bpffs directory under which each node pins its maps.
    #[arg(long, env = "OVL_PIN_ROOT", default_value = DEFAULT_PIN_ROOT, global = true)]
    pin_root: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create, list, inspect and remove networks.
    #[command(subcommand)]
    Network(NetworkCmd),
    /// Give a container namespace an interface on a network.
    Connect {
        network: String,
        /// Namespace name (under /run/netns) or path.
        netns: String,
        /// Address to use instead of the next free one.
        #[arg(long)]
        ip: Option<Ipv4Addr>,
        /// Endpoint name [default: the namespace name].
        #[arg(long)]
        name: Option<String>,
    },
    /// Remove a container namespace's interface from a network.
    Disconnect { network: String, netns: String },
    /// Run the node agent on an underlay interface (foreground).
    Attach {
        iface: String,
        /// Decap hook: auto, native (XDP), generic (XDP), tc.
        #[arg(long, default_value = "auto")]
        mode: DecapMode,
        /// Seconds the node stays alive in etcd without keep-alives.
        #[arg(long, env = "OVL_LEASE_TTL", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
        lease_ttl: u64,
    },
    /// Clean up after an agent that died.
    Detach { iface: String },
    /// Per-network counters of this node's agent.
    Stats {
        /// Only this network.
        #[arg(long)]
        network: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Node-wide counters instead: underlay frames seen and passed,
        /// drops no network can be charged with.
        #[arg(long, conflicts_with = "network")]
        underlay: bool,
    },
    /// Endpoints behind VTEPs that run no ovl agent (e.g. a kernel vxlan).
    #[command(subcommand)]
    Endpoint(EndpointCmd),
    /// Nodes known to the store.
    #[command(subcommand)]
    Node(NodeCmd),
}

#[derive(Subcommand)]
enum NetworkCmd {
    /// Create a network.
    Create {
        name: String,
        #[arg(long)]
        subnet: Subnet,
        /// VXLAN network identifier [default: next free from 4096].
        #[arg(long)]
        vni: Option<u32>,
        /// Container MTU [default: 1450, a 1500 underlay minus 50].
        #[arg(long)]
        mtu: Option<u32>,
    },
    /// List networks.
    Ls,
    /// Show a network and its endpoints as JSON.
    Inspect { name: String },
    /// Remove a network without endpoints.
    Rm { name: String },
}

#[derive(Subcommand)]
enum EndpointCmd {
    /// Register an endpoint behind a remote VTEP.
    Add {
        network: String,
        ip: Ipv4Addr,
        #[arg(long)]
        vtep: Ipv4Addr,
        /// [default: 02:42 followed by the address]
        #[arg(long)]
        mac: Option<MacAddr>,
        #[arg(long)]
        name: Option<String>,
    },
    /// Remove an endpoint.
    Rm { network: String, ip: Ipv4Addr },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// List nodes and their VTEP addresses.
    Ls,
}

fn node_name(cli: &Option<String>) -> Result<String> {
    if let Some(n) = cli {
        return Ok(n.clone());
    }
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").context("read hostname")?;
    Ok(name.trim().to_owned())
}

async fn run(cli: Cli) -> Result<()> {
    let node = node_name(&cli.node)?;
    // Opened before anything else: a bad URL fails before any change.
    let store = Store::open(&cli.store).await?;
    let store = &store;
    let out = match cli.command {
        Command::Network(NetworkCmd::Create {
            name,
            subnet,
            vni,
            mtu,
        }) => commands::network_create(store, &name, subnet, vni, mtu).await?,
        Command::Network(NetworkCmd::Ls) => commands::network_ls(store).await?,
        Command::Network(NetworkCmd::Inspect { name }) => {
            commands::network_inspect(store, &name).await?
        }
        Command::Network(NetworkCmd::Rm { name }) => commands::network_rm(store, &name).await?,
        Command::Connect {
            network,
            netns,
            ip,
            name,
        } => commands::connect(store, &node, &network, &netns, ip, name).await?,
        Command::Disconnect { network, netns } => {
            commands::disconnect(store, &node, &network, &netns).await?
        }
        Command::Attach {
            iface,
            mode,
            lease_ttl,
        } => {
            let opts = AgentOptions {
                iface,
                mode,
                node,
                pin_root: cli.pin_root,
                lease_ttl: std::time::Duration::from_secs(lease_ttl),
            };
            agent::run(opts, store).await?;
            return Ok(());
        }
        Command::Detach { iface } => commands::detach(&iface, &node, &cli.pin_root).await?,
        Command::Stats {
            underlay: true,
            json,
            ..
        } => commands::underlay_stats(&node, &cli.pin_root, json)?,
        Command::Stats { network, json, .. } => {
            commands::stats(store, &node, &cli.pin_root, network.as_deref(), json).await?
        }
        Command::Endpoint(EndpointCmd::Add {
            network,
            ip,
            vtep,
            mac,
            name,
        }) => commands::endpoint_add(store, &network, ip, vtep, mac, name).await?,
        Command::Endpoint(EndpointCmd::Rm { network, ip }) => {
            commands::endpoint_rm(store, &network, ip).await?
        }
        Command::Node(NodeCmd::Ls) => commands::node_ls(store, &cli.pin_root).await?,
    };
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{}", out.trim_end()) {
        // A closed pipe (`ovl stats | head`) is the reader's choice.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("write to stdout"),
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    // One thread: namespace switches (setns) apply per thread, and the
    // CLI and the agent never need more.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ovl: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ovl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
