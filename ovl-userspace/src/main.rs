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
    ipam::{IpRange, Subnet},
    model::{MacAddr, NetworkSpec},
    store::{EtcdAccess, Store, StoreOptions},
};

/// VXLAN overlay networks switched by eBPF/XDP: Docker's overlay data
/// path without the bridge and the vxlan device.
#[derive(Parser)]
#[command(name = "ovl", version, about)]
struct Cli {
    /// Where the state lives: file:///PATH (embedded, one machine),
    /// etcd://HOST:PORT[,HOST:PORT...] (a cluster) or etcds://... (etcd
    /// over TLS). Options may follow as a query (?cacert=...&user=...).
    #[arg(
        long,
        env = "OVL_STORE",
        default_value = "file:///var/lib/ovl",
        global = true
    )]
    store: String,
    /// CA bundle that signed etcd's server certificate (etcds://).
    #[arg(long, env = "OVL_ETCD_CACERT", global = true)]
    etcd_cacert: Option<PathBuf>,
    /// Client certificate for etcd's client-certificate authentication.
    #[arg(long, env = "OVL_ETCD_CERT", global = true, requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,
    /// Key of --etcd-cert.
    #[arg(long, env = "OVL_ETCD_KEY", global = true, requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// etcd user; the password comes from OVL_ETCD_PASSWORD or
    /// --etcd-password-file, never from the command line.
    #[arg(long, env = "OVL_ETCD_USER", global = true)]
    etcd_user: Option<String>,
    /// File whose first line is the etcd user's password.
    #[arg(long, env = "OVL_ETCD_PASSWORD_FILE", global = true)]
    etcd_password_file: Option<PathBuf>,
    /// Seconds an address freed from a dead (or removed) node is held back
    /// before it is handed out again: the node may only be cut off
    /// [default: 60].
    #[arg(long, env = "OVL_ADDRESS_GRACE", global = true, value_parser = clap::value_parser!(u64).range(0..=86_400))]
    address_grace: Option<u64>,
    /// This node's name [default: the hostname].
    #[arg(long, env = "OVL_NODE", global = true)]
    node: Option<String>,
    /// bpffs directory under which each node pins its maps and links.
    #[arg(long, env = "OVL_PIN_ROOT", default_value = DEFAULT_PIN_ROOT, global = true)]
    pin_root: PathBuf,
    /// The node agent's API socket [default: /run/ovl/<node>.sock].
    #[arg(long, env = "OVL_API_SOCKET", global = true)]
    api_socket: Option<PathBuf>,
    /// The node agent's local state [default: /var/lib/ovl/nodes/<node>].
    #[arg(long, env = "OVL_STATE_DIR", global = true)]
    state_dir: Option<PathBuf>,
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
        /// Take the address from this subnet of the network [default: the
        /// first with a free address].
        #[arg(long)]
        subnet: Option<Subnet>,
        /// Endpoint name [default: the namespace name]: what the network's
        /// other containers resolve to its address; unique on the network.
        #[arg(long)]
        name: Option<String>,
        /// Another name the endpoint resolves as (repeatable); shared, as
        /// `docker run --network-alias`: an alias several endpoints have
        /// resolves to all of them, in turns.
        #[arg(long = "alias", value_name = "NAME")]
        aliases: Vec<String>,
        /// Publish a container port on this node's addresses, as `docker
        /// run -p` (repeatable): [HOSTIP:]HOSTPORT:CONTAINERPORT[/tcp|/udp].
        #[arg(
            long = "publish",
            short = 'p',
            value_name = "[HOSTIP:]HOSTPORT:CPORT[/PROTO]"
        )]
        ports: Vec<ovl_userspace::ports::PublishedPort>,
        /// The container's MAC, as `docker run --mac-address` [default:
        /// 02:42 followed by its address]: unicast, outside 02:42:…,
        /// unique on the network.
        #[arg(long)]
        mac: Option<MacAddr>,
    },
    /// Remove a container namespace's interface from a network.
    Disconnect { network: String, netns: String },
    /// Run the node agent on an underlay interface (foreground). The data
    /// path it sets up keeps forwarding when it exits; a new agent takes
    /// it over without a gap.
    Attach {
        iface: String,
        /// Decap hook: auto, native (XDP), generic (XDP), tc.
        #[arg(long, default_value = "auto")]
        mode: DecapMode,
        /// Seconds the node stays alive in etcd without keep-alives.
        #[arg(long, env = "OVL_LEASE_TTL", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
        lease_ttl: u64,
        /// Serve Prometheus metrics on ADDR:PORT (conventionally port 9474).
        #[arg(long, env = "OVL_METRICS")]
        metrics: Option<std::net::SocketAddr>,
        /// Seconds a local endpoint's network namespace must be gone
        /// (deleted without a disconnect), or the attach that registered it
        /// dead before making its veth, before its endpoint is freed.
        #[arg(long, env = "OVL_GC_GRACE", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=86400))]
        gc_grace: u64,
        #[command(flatten)]
        dns: DnsArgs,
        /// Be Docker's `ovl` network and IPAM driver for the dockerd at this
        /// URL (unix:///var/run/docker.sock), mirroring ovl networks into it;
        /// `auto`: the dockerd at /var/run/docker.sock if it runs as the
        /// agent starts; `off`: never.
        #[arg(long, env = "OVL_DOCKER_HOST", default_value = "auto")]
        docker_host: String,
        /// The Docker plugin's socket.
        #[arg(long, env = "OVL_DOCKER_PLUGIN_SOCKET",
              default_value = ovl_userspace::docker::DEFAULT_PLUGIN_SOCKET)]
        docker_plugin_socket: PathBuf,
        /// UDP port of WireGuard, which carries encrypted networks between
        /// nodes (at this node's VTEP address).
        #[arg(long, env = "OVL_WIREGUARD_PORT", default_value_t = ovl_common::wire::WIREGUARD_PORT, value_parser = clap::value_parser!(u16).range(1..))]
        wireguard_port: u16,
        /// Seconds between automatic rotations of this node's WireGuard key
        /// (12 h, as Docker's overlay).
        #[arg(long, env = "OVL_KEY_ROTATION", default_value_t = 43200, value_parser = clap::value_parser!(u64).range(10..=31_536_000))]
        key_rotation: u64,
    },
    /// Remove this node's data path from IFACE (the underlay it was
    /// attached to; any other is refused): programs, links, maps, pins.
    Detach { iface: String },
    /// The node agent's health in one screen.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
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
        /// The encrypting path instead: WireGuard key, peers, packets
        /// sealed and opened, drops (authentication, replays, unknown keys).
        #[arg(long, conflicts_with_all = ["network", "underlay"])]
        crypto: bool,
    },
    /// Endpoints behind VTEPs that run no ovl agent (e.g. a kernel vxlan).
    #[command(subcommand)]
    Endpoint(EndpointCmd),
    /// Nodes known to the store.
    #[command(subcommand)]
    Node(NodeCmd),
    /// ovl as a CNI plugin (podman, containerd, CRI-O, Kubernetes).
    #[command(subcommand)]
    Cni(CniCmd),
    /// Settings every node of the cluster shares.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Print a systemd template unit running the agent on an interface
    /// (`ovl systemd-unit > /etc/systemd/system/ovl@.service; systemctl
    /// enable --now ovl@eth0`), with this binary's path.
    SystemdUnit,
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Show the cluster's settings.
    Show,
    /// Change the cluster's settings (every agent follows).
    Set {
        /// UDP port of the overlay's VXLAN [default: 4789, IANA's; 8472 is
        /// Linux's and Flannel's].
        #[arg(long)]
        vxlan_port: Option<u16>,
    },
}

