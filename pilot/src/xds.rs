//! The delta ADS server. One task per proxy stream: it answers each type's
//! subscription with that type's resources, pushes only what changed when a
//! new snapshot arrives, and records ACKs and NACKs.

use std::num::NonZeroU64;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use mesh_proto::discovery::aggregated_discovery_service_server::AggregatedDiscoveryService;
use mesh_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use mesh_proto::type_url;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};

use crate::generate::Snapshot;
use crate::status::Tracker;

pub struct Ads {
    pub(crate) snapshots: watch::Receiver<Arc<Snapshot>>,
    pub(crate) status: Arc<Tracker>,
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    /// Turns true when pilot stops: every stream then ends, so proxies
    /// reconnect elsewhere (or to the next pilot) instead of hanging.
    pub(crate) closing: watch::Receiver<bool>,
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let peer = req
            .peer_certs()
            .and_then(|c| {
                c.first()
                    .and_then(|leaf| mesh_identity::identity_of(leaf).ok())
            })
            .ok_or_else(|| Status::unauthenticated("present a mesh client certificate"))?;
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("stream closed before the first request"))?;
        let node_id = first
            .node
            .as_ref()
            .map(|n| n.id.clone())
            .filter(|id| !id.is_empty())
            .ok_or_else(|| Status::invalid_argument("the first request must carry node.id"))?;
        let snapshot = self.snapshots.borrow().clone();
        if let Some(w) = snapshot.model.workloads.get(&node_id) {
            let expected = w.identity(&snapshot.model.trust_domain);
            if expected != peer {
                return Err(Status::permission_denied(format!(
                    "proxy {node_id} must present {expected}, not {peer}"
                )));
            }
        }
        tracing::info!(proxy = %node_id, identity = %peer, "proxy connected");
        let address = snapshot
            .model
            .workloads
            .get(&node_id)
            .map(|w| w.address.as_str())
            .unwrap_or_default();
        self.status.connected(&node_id, &peer.to_string(), address);
        let (tx, rx) = mpsc::channel(16);
        let conn = Connection {
            id: node_id,
            tx,
            status: self.status.clone(),
            metrics: self.metrics.clone(),
            types: Default::default(),
            nonce: 0,
            converging: None,
        };
        tokio::spawn(conn.run(first, inbound, self.snapshots.clone(), self.closing.clone()));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx).map(|r| Ok(*r)),
        )))
    }
}

#[derive(Default)]
struct TypeState {
    /// Whether the proxy asked for this type.
    subscribed: bool,
    /// What the proxy holds (as far as we know), sorted by name: names
    /// shared with the snapshot, versions as numbers (`None`: one pilot
    /// never sent, or 0). A sorted list refilled in place on each push,
    /// rather than a hash map: at thousands of proxies a map's spare
    /// capacity was pilot's largest allocation of its own (`bench-pilot`).
    sent: Vec<(Arc<str>, Option<NonZeroU64>)>,
    /// Names a config change took away but whose removal waits until the
    /// change's routes are sent (make-before-break). Still in `sent`;
    /// sorted, as the walk over `sent` finds them.
    stale: Vec<Arc<str>>,
    answered: bool,
    /// The nonce of a push not yet acknowledged.
    pending: Option<String>,
}

struct Connection {
    id: String,
    /// Boxed: the channel's slots are allocated up front, per proxy.
    tx: mpsc::Sender<Box<DeltaDiscoveryResponse>>,
    status: Arc<Tracker>,
    metrics: Arc<crate::metrics::Metrics>,
    /// By type, in the order of `type_url::ALL`.
    types: [TypeState; 4],
    nonce: u64,
    /// A config change this proxy has not acknowledged all of yet: when it was made.
    converging: Option<std::time::Instant>,
}

