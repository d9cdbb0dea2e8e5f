//! The proxy's delta-xDS client. It subscribes to every type, applies each
//! response all-or-nothing (a bad resource NACKs the whole response, naming
//! the resource), keeps serving its last good config while pilot is away,
//! and reconnects with backoff, telling pilot which versions it holds.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use mesh_proto::core::Node;
use mesh_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use mesh_proto::resources as pb;
use mesh_proto::type_url;
use prost::Message;
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::identity::Tls;
use crate::state::{Resources, Snapshot};

const MIN_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What the admin endpoint reports about the control-plane connection.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct XdsStatus {
    pub connected: bool,
    /// The pilot replica connected to, or last tried.
    pub pilot: String,
    /// pilot's snapshot version of the last accepted response.
    pub version: String,
    /// Why the last rejected response was rejected, until a response of
    /// the same type is accepted.
    pub last_nack: Option<String>,
    pub last_nack_type: Option<String>,
    /// Responses applied (ACKed) and rejected (NACKed) since the proxy started.
    pub acks: u64,
    pub nacks: u64,
}

pub struct Client {
    cfg: Arc<Config>,
    resources: Resources,
    /// type -> name -> version, for initial_resource_versions on reconnect.
    versions: HashMap<String, HashMap<String, String>>,
    snapshot_tx: watch::Sender<Arc<Snapshot>>,
    status_tx: watch::Sender<XdsStatus>,
}

impl Client {
    pub fn new(
        cfg: Arc<Config>,
        snapshot_tx: watch::Sender<Arc<Snapshot>>,
        status_tx: watch::Sender<XdsStatus>,
    ) -> Self {
        Self {
            cfg,
            resources: Resources::default(),
            versions: HashMap::new(),
            snapshot_tx,
            status_tx,
        }
    }

    pub async fn run(mut self, mut tls: watch::Receiver<Option<Arc<Tls>>>) {
        let replicas: Vec<std::net::SocketAddr> = std::iter::once(self.cfg.pilot_addr)
            .chain(self.cfg.pilot_replicas.iter().copied())
            .collect();
        let mut backoff = mesh_identity::backoff::Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
        // Each failure moves on to the next replica; backing off only
        // after every one has been tried.
        for (attempt, pilot) in replicas.iter().copied().cycle().enumerate() {
            let current = match tls.wait_for(Option::is_some).await {
                Ok(t) => t.clone().expect("waited for Some"),
                Err(_) => return,
            };
            self.status_tx.send_modify(|s| s.pilot = pilot.to_string());
            let ended = self.session(&current, pilot).await;
            self.status_tx.send_modify(|s| s.connected = false);
            if ended.is_ok() {
                backoff.reset();
            }
            let wait = if (attempt + 1) % replicas.len() == 0 {
                backoff.next_wait()
            } else {
                MIN_BACKOFF
            };
            if let Err(e) = ended {
                tracing::warn!(%pilot, error = %e, retry_in = ?wait, "xDS stream to pilot failed; serving the last good config")
            }
            tokio::time::sleep(wait).await;
        }
    }

