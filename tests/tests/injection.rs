//! What an injected pod's kubelet sees: the probes the injector rewrote
//! reach the sidecar's agent port (15020), and the sidecar runs the app's
//! original checks, answering as the app does. `/quitquitquit` ends the
//! sidecar (Jobs in legacy mode), and `mesh-proxy wait` (the legacy
//! postStart hook) says why it is still waiting.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use mesh_injector::{Config as InjectConfig, NamespacePolicy, Outcome};
use mesh_proxy::Config;

const POD_IP: &str = "127.0.10.81";

/// The pod as its Deployment's template would have it.
const POD: &str = "
apiVersion: v1
kind: Pod
metadata: {name: details-v1-0, namespace: default}
spec:
  containers:
    - name: details
      image: bookinfo/details:1.0
      ports: [{name: http, containerPort: 9080}]
      readinessProbe: {httpGet: {path: /health, port: http}}
      livenessProbe: {tcpSocket: {port: 9080}, timeoutSeconds: 2}
      startupProbe: {httpGet: {path: /status/500, port: 9080}}
";

fn injected() -> Pod {
    let pod: Pod = serde_json::from_value(
        serde_json::to_value(serde_saphyr::from_str::<serde_json::Value>(POD).unwrap()).unwrap(),
    )
    .unwrap();
    match mesh_injector::inject(
        &pod,
        "default",
        &NamespacePolicy::Enabled,
        &InjectConfig::default(),
    )
    .unwrap()
    {
        Outcome::Injected(p) => *p,
        Outcome::Skipped(why) => panic!("not injected: {why}"),
    }
}

/// kubelet's view: the URLs the rewritten probes name, on the pod's IP.
fn probe_urls(pod: &Pod) -> [String; 3] {
    let app = &pod.spec.as_ref().unwrap().containers[0];
    let url = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        let get = p.as_ref().unwrap().http_get.as_ref().unwrap();
        let port = match &get.port {
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => *n,
            other => panic!("probe port {other:?}"),
        };
        format!("http://{POD_IP}:{port}{}", get.path.as_deref().unwrap())
    };
    [
        url(&app.readiness_probe),
        url(&app.liveness_probe),
        url(&app.startup_probe),
    ]
}

fn sidecar_env(pod: &Pod, name: &str) -> String {
    let proxy = pod
        .spec
        .as_ref()
        .unwrap()
        .init_containers
        .as_ref()
        .unwrap()
        .iter()
        .find(|c| c.name == "mesh-proxy")
        .unwrap();
    proxy
        .env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .unwrap()
        .value
        .clone()
        .unwrap()
}

async fn get(http: &reqwest::Client, url: &str) -> (u16, String) {
    let r = http.get(url).send().await.unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn kubelet_probes_reach_the_app_through_the_sidecar() {
    let pod = injected();
    let [ready, live, startup] = probe_urls(&pod);
    assert_eq!(
        ready,
        format!("http://{POD_IP}:15020/app-health/details/readyz")
    );
    let ip: IpAddr = POD_IP.parse().unwrap();

    // The app, and the sidecar with what the injector gave it. No control
    // plane runs: probes do not need one.
    let (app_stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let app = tokio::spawn(mesh_samples::serve(
        mesh_samples::Service::Details,
        "v1",
        SocketAddr::new(ip, mesh_samples::PORT),
        None,
        &[],
        async move {
            let _ = stopped.await;
        },
    ));
    let cfg = Config {
        app_probers: serde_json::from_str(&sidecar_env(&pod, "MESH_APP_PROBERS")).unwrap(),
        ..Config::new(
            "details-v1-0.default",
            mesh_identity::SpiffeId::new("cluster.local", "default", "default"),
            ip,
            "127.0.0.1:9".parse().unwrap(),
            "127.0.0.1:9".parse().unwrap(),
        )
    };
    let proxy = tokio::spawn(mesh_proxy::run(cfg, std::future::pending()));

    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while http
        .get(&ready)
        .send()
        .await
        .map(|r| r.status() != 200)
        .unwrap_or(true)
    {
        assert!(
            Instant::now() < deadline,
            "the readiness probe never passed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(get(&http, &live).await.0, 200);
    // The app's own failure comes through as its status.
    assert_eq!(
        get(&http, &startup).await,
        (500, "the app answered 500 Internal Server Error\n".into())
    );
    assert_eq!(
        get(
            &http,
            &format!("http://{POD_IP}:15020/app-health/other/readyz")
        )
        .await
        .0,
        404
    );

    // The app goes away: both probes fail, saying why.
    app_stop.send(()).unwrap();
    app.await.unwrap().unwrap();
    let (status, why) = get(&http, &live).await;
    assert_eq!(status, 503);
    assert!(
        why.starts_with(&format!("cannot connect to the app on {POD_IP}:9080")),
        "{why}"
    );
    let (status, why) = get(&http, &ready).await;
    assert_eq!(status, 503);
    assert!(
        why.starts_with(&format!("cannot reach the app on {POD_IP}:9080")),
        "{why}"
    );

    // The legacy postStart hook waits, and says what it waited for.
    let health: SocketAddr = format!("{POD_IP}:15021").parse().unwrap();
    let err = tokio::task::spawn_blocking(move || {
        mesh_proxy::cli::wait_ready(health, Duration::from_secs(1))
    })
    .await
    .unwrap()
    .unwrap_err();
    assert_eq!(
        err,
        "the proxy was not ready within 1s: no certificate from citadel yet"
    );

    // A Job's last container is done: /quitquitquit ends the sidecar.
    let r = http
        .post(format!("http://{POD_IP}:15020/quitquitquit"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    tokio::time::timeout(Duration::from_secs(10), proxy)
        .await
        .expect("the sidecar did not exit after /quitquitquit")
        .unwrap()
        .unwrap();
}
