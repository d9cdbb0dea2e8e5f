//! End to end: the bookinfo mesh in-process on loopback, real TLS, real
//! gRPC, real HTTP.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mesh_tests::{Mesh, reviews_all_to};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread")]
async fn request_crosses_productpage_reviews_ratings_over_mtls() {
    let mesh = Mesh::start().await;
    mesh.write_config("reviews-routing.yaml", &reviews_all_to("v2"));
    let http = mesh.client();
    // Wait for the route to reach the client's and productpage's sidecars.
    let deadline = Instant::now() + Duration::from_secs(5);
    let (version, hops) = loop {
        let (v, hops) = mesh.request(&http).await.expect("request succeeds");
        if v == "v2" || Instant::now() > deadline {
            break (v, hops);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(version, "v2");
    let find = |to: &str| {
        hops.iter()
            .find(|h| h.1 == to)
            .unwrap_or_else(|| panic!("no hop to {to}: {hops:?}"))
    };
    let ratings = find("ratings");
    assert_eq!(ratings.0, "reviews");
    assert_eq!(
        ratings.2,
        mesh.identity_of("reviews-v2").to_string(),
        "ratings saw reviews' identity"
    );
    assert_eq!(ratings.3, mesh.identity_of("ratings-v1").to_string());
    let reviews = find("reviews");
    assert_eq!(reviews.2, mesh.identity_of("productpage-v1").to_string());
    // Both sidecars of the reviews -> ratings hop counted it, as Istio labels it.
    let stats = reqwest::get(format!(
        "http://{}:15090/stats/prometheus",
        mesh.workload("ratings-v1").address
    ))
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    let line = stats
        .lines()
        .find(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains("source_workload=\"reviews-v2\"")
        })
        .unwrap_or_else(|| {
            panic!("no destination-reported reviews-v2 -> ratings series in:\n{stats}")
        });
    for label in [
        "source_canonical_service=\"reviews\"",
        "source_canonical_revision=\"v2\"",
        "source_app=\"reviews\"",
        "source_version=\"v2\"",
        "source_cluster=\"Kubernetes\"",
        "destination_workload=\"ratings-v1\"",
        "destination_canonical_service=\"ratings\"",
        "destination_canonical_revision=\"v1\"",
        "destination_cluster=\"Kubernetes\"",
        "destination_service=\"ratings.default.svc.cluster.local\"",
        "destination_service_name=\"ratings\"",
        "destination_service_namespace=\"default\"",
        "request_protocol=\"http\"",
        "response_code=\"200\"",
        "grpc_response_status=\"\"",
        "response_flags=\"-\"",
        "connection_security_policy=\"mutual_tls\"",
        "source_principal=\"spiffe://cluster.local/ns/default/sa/bookinfo-reviews\"",
    ] {
        assert!(line.contains(label), "{label} missing from {line}");
    }
    // The same series has its duration and size histograms, in Istio's
    // buckets, with one observation per request counted.
    let labels = &line["istio_requests_total".len()..line.rfind(' ').unwrap()];
    let requests: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    for (histogram, le) in [
        ("istio_request_duration_milliseconds", "0.5"),
        ("istio_request_duration_milliseconds", "3600000.0"),
        ("istio_request_bytes", "1.0"),
        ("istio_response_bytes", "100000000.0"),
    ] {
        let bucket = format!("{histogram}_bucket{{le=\"{le}\",{}", &labels[1..]);
        assert!(
            stats.lines().any(|l| l.starts_with(&bucket)),
            "no {bucket} in:\n{stats}"
        );
        let count = format!("{histogram}_count{labels} ");
        let n: f64 = stats
            .lines()
            .find_map(|l| l.strip_prefix(&count))
            .unwrap_or_else(|| panic!("no {count} in:\n{stats}"))
            .parse()
            .unwrap();
        assert_eq!(n, requests, "{histogram} observed every request");
    }
    // A request's size is at least its head; the reviews page it answered is more.
    let sum = |name: &str| -> f64 {
        let prefix = format!("{name}_sum{labels} ");
        stats
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(sum("istio_request_bytes") >= 40.0 * requests);
    assert!(sum("istio_response_bytes") >= 40.0 * requests);
    assert!(
        stats.contains("mesh_proxy_control_plane_connected 1"),
        "{stats}"
    );
    assert!(stats.contains("mesh_proxy_cert_expiry_seconds "), "{stats}");
    assert!(
        stats.contains("mesh_proxy_config_updates_total{result=\"ack\"}"),
        "{stats}"
    );
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn plaintext_to_an_inbound_sidecar_is_refused() {
    let mesh = Mesh::start().await;
    let addr = std::net::SocketAddr::new(
        mesh.workload("reviews-v1").address,
        mesh_proto::ports::INBOUND,
    );
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        b"GET /reviews/0 HTTP/1.1\r\nHost: reviews:9080\r\nx-mesh-target-port: 9080\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf))
        .await
        .expect("sidecar closes the connection");
    assert!(
        !buf.starts_with(b"HTTP/"),
        "plaintext got an HTTP answer: {:?}",
        String::from_utf8_lossy(&buf)
    );
    // The same with curl, a real client: no HTTP response comes back.
    if let Ok(out) = std::process::Command::new("curl")
        .args(["-sS", "-m", "5", &format!("http://{addr}/reviews/0")])
        .output()
    {
        assert!(
            !out.status.success(),
            "curl got an answer over plaintext: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    } else {
        eprintln!("curl not installed; checked with a raw TCP client only");
    }
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_expecting_identity_b_refuses_a_sidecar_holding_a() {
    let mesh = Mesh::start().await;
    let creds = mesh.creds_for(&mesh.identity_of("client")).await;
    let reviews = std::net::SocketAddr::new(
        mesh.workload("reviews-v1").address,
        mesh_proto::ports::INBOUND,
    );
    let expecting = |id: mesh_identity::SpiffeId| {
        mesh_identity::client_config(Some(&creds), creds.roots.clone(), id, &[b"h2"]).unwrap()
    };
    // Expecting the identity reviews really has: accepted.
    mesh_tests::handshake(expecting(mesh.identity_of("reviews-v1")), reviews)
        .await
        .expect("right identity is accepted");
    // Expecting ratings' identity from reviews' sidecar: refused, and the error says why.
    let err = mesh_tests::handshake(expecting(mesh.identity_of("ratings-v1")), reviews)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bookinfo-reviews")
            && err.contains("expected spiffe://cluster.local/ns/default/sa/bookinfo-ratings"),
        "{err}"
    );
    mesh.stop().await;
}

/// pilot serves a proxy's config only to the identity its workload runs
/// as: the client's certificate asking for reviews' listener is refused,
/// and the same stream under its own name is answered.
#[tokio::test(flavor = "multi_thread")]
async fn pilot_refuses_a_proxy_asking_for_another_workloads_config() {
    use mesh_proto::core::Node;
    use mesh_proto::discovery::DeltaDiscoveryRequest;
    use mesh_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    let mesh = Mesh::start().await;
    let creds = mesh.creds_for(&mesh.identity_of("client")).await;
    let pilot_id = mesh_identity::SpiffeId::new("cluster.local", "mesh-system", "pilot");
    let tls = mesh_identity::client_config(Some(&creds), creds.roots.clone(), pilot_id, &[b"h2"])
        .unwrap();
    let ask = async |node: &str| {
        let mut ads = AggregatedDiscoveryServiceClient::new(mesh_identity::grpc::channel(
            mesh.cp.pilot_addr,
            tls.clone(),
        ));
        let first = DeltaDiscoveryRequest {
            node: Some(Node {
                id: node.to_string(),
                ..Default::default()
            }),
            type_url: mesh_proto::type_url::LISTENER.to_string(),
            ..Default::default()
        };
        let mut responses = ads
            .delta_aggregated_resources(tokio_stream::iter([first]))
            .await?
            .into_inner();
        responses.message().await
    };
    let err = ask("reviews-v1.default").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(
        err.message()
            .contains("must present spiffe://cluster.local/ns/default/sa/bookinfo-reviews"),
        "{err:?}"
    );
    let own = ask("client.default")
        .await
        .expect("its own config is served")
        .expect("a response");
    assert_eq!(own.type_url, mesh_proto::type_url::LISTENER);
    assert_eq!(own.resources.len(), 1, "{own:?}");
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_peer_with_an_untrusted_certificate_is_refused() {
    let mesh = Mesh::start().await;
    // A certificate for a mesh identity, but from a CA the mesh does not trust.
    let rogue_dir = tempfile::tempdir().unwrap();
    let rogue = mesh_citadel::Authority::open(rogue_dir.path(), "cluster.local", None).unwrap();
    let id = mesh.identity_of("productpage-v1");
    let key = rcgen::KeyPair::generate().unwrap();
    let chain = rogue.issue(&key, &id, Duration::from_secs(3600)).unwrap();
    let rogue_creds = mesh_identity::Credentials::from_pem(
        &chain.concat(),
        &key.serialize_pem(),
        &mesh.cp.citadel.roots_pem(),
    )
    .unwrap();
    let reviews = std::net::SocketAddr::new(
        mesh.workload("reviews-v1").address,
        mesh_proto::ports::INBOUND,
    );
    let config = mesh_identity::client_config(
        Some(&rogue_creds),
        rogue_creds.roots.clone(),
        mesh.identity_of("reviews-v1"),
        &[b"h2"],
    )
    .unwrap();
    let err = mesh_tests::handshake(config, reviews)
        .await
        .expect_err("the sidecar must refuse a foreign certificate");
    eprintln!("refused as expected: {err}");
    // And the mesh still serves.
    mesh.request(&mesh.client())
        .await
        .expect("mesh keeps serving");
    mesh.stop().await;
}

/// What a load loop saw: successes, failures, and each answer's time and version.
type LoadResult = (usize, Vec<String>, Vec<(Instant, String)>);

/// Sends requests back to back until `stop`; returns (ok, failures, per-request log).
fn steady_load(mesh: &Mesh, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<LoadResult> {
    let http = mesh.client();
    let client_id = mesh.identity_of("client").to_string();
    tokio::spawn(async move {
        let (mut ok, mut failures, mut log) = (0, Vec::new(), Vec::new());
        while !stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            match meshctl::traffic::one(&http, &client_id).await {
                Ok((v, _)) => {
                    ok += 1;
                    log.push((started, v));
                }
                Err(e) => failures.push(e),
            }
        }
        (ok, failures, log)
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn editing_the_virtualservice_takes_effect_within_a_second_under_load() {
    let mesh = Mesh::start().await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = steady_load(&mesh, stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let edited = Instant::now();
    mesh.write_config("reviews-routing.yaml", &reviews_all_to("v3"));
    tokio::time::sleep(Duration::from_millis(2000)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failures, log) = load.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} requests failed: {failures:?}",
        failures.len()
    );
    let before = log.iter().filter(|(t, _)| *t < edited).count();
    assert!(before > 5, "too little traffic before the edit ({before})");
    let last_not_v3 = log
        .iter()
        .filter(|(_, v)| v != "v3")
        .map(|(t, _)| *t)
        .max()
        .unwrap();
    let took = last_not_v3.saturating_duration_since(edited);
    let after_switch = log
        .iter()
        .filter(|(t, _)| *t > edited + Duration::from_secs(1))
        .count();
    eprintln!(
        "{ok} requests, none failed; last non-v3 answer started {took:?} after the edit; {after_switch} all-v3 requests after"
    );
    assert!(
        took < Duration::from_secs(1),
        "routing change took {took:?}"
    );
    assert!(
        after_switch > 5,
        "too little traffic after the switch ({after_switch})"
    );
    mesh.stop().await;
}

/// Two pilots serve the mesh. A proxy told of both keeps its config when
/// the one it is connected to stops, reconnects to the other, and takes
/// the next change from it: no state lived only in the first.
#[tokio::test(flavor = "multi_thread")]
async fn a_proxy_fails_over_to_another_pilot_replica() {
    let mut mesh = Mesh::start().await;
    let ip = mesh.cp.pilot_addr.ip();
    let replica_addr = std::net::SocketAddr::new(ip, 15112);
    let replica = mesh
        .cp
        .start_replica(replica_addr, std::net::SocketAddr::new(ip, 15114))
        .await
        .expect("a second pilot starts");
    let pod = mesh.beside_client(104);
    mesh.client_sidecar(pod, Arc::default(), |cfg| {
        cfg.pilot_replicas = vec![replica_addr];
    })
    .await;
    let http = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://{pod}:15001")).unwrap())
        .build()
        .unwrap();
    let ratings = async || {
        http.get("http://ratings:9080/ratings/0")
            .send()
            .await
            .map(|r| r.status().as_u16())
    };
    let xds = async || -> serde_json::Value {
        reqwest::get(format!("http://{pod}:15000/config_dump"))
            .await
            .unwrap()
            .json::<serde_json::Value>()
            .await
            .unwrap()["xds"]
            .clone()
    };
    assert_eq!(ratings().await.unwrap(), 200);
    assert_eq!(xds().await["pilot"], mesh.cp.pilot_addr.to_string());

    mesh.cp.stop_pilot().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let x = xds().await;
        if x["connected"] == true && x["pilot"] == replica_addr.to_string() {
            break;
        }
        assert!(Instant::now() < deadline, "never reached the replica: {x}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ratings().await.unwrap(), 200, "served while failing over");
    assert!(
        replica
            .pilot
            .proxies()
            .iter()
            .any(|p| p.id == format!("captured-{pod}.default") && p.connected),
        "the replica lists the proxy"
    );
    // A change made now reaches the proxy through the replica.
    mesh.write_config(
        "teapot.yaml",
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: default}
spec:
  hosts: [ratings]
  http:
  - fault: {abort: {httpStatus: 418}}
    route:
    - destination: {host: ratings}
",
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while ratings().await.unwrap() != 418 {
        assert!(
            Instant::now() < deadline,
            "the replica's push never arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    replica.stop().await;
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pilot_killed_and_restarted_under_load_loses_no_request() {
    let mut mesh = Mesh::start().await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = steady_load(&mesh, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    mesh.cp.stop_pilot().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    mesh.cp.start_pilot().await.expect("pilot restarts");
    // Every proxy reconnects to the new pilot.
    mesh.wait_all_proxies_synced(Duration::from_secs(15)).await;
    // The restarted pilot still routes: a change made now reaches the proxies.
    mesh.write_config("reviews-routing.yaml", &reviews_all_to("v1"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failures, log) = load.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {failures:?}",
        failures.len(),
        ok + failures.len()
    );
    assert!(ok > 20, "too little traffic ({ok})");
    assert_eq!(
        log.last().unwrap().1,
        "v1",
        "the restarted pilot's push took effect"
    );
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_config_is_reported_and_the_last_good_one_keeps_serving() {
    let mesh = Mesh::start().await;
    let http = mesh.client();
    let pilot = mesh.cp.pilot().unwrap().clone();
    let version = pilot.snapshot().version;
    // Broken YAML, then a VirtualService routing to a subset nobody defined.
    mesh.write_config("broken.yaml", "kind: [unclosed\n");
    let errors = wait_for_errors(&pilot).await;
    assert!(
        errors[0].contains("broken.yaml") && errors[0].contains("not valid YAML"),
        "{errors:?}"
    );
    mesh.write_config("broken.yaml", "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: ratings}\nspec:\n  hosts: [ratings]\n  http:\n  - route:\n    - destination: {host: ratings, subset: v9}\n");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let errors = wait_for_errors(&pilot).await;
    assert!(
        errors.iter().any(
            |e| e.contains("broken.yaml: VirtualService default/ratings")
                && e.contains("spec.http[0].route[0].destination.subset \"v9\"")
        ),
        "{errors:?}"
    );
    assert_eq!(
        pilot.snapshot().version,
        version,
        "a bad config must not replace the good one"
    );
    for _ in 0..10 {
        mesh.request(&http)
            .await
            .expect("the last good config keeps serving");
    }
    std::fs::remove_file(mesh.config_dir.join("broken.yaml")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while !pilot.errors().is_empty() {
        assert!(
            Instant::now() < deadline,
            "errors not cleared after the fix"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    mesh.stop().await;
}

async fn wait_for_errors(pilot: &mesh_pilot::Pilot) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let e = pilot.errors();
        if !e.is_empty() {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "pilot did not report the bad file"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn proxies_answer_readiness_and_config_dump() {
    let mesh = Mesh::start().await;
    let w = mesh.workload("reviews-v2");
    let ready = reqwest::get(format!("http://{}:15021/healthz/ready", w.address))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let dump: serde_json::Value = reqwest::get(format!("http://{}/config_dump", w.admin()))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        dump["identity"],
        "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"
    );
    assert_eq!(dump["xds"]["connected"], true);
    assert_eq!(dump["listener"]["workload"]["name"], "reviews-v2");
    let reviews_route = dump["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "reviews.default.svc.cluster.local:9080")
        .expect("reviews route");
    let weights: Vec<u64> = reviews_route["routes"][0]["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["weight"].as_u64().unwrap())
        .collect();
    assert_eq!(weights, [40, 30, 30]);
    let count = AtomicUsize::new(0);
    for c in dump["clusters"].as_array().unwrap() {
        if c["name"] == "outbound|9080|v3|reviews.default.svc.cluster.local" {
            assert_eq!(c["endpoints"][0]["workload"], "reviews-v3");
            count.fetch_add(1, Ordering::Relaxed);
        }
    }
    assert_eq!(count.load(Ordering::Relaxed), 1);
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn draining_a_sidecar_finishes_in_flight_requests_then_stops() {
    let mesh = Mesh::start().await;
    let client = mesh.workload("client").clone();
    let http = mesh.client();
    let slow = tokio::spawn(async move {
        let started = Instant::now();
        let r = http.get("http://productpage:9080/delay/800").send().await;
        (r.map(|r| r.status().as_u16()), started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let admin = reqwest::Client::builder().no_proxy().build().unwrap();
    let r = admin
        .post(format!("http://{}/drain", client.admin()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Readiness turns false at once, so no new traffic is sent here.
    let ready = admin
        .get(format!("http://{}:15021/healthz/ready", client.address))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    assert!(ready.text().await.unwrap().contains("draining"));
    // New connections to the outbound listener are refused.
    let deadline = Instant::now() + Duration::from_secs(1);
    while tokio::net::TcpStream::connect(client.outbound())
        .await
        .is_ok()
    {
        assert!(
            Instant::now() < deadline,
            "outbound listener still accepts while draining"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The request already in flight completes normally.
    let (status, took) = slow.await.unwrap();
    assert_eq!(status.expect("in-flight request survives the drain"), 200);
    assert!(took >= Duration::from_millis(800), "{took:?}");
    // With nothing left in flight the proxy stops well before the 5 s grace.
    let deadline = Instant::now() + Duration::from_secs(3);
    while tokio::net::TcpStream::connect(client.admin()).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "proxy still running after its connections finished"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn proxy_status_and_proxy_config_show_what_each_proxy_holds() {
    let mesh = Mesh::start().await;
    mesh.wait_all_proxies_synced(Duration::from_secs(10)).await;
    let rows = meshctl::inspect::syncz(mesh.cp.pilot_debug_addr)
        .await
        .unwrap();
    assert_eq!(rows.len(), mesh.specs.len());
    let table = meshctl::inspect::render_status(&rows);
    for w in &mesh.specs {
        let line = table
            .lines()
            .find(|l| l.starts_with(&format!("{}.default ", w.name)))
            .unwrap_or_else(|| panic!("{} missing from\n{table}", w.name));
        assert_eq!(line.matches("SYNCED").count(), 4, "{line}");
    }
    // What a proxy holds, by workload name.
    let dump = meshctl::inspect::config_dump(mesh.cp.pilot_debug_addr, "productpage-v1")
        .await
        .unwrap();
    let routes = meshctl::inspect::render_section(&dump, meshctl::inspect::Section::Routes);
    assert!(
        routes.contains("outbound|9080|v1|reviews.default.svc.cluster.local 40%"),
        "{routes}"
    );
    let endpoints = meshctl::inspect::render_section(&dump, meshctl::inspect::Section::Endpoints);
    let ratings = endpoints
        .lines()
        .find(|l| l.contains("outbound|9080||ratings.default.svc.cluster.local"))
        .expect("ratings endpoint");
    assert!(
        ratings.contains("spiffe://cluster.local/ns/default/sa/bookinfo-ratings"),
        "{ratings}"
    );
    let secret = meshctl::inspect::render_section(&dump, meshctl::inspect::Section::Secret);
    assert!(
        secret.contains("identity: spiffe://cluster.local/ns/default/sa/bookinfo-productpage"),
        "{secret}"
    );
    let listeners = meshctl::inspect::render_section(&dump, meshctl::inspect::Section::Listeners);
    assert!(
        listeners.contains("9080") && listeners.contains("productpage.default.svc.cluster.local"),
        "{listeners}"
    );
    // An unknown proxy gets an error naming the ones pilot knows.
    let err = meshctl::inspect::config_dump(mesh.cp.pilot_debug_addr, "nope")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no proxy \"nope\"") && err.contains("reviews-v2.default"),
        "{err}"
    );
    mesh.stop().await;
}

/// A resource rewritten every 10 ms for two seconds (an editor's autosave
/// loop, a controller fighting another): pilot keeps answering, traffic
/// keeps flowing, and once the writes stop the proxies hold the last one.
#[tokio::test(flavor = "multi_thread")]
async fn a_file_rewritten_every_10ms_leaves_pilot_serving_and_ends_on_the_last_write() {
    let mesh = Mesh::start().await;
    let route = |name: &str| {
        format!(
            "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: ratings, namespace: default}}
spec:
  hosts: [ratings]
  http:
  - name: {name}
    route: [{{destination: {{host: ratings}}}}]
"
        )
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, dir) = (stop.clone(), mesh.config_dir.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                mesh_tests::write_atomically(
                    &dir.join("churn.yaml"),
                    &route(&format!("churn-{i}")),
                );
                i += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            i
        })
    };
    let http = mesh.client();
    let debug = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let syncz = format!("http://{}/debug/syncz", mesh.cp.pilot_debug_addr);
    let until = Instant::now() + Duration::from_secs(2);
    let mut requests = 0;
    while Instant::now() < until {
        let r = http
            .get("http://ratings:9080/ratings/0")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "a request failed while the file churned");
        let s = debug
            .get(&syncz)
            .send()
            .await
            .expect("pilot answers within 2 s");
        assert_eq!(s.status(), 200);
        requests += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = writer.await.unwrap();
    assert!(
        writes > 50 && requests > 10,
        "{writes} writes, {requests} requests"
    );
    // The last write wins, with no further nudge.
    let last = format!("\"churn-{}\"", writes - 1);
    let dump = format!(
        "http://{}:15000/config_dump",
        mesh.workload("client").address
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = debug.get(&dump).send().await.unwrap().text().await.unwrap();
        if text.contains(&last) {
            break;
        }
        assert!(Instant::now() < deadline, "the client never got {last}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    mesh.stop().await;
}
