//! Live tap: each finished request, streamed as a JSON line to whoever is
//! reading the admin port's `/tap`. Requests are published only while
//! someone listens; the channel never blocks a sender, so a reader that
//! falls behind misses events (told how many, and counted in
//! `mesh_proxy_tap_events_dropped_total`) and never slows the data path.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body::Frame;
use serde::Serialize;
use tokio::sync::broadcast;

use crate::accesslog::Entry;
use crate::pool::Body;

/// Events kept for a reader that has not caught up.
const BACKLOG: usize = 1024;

/// Headers whose values a tap shows only when asked to.
pub const SENSITIVE: [&str; 6] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "x-auth-token",
];

pub struct Tap {
    tx: broadcast::Sender<Arc<Event>>,
    pub dropped: AtomicU64,
}

impl Default for Tap {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(BACKLOG).0,
            dropped: AtomicU64::new(0),
        }
    }
}

/// One finished request.
#[derive(Clone, Debug, Serialize)]
pub struct Event {
    pub time: String,
    /// `outbound` (the workload called out) or `inbound` (it was called).
    pub direction: &'static str,
    pub method: String,
    pub authority: String,
    pub path: String,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<u32>,
    pub latency_ms: f64,
    pub flags: String,
    /// SPIFFE IDs; empty where unknown (plaintext from outside the mesh).
    pub source: String,
    pub destination: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    pub request_headers: BTreeMap<String, String>,
}

impl Event {
    pub fn of(direction: &'static str, e: &Entry<'_>) -> Self {
        let a = e.arrival;
        Self {
            time: humantime::format_rfc3339_millis(a.time).to_string(),
            direction,
            method: a.method.to_string(),
            authority: a.authority.clone(),
            path: a.path.clone(),
            status: e.code,
            grpc_status: e.grpc_status,
            latency_ms: e.duration.as_secs_f64() * 1000.0,
            flags: e.flags.to_string(),
            source: e.source_principal.clone().unwrap_or_default(),
            destination: e.destination_principal.clone().unwrap_or_default(),
            upstream: e.upstream_host.clone(),
            request_headers: a
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
        }
    }
}

/// What a reader wants: requests matching every filter given.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub method: Option<String>,
    pub authority: Option<String>,
    pub path_prefix: Option<String>,
    pub show_sensitive: bool,
}

impl Filter {
    /// From `/tap`'s query: `method`, `authority`, `path` (a prefix),
    /// `show_sensitive=true`.
    pub fn from_query(query: Option<&str>) -> Self {
        let get = |k| crate::wire::query_param(query, k).map(str::to_string);
        Self {
            method: get("method"),
            authority: get("authority"),
            path_prefix: get("path"),
            show_sensitive: get("show_sensitive").as_deref() == Some("true"),
        }
    }

    fn line(&self, e: &Event) -> Option<Bytes> {
        let wanted = self
            .method
            .as_ref()
            .is_none_or(|m| m.eq_ignore_ascii_case(&e.method))
            && self.authority.as_ref().is_none_or(|a| *a == e.authority)
            && self
                .path_prefix
                .as_ref()
                .is_none_or(|p| e.path.starts_with(p.as_str()));
        if !wanted {
            return None;
        }
        let mut json = if self.show_sensitive {
            serde_json::to_string(e)
        } else {
            let mut e = e.clone();
            for (k, v) in e.request_headers.iter_mut() {
                if SENSITIVE.contains(&k.as_str()) {
                    *v = "[redacted]".to_string();
                }
            }
            serde_json::to_string(&e)
        }
        .expect("events serialize");
        json.push('\n');
        Some(Bytes::from(json))
    }
}

impl Tap {
    /// Whether anyone is reading: requests are described only then.
    pub fn active(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    pub fn publish(&self, e: Event) {
        let _ = self.tx.send(Arc::new(e));
    }

    /// A stream of JSON lines for one reader, until it goes away.
    pub fn stream(self: &Arc<Self>, filter: Filter) -> Body {
        let rx = self.tx.subscribe();
        let tap = self.clone();
        let frames = futures::stream::unfold((rx, filter), move |(mut rx, filter)| {
            let tap = tap.clone();
            async move {
                loop {
                    match rx.recv().await {
                        Ok(e) => {
                            if let Some(line) = filter.line(&e) {
                                return Some((Ok(Frame::data(line)), (rx, filter)));
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            tap.dropped.fetch_add(n, Ordering::Relaxed);
                            let line = format!("{{\"dropped\":{n}}}\n");
                            return Some((Ok(Frame::data(Bytes::from(line))), (rx, filter)));
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            }
        });
        http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(frames))
    }
}
