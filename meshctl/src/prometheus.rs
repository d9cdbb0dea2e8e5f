//! The demo's Prometheus: a scrape config naming every sidecar's metrics
//! endpoint and the control plane's, and Debian's `prometheus` run with it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::workloads::WorkloadSpec;

/// A Prometheus scrape config: each sidecar's agent port (15020)
/// `/stats/prometheus`, the app's metrics merged with the proxy's (job
/// `kubernetes-pods`, as Istio's merged scrape is named, with `workload`
/// and `namespace` target labels), and pilot's 15014 `/metrics` (job `pilot`).
pub fn scrape_config(specs: &[WorkloadSpec], pilot: SocketAddr, interval: Duration) -> String {
    let mut y = format!(
        "# Written by meshctl demo: every sidecar's metrics endpoint and the control plane's.\n\
         global:\n  scrape_interval: {}s\n  evaluation_interval: {}s\n\
         scrape_configs:\n- job_name: kubernetes-pods\n  metrics_path: /stats/prometheus\n  static_configs:\n",
        interval.as_secs().max(1),
        interval.as_secs().max(1),
    );
    for w in specs {
        y.push_str(&format!(
            "  - targets: ['{}']\n    labels: {{workload: '{}', namespace: '{}'}}\n",
            SocketAddr::new(w.address, mesh_proto::ports::AGENT),
            w.name,
            w.namespace
        ));
    }
    y.push_str(&format!(
        "- job_name: pilot\n  metrics_path: /metrics\n  static_configs:\n  - targets: ['{pilot}']\n"
    ));
    y
}

/// Debian's `prometheus`, if installed.
pub fn find() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join("prometheus"))
        .find(|p| p.is_file())
}

/// A running Prometheus, stopped (by its PID) when dropped.
pub struct Prometheus {
    child: tokio::process::Child,
    pub addr: SocketAddr,
}

impl Prometheus {
    /// Starts `bin` with `config`, its data in `data_dir`, serving on
    /// `listen`, logging to `log`; waits until it says it is ready.
    pub async fn start(
        bin: &Path,
        config: &Path,
        data_dir: &Path,
        listen: SocketAddr,
        log: &Path,
    ) -> anyhow::Result<Self> {
        let out =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = tokio::process::Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", data_dir.display()))
            .arg(format!("--web.listen-address={listen}"))
            .stdin(std::process::Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut p = Self {
            child,
            addr: listen,
        };
        let http = reqwest::Client::builder().no_proxy().build()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = http
                .get(format!("http://{listen}/-/ready"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(p);
            }
            if let Some(status) = p.child.try_wait()? {
                bail!("prometheus exited ({status}); see {}", log.display());
            }
            if Instant::now() > deadline {
                bail!("prometheus not ready after 30s; see {}", log.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// An instant PromQL query: the `data.result` vector.
    pub async fn query(&self, promql: &str) -> anyhow::Result<Vec<Value>> {
        let http = reqwest::Client::builder().no_proxy().build()?;
        let url = reqwest::Url::parse_with_params(
            &format!("http://{}/api/v1/query", self.addr),
            &[("query", promql)],
        )?;
        let v: Value = http.get(url).send().await?.json().await?;
        if v["status"] != "success" {
            bail!("{promql}: {v}");
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}
