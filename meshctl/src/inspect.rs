//! `meshctl proxy-status` and `meshctl proxy-config`: what pilot sent each
//! proxy and whether it was acknowledged (pilot's `/debug/syncz`), and what
//! a proxy holds (its admin `/config_dump`).

use std::fmt::Write;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

async fn get_json(url: &str) -> anyhow::Result<Value> {
    call_json(url, None).await
}

/// GETs `url`, or POSTs `body` to it, and reads the JSON answer; an error
/// names the URL and carries the body of a non-2xx answer.
pub(crate) async fn call_json(url: &str, body: Option<&Value>) -> anyhow::Result<Value> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .build()?;
    let req = match body {
        None => http.get(url),
        Some(b) => http.post(url).json(b),
    };
    let resp = req
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let status = resp.status();
    let text = resp.text().await?;
    if !status.is_success() {
        bail!("{url}: {status}: {}", text.trim());
    }
    serde_json::from_str(&text).with_context(|| format!("{url} did not answer JSON"))
}

/// pilot's view of every proxy.
pub async fn syncz(pilot_debug: SocketAddr) -> anyhow::Result<Vec<Value>> {
    let v = get_json(&format!("http://{pilot_debug}/debug/syncz")).await?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

/// The sync columns, in the order pilot pushes.
const TYPES: [(&str, &str); 4] = [
    ("Cluster", "CLUSTERS"),
    ("ClusterEndpoints", "ENDPOINTS"),
    ("Listener", "LISTENER"),
    ("RouteConfig", "ROUTES"),
];

pub fn render_status(rows: &[Value]) -> String {
    let mut out = String::new();
    let _ = write!(out, "{:<24} {:<10}", "NAME", "CONNECTED");
    for (_, col) in TYPES {
        let _ = write!(out, " {col:<10}");
    }
    let _ = writeln!(out, " {:<8} IDENTITY", "VERSION");
    for r in rows {
        let _ = write!(
            out,
            "{:<24} {:<10}",
            r["id"].as_str().unwrap_or("?"),
            if r["connected"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            }
        );
        for (t, _) in TYPES {
            let _ = write!(out, " {:<10}", r["sync"][t].as_str().unwrap_or("?"));
        }
        let _ = writeln!(
            out,
            " {:<8} {}",
            r["acked_version"].to_string(),
            r["identity"].as_str().unwrap_or("?")
        );
        for (t, status) in r["types"].as_object().into_iter().flatten() {
            if let Some(nack) = status["nack"].as_str() {
                let short = t.rsplit('.').next().unwrap_or(t);
                let _ = writeln!(out, "    {short} rejected: {nack}");
            }
        }
    }
    out
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    Listeners,
    Routes,
    Clusters,
    Endpoints,
    Secret,
}

/// A proxy's `/config_dump`, found through pilot by workload name
/// (`reviews-v1`) or proxy id (`reviews-v1.default`).
pub async fn config_dump(pilot_debug: SocketAddr, proxy: &str) -> anyhow::Result<Value> {
    let admin = admin_addr(pilot_debug, proxy).await?;
    get_json(&format!("http://{admin}/config_dump")).await
}

/// A proxy's admin address, found through pilot by workload name
/// (`reviews-v1`) or proxy id (`reviews-v1.default`).
pub async fn admin_addr(pilot_debug: SocketAddr, proxy: &str) -> anyhow::Result<SocketAddr> {
    let rows = syncz(pilot_debug).await?;
    let row = rows
        .iter()
        .find(|r| {
            let id = r["id"].as_str().unwrap_or_default();
            id == proxy || id.split_once('.').is_some_and(|(name, _)| name == proxy)
        })
        .with_context(|| {
            let known: Vec<&str> = rows.iter().filter_map(|r| r["id"].as_str()).collect();
            format!(
                "pilot knows no proxy {proxy:?}; known: {}",
                known.join(", ")
            )
        })?;
    let address = row["address"]
        .as_str()
        .filter(|a| !a.is_empty())
        .with_context(|| format!("pilot has no address for {proxy} (no WorkloadEntry for it)"))?;
    Ok(SocketAddr::new(address.parse()?, mesh_proto::ports::ADMIN))
}

/// The part of a config dump a section shows, as JSON.
pub fn section(dump: &Value, s: Section) -> Value {
    match s {
        Section::Listeners => dump["listener"].clone(),
        Section::Routes => dump["routes"].clone(),
        Section::Clusters => dump["clusters"].clone(),
        Section::Endpoints => Value::Array(
            dump["clusters"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|c| {
                    c["endpoints"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(move |e| {
                            let mut e = e.clone();
                            e["cluster"] = c["name"].clone();
                            e
                        })
                })
                .collect(),
        ),
        Section::Secret => dump["certificate"].clone(),
    }
}

pub fn render_section(dump: &Value, s: Section) -> String {
    let v = section(dump, s);
    let mut out = String::new();
    let rows = v.as_array().cloned().unwrap_or_default();
    match s {
        Section::Listeners => {
            let w = &v["workload"];
            let _ = writeln!(
                out,
                "inbound: {} ({}), mTLS {}",
                w["name"].as_str().unwrap_or("?"),
                w["identity"].as_str().unwrap_or("?"),
                v["mtls"].as_str().unwrap_or("?")
            );
            let _ = writeln!(out, "{:<8} {:<10} SERVICES", "PORT", "PROTOCOL");
            for p in v["ports"].as_array().into_iter().flatten() {
                let services: Vec<&str> = p["services"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|s| s.as_str())
                    .collect();
                let _ = writeln!(
                    out,
                    "{:<8} {:<10} {}",
                    p["port"].to_string(),
                    p["protocol"].as_str().unwrap_or("?"),
                    services.join(",")
                );
            }
        }
        Section::Routes => {
            let _ = writeln!(
                out,
                "{:<48} {:<12} {:<28} DESTINATIONS",
                "NAME", "ROUTE", "MATCH"
            );
            for r in rows {
                for h in r["routes"].as_array().into_iter().flatten() {
                    let dests: Vec<String> = h["clusters"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|c| {
                            format!("{} {}%", c["cluster"].as_str().unwrap_or("?"), c["weight"])
                        })
                        .collect();
                    let matches = h["matches"]
                        .as_array()
                        .map(|m| {
                            if m.is_empty() {
                                "*".to_string()
                            } else {
                                serde_json::to_string(m).unwrap_or_default()
                            }
                        })
                        .unwrap_or_else(|| "*".into());
                    let _ = writeln!(
                        out,
                        "{:<48} {:<12} {:<28} {}",
                        r["name"].as_str().unwrap_or("?"),
                        h["name"].as_str().unwrap_or("?"),
                        matches,
                        dests.join(", ")
                    );
                }
            }
        }
        Section::Clusters => {
            let _ = writeln!(out, "{:<56} {:<10} ENDPOINTS", "NAME", "PROTOCOL");
            for c in rows {
                let _ = writeln!(
                    out,
                    "{:<56} {:<10} {}",
                    c["name"].as_str().unwrap_or("?"),
                    c["protocol"].as_str().unwrap_or("?"),
                    c["endpoints"].as_array().map_or(0, |e| e.len())
                );
            }
        }
        Section::Endpoints => {
            let _ = writeln!(out, "{:<22} {:<52} CLUSTER", "ENDPOINT", "IDENTITY");
            for e in rows {
                let _ = writeln!(
                    out,
                    "{:<22} {:<52} {}",
                    e["address"].as_str().unwrap_or("?"),
                    e["identity"].as_str().unwrap_or("?"),
                    e["cluster"].as_str().unwrap_or("?")
                );
            }
        }
        Section::Secret => {
            let _ = writeln!(
                out,
                "identity: {}",
                v["identity"].as_str().unwrap_or("(no certificate yet)")
            );
            let _ = writeln!(out, "expires in: {} s", v["seconds_to_expiry"]);
        }
    }
    out
}
