//! `meshctl ca status` and `meshctl ca rotate`: the operator's side of
//! citadel's `CaAdmin` service.
//!
//! In local mode meshctl authenticates as the mesh admin
//! (`spiffe://<td>/ns/mesh-system/sa/mesh-admin`) with a short-lived token
//! it mints from citadel's state directory (whoever can read that
//! directory holds the CA anyway), and trusts the bundle citadel keeps
//! there. Each call reconnects with the bundle as it stands then, so the
//! connection survives the rotation it drives.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use mesh_proto::resources::ca_admin_client::CaAdminClient;
use mesh_proto::resources::rotate_request::Step;
use mesh_proto::resources::{CaStatus, CaStatusRequest, RotateRequest};

/// How long an admin token meshctl mints lives.
const ADMIN_TOKEN_TTL: Duration = Duration::from_secs(300);

pub struct Admin {
    addr: SocketAddr,
    citadel_state: PathBuf,
    trust_domain: String,
    token: String,
}

impl Admin {
    /// Admin access to the citadel at `addr` whose state lives in
    /// `citadel_state` (`<demo state dir>/citadel`).
    pub fn local(addr: SocketAddr, citadel_state: &Path) -> anyhow::Result<Self> {
        let key = citadel_state.join(mesh_citadel::token::TOKEN_KEY_FILE);
        if !key.exists() {
            bail!(
                "{} does not exist: point --state-dir at the directory `meshctl demo` printed (it holds citadel/)",
                key.display()
            );
        }
        let signer = mesh_citadel::TokenSigner::open(citadel_state)?;
        let trust_domain = mesh_identity::DEFAULT_TRUST_DOMAIN.to_string();
        let token = signer.mint(
            &mesh_citadel::admin_identity(&trust_domain),
            ADMIN_TOKEN_TTL,
        );
        Ok(Self {
            addr,
            citadel_state: citadel_state.to_path_buf(),
            trust_domain,
            token,
        })
    }

    fn client(&self) -> anyhow::Result<CaAdminClient<tonic::transport::Channel>> {
        let file = self
            .citadel_state
            .join(mesh_citadel::authority::BUNDLE_FILE);
        let pem = std::fs::read_to_string(&file)
            .with_context(|| format!("reading citadel's trust bundle {}", file.display()))?;
        let roots = std::sync::Arc::new(mesh_identity::root_store(&pem)?);
        let tls = mesh_identity::client_config(
            None,
            roots,
            mesh_identity::grpc::citadel_identity(&self.trust_domain),
            &[b"h2"],
        )?;
        Ok(CaAdminClient::new(mesh_identity::grpc::channel(
            self.addr, tls,
        )))
    }

    fn request<T>(&self, body: T) -> anyhow::Result<tonic::Request<T>> {
        let mut req = tonic::Request::new(body);
        req.metadata_mut()
            .insert("authorization", format!("Bearer {}", self.token).parse()?);
        Ok(req)
    }

    pub async fn status(&self) -> anyhow::Result<CaStatus> {
        let req = self.request(CaStatusRequest {})?;
        let status = self
            .client()?
            .status(req)
            .await
            .map_err(|s| anyhow::anyhow!("citadel at {}: {}", self.addr, s.message()))?;
        Ok(status.into_inner())
    }

    async fn step(&self, step: Step, plugin: Option<&Path>) -> anyhow::Result<CaStatus> {
        let req = self.request(RotateRequest {
            step: step as i32,
            plugin_dir: plugin.map(|p| p.display().to_string()).unwrap_or_default(),
        })?;
        let status = self
            .client()?
            .rotate(req)
            .await
            .map_err(|s| anyhow::anyhow!("{}: {}", step.as_str_name(), s.message()))?;
        Ok(status.into_inner())
    }

