//! What pilot knows of each connected proxy: what it was sent, what it
//! acknowledged, and what it rejected.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;

#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct TypeStatus {
    pub sent_nonce: String,
    pub acked_nonce: String,
    /// The last rejection, if the proxy's latest answer was a NACK.
    pub nack: Option<String>,
}

/// Whether a proxy holds what pilot last sent it, as istioctl puts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Sync {
    /// The latest push was acknowledged.
    Synced,
    /// Sent but not (yet) acknowledged, or rejected.
    Stale,
    /// Nothing of this type was sent.
    NotSent,
}

impl TypeStatus {
    pub fn sync(&self) -> Sync {
        if self.sent_nonce.is_empty() {
            Sync::NotSent
        } else if self.nack.is_none() && self.acked_nonce == self.sent_nonce {
            Sync::Synced
        } else {
            Sync::Stale
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ProxyStatus {
    pub id: String,
    pub identity: String,
    /// The workload's address, where its admin endpoint listens (empty if
    /// the proxy is not a known workload).
    pub address: String,
    pub connected: bool,
    pub connected_at: SystemTime,
    /// Snapshot version of the last push the proxy acknowledged.
    pub acked_version: u64,
    pub types: TypeStatuses,
}

/// Each type's status, in the order of `type_url::ALL`; on the wire, a map
/// by type URL of those pilot has sent or heard of. An array, not a map:
/// pilot keeps one per proxy, thousands of them.
#[derive(Clone, Debug, Default)]
pub struct TypeStatuses([TypeStatus; 4]);

impl TypeStatuses {
    /// The status of `type_url`, if anything was sent or heard of it.
    pub fn get(&self, type_url: &str) -> Option<&TypeStatus> {
        let s = &self.0[index(type_url)?];
        (*s != TypeStatus::default()).then_some(s)
    }

    fn entry(&mut self, type_url: &str) -> Option<&mut TypeStatus> {
        Some(&mut self.0[index(type_url)?])
    }
}

fn index(type_url: &str) -> Option<usize> {
    mesh_proto::type_url::ALL
        .iter()
        .position(|t| *t == type_url)
}

impl Serialize for TypeStatuses {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(
            mesh_proto::type_url::ALL
                .iter()
                .filter_map(|t| Some((*t, self.get(t)?))),
        )
    }
}

#[derive(Default)]
pub struct Tracker(Mutex<BTreeMap<String, ProxyStatus>>);

impl Tracker {
    pub fn connected(&self, id: &str, identity: &str, address: &str) {
        self.0.lock().unwrap().insert(
            id.to_string(),
            ProxyStatus {
                id: id.to_string(),
                identity: identity.to_string(),
                address: address.to_string(),
                connected: true,
                connected_at: SystemTime::now(),
                acked_version: 0,
                types: TypeStatuses::default(),
            },
        );
    }

    pub fn disconnected(&self, id: &str, at: SystemTime) {
        if let Some(p) = self.0.lock().unwrap().get_mut(id) {
            // A newer stream from the same proxy may have replaced this one.
            if p.connected_at == at {
                p.connected = false;
            }
        }
    }

    pub fn update(&self, id: &str, type_url: &str, f: impl FnOnce(&mut TypeStatus)) {
        if let Some(p) = self.0.lock().unwrap().get_mut(id)
            && let Some(s) = p.types.entry(type_url)
        {
            f(s);
        }
    }

    pub fn acked_version(&self, id: &str, version: u64) {
        if let Some(p) = self.0.lock().unwrap().get_mut(id) {
            p.acked_version = p.acked_version.max(version);
        }
    }

    pub fn connected_at(&self, id: &str) -> Option<SystemTime> {
        self.0.lock().unwrap().get(id).map(|p| p.connected_at)
    }

    pub fn all(&self) -> Vec<ProxyStatus> {
        self.0.lock().unwrap().values().cloned().collect()
    }
}
