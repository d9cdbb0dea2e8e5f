//! The proxy's settings, parsed once (by `main` from flags and env vars, or
//! built directly by tests and `meshctl demo`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use mesh_identity::SpiffeId;

#[derive(Clone, Debug)]
pub struct Config {
    /// The xDS node id: `<workload>.<namespace>`.
    pub proxy_id: String,
    /// The identity this proxy's certificate carries.
    pub identity: SpiffeId,
    /// The pod's address: every listener binds here, the app is reached here.
    pub pod_ip: IpAddr,
    pub pilot_addr: SocketAddr,
    /// Other pilot replicas: when the stream to one fails or ends, the
    /// proxy goes on to the next (pilot's state is all in its config, so
    /// any replica serves the same resources, at the same versions).
    pub pilot_replicas: Vec<SocketAddr>,
    pub ca_addr: SocketAddr,
    /// Token granting `identity` at citadel.
    pub ca_token: String,
    /// PEM roots the proxy trusts before citadel tells it more.
    pub roots_pem: String,
    /// Requested certificate lifetime; zero takes citadel's default.
    pub cert_lifetime: Duration,
    /// How long in-flight requests may take to finish once draining starts.
    pub drain_grace: Duration,
    /// What captured traffic to destinations outside the mesh gets.
    pub outbound_policy: OutboundPolicy,
    /// How long a connection of unknown protocol may stay silent before it
    /// is taken for a server-first protocol; zero waits for the client.
    pub protocol_detection_timeout: Duration,
    /// The pod's traffic is captured by iptables (`mesh-iptables`):
    /// listeners bind every address (an OUTPUT redirect arrives on
    /// 127.0.0.1) and the app is reached on 127.0.0.1.
    pub capture: bool,
    /// Mark every socket the proxy opens carries (`SO_MARK`), for capture
    /// rules that cannot tell the proxy by its UID (rootless pods).
    pub socket_mark: Option<u32>,
    pub ports: Ports,
    /// How many retries each destination may take (`budget.rs`).
    pub retry_budget: crate::budget::BudgetConfig,
    /// How much of a request body is kept so it can be retried or mirrored.
    pub retry_buffer_bytes: usize,
    /// The app's own probes, run when kubelet asks the agent port for
    /// `/app-health/...` (written by the injector).
    pub app_probers: mesh_proto::probers::Probers,
    /// Where access logs go; `None` is the proxy's stdout.
    pub access_log_file: Option<std::path::PathBuf>,
    /// The app's own metrics, merged into the agent port's `/stats/prometheus`.
    pub app_metrics: Option<mesh_proto::app_metrics::AppMetrics>,
    /// Threads serving connections, each a single-threaded runtime with
    /// pools of its own; accepted connections are dealt to them in turn
    /// (`server::Shards`). The first is the thread `run` is called on.
    pub threads: usize,
    /// Socket events each serving thread takes per poll (`cli`).
    pub io_events_per_tick: u16,
}

/// How long a client may stay silent before its protocol is taken for one
/// where the server speaks first.
pub const DEFAULT_DETECTION_TIMEOUT: Duration = Duration::from_millis(100);

/// Istio's outboundTrafficPolicy modes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutboundPolicy {
    /// Pass traffic to unknown destinations through to where it was going.
    #[default]
    AllowAny,
    /// Refuse it (HTTP 502, Istio's BlackHoleCluster).
    RegistryOnly,
}

#[derive(Clone, Copy, Debug)]
pub struct Ports {
    pub outbound: u16,
    pub inbound: u16,
    pub admin: u16,
    pub stats: u16,
    pub health: u16,
    pub agent: u16,
}

impl Default for Ports {
    fn default() -> Self {
        use mesh_proto::ports::*;
        Self {
            outbound: OUTBOUND,
            inbound: INBOUND,
            admin: ADMIN,
            stats: STATS,
            health: HEALTH,
            agent: AGENT,
        }
    }
}

impl Config {
    /// A sidecar for `identity` on `pod_ip` with every other setting at its
    /// default (no capture, no mark, citadel's certificate lifetime); the
    /// token and roots are left empty for the caller.
    pub fn new(
        proxy_id: impl Into<String>,
        identity: SpiffeId,
        pod_ip: IpAddr,
        pilot_addr: SocketAddr,
        ca_addr: SocketAddr,
    ) -> Self {
        Self {
            proxy_id: proxy_id.into(),
            identity,
            pod_ip,
            pilot_addr,
            pilot_replicas: vec![],
            ca_addr,
            ca_token: String::new(),
            roots_pem: String::new(),
            cert_lifetime: Duration::ZERO,
            drain_grace: Duration::ZERO,
            outbound_policy: OutboundPolicy::default(),
            protocol_detection_timeout: DEFAULT_DETECTION_TIMEOUT,
            capture: false,
            socket_mark: None,
            ports: Ports::default(),
            retry_budget: Default::default(),
            retry_buffer_bytes: crate::replay::DEFAULT_LIMIT,
            app_probers: Default::default(),
            access_log_file: None,
            app_metrics: None,
            threads: crate::cli::DEFAULT_THREADS,
            io_events_per_tick: crate::cli::DEFAULT_IO_EVENTS_PER_TICK,
        }
    }

    /// The pod's address, or in capture mode the same family's `v4`/`v6`.
    fn pod_or(&self, v4: Ipv4Addr, v6: Ipv6Addr) -> IpAddr {
        match (self.capture, self.pod_ip) {
            (false, ip) => ip,
            (true, IpAddr::V4(_)) => IpAddr::V4(v4),
            (true, IpAddr::V6(_)) => IpAddr::V6(v6),
        }
    }

    /// Where a listener binds: every address in capture mode (an OUTPUT
    /// redirect arrives on loopback).
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(
            self.pod_or(Ipv4Addr::UNSPECIFIED, Ipv6Addr::UNSPECIFIED),
            port,
        )
    }

    /// Where the app listens on `port`: the pod's address, or loopback when
    /// traffic is captured (so the proxy's connection is not captured again).
    pub fn app_addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.pod_or(Ipv4Addr::LOCALHOST, Ipv6Addr::LOCALHOST), port)
    }

    /// Whether `dst` is one of this proxy's own traffic listeners (a
    /// connection there through interception would loop).
    pub fn is_own_listener(&self, dst: SocketAddr) -> bool {
        [self.ports.outbound, self.ports.inbound].contains(&dst.port())
            && (dst.ip() == self.pod_ip || dst.ip().is_loopback() || dst.ip().is_unspecified())
    }

    pub fn pilot_identity(&self) -> SpiffeId {
        SpiffeId::new(&self.identity.trust_domain, "mesh-system", "pilot")
    }
}