impl Connection {
    async fn run(
        mut self,
        first: DeltaDiscoveryRequest,
        mut inbound: Streaming<DeltaDiscoveryRequest>,
        mut snapshots: watch::Receiver<Arc<Snapshot>>,
        mut closing: watch::Receiver<bool>,
    ) {
        let connected_at = self.status.connected_at(&self.id);
        let mut snapshot = snapshots.borrow_and_update().clone();
        let mut ok = self.handle(first, &snapshot).await;
        while ok {
            tokio::select! {
                _ = closing.changed() => break,
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => ok = self.handle(req, &snapshot).await,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(proxy = %self.id, error = %e, "stream ended");
                        break;
                    }
                },
                changed = snapshots.changed() => {
                    if changed.is_err() { break; }
                    snapshot = snapshots.borrow_and_update().clone();
                    self.converging.get_or_insert(snapshot.created);
                    ok = self.change(&snapshot).await;
                }
            }
        }
        tracing::info!(proxy = %self.id, "proxy disconnected");
        if let Some(at) = connected_at {
            self.status.disconnected(&self.id, at);
        }
    }

    /// Sends a config change make-before-break, in the order the xDS
    /// protocol asks of a server: clusters and endpoints first, then
    /// listeners and routes, and only then the clusters and endpoints
    /// nothing routes to any more. Sent the other way round, a proxy briefly
    /// holds a route to a cluster it has already dropped, and answers 503.
    async fn change(&mut self, snapshot: &Snapshot) -> bool {
        for t in PUSH_ORDER {
            if self.state(t).subscribed && !self.push(t, snapshot, Push::Change).await {
                return false;
            }
        }
        for t in HELD_BACK {
            if !self.state(t).stale.is_empty() && !self.remove_stale(t, snapshot).await {
                return false;
            }
        }
        true
    }

    /// The state of type `t`, one of `type_url::ALL`.
    fn state(&mut self, t: &str) -> &mut TypeState {
        state_of(&mut self.types, t)
    }

    /// Returns false once the proxy's side of the stream is gone.
    async fn handle(&mut self, req: DeltaDiscoveryRequest, snapshot: &Snapshot) -> bool {
        let t = req.type_url.clone();
        if !type_url::ALL.contains(&t.as_str()) {
            tracing::warn!(proxy = %self.id, type_url = %t, "ignoring an unknown type");
            return true;
        }
        if !req.response_nonce.is_empty() {
            let nonce = req.response_nonce.clone();
            match req.error_detail {
                Some(err) => {
                    self.metrics.rejected(&t);
                    tracing::warn!(proxy = %self.id, type_url = %t, %nonce, reason = %err.message, "proxy rejected config (NACK)");
                    self.status
                        .update(&self.id, &t, |s| s.nack = Some(err.message));
                }
                None => {
                    self.status.update(&self.id, &t, |s| {
                        s.acked_nonce = nonce.clone();
                        s.nack = None;
                    });
                    if let Some(v) = nonce.split('-').next().and_then(|v| v.parse().ok()) {
                        self.status.acked_version(&self.id, v);
                    }
                    let state = self.state(&t);
                    if state.pending.as_ref() == Some(&nonce) {
                        state.pending = None;
                    }
                    // Everything the change touched is acknowledged: converged.
                    if self.types.iter().all(|s| s.pending.is_none())
                        && let Some(since) = self.converging.take()
                    {
                        self.metrics
                            .convergence
                            .observe(since.elapsed().as_secs_f64());
                    }
                }
            }
            return true;
        }
        // A (re)subscription: wildcard, and whatever the proxy already holds
        // need not be sent again.
        let state = self.state(&t);
        state.subscribed = true;
        let mut sent: Vec<(Arc<str>, Option<NonZeroU64>)> = req
            .initial_resource_versions
            .into_iter()
            .map(|(name, v)| {
                let v = crate::generate::parse_version(&v).and_then(NonZeroU64::new);
                (Arc::from(name), v)
            })
            .collect();
        sent.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        state.sent = sent;
        state.stale.clear();
        state.answered = false;
        self.push(&t, snapshot, Push::Answer).await
    }

    async fn push(&mut self, t: &str, snapshot: &Snapshot, why: Push) -> bool {
        let started = std::time::Instant::now();
        let desired = snapshot.for_proxy(t, &self.id);
        let state = state_of(&mut self.types, t);
        // A change's clusters and endpoints stay until its routes are sent.
        let hold = why == Push::Change && HELD_BACK.contains(&t);
        // Only what changed is copied out of the snapshot. Both lists are
        // sorted by name: one walk finds what changed and what went.
        let mut changed: Vec<&crate::generate::Versioned> = Vec::new();
        let mut removed: Vec<String> = Vec::new();
        let mut stale = std::mem::take(&mut state.stale);
        let mut gone = |(name, _): &(Arc<str>, Option<NonZeroU64>)| {
            if hold {
                stale.push(name.clone());
            } else {
                removed.push(name.to_string());
            }
        };
        let mut held = state.sent.iter().peekable();
        for (name, r) in &desired {
            while let Some(g) = held.next_if(|(n, _)| **n < **name) {
                gone(g);
            }
            match held.next_if(|(n, _)| **n == **name) {
                // Held at this version; `None` (unknown) never matches.
                Some((_, Some(v))) if v.get() == r.version => {}
                _ => changed.push(r),
            }
        }
        held.for_each(gone);
        if changed.is_empty() && removed.is_empty() && why != Push::Answer && state.answered {
            state.stale = stale;
            return true;
        }
        // Refilled in place: 2,000 proxies reallocating their lists on
        // every push left pilot's heap fragmented.
        state.sent.clear();
        let held = desired
            .values()
            .map(|r| (r.name.clone(), NonZeroU64::new(r.version)));
        state.sent.extend(held);
        if !stale.is_empty() {
            // Still the proxy's until `remove_stale`, at a version no
            // longer needed.
            state.sent.extend(stale.iter().map(|n| (n.clone(), None)));
            state.sent.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        }
        state.stale = stale;
        let resources = changed
            .into_iter()
            .map(|r| Resource {
                version: r.version_string(),
                resource: Some(r.any.clone()),
                name: r.name.to_string(),
                aliases: vec![],
            })
            .collect();
        state.answered = true;
        self.send(t, snapshot, resources, removed, started).await
    }

    /// Removes what the last change held back (see `change`).
    async fn remove_stale(&mut self, t: &str, snapshot: &Snapshot) -> bool {
        let started = std::time::Instant::now();
        let state = state_of(&mut self.types, t);
        let stale = std::mem::take(&mut state.stale);
        state.sent.retain(|(n, _)| stale.binary_search(n).is_err());
        let removed = stale.iter().map(|n| n.to_string()).collect();
        self.send(t, snapshot, vec![], removed, started).await
    }

    async fn send(
        &mut self,
        t: &str,
        snapshot: &Snapshot,
        resources: Vec<Resource>,
        removed: Vec<String>,
        started: std::time::Instant,
    ) -> bool {
        let state = state_of(&mut self.types, t);
        self.nonce += 1;
        let nonce = format!("{}-{}", snapshot.version, self.nonce);
        state.pending = Some(nonce.clone());
        self.status
            .update(&self.id, t, |s| s.sent_nonce = nonce.clone());
        let resp = DeltaDiscoveryResponse {
            system_version_info: snapshot.version.to_string(),
            resources,
            type_url: t.to_string(),
            nonce,
            removed_resources: removed,
        };
        let sent = self.tx.send(Box::new(resp)).await.is_ok();
        self.metrics.pushed(t);
        self.metrics
            .push_time
            .observe(started.elapsed().as_secs_f64());
        sent
    }
}

