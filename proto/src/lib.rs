//! The mesh's wire contracts, generated from the `.proto` files in `proto/`.
//! Modules mirror the protobuf packages; the short aliases below are what
//! the rest of the workspace uses.
#![forbid(unsafe_code)]

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// Protobuf over gRPC, as tonic's own codec, with 1 KiB starting buffers
/// instead of 8 KiB. Each stream keeps one buffer per direction, grown to
/// its largest message; xDS requests (ACKs) and most pushes are far
/// smaller than 8 KiB, and pilot holds one stream per proxy.
#[derive(Debug, Clone)]
pub struct LeanCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for LeanCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

fn lean() -> BufferSettings {
    BufferSettings::new(1024, 32 * 1024)
}

impl<T, U> Codec for LeanCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::raw_encoder(lean())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstCodec::<T, U>::raw_decoder(lean())
    }
}

pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

pub mod istio {
    pub mod v1 {
        pub mod auth {
            tonic::include_proto!("istio.v1.auth");
        }
    }
}

pub mod envoy {
    pub mod config {
        pub mod core {
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
    pub mod service {
        pub mod discovery {
            pub mod v3 {
                tonic::include_proto!("envoy.service.discovery.v3");
            }
        }
    }
}

pub mod mesh {
    pub mod v1 {
        tonic::include_proto!("mesh.v1");
    }
}

pub use envoy::config::core::v3 as core;
pub use envoy::service::discovery::v3 as discovery;
pub use google::rpc;
pub use istio::v1::auth as ca;
pub use mesh::v1 as resources;

/// Type URLs of the mesh's resource types.
pub mod type_url {
    pub const LISTENER: &str = "type.googleapis.com/mesh.v1.Listener";
    pub const ROUTE: &str = "type.googleapis.com/mesh.v1.RouteConfig";
    pub const CLUSTER: &str = "type.googleapis.com/mesh.v1.Cluster";
    pub const ENDPOINTS: &str = "type.googleapis.com/mesh.v1.ClusterEndpoints";

    /// The order in which pilot pushes, so that a route never points at a
    /// cluster the proxy has not heard of yet.
    pub const ALL: [&str; 4] = [LISTENER, CLUSTER, ENDPOINTS, ROUTE];
}

/// The mesh's well-known ports (Istio's numbers).
/// Istio's default share of new traces sampled, in percent.
pub const DEFAULT_TRACE_SAMPLING_PERCENT: f64 = 1.0;

pub mod ports {
    pub const OUTBOUND: u16 = 15001;
    pub const INBOUND: u16 = 15006;
    pub const ADMIN: u16 = 15000;
    pub const HEALTH: u16 = 15021;
    pub const STATS: u16 = 15090;
    pub const CA: u16 = 15011;
    pub const XDS: u16 = 15012;
    pub const CONTROL_PLANE_MONITORING: u16 = 15014;
    /// The proxy's agent: rewritten app probes, `/quitquitquit`.
    pub const AGENT: u16 = 15020;
    /// The injector's admission webhook (HTTPS).
    pub const WEBHOOK: u16 = 15017;
}

/// The app probes the injector moved onto the proxy's agent port: it
/// writes them (JSON) into the sidecar's `MESH_APP_PROBERS`, keyed by the
/// path kubelet now asks (`/app-health/<container>/livez|readyz|startupz`),
/// and the proxy runs the original check against the app when kubelet
/// asks. Field names follow the Kubernetes probe they came from.
pub mod probers {
    use std::collections::BTreeMap;

    pub const ENV: &str = "MESH_APP_PROBERS";

    pub type Probers = BTreeMap<String, Prober>;

    #[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    pub struct Prober {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub http_get: Option<HttpGet>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub tcp_socket: Option<TcpSocket>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub grpc: Option<Grpc>,
        pub timeout_seconds: u32,
    }

    #[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    pub struct HttpGet {
        pub path: String,
        pub port: u16,
        /// `scheme: HTTPS`: TLS to the app, its certificate not checked
        /// (as kubelet does not check it).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        pub https: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub host: Option<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub http_headers: Vec<Header>,
    }

    #[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Header {
        pub name: String,
        pub value: String,
    }

    #[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct TcpSocket {
        pub port: u16,
    }

    /// A gRPC probe: `grpc.health.v1.Health/Check` for `service` (the
    /// server's overall health when absent) must answer SERVING.
    #[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Grpc {
        pub port: u16,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub service: Option<String>,
    }
}

/// Where the app serves its own Prometheus metrics, from the pod's
/// `prometheus.io/port` and `prometheus.io/path` annotations: the injector
/// writes it (JSON) into the sidecar's `MESH_APP_METRICS` and points the
/// annotations at the agent port, whose `/stats/prometheus` serves the
/// app's metrics merged with the proxy's.
pub mod app_metrics {
    pub const ENV: &str = "MESH_APP_METRICS";

    #[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct AppMetrics {
        pub port: u16,
        pub path: String,
    }
}

/// Access-log filters: a Telemetry resource's `filter.expression`, a CEL
/// expression over Envoy's attribute names. Pilot checks it; the proxy
/// evaluates it per request.
pub mod filter {
    /// The attributes a filter may read, as Envoy names them.
    pub const ATTRIBUTES: &str = "request.{method,path,url_path,host,scheme,protocol,headers,duration,size,id,useragent}, \
        response.{code,flags,grpc_status,size,headers}, connection.{mtls,requested_server_name}, \
        source.{address,port,principal}, destination.{address,port,principal}, upstream.{address,cluster}";

    const ROOTS: [&str; 6] = [
        "request",
        "response",
        "connection",
        "source",
        "destination",
        "upstream",
    ];

    /// Compiles `expr`, refusing variables outside [`ATTRIBUTES`].
    pub fn compile(expr: &str) -> Result<cel::Program, String> {
        let program = cel::Program::compile(expr).map_err(|e| format!("not valid CEL: {e}"))?;
        let refs = program.references();
        if let Some(v) = refs.variables().into_iter().find(|v| !ROOTS.contains(v)) {
            return Err(format!(
                "unknown attribute {v:?}; a filter can read {ATTRIBUTES}"
            ));
        }
        Ok(program)
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn filters_compile_or_say_why_not() {
            assert!(super::compile("response.code >= 400").is_ok());
            assert!(
                super::compile("request.headers['x-debug'] == 'on' && response.code != 200")
                    .is_ok()
            );
            let e = super::compile("respnse.code >= 400").unwrap_err();
            assert!(e.contains("\"respnse\""), "{e}");
            let e = super::compile("response.code >=").unwrap_err();
            assert!(e.contains("not valid CEL"), "{e}");
        }
    }
}