#[derive(Subcommand)]
enum CniCmd {
    /// Copy this binary into a CNI bin directory as the plugin `ovl`.
    Install {
        #[arg(long, default_value = ovl_userspace::cni::install::DEFAULT_BIN_DIR)]
        dir: PathBuf,
    },
    /// Print a network configuration list (.conflist) that attaches
    /// containers to NETWORK on this node with this store.
    Conflist {
        network: String,
        /// The CNI network name runtimes use [default: NETWORK].
        #[arg(long)]
        name: Option<String>,
    },
}

/// The containers' resolver (`ovl attach`).
#[derive(clap::Args)]
struct DnsArgs {
    /// No resolver in the containers of this node.
    #[arg(long, env = "OVL_NO_DNS")]
    no_dns: bool,
    /// Resolver for names that are not ovl's, IP[:PORT] (repeatable,
    /// tried in order) [default: the nameservers of /etc/resolv.conf,
    /// followed as it changes].
    #[arg(long = "dns-upstream", env = "OVL_DNS_UPSTREAM", value_delimiter = ',', value_name = "IP[:PORT]", value_parser = ovl_userspace::dns::parse_upstream)]
    upstreams: Vec<std::net::SocketAddr>,
    /// Questions per second each container may ask (bursts of twice
    /// that); more are dropped. 0: no limit.
    #[arg(long, env = "OVL_DNS_RATE_LIMIT", default_value_t = ovl_userspace::dns::DEFAULT_RATE_LIMIT)]
    dns_rate_limit: u32,
}