/// Why a type is pushed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Push {
    /// A (re)subscription: answered even when the proxy holds it all.
    Answer,
    /// A config change: what changed; and what went, except clusters and
    /// endpoints, whose removal waits (see `Connection::change`).
    Change,
}

/// The order a config change is pushed in (see `Connection::change`).
const PUSH_ORDER: [&str; 4] = [
    type_url::CLUSTER,
    type_url::ENDPOINTS,
    type_url::LISTENER,
    type_url::ROUTE,
];

/// The types whose removals a change sends last (see `Connection::change`).
const HELD_BACK: [&str; 2] = [type_url::CLUSTER, type_url::ENDPOINTS];

/// The state of type `t`, one of `type_url::ALL`.
fn state_of<'a>(types: &'a mut [TypeState; 4], t: &str) -> &'a mut TypeState {
    let i = type_url::ALL.iter().position(|a| *a == t);
    &mut types[i.expect("a known type")]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;
    use crate::store::ConfigSet;

    /// A mesh of a service per (name, endpoint address), plus the proxy's
    /// own workload `w` in default.
    fn snapshot(services: &[(&str, &str)], version: u64) -> Snapshot {
        let mut yaml = "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: w}\nspec: {address: 10.0.0.9}\n".to_string();
        for (app, address) in services {
            yaml += &format!(
                "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {app}}}\nspec:\n  hosts: [{app}]\n  ports: [{{number: 80, name: http}}]\n  workloadSelector: {{labels: {{app: {app}}}}}\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: w-{app}}}\nspec: {{address: {address}, labels: {{app: {app}}}}}\n"
            );
        }
        let set = ConfigSet {
            resources: crate::store::parse_file(std::path::Path::new("x.yaml"), &yaml).unwrap(),
        };
        Snapshot::build(
            Arc::new(Model::build(&set, "cluster.local").unwrap()),
            version,
        )
    }

    /// A stream for proxy `w.default`, and what it sends.
    fn connection() -> (Connection, mpsc::Receiver<Box<DeltaDiscoveryResponse>>) {
        let (tx, rx) = mpsc::channel(16);
        let conn = Connection {
            id: "w.default".into(),
            tx,
            status: Arc::new(Tracker::default()),
            metrics: Arc::new(crate::metrics::Metrics::default()),
            types: Default::default(),
            nonce: 0,
            converging: None,
        };
        (conn, rx)
    }

    fn names(resp: &DeltaDiscoveryResponse) -> Vec<&str> {
        resp.resources.iter().map(|r| r.name.as_str()).collect()
    }

    #[tokio::test]
    async fn a_push_sends_only_what_changed_and_names_what_went() {
        let (mut conn, mut rx) = connection();
        let (a, b, c) = (
            "outbound|80||a.default.svc.cluster.local",
            "outbound|80||b.default.svc.cluster.local",
            "outbound|80||c.default.svc.cluster.local",
        );
        let first = snapshot(
            &[("a", "10.0.0.1"), ("b", "10.0.0.2"), ("c", "10.0.0.3")],
            1,
        );
        // The proxy (reconnecting) holds b at the current version, c at an
        // old one, and something that is no more.
        let held = first.for_proxy(type_url::ENDPOINTS, "w.default")[b].version_string();
        let subscribe = DeltaDiscoveryRequest {
            type_url: type_url::ENDPOINTS.into(),
            initial_resource_versions: [
                (b.to_string(), held),
                (c.to_string(), "0000000000000001".into()),
                (
                    "outbound|80||zz.default.svc.cluster.local".to_string(),
                    "x".into(),
                ),
            ]
            .into(),
            ..Default::default()
        };
        assert!(conn.handle(subscribe, &first).await);
        let resp = rx.recv().await.unwrap();
        assert_eq!(names(&resp), [a, c], "b is held at this version already");
        assert_eq!(
            resp.removed_resources,
            ["outbound|80||zz.default.svc.cluster.local"]
        );

        // b's endpoint moves: only b is sent.
        let second = snapshot(
            &[("a", "10.0.0.1"), ("b", "10.0.0.5"), ("c", "10.0.0.3")],
            2,
        );
        assert!(conn.change(&second).await);
        let resp = rx.recv().await.unwrap();
        assert_eq!(names(&resp), [b]);
        assert!(resp.removed_resources.is_empty());

        // Nothing changed: nothing is sent.
        assert!(conn.change(&second).await);
        assert!(rx.try_recv().is_err());

        // a and c go, d comes: d is sent, then a and c are named removed.
        let third = snapshot(&[("b", "10.0.0.5"), ("d", "10.0.0.4")], 3);
        assert!(conn.change(&third).await);
        let resp = rx.recv().await.unwrap();
        assert_eq!(names(&resp), ["outbound|80||d.default.svc.cluster.local"]);
        assert!(resp.removed_resources.is_empty());
        let resp = rx.recv().await.unwrap();
        assert!(resp.resources.is_empty());
        assert_eq!(resp.removed_resources, [a, c]);
        assert!(rx.try_recv().is_err());

        // The proxy reconnects holding what it was last told of.
        let d = "outbound|80||d.default.svc.cluster.local";
        let held = third.for_proxy(type_url::ENDPOINTS, "w.default");
        let subscribe = DeltaDiscoveryRequest {
            type_url: type_url::ENDPOINTS.into(),
            initial_resource_versions: [b, d]
                .map(|n| (n.to_string(), held[n].version_string()))
                .into(),
            ..Default::default()
        };
        assert!(conn.handle(subscribe, &third).await);
        let resp = rx.recv().await.unwrap();
        assert!(resp.resources.is_empty() && resp.removed_resources.is_empty());
    }

    /// A change that moves a route to a new cluster and drops the old one
    /// reaches the proxy make-before-break: the new cluster and its
    /// endpoints, then the route, and only then the old cluster's removal.
    /// Otherwise the proxy holds a route to a cluster it no longer has.
    #[tokio::test]
    async fn a_change_removes_clusters_only_after_the_routes_that_used_them() {
        let (mut conn, mut rx) = connection();
        let first = snapshot(&[("a", "10.0.0.1"), ("b", "10.0.0.2")], 1);
        for t in type_url::ALL {
            let subscribe = DeltaDiscoveryRequest {
                type_url: t.into(),
                ..Default::default()
            };
            assert!(conn.handle(subscribe, &first).await);
            rx.recv().await.unwrap();
        }
        let second = snapshot(&[("b", "10.0.0.2"), ("c", "10.0.0.3")], 2);
        assert!(conn.change(&second).await);
        let mut order = vec![];
        while let Ok(resp) = rx.try_recv() {
            let what = |names: Vec<&str>| {
                let mut names: Vec<_> = names
                    .iter()
                    .filter(|n| n.contains("default.svc") || n.contains(":80"))
                    .map(|n| n.split("||").last().unwrap_or(n).to_string())
                    .collect();
                names.sort();
                names.join(",")
            };
            let kind = resp.type_url.rsplit('.').next().unwrap().to_string();
            let removed = resp.removed_resources.iter().map(|n| n.as_str()).collect();
            order.push(format!(
                "{kind} +[{}] -[{}]",
                what(names(&resp)),
                what(removed)
            ));
        }
        let at = |prefix: &str| {
            order
                .iter()
                .position(|o| o.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix} in {order:?}"))
        };
        let added = at("Cluster +[c.default.svc.cluster.local]");
        let routed = at("RouteConfig");
        let removed = at("Cluster +[] -[a.default.svc.cluster.local]");
        assert!(added < routed && routed < removed, "{order:?}");
        at("ClusterEndpoints +[] -[a.default.svc.cluster.local]");
    }
}
