use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

/// The mesh's command-line tool.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole mesh locally: control plane, sample app, a sidecar per workload.
    Demo {
        /// Send N requests to productpage through the mesh, print a summary,
        /// and exit 0 only if all succeeded with every hop over mutual TLS.
        #[arg(long)]
        requests: Option<usize>,
        /// Directory of Istio YAML to run (default: the bookinfo sample).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where the demo keeps its logs, citadel's state, tokens, the
        /// config and prometheus.yml (default: a fresh temporary directory,
        /// printed, removed at exit).
        #[arg(long, alias = "state-dir")]
        run_dir: Option<PathBuf>,
        /// Also start Debian's Prometheus (if installed) scraping every
        /// sidecar and the control plane, on the control-plane address (with
        /// --transparent, the node's 10.244.0.1), port 9090.
        #[arg(long)]
        prometheus: bool,
        /// Loopback address for citadel and pilot.
        #[arg(long, default_value = meshctl::demo::DEFAULT_CONTROL_PLANE_IP)]
        control_plane_ip: IpAddr,
        /// Run each workload in its own pod (network namespace) with real
        /// iptables capture; needs root.
        #[arg(long)]
        transparent: bool,
        /// Lifetime of every certificate (workloads', pilot's, citadel's),
        /// e.g. 10s: rotation while requests flow.
        #[arg(long, value_parser = humantime::parse_duration)]
        cert_ttl: Option<std::time::Duration>,
        /// Send requests for this long (e.g. 60s), print a summary, and exit
        /// 0 only if every one succeeded over mutual TLS.
        #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "requests")]
        duration: Option<std::time::Duration>,
    },
    /// Per proxy and resource type: SYNCED (acknowledged the latest push),
    /// STALE (sent, not acknowledged, or rejected) or NOT_SENT.
    ProxyStatus {
        /// pilot's debug address.
        #[arg(long, default_value = DEFAULT_PILOT_DEBUG)]
        pilot: SocketAddr,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
    /// What one proxy holds: listeners, routes, clusters, endpoints or secret.
    ProxyConfig {
        /// Workload name (reviews-v1) or proxy id (reviews-v1.default).
        proxy: String,
        section: meshctl::inspect::Section,
        #[arg(long, default_value = DEFAULT_PILOT_DEBUG)]
        pilot: SocketAddr,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Stream the requests a workload's sidecar handles, live: method,
    /// authority, path, status, latency, flags, source and destination
    /// identities. Sensitive headers (authorization, cookies, API keys) are
    /// redacted in -o json unless --show-sensitive.
    Tap {
        /// Workload name (reviews-v1) or proxy id (reviews-v1.default).
        workload: String,
        #[arg(long)]
        method: Option<String>,
        #[arg(long)]
        authority: Option<String>,
        /// Only requests whose path starts with this.
        #[arg(long)]
        path: Option<String>,
        /// Stop after this many requests.
        #[arg(short = 'n', long)]
        count: Option<usize>,
        #[arg(long)]
        show_sensitive: bool,
        #[arg(long, default_value = DEFAULT_PILOT_DEBUG)]
        pilot: SocketAddr,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
    /// The certificate authority: roots, counts, and root rotation.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
        /// citadel's address.
        #[arg(long, global = true, default_value = DEFAULT_CA)]
        ca_addr: SocketAddr,
        /// The mesh's state directory (`meshctl demo` prints it); meshctl
        /// reads citadel's trust bundle and token key there.
        #[arg(long, global = true, env = "MESH_STATE_DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Check Istio YAML as pilot would: errors (exit 1) name the file, the
    /// resource and the field; warnings (selectors that select nothing,
    /// routes shadowed by a catch-all) do not fail.
    Analyze {
        /// Config directories or files.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
    /// AuthorizationPolicy: which apply to a workload, and whether a request
    /// is allowed (exit 0 yes, 1 no, 2 could not decide).
    Authz {
        #[command(subcommand)]
        command: AuthzCommand,
    },
    /// Add the sidecar to workload manifests (Pod, Deployment, StatefulSet,
    /// DaemonSet, ReplicaSet, Job, CronJob, List; multi-document YAML) as
    /// the admission webhook would, printing them to stdout; what was left
    /// alone, and why, goes to stderr.
    KubeInject {
        /// Manifest file, or - for stdin.
        #[arg(short = 'f', long = "filename")]
        filename: PathBuf,
        #[command(flatten)]
        config: mesh_injector::ConfigArgs,
    },
    /// Install the control plane on a Kubernetes cluster (server-side
    /// apply through the kubeconfig), or print its manifests (-o yaml).
    /// Installing again keeps the mesh's CA (the cacerts Secret).
    Install {
        /// Print the manifests instead of applying them.
        #[arg(short = 'o', long, value_enum)]
        output: Option<ManifestFormat>,
        #[command(flatten)]
        opts: InstallArgs,
        #[arg(long, env = "KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
    },
    /// Remove what install applied; the Istio CRDs (and every resource made
    /// from them) only with --purge.
    Uninstall {
        #[arg(long)]
        purge: bool,
        #[arg(long, env = "KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
    },
    /// Say what the cluster lacks for install and injected pods: a
    /// Kubernetes with native sidecars (1.29+), and permission to create
    /// each object. Exit 0 when nothing is missing.
    Precheck {
        #[arg(long, env = "KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
    },
    /// Apply Istio resources to the running local mesh, as `kubectl apply`:
    /// each replaces the resource of its kind, namespace and name.
    Apply {
        /// Files, directories or `-` (standard input).
        #[arg(short = 'f', long = "filename", required = true)]
        filename: Vec<PathBuf>,
        /// The running mesh's state directory (`meshctl demo` prints it).
        #[arg(long, env = "MESH_STATE_DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Delete the Istio resources a file names from the running local mesh.
    Delete {
        /// Files, directories or `-` (standard input).
        #[arg(short = 'f', long = "filename", required = true)]
        filename: Vec<PathBuf>,
        /// Exit 0 even when a resource is not there.
        #[arg(long)]
        ignore_not_found: bool,
        /// The running mesh's state directory (`meshctl demo` prints it).
        #[arg(long, env = "MESH_STATE_DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Run a command as a workload of the running local mesh, behind its
    /// sidecar: `meshctl exec sleep -- curl -s http://reviews:9080/reviews/0`.
    Exec {
        /// The workload (its WorkloadEntry's name), e.g. `sleep`.
        workload: String,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<std::ffi::OsString>,
        /// The running mesh's state directory (`meshctl demo` prints it).
        #[arg(long, env = "MESH_STATE_DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Load a pod's capture rules (used by `demo --transparent` in each pod).
    #[command(hide = true)]
    Capture(mesh_proxy::capture::CaptureConfig),
    /// Run a sidecar (used by `demo` for each pod).
    #[command(hide = true)]
    Proxy(mesh_proxy::cli::ProxyArgs),
    /// Run a sample app (used by `demo` for each pod).
    #[command(hide = true)]
    App(mesh_samples::AppArgs),
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ManifestFormat {
    Yaml,
}

#[derive(clap::Args)]
struct InstallArgs {
    /// The CA to sign with (Istio's plug-in layout: ca-cert.pem,
    /// ca-key.pem, root-cert.pem, cert-chain.pem); default: the cluster's
    /// cacerts Secret if there is one, else a new self-signed root.
    #[arg(long)]
    plugin_certs: Option<PathBuf>,
    /// Image with mesh-citadel, mesh-pilot and mesh-injector.
    #[arg(long, default_value_t = meshctl::install::Options::default().control_plane_image)]
    control_plane_image: String,
    /// Image with mesh-proxy and mesh-iptables.
    #[arg(long, default_value_t = meshctl::install::Options::default().proxy_image)]
    proxy_image: String,
    #[arg(long, default_value = "default")]
    revision: String,
    #[arg(long, default_value_t = 2)]
    replicas: u32,
}

impl InstallArgs {
    fn options(&self) -> meshctl::install::Options {
        meshctl::install::Options {
            control_plane_image: self.control_plane_image.clone(),
            proxy_image: self.proxy_image.clone(),
            revision: self.revision.clone(),
            replicas: self.replicas,
            ..Default::default()
        }
    }
}

#[derive(Subcommand)]
enum CaCommand {
    /// Roots with fingerprints, roles and expiry; certificates issued; the
    /// workloads watching the trust bundle.
    Status {
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Rotate the root with no downtime: trust a new root beside the old,
    /// wait for every workload; sign with the new, wait until every
    /// workload is re-issued; drop the old root. Resumes a rotation left
    /// half-way.
    Rotate {
        /// Bring in this operator material (Istio's plug-in layout) instead
        /// of a root citadel generates.
        #[arg(long)]
        plugin_certs: Option<PathBuf>,
        /// How long to wait for the workloads at each step.
        #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
}

#[derive(Subcommand)]
enum AuthzCommand {
    /// Lists the policies that apply to WORKLOAD; with a request described
    /// (--from, --method, --path, --header, --port, --tcp, --source-ip),
    /// prints `yes` or `no` and the deciding policy and rule. Live (the
    /// workload's sidecar decides over the policies it enforces now), or
    /// offline over --config.
    Check {
        /// Workload name (reviews-v1) or name.namespace.
        workload: String,
        /// Offline: config directories or files, resolved as pilot does.
        #[arg(long, num_args = 1..)]
        config: Vec<PathBuf>,
        /// Live: pilot's debug address, where the sidecar is looked up.
        #[arg(long, default_value = DEFAULT_PILOT_DEBUG)]
        pilot: SocketAddr,
        /// The caller's principal (cluster.local/ns/NS/sa/SA); without it,
        /// a plaintext caller with no sidecar.
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        source_ip: Option<std::net::IpAddr>,
        #[arg(long, default_value = "GET")]
        method: String,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long)]
        host: Option<String>,
        /// A request header, `name=value`; repeatable.
        #[arg(long, value_parser = parse_header)]
        header: Vec<(String, String)>,
        /// The app port (default: the workload's first service port).
        #[arg(long)]
        port: Option<u32>,
        /// A TCP connection instead of an HTTP request.
        #[arg(long)]
        tcp: bool,
        /// The claims of a JWT the request carries (JSON), taken as
        /// verified: `request.auth.*` and requestPrincipals (`iss/sub`).
        #[arg(long)]
        jwt_claims: Option<String>,
    },
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .ok_or_else(|| format!("{s:?} is not name=value"))
}

/// The demo's citadel.
const DEFAULT_CA: &str = "127.0.10.254:15011";
/// The demo control plane's debug address.
const DEFAULT_PILOT_DEBUG: &str = "127.0.10.254:15014";

#[derive(Clone, Copy, clap::ValueEnum)]
enum Output {
    Table,
    Json,
}

fn init_logs(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default.into()),
        )
        .init();
}

/// Commands that only print: like other Unix tools, they end quietly when
/// their reader goes away (`meshctl ca status | head`).
fn die_on_closed_stdout() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: called before any thread starts; restores the default
    // disposition, which installs no handler code.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
}

fn main() {
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Command::Ca { .. }
            | Command::ProxyStatus { .. }
            | Command::ProxyConfig { .. }
            | Command::Tap { .. }
            | Command::KubeInject { .. }
    ) {
        die_on_closed_stdout();
    }
    let result = match cli.command {
        Command::Proxy(args) => {
            init_logs("info");
            mesh_proxy::cli::run_process(args, || {}).map_err(|e| anyhow::anyhow!("{e}"))
        }
        Command::KubeInject { filename, config } => mesh_injector::Config::try_from(config)
            .map_err(anyhow::Error::from)
            .and_then(|cfg| kube_inject(&filename, cfg)),
        Command::Apply {
            filename,
            state_dir,
        } => state_dir_of(state_dir).and_then(|dir| {
            let config = meshctl::apply::config_dir(&dir);
            for line in meshctl::apply::apply(&config, &filename)? {
                println!("{line}");
            }
            Ok(())
        }),
        Command::Delete {
            filename,
            ignore_not_found,
            state_dir,
        } => state_dir_of(state_dir).and_then(|dir| {
            let config = meshctl::apply::config_dir(&dir);
            let (lines, all_found) = meshctl::apply::delete(&config, &filename)?;
            for line in lines {
                if line.starts_with("Error") {
                    eprintln!("{line}");
                } else {
                    println!("{line}");
                }
            }
            if !all_found && !ignore_not_found {
                std::process::exit(1);
            }
            Ok(())
        }),
        Command::Exec {
            workload,
            command,
            state_dir,
        } => state_dir_of(state_dir).and_then(|dir| {
            let status = meshctl::workloads::exec(&dir, &workload, &command)?;
            // The command's own exit status, as kubectl exec gives it.
            std::process::exit(status.code().unwrap_or(1));
        }),
        Command::Analyze { paths, output } => {
            let report = meshctl::analyze::analyze(&paths);
            match output {
                Output::Table => print!("{}", meshctl::analyze::render(&report)),
                Output::Json => match serde_json::to_string_pretty(&report) {
                    Ok(j) => println!("{j}"),
                    Err(e) => eprintln!("error: {e}"),
                },
            }
            std::process::exit(i32::from(report.errors > 0));
        }
        Command::Authz { command } => {
            // Exit 0 allow, 1 deny, 2 could not decide.
            match authz(command) {
                Ok(code) => std::process::exit(code),
                Err(e) => {
                    eprintln!("error: {e:#}");
                    std::process::exit(2);
                }
            }
        }
        command => tokio::runtime::Runtime::new()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(run(command))),
    };
    if let Err(e) = result {
        // The chain of causes on one line, without a backtrace: for people.
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// The running mesh's state directory, or an error saying where to find it.
fn state_dir_of(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    given.ok_or_else(|| {
        anyhow::anyhow!(
            "--state-dir (or MESH_STATE_DIR) is needed: the run directory `meshctl demo` printed"
        )
    })
}

fn kube_inject(file: &Path, cfg: mesh_injector::Config) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::io::Read;
    let mut text = String::new();
    if file == Path::new("-") {
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading stdin")?;
    } else {
        text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    }
    if let Some(note) = cfg
        .mesh_defaults
        .unread_note("mesh config: defaultConfig fields")
    {
        eprintln!("{note}");
    }
    let (yaml, notes) = mesh_injector::workloads::inject_yaml(&text, &cfg)?;
    for note in notes {
        if let Some(why) = note.skipped {
            eprintln!("{}: not injected: {why}", note.workload);
        }
        for warning in note.warnings {
            eprintln!("{}: {warning}", note.workload);
        }
    }
    print!("{yaml}");
    Ok(())
}

fn authz(command: AuthzCommand) -> anyhow::Result<i32> {
    let AuthzCommand::Check {
        workload,
        config,
        pilot,
        from,
        source_ip,
        method,
        path,
        host,
        header,
        port,
        tcp,
        jwt_claims,
    } = command;
    let jwt_claims = jwt_claims
        .map(|j| {
            serde_json::from_str::<serde_json::Value>(&j)
                .ok()
                .filter(|v| v.is_object())
                .ok_or_else(|| anyhow::anyhow!("--jwt-claims {j:?} is not a JSON object"))
        })
        .transpose()?;
    let req = meshctl::authz::Described {
        from,
        source_ip,
        method,
        path,
        host,
        headers: header,
        port,
        tcp,
        jwt_claims,
    };
    let defaults = meshctl::authz::Described::default();
    let described = req.from.is_some()
        || req.source_ip.is_some()
        || req.tcp
        || req.port.is_some()
        || !req.headers.is_empty()
        || req.jwt_claims.is_some()
        || req.method != defaults.method
        || req.path != defaults.path
        || req.host.is_some();
    let req = described.then_some(&req);
    let checked = if config.is_empty() {
        tokio::runtime::Runtime::new()?
            .block_on(meshctl::authz::check_live(pilot, &workload, req))?
    } else {
        meshctl::authz::check(&meshctl::authz::load(&config)?, &workload, req)?
    };
    print!("{}", checked.render());
    Ok(match &checked.decision {
        Some(d) if !d.allowed() => 1,
        _ => 0,
    })
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Demo {
            requests,
            config,
            run_dir,
            prometheus,
            control_plane_ip,
            transparent,
            cert_ttl,
            duration,
        } => {
            init_logs("warn");
            let opts = meshctl::demo::Options {
                requests,
                config_dir: config,
                state_dir: run_dir,
                prometheus,
                control_plane_ip,
                transparent,
                cert_ttl,
                duration,
            };
            if !meshctl::demo::run(opts).await? {
                std::process::exit(1);
            }
        }
        Command::ProxyStatus { pilot, output } => {
            let rows = meshctl::inspect::syncz(pilot).await?;
            match output {
                Output::Table => print!("{}", meshctl::inspect::render_status(&rows)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
            }
        }
        Command::ProxyConfig {
            proxy,
            section,
            pilot,
            output,
        } => {
            let dump = meshctl::inspect::config_dump(pilot, &proxy).await?;
            match output {
                Output::Table => print!("{}", meshctl::inspect::render_section(&dump, section)),
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&meshctl::inspect::section(&dump, section))?
                ),
            }
        }
        Command::Tap {
            workload,
            method,
            authority,
            path,
            count,
            show_sensitive,
            pilot,
            output,
        } => {
            let admin = meshctl::inspect::admin_addr(pilot, &workload).await?;
            let opts = meshctl::tap::Options {
                method,
                authority,
                path,
                show_sensitive,
            };
            let mut left = count;
            meshctl::tap::stream(admin, &opts, |event| {
                match output {
                    Output::Table => println!("{}", meshctl::tap::render(&event)),
                    Output::Json => println!("{event}"),
                }
                let is_request = event.get("dropped").is_none();
                if let Some(n) = left.as_mut().filter(|_| is_request) {
                    *n -= 1;
                }
                left != Some(0)
            })
            .await?;
        }
        Command::Ca {
            command,
            ca_addr,
            state_dir,
        } => {
            let state_dir = state_dir_of(state_dir)?;
            let admin = meshctl::ca::Admin::local(ca_addr, &state_dir.join("citadel"))?;
            match command {
                CaCommand::Status { output } => {
                    let status = admin.status().await?;
                    match output {
                        Output::Table => meshctl::ca::print_status(&status),
                        Output::Json => println!(
                            "{}",
                            serde_json::to_string_pretty(&meshctl::ca::status_json(&status))?
                        ),
                    }
                }
                CaCommand::Rotate {
                    plugin_certs,
                    timeout,
                } => {
                    let plugin = plugin_certs.map(|p| std::path::absolute(&p)).transpose()?;
                    let status = admin
                        .rotate(plugin.as_deref(), timeout, |line| println!("{line}"))
                        .await?;
                    println!();
                    meshctl::ca::print_status(&status);
                }
            }
        }
        Command::Authz { .. }
        | Command::Analyze { .. }
        | Command::KubeInject { .. }
        | Command::Apply { .. }
        | Command::Delete { .. }
        | Command::Exec { .. } => {
            unreachable!("handled before the runtime starts")
        }
        Command::Install {
            output,
            opts,
            kubeconfig,
        } => {
            use meshctl::install::{self, Certs};
            let options = opts.options();
            let (client, certs) = match (output, &opts.plugin_certs) {
                (Some(ManifestFormat::Yaml), plugin) => {
                    (None, Certs::new(plugin.as_deref(), &options.trust_domain)?)
                }
                (None, plugin) => {
                    let client = install::client(kubeconfig.as_ref()).await?;
                    let certs = match plugin {
                        Some(dir) => Certs::new(Some(dir), &options.trust_domain)?,
                        None => {
                            match install::existing_certs(&client, &options.trust_domain).await? {
                                Some(c) => {
                                    eprintln!(
                                        "keeping the mesh's CA from secret {}/{}",
                                        install::NAMESPACE,
                                        install::CACERTS
                                    );
                                    c
                                }
                                None => Certs::new(None, &options.trust_domain)?,
                            }
                        }
                    };
                    (Some(client), certs)
                }
            };
            let objects = install::manifests(&options, &certs);
            for obj in &objects {
                install::check_typed(obj)?;
            }
            match client {
                None => print!("{}", serde_saphyr::to_string_multiple(&objects)?),
                Some(client) => install::apply(&client, &objects, &mut std::io::stdout()).await?,
            }
        }
        Command::Uninstall { purge, kubeconfig } => {
            use meshctl::install;
            let client = install::client(kubeconfig.as_ref()).await?;
            let options = install::Options::default();
            // Names only: the objects install would write.
            let objects =
                install::manifests(&options, &install::Certs::new(None, &options.trust_domain)?);
            install::uninstall(&client, &objects, purge, &mut std::io::stdout()).await?;
        }
        Command::Precheck { kubeconfig } => {
            use meshctl::install;
            let client = install::client(kubeconfig.as_ref()).await?;
            let options = install::Options::default();
            let objects =
                install::manifests(&options, &install::Certs::new(None, &options.trust_domain)?);
            let problems = install::precheck(&client, &objects).await?;
            if problems.is_empty() {
                println!("ready: this cluster can run the mesh");
            } else {
                for p in &problems {
                    println!("missing: {p}");
                }
                std::process::exit(1);
            }
        }
        Command::Capture(cfg) => mesh_proxy::capture::apply(&cfg, mesh_proxy::capture::Family::V4)?,
        Command::Proxy(_) => unreachable!("handled before the runtime starts"),
        Command::App(app) => {
            init_logs("info");
            app.run(mesh_proxy::cli::shutdown_signal()).await?;
        }
    }
    Ok(())
}