    /// Runs a root rotation to its end: prepare (both roots trusted), wait
    /// until every workload watching the bundle trusts both; switch (the new
    /// root signs), wait until every workload holds a certificate from it;
    /// commit (the old root goes), wait until every workload has dropped
    /// it. A rotation left half-way (a timeout, a crash) is resumed from
    /// where it stands. `say` hears each step.
    pub async fn rotate(
        &self,
        plugin: Option<&Path>,
        timeout: Duration,
        mut say: impl FnMut(&str),
    ) -> anyhow::Result<CaStatus> {
        let mut status = self.status().await?;
        if status.phase == "steady" {
            status = self.step(Step::Prepare, plugin).await?;
            say(&format!(
                "prepare: new root {} trusted beside the current one (generation {})",
                short(&signing_or_next(&status, "next")),
                status.generation
            ));
        } else if plugin.is_some() {
            bail!(
                "a rotation is already {}; it is resumed without new material (drop --plugin-certs)",
                status.phase
            );
        }
        if status.phase == "prepared" {
            self.wait(&status, timeout, false, &mut say).await?;
            status = self.step(Step::Switch, None).await?;
            say(&format!(
                "switch: new certificates chain to {} (generation {})",
                short(&signing_or_next(&status, "signing")),
                status.generation
            ));
        }
        if status.phase == "switched" {
            self.wait(&status, timeout, true, &mut say).await?;
            status = self.step(Step::Commit, None).await?;
            say(&format!(
                "commit: old root removed from the bundle (generation {})",
                status.generation
            ));
            self.wait(&status, timeout, false, &mut say).await?;
            status = self.status().await?;
        }
        Ok(status)
    }

    /// Waits until every workload watching the bundle has applied
    /// `after.generation` (and, with `reissued`, holds a certificate from the
    /// signing root). Names the stragglers on timeout.
    async fn wait(
        &self,
        after: &CaStatus,
        timeout: Duration,
        reissued: bool,
        say: &mut impl FnMut(&str),
    ) -> anyhow::Result<()> {
        let signing = signing_or_next(after, "signing");
        let start = Instant::now();
        loop {
            let now = self.status().await?;
            let lagging: Vec<String> = now
                .workloads
                .iter()
                .filter(|w| {
                    w.applied_generation < after.generation
                        || (reissued && w.leaf_root_sha256 != signing)
                })
                .map(|w| format!("{} ({})", w.identity, w.peer))
                .collect();
            if lagging.is_empty() {
                say(&format!(
                    "  all {} workloads caught up in {:.1} s",
                    now.workloads.len(),
                    start.elapsed().as_secs_f64()
                ));
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!(
                    "after {timeout:?}, {} workloads have not {}: {}. The rotation stays {}; run `meshctl ca rotate` again to resume",
                    lagging.len(),
                    if reissued {
                        "renewed under the new root"
                    } else {
                        "applied the new bundle"
                    },
                    lagging.join(", "),
                    now.phase
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn signing_or_next(status: &CaStatus, role: &str) -> String {
    status
        .roots
        .iter()
        .find(|r| r.role == role)
        .map(|r| r.sha256.clone())
        .unwrap_or_default()
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(16)]
}

/// `meshctl ca status` for people.
pub fn print_status(s: &CaStatus) {
    println!("phase: {}   generation: {}", s.phase, s.generation);
    println!(
        "{:<66} {:<8} {:<22} {:>7}  SUBJECT",
        "ROOT (SHA-256)", "ROLE", "EXPIRES (UTC)", "ISSUED"
    );
    for r in &s.roots {
        println!(
            "{:<66} {:<8} {:<22} {:>7}  {}",
            r.sha256,
            r.role,
            utc(r.not_after),
            r.issued,
            r.subject
        );
    }
    println!(
        "certificates issued: {}   requests refused: {}",
        s.issued_total, s.refused_total
    );
    println!("workloads watching the bundle: {}", s.workloads.len());
    for w in &s.workloads {
        println!(
            "  {:<55} {:<22} generation {}  cert root {}",
            w.identity,
            w.peer,
            w.applied_generation,
            short(&w.leaf_root_sha256)
        );
    }
}

fn utc(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .map(|t| {
            format!(
                "{:04}-{:02}-{:02} {:02}:{:02}",
                t.year(),
                t.month() as u8,
                t.day(),
                t.hour(),
                t.minute()
            )
        })
        .unwrap_or_else(|_| secs.to_string())
}

/// `meshctl ca status -o json`: the status as one JSON object.
pub fn status_json(s: &CaStatus) -> serde_json::Value {
    serde_json::json!({
        "phase": s.phase,
        "generation": s.generation,
        "issued_total": s.issued_total,
        "refused_total": s.refused_total,
        "roots": s.roots.iter().map(|r| serde_json::json!({
            "sha256": r.sha256,
            "subject": r.subject,
            "role": r.role,
            "not_before": r.not_before,
            "not_after": r.not_after,
            "issued": r.issued,
        })).collect::<Vec<_>>(),
        "workloads": s.workloads.iter().map(|w| serde_json::json!({
            "identity": w.identity,
            "peer": w.peer,
            "applied_generation": w.applied_generation,
            "cert_root_sha256": w.leaf_root_sha256,
        })).collect::<Vec<_>>(),
    })
}