    async fn session(
        &mut self,
        tls: &Tls,
        pilot: std::net::SocketAddr,
    ) -> Result<(), tonic::Status> {
        let client_cfg = tls
            .client_for(&self.cfg.pilot_identity())
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        let channel = mesh_identity::grpc::channel_marked(pilot, client_cfg, self.cfg.socket_mark);
        let (tx, rx) = mpsc::channel(16);
        for (i, t) in type_url::ALL.iter().enumerate() {
            let req = DeltaDiscoveryRequest {
                node: (i == 0).then(|| Node {
                    id: self.cfg.proxy_id.clone(),
                    user_agent_name: "mesh-proxy".to_string(),
                    ..Default::default()
                }),
                type_url: t.to_string(),
                initial_resource_versions: self.versions.get(*t).cloned().unwrap_or_default(),
                ..Default::default()
            };
            tx.send(req).await.expect("receiver is alive");
        }
        let mut stream = AggregatedDiscoveryServiceClient::new(channel)
            .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        self.status_tx.send_modify(|s| s.connected = true);
        tracing::info!(%pilot, "connected to pilot");
        while let Some(resp) = stream.message().await? {
            let mut ack = DeltaDiscoveryRequest {
                type_url: resp.type_url.clone(),
                response_nonce: resp.nonce.clone(),
                ..Default::default()
            };
            match self.apply(&resp) {
                Ok(()) => {
                    self.status_tx.send_modify(|s| {
                        s.version = resp.system_version_info.clone();
                        if s.last_nack_type.as_deref() == Some(resp.type_url.as_str()) {
                            s.last_nack = None;
                            s.last_nack_type = None;
                        }
                        s.acks += 1;
                    });
                }
                Err(message) => {
                    tracing::warn!(type_url = %resp.type_url, %message, "rejecting config from pilot (NACK); keeping the last good one");
                    self.status_tx.send_modify(|s| {
                        s.last_nack = Some(message.clone());
                        s.last_nack_type = Some(resp.type_url.clone());
                        s.nacks += 1;
                    });
                    ack.error_detail = Some(mesh_proto::rpc::Status {
                        code: tonic::Code::InvalidArgument as i32,
                        message,
                        details: vec![],
                    });
                }
            }
            if tx.send(ack).await.is_err() {
                break;
            }
        }
        Ok(())
    }

    /// Applies a response whole, or not at all.
    fn apply(&mut self, resp: &DeltaDiscoveryResponse) -> Result<(), String> {
        let mut next = self.resources.clone();
        let t = resp.type_url.as_str();
        for r in &resp.resources {
            let any = r
                .resource
                .as_ref()
                .ok_or_else(|| format!("{t} {}: resource body missing", r.name))?;
            if any.type_url != t {
                return Err(format!(
                    "{t} {}: carries a {} where {t} was expected",
                    r.name, any.type_url
                ));
            }
            decode_into(&mut next, t, &r.name, &any.value)
                .map_err(|e| format!("{t} {}: {e}", r.name))?;
        }
        for name in &resp.removed_resources {
            match t {
                type_url::LISTENER => next.listener = None,
                type_url::ROUTE => drop(next.routes.remove(name)),
                type_url::CLUSTER => drop(next.clusters.remove(name)),
                type_url::ENDPOINTS => drop(next.endpoints.remove(name)),
                _ => {}
            }
        }
        if !type_url::ALL.contains(&t) {
            return Err(format!("unknown type {t}"));
        }
        next.answered.insert(t.to_string());
        let versions = self.versions.entry(t.to_string()).or_default();
        for name in &resp.removed_resources {
            versions.remove(name);
        }
        for r in &resp.resources {
            versions.insert(r.name.clone(), r.version.clone());
        }
        let snapshot = next.snapshot_after(Some(&self.snapshot_tx.borrow()));
        self.snapshot_tx.send_replace(Arc::new(snapshot));
        self.resources = next;
        Ok(())
    }
}