#[derive(Subcommand)]
enum NetworkCmd {
    /// Create a network.
    Create {
        name: String,
        /// A subnet of the network; repeat for several (routed to each
        /// other by their gateways). IPAM fills them in this order.
        #[arg(long, required = true)]
        subnet: Vec<Subnet>,
        /// A subnet's gateway, matched to the subnet that holds it; repeat
        /// for several [default: each subnet's first address].
        #[arg(long)]
        gateway: Vec<Ipv4Addr>,
        /// Give endpoints that ask for no address one from this CIDR block
        /// of the subnet that holds it (Docker's --ip-range); repeat for
        /// several subnets [default: the whole subnet].
        #[arg(long, value_name = "CIDR")]
        ip_range: Vec<IpRange>,
        /// An address never given to an endpoint (a router or host outside
        /// ovl that uses it), as Docker's --aux-address; repeatable.
        #[arg(long, value_name = "NAME=IP", value_parser = ovl_userspace::model::parse_aux_address)]
        aux_address: Vec<(String, Ipv4Addr)>,
        /// No way out of the overlay: containers get no default route and
        /// no external egress (Docker's --internal).
        #[arg(long)]
        internal: bool,
        /// VXLAN network identifier [default: next free from 4096].
        #[arg(long)]
        vni: Option<u32>,
        /// Container MTU [default: the smallest underlay MTU of the known
        /// nodes minus 50 (110 when encrypted); 1450 (1390) when none is
        /// known].
        #[arg(long)]
        mtu: Option<u32>,
        /// Traffic between nodes leaves only encrypted and authenticated
        /// (WireGuard), as Docker's `--opt encrypted`.
        #[arg(long)]
        encrypted: bool,
    },
    /// List networks.
    Ls {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
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
    /// Remove a static endpoint (`endpoint add`); containers leave with
    /// `ovl disconnect` or their runtime.
    Rm { network: String, ip: Ipv4Addr },
    /// List endpoints (containers and static ones).
    Ls {
        /// Only this network's.
        #[arg(long)]
        network: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// List nodes, their VTEP addresses, liveness and address conflicts.
    Ls {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Remove a dead node: its registration and its endpoints (their
    /// addresses are held back for the address grace). Refused while the
    /// node's agent is alive.
    Rm { node: String },
    /// Give this node a new WireGuard key now (the agent also rotates on
    /// its own, every --key-rotation seconds); no packet is lost.
    RotateKey,
}

/// This node's name: `--node`, else the host name. Checked before any
/// path is built from it, by every command that uses it.
fn node_name(cli: &Option<String>) -> Result<String> {
    let name = match cli {
        Some(n) => n.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("read hostname")?
            .trim()
            .to_owned(),
    };
    ovl_userspace::validate::node_name(&name)?;
    Ok(name)
}

/// The store URL with the store flags folded into its options, so every
/// consumer (the agent too) gets one self-contained string.
fn store_url(cli: &Cli) -> String {
    ovl_userspace::store::options::with_options(&cli.store, &store_options(cli))
}

/// The store flags as options of the store URL.
fn store_options(cli: &Cli) -> StoreOptions {
    StoreOptions {
        etcd: EtcdAccess {
            cacert: cli.etcd_cacert.clone(),
            cert: cli.etcd_cert.clone(),
            key: cli.etcd_key.clone(),
            user: cli.etcd_user.clone(),
            password_file: cli.etcd_password_file.clone(),
        },
        address_grace: cli.address_grace.map(std::time::Duration::from_secs),
        lock_timeout: None,
    }
}

/// Commands that act as this node (and so build paths from its name).
fn uses_node(command: &Command) -> bool {
    matches!(
        command,
        Command::Attach { .. }
            | Command::Status { .. }
            | Command::Detach { .. }
            | Command::Connect { .. }
            | Command::Disconnect { .. }
            | Command::Stats { .. }
            | Command::Node(NodeCmd::RotateKey)
            | Command::Cni(CniCmd::Conflist { .. })
    )
}

async fn run(cli: Cli) -> Result<()> {
    let store_url = store_url(&cli);
    // Commands that do not act as a node work whatever the host name is.
    let node = if uses_node(&cli.command) {
        node_name(&cli.node)?
    } else {
        cli.node.clone().unwrap_or_default()
    };
    let api_socket = cli
        .api_socket
        .clone()
        .unwrap_or_else(|| ovl_userspace::api::default_socket(&node));
    if let Command::Attach {
        iface,
        mode,
        lease_ttl,
        metrics,
        gc_grace,
        dns,
        docker_host,
        docker_plugin_socket,
        wireguard_port,
        key_rotation,
    } = cli.command
    {
        let state_dir = cli
            .state_dir
            .unwrap_or_else(|| PathBuf::from("/var/lib/ovl/nodes").join(&node));
        return agent::run(AgentOptions {
            iface,
            mode,
            node,
            pin_root: cli.pin_root,
            lease_ttl: std::time::Duration::from_secs(lease_ttl),
            store_url,
            api_socket,
            metrics,
            state_dir,
            gc_grace: std::time::Duration::from_secs(gc_grace),
            dns: ovl_userspace::dns::Options {
                enabled: !dns.no_dns,
                upstreams: dns.upstreams,
                rate_limit: dns.dns_rate_limit,
            },
            docker: ovl_userspace::docker::DockerOptions::resolve(
                &docker_host,
                std::path::Path::new(ovl_userspace::docker::DEFAULT_DOCKER_SOCKET),
                docker_plugin_socket,
            ),
            wireguard_port,
            key_rotation: std::time::Duration::from_secs(key_rotation),
        })
        .await;
    }
    if let Command::Status { json } = cli.command {
        return print(commands::status(&api_socket, &node, &cli.pin_root, json).await?);
    }
    if let Command::Node(NodeCmd::RotateKey) = &cli.command {
        return print(ovl_userspace::crypto::cli::rotate_key(&api_socket, &node).await?);
    }
    if let Command::Stats {
        crypto: true, json, ..
    } = &cli.command
    {
        return print(ovl_userspace::crypto::cli::stats(&api_socket, &node, *json).await?);
    }
    if let Command::Cni(cmd) = &cli.command {
        return print(cni_command(cmd, &cli, &node, &api_socket)?);
    }
    if let Command::SystemdUnit = &cli.command {
        let exe = std::env::current_exe().context("find the path of this ovl binary")?;
        return print(ovl_userspace::agent::service::unit(&exe)?);
    }
    if let Command::Detach { iface } = &cli.command {
        return print(commands::detach(iface, &node, &cli.pin_root, &api_socket).await?);
    }
    // Counters are the agent's: asked of it without the store, which only
    // names the pinned counters when no agent runs (an unreachable store
    // must not hide what a running agent answers).
    if let Command::Stats {
        underlay: true,
        json,
        ..
    } = &cli.command
    {
        return print(commands::underlay_stats(&api_socket, &node, &cli.pin_root, *json).await?);
    }
    if let Command::Stats { network, json, .. } = &cli.command {
        return print(
            commands::stats(
                &store_url,
                &api_socket,
                &node,
                &cli.pin_root,
                network.as_deref(),
                *json,
            )
            .await?,
        );
    }
    // Opened before anything else: a bad URL fails before any change.
    let store = Store::open(&store_url).await?;
    let store = &store;
    let out = match cli.command {
        Command::Network(NetworkCmd::Create {
            name,
            subnet,
            gateway,
            ip_range,
            aux_address,
            internal,
            vni,
            mtu,
            encrypted,
        }) => {
            let spec = NetworkSpec {
                name,
                subnets: subnet,
                gateways: gateway,
                ranges: ip_range,
                aux_addresses: aux_address,
                vni,
                mtu,
                internal,
                encrypted,
            };
            commands::network_create(store, spec).await?
        }
        Command::Network(NetworkCmd::Ls { json }) => commands::network_ls(store, json).await?,
        Command::Network(NetworkCmd::Inspect { name }) => {
            commands::network_inspect(store, &name).await?
        }
        Command::Network(NetworkCmd::Rm { name }) => commands::network_rm(store, &name).await?,
        Command::Connect {
            network,
            netns,
            ip,
            subnet,
            name,
            aliases,
            ports,
            mac,
        } => {
            let req = ovl_userspace::attachment::Request {
                network,
                node: node.clone(),
                netns: ovl_userspace::netns::normalise(&netns)?,
                ifname: None,
                name,
                fallback_name: None,
                aliases,
                ip,
                subnet,
                owner: None,
                ports,
                mac,
            };
            commands::connect(store, &api_socket, &req).await?
        }
        Command::Disconnect { network, netns } => {
            let netns = ovl_userspace::netns::normalise(&netns)?;
            commands::disconnect(store, &node, &network, &netns).await?
        }
        Command::Attach { .. }
        | Command::Status { .. }
        | Command::Detach { .. }
        | Command::Stats { .. }
        | Command::Cni(_)
        | Command::SystemdUnit => {
            unreachable!("dispatched above")
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
        Command::Endpoint(EndpointCmd::Ls { network, json }) => {
            commands::endpoint_ls(store, network.as_deref(), json).await?
        }
        Command::Node(NodeCmd::Ls { json }) => {
            commands::node_ls(store, &cli.pin_root, json).await?
        }
        Command::Node(NodeCmd::Rm { node }) => {
            commands::node_rm(store, &cli.pin_root, &node).await?
        }
        Command::Node(NodeCmd::RotateKey) => unreachable!("dispatched above"),
        Command::Cluster(ClusterCmd::Show) => commands::cluster_show(store).await?,
        Command::Cluster(ClusterCmd::Set { vxlan_port }) => {
            commands::cluster_set(store, vxlan_port).await?
        }
    };
    print(out)
}

fn cni_command(
    cmd: &CniCmd,
    cli: &Cli,
    node: &str,
    api_socket: &std::path::Path,
) -> Result<String> {
    use ovl_userspace::cni::install;
    match cmd {
        CniCmd::Install { dir } => {
            let path = install::install(dir)?;
            Ok(format!(
                "installed the ovl CNI plugin as {}",
                path.display()
            ))
        }
        CniCmd::Conflist { network, name } => {
            // The plugin runs in the runtime's working directory: every
            // path it is given must be absolute.
            let absolute = |p: &std::path::Path| {
                std::path::absolute(p).with_context(|| format!("make {} absolute", p.display()))
            };
            let mut options = store_options(cli);
            let etcd = &mut options.etcd;
            for path in [
                &mut etcd.cacert,
                &mut etcd.cert,
                &mut etcd.key,
                &mut etcd.password_file,
            ]
            .into_iter()
            .flatten()
            {
                *path = absolute(path)?;
            }
            let store = ovl_userspace::store::options::with_options(&cli.store, &options);
            install::conflist(&install::ConflistSpec {
                name: name.as_deref().unwrap_or(network),
                network,
                store: &store,
                node,
                api_socket: &absolute(api_socket)?,
                pin_root: &absolute(&cli.pin_root)?,
            })
        }
    }
}

fn print(out: String) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{}", out.trim_end()) {
        // A closed pipe (`ovl stats | head`) is the reader's choice.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other.context("write to stdout"),
    }
}

fn main() -> ExitCode {
    // A runtime runs CNI plugins with no arguments and CNI_COMMAND set.
    if ovl_userspace::cni::invoked_as_plugin() {
        return ovl_userspace::cni::main();
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    // The CLI needs one thread. The agent gets two: its API and metrics
    // answer while its loop waits on the kernel (attaching programs waits
    // for the RTNL lock). Namespace switches (setns) are per thread and
    // never span an await, so either runtime is safe for them.
    let builder = if matches!(cli.command, Command::Attach { .. }) {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(2);
        b
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let mut builder = builder;
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            commands::say(format_args!("cannot start the runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            commands::say(format_args!("{e:#}"));
            ExitCode::FAILURE
        }
    }
}