fn decode_into(next: &mut Resources, t: &str, name: &str, bytes: &[u8]) -> Result<(), String> {
    let bad = |e: prost::DecodeError| format!("cannot decode: {e}");
    match t {
        type_url::LISTENER => {
            let l = pb::Listener::decode(bytes).map_err(bad)?;
            let w = l.workload.as_ref().ok_or("listener names no workload")?;
            w.identity
                .parse::<mesh_identity::SpiffeId>()
                .map_err(|e| e.to_string())?;
            if let Some(p) = l.ports.iter().find(|p| p.port == 0 || p.port > 65535) {
                return Err(format!("inbound port {} is not a valid port", p.port));
            }
            crate::authz::Policies::compile(&l.policies)?;
            crate::jwt::Rules::compile(&l.jwt_rules)?;
            if let Some(t) = &l.telemetry {
                crate::accesslog::Rules::compile(&t.access_logs)
                    .map_err(|e| format!("access log {e}"))?;
            }
            next.listener = Some(l);
        }
        type_url::ROUTE => {
            let rc = pb::RouteConfig::decode(bytes).map_err(bad)?;
            crate::route::RouteTable::compile(&rc, None)?;
            next.routes.insert(name.to_string(), rc);
        }
        type_url::CLUSTER => {
            let c = pb::Cluster::decode(bytes).map_err(bad)?;
            crate::origin::Transport::compile(
                c.tls.as_ref(),
                &c.service,
                crate::state::speaks_h2(c.protocol),
                None,
            )
            .map_err(|e| format!("cluster {}: {e}", c.name))?;
            next.clusters.insert(name.to_string(), c);
        }
        type_url::ENDPOINTS => {
            let e = pb::ClusterEndpoints::decode(bytes).map_err(bad)?;
            for ep in &e.endpoints {
                ep.address
                    .parse::<std::net::IpAddr>()
                    .map_err(|_| format!("endpoint address {:?} is not an IP", ep.address))?;
                // Without a sidecar (tunnel port 0) there is no identity to check.
                if ep.tunnel_port != 0 {
                    ep.identity
                        .parse::<mesh_identity::SpiffeId>()
                        .map_err(|e| format!("endpoint {}: {e}", ep.address))?;
                }
            }
            next.endpoints.insert(name.to_string(), e);
        }
        other => return Err(format!("unknown type {other}")),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_proto::discovery::Resource;

    fn client() -> (Client, watch::Receiver<Arc<Snapshot>>) {
        let cfg = Arc::new(Config::new(
            "a.default",
            "spiffe://cluster.local/ns/default/sa/a".parse().unwrap(),
            "127.0.0.1".parse().unwrap(),
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:1".parse().unwrap(),
        ));
        let (snap_tx, snap_rx) = watch::channel(Arc::new(Snapshot::default()));
        let (status_tx, _) = watch::channel(XdsStatus::default());
        (Client::new(cfg, snap_tx, status_tx), snap_rx)
    }

    fn endpoints(name: &str, identity: &str) -> Resource {
        let msg = pb::ClusterEndpoints {
            cluster: name.into(),
            endpoints: vec![pb::Endpoint {
                address: "127.0.0.2".into(),
                port: 9080,
                identity: identity.into(),
                tunnel_port: 15006,
                ..Default::default()
            }],
        };
        Resource {
            name: name.into(),
            version: "1".into(),
            resource: Some(prost_types::Any {
                type_url: type_url::ENDPOINTS.into(),
                value: msg.encode_to_vec(),
            }),
            aliases: vec![],
        }
    }

    fn response(resources: Vec<Resource>) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            type_url: type_url::ENDPOINTS.into(),
            resources,
            nonce: "1-1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_bad_resource_is_nacked_by_name_and_nothing_of_the_response_applies() {
        let (mut c, snap) = client();
        let good = endpoints("outbound|9080||a", "spiffe://cluster.local/ns/default/sa/a");
        c.apply(&response(vec![good])).unwrap();
        assert_eq!(snap.borrow().answered, 1);

        let fresh = endpoints("outbound|9080||b", "spiffe://cluster.local/ns/default/sa/b");
        let bad = endpoints("outbound|9080||c", "not-an-identity");
        let err = c.apply(&response(vec![fresh, bad])).unwrap_err();
        assert!(
            err.contains("outbound|9080||c") && err.contains("not-an-identity"),
            "{err}"
        );
        // Neither the bad nor the good resource of the rejected response applied.
        assert_eq!(c.resources.endpoints.len(), 1);
        assert!(!c.versions[type_url::ENDPOINTS].contains_key("outbound|9080||b"));
    }

    #[test]
    fn a_resource_of_the_wrong_type_is_nacked() {
        let (mut c, _) = client();
        let mut r = endpoints("x", "spiffe://cluster.local/ns/default/sa/a");
        r.resource.as_mut().unwrap().type_url = type_url::ROUTE.into();
        let err = c.apply(&response(vec![r])).unwrap_err();
        assert!(err.contains("carries a"), "{err}");
    }
}
