//! The store on etcd, against a real etcd child process on loopback (the
//! binary of `scripts/test-peers etcd`; without one these tests skip,
//! except under CI=true), and control plane replicas sharing it.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::broadcast;
use trellis_control::store::{Action, Change, StoreEvent};
use trellis_control::{ControlConfig, ControlPlane, EtcdConfig, EtcdStore, Store, StoreError};
use trellis_resource::{Kind, Resource};
use trellis_testkit::etcd::Cluster;
use trellis_testkit::eventually;

const WAIT: Duration = Duration::from_secs(15);

fn services(yaml_names: &[(&str, u16)]) -> Vec<Resource> {
    let text: Vec<String> = yaml_names
        .iter()
        .map(|(n, port)| {
            format!(
                "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{name: {n}}}\nspec: {{selector: {{app: {n}}}, ports: [{{port: {port}}}]}}\n"
            )
        })
        .collect();
    trellis_resource::parse_documents("t.yaml", &text.join("---\n")).unwrap()
}

fn etcd_config(cluster: &Cluster, prefix: &str) -> EtcdConfig {
    EtcdConfig {
        endpoints: cluster.endpoints(),
        prefix: prefix.into(),
        lease_ttl: Duration::from_secs(2),
        ..EtcdConfig::default()
    }
}

async fn open(cluster: &Cluster, prefix: &str, replica: &str) -> EtcdStore {
    EtcdStore::open(&etcd_config(cluster, prefix), replica, b"{}".to_vec())
        .await
        .expect("the store opens")
}

/// The next event that holds a change `want` accepts.
async fn next_change(
    rx: &mut broadcast::Receiver<StoreEvent>,
    want: impl Fn(&Change) -> bool,
) -> StoreEvent {
    tokio::time::timeout(WAIT, async {
        loop {
            let ev = rx.recv().await.expect("the watch runs");
            if ev.changes.iter().any(&want) {
                return ev;
            }
        }
    })
    .await
    .expect("the change arrives")
}

#[tokio::test]
async fn resources_state_and_watches_on_etcd() {
    let Some(bin) = trellis_testkit::etcd::binary("resources_state_and_watches_on_etcd") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::single(&bin, dir.path());
    cluster.wait_healthy(WAIT).await;
    let store = open(&cluster, "/t1", "a").await;
    let other = open(&cluster, "/t1", "b").await;
    let mut watch = other.watch();

    let out = store
        .apply(services(&[("a", 80), ("b", 81)]))
        .await
        .unwrap();
    assert!(out.results.iter().all(|r| r.action == Action::Created));
    let ev = next_change(&mut watch, |c| matches!(c, Change::Put(..))).await;
    assert_eq!(ev.revision, out.revision, "the apply is one revision");
    assert_eq!(ev.changes.len(), 2);

    let (all, rev) = other.list(None).await.unwrap();
    assert_eq!(all.len(), 2);
    assert!(rev >= out.revision);
    assert_eq!(other.list(Some(Kind::HttpRoute)).await.unwrap().0, vec![]);
    // The same again changes nothing; a changed one is configured.
    let same = store.apply(services(&[("a", 80)])).await.unwrap();
    assert_eq!(same.results[0].action, Action::Unchanged);
    let changed = store.apply(services(&[("a", 8080)])).await.unwrap();
    assert_eq!(changed.results[0].action, Action::Configured);
    assert!(changed.revision > out.revision);

    // An apply validated at an older revision is refused whole: another
    // replica wrote since.
    let (_, seen) = store.list(None).await.unwrap();
    other.apply(services(&[("c", 82)])).await.unwrap();
    let e = store
        .apply_since(services(&[("d", 83), ("a", 9)]), seen)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict), "{e}");
    assert!(store
        .get(&services(&[("d", 83)])[0].key())
        .await
        .unwrap()
        .is_none());
    let key = services(&[("b", 1)])[0].key();
    assert!(store.delete_since(&key, seen).await.is_err());
    let (_, seen) = store.list(None).await.unwrap();
    let deleted = store.delete_since(&key, seen).await.unwrap().unwrap();
    // The revision of the last resource change, a delete included, as
    // either replica reads it.
    assert_eq!(store.revision().await.unwrap(), deleted);
    assert_eq!(other.revision().await.unwrap(), deleted);
    let ev = next_change(&mut watch, |c| matches!(c, Change::Delete(_))).await;
    assert_eq!(ev.changes, vec![Change::Delete(key.clone())]);
    assert_eq!(store.delete(&key).await.unwrap(), None);

    // State values: compare-and-swap, prefixes, and their events.
    assert!(store.swap_state("vips", None, b"1".to_vec()).await.unwrap());
    assert!(!other.swap_state("vips", None, b"2".to_vec()).await.unwrap());
    assert!(other
        .swap_state("vips", Some(b"1"), b"2".to_vec())
        .await
        .unwrap());
    assert!(!store
        .swap_state("vips", Some(b"1"), b"3".to_vec())
        .await
        .unwrap());
    next_change(&mut watch, |c| *c == Change::State("vips".into())).await;
    for k in ["auth/b", "auth/a", "authz"] {
        store.put_state(k, k.as_bytes().to_vec()).await.unwrap();
    }
    let keys: Vec<String> = other
        .list_state("auth/")
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, ["auth/a", "auth/b"]);
    store.delete_state("auth/a").await.unwrap();
    assert_eq!(other.get_state("auth/a").await.unwrap(), None);

    // A snapshot holds resources and the VIP table at one revision.
    let snap = other.snapshot().await.unwrap();
    assert_eq!(snap.resources.len(), 2);
    assert_eq!(snap.vips.as_deref(), Some(&b"2"[..]));

    // Another prefix is another mesh. Its writes, and the state values
    // written above, move etcd's revision but not this mesh's resource
    // revision: a watch of these resources could never reach theirs.
    let elsewhere = open(&cluster, "/t1-other", "c").await;
    assert!(elsewhere.list(None).await.unwrap().0.is_empty());
    let theirs = elsewhere.apply(services(&[("x", 80)])).await.unwrap();
    assert!(theirs.revision > deleted);
    assert_eq!(store.revision().await.unwrap(), deleted);
    assert_eq!(elsewhere.revision().await.unwrap(), theirs.revision);
    for s in [store, other, elsewhere] {
        s.close().await.unwrap();
    }
}

#[tokio::test]
async fn endpoint_records_live_on_their_replicas_lease() {
    let Some(bin) = trellis_testkit::etcd::binary("endpoint_records_live_on_their_replicas_lease")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // Three members: keep-alives that work against one member alone went
    // unanswered on a cluster.
    let places: Vec<(String, u16, u16, Vec<String>)> = (0..3)
        .map(|_| {
            let (client, peer) = (trellis_testkit::free_port(), trellis_testkit::free_port());
            ("127.0.0.1".to_string(), client, peer, Vec::new())
        })
        .collect();
    let cluster = Cluster::start(&bin, dir.path(), &places);
    cluster.wait_healthy(WAIT).await;
    let a = open(&cluster, "/t2", "a").await;
    let b = open(&cluster, "/t2", "b").await;
    let mut watch = b.watch();

    let endpoint = |instance: &str, rec: Option<&[u8]>| Change::Endpoint {
        instance: instance.into(),
        record: rec.map(<[u8]>::to_vec),
    };
    a.publish_endpoint("web-0", b"a1".to_vec());
    a.publish_endpoint("web-1", b"a1".to_vec());
    next_change(&mut watch, |c| *c == endpoint("web-0", Some(b"a1"))).await;
    // web-1 moves to replica b; a's late withdrawal of its record does not
    // remove b's.
    b.publish_endpoint("web-1", b"b1".to_vec());
    next_change(&mut watch, |c| *c == endpoint("web-1", Some(b"b1"))).await;
    a.withdraw_endpoint("web-1", b"a1".to_vec());
    a.publish_endpoint("marker", b"m".to_vec());
    next_change(&mut watch, |c| *c == endpoint("marker", Some(b"m"))).await;
    let snap = b.snapshot().await.unwrap();
    assert!(snap
        .endpoints
        .contains(&("web-1".to_string(), b"b1".to_vec())));

    // A live replica keeps its lease alive: its records outlive the lease
    // TTL (2 s) three times over, never deleted and written again.
    let gone = tokio::time::timeout(Duration::from_secs(6), async {
        loop {
            let ev = watch.recv().await.expect("the watch runs");
            if ev.changes.contains(&endpoint("web-0", None)) {
                return;
            }
        }
    })
    .await;
    assert!(
        gone.is_err(),
        "a live replica's endpoint record expired: its lease was not kept alive"
    );

    // Replica a dies (no close, no more keep-alives): its records go with
    // its lease; b's stay.
    let died = Instant::now();
    drop(a);
    next_change(&mut watch, |c| *c == endpoint("web-0", None)).await;
    println!(
        "a dead replica's endpoint records expired after {:?} (lease TTL 2s)",
        died.elapsed()
    );
    let snap = b.snapshot().await.unwrap();
    assert_eq!(snap.endpoints, vec![("web-1".to_string(), b"b1".to_vec())]);
    b.close().await.unwrap();
}

#[tokio::test]
async fn a_broken_watch_resumes_without_losing_events() {
    let Some(bin) = trellis_testkit::etcd::binary("a_broken_watch_resumes_without_losing_events")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::single(&bin, dir.path());
    cluster.wait_healthy(WAIT).await;
    let store = open(&cluster, "/t3", "a").await;
    let mut watch = store.watch();
    store.put_state("k1", b"1".to_vec()).await.unwrap();
    next_change(&mut watch, |c| *c == Change::State("k1".into())).await;

    // kill -9 of the only member: writes fail with what to do.
    cluster.members[0].kill();
    let e = store.put_state("k2", b"2".to_vec()).await.unwrap_err();
    assert!(e.is_unavailable(), "{e}");
    assert!(e.to_string().contains("majority"), "{e}");
    cluster.members[0].restart();
    cluster.wait_healthy(WAIT).await;
    // Written by another client while the watch was down or reconnecting:
    // the watch resumes from where it was, and sees them in order.
    let other = open(&cluster, "/t3", "b").await;
    other.put_state("k3", b"3".to_vec()).await.unwrap();
    other.put_state("k4", b"4".to_vec()).await.unwrap();
    let ev3 = next_change(&mut watch, |c| *c == Change::State("k3".into())).await;
    let ev4 = next_change(&mut watch, |c| *c == Change::State("k4".into())).await;
    assert!(ev4.revision > ev3.revision);
    store.close().await.unwrap();
    other.close().await.unwrap();
}

async fn replica(cluster: &Cluster, dir: &std::path::Path, kek: &std::path::Path) -> ControlPlane {
    let mut cfg = ControlConfig::new(dir);
    cfg.http_addr = "127.0.0.1:0".parse().unwrap();
    cfg.grpc_addr = "127.0.0.1:0".parse().unwrap();
    cfg.store = trellis_control::StoreKind::Etcd(etcd_config(cluster, "/mesh"));
    cfg.kek_file = Some(kek.to_path_buf());
    ControlPlane::start(cfg).await.expect("a replica starts")
}

async fn call(
    cp: &ControlPlane,
    token: &str,
    method: &str,
    path: &str,
    body: Value,
) -> (u16, Value) {
    let auth = format!("Bearer {token}");
    let resp = trellis_testkit::http_request(
        method.parse().unwrap(),
        &format!("http://{}{path}", cp.http_addr),
        &[
            ("content-type", "application/json"),
            ("authorization", &auth),
        ],
        bytes::Bytes::from(if body.is_null() {
            String::new()
        } else {
            body.to_string()
        }),
        None,
    )
    .await
    .unwrap_or_else(|e| panic!("{method} {path}: {e:#}"));
    let text = String::from_utf8_lossy(resp.body()).into_owned();
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (resp.status().as_u16(), v)
}

#[tokio::test]
async fn replicas_share_tokens_the_ca_and_vips() {
    let Some(bin) = trellis_testkit::etcd::binary("replicas_share_tokens_the_ca_and_vips") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::single(&bin, &dir.path().join("etcd"));
    cluster.wait_healthy(WAIT).await;
    let kek = dir.path().join("kek");
    trellis_identity::write_secret(&kek, &[9u8; 32]).unwrap();
    // Started together: they agree on one CA and one token key.
    let (dir_a, dir_b) = (dir.path().join("a"), dir.path().join("b"));
    let (a, b) = tokio::join!(
        replica(&cluster, &dir_a, &kek),
        replica(&cluster, &dir_b, &kek)
    );
    assert_eq!(a.identity().pin(), b.identity().pin());
    assert_ne!(a.replica(), b.replica());

    // An API token made through A works at B at once.
    let (s, made) = call(
        &a,
        a.admin_token(),
        "POST",
        "/api/v1/tokens",
        json!({"role": "viewer"}),
    )
    .await;
    assert_eq!(s, 200, "{made}");
    let viewer = made["token"].as_str().unwrap().to_string();
    let (s, _) = call(&b, &viewer, "GET", "/api/v1/services", Value::Null).await;
    assert_eq!(s, 200);
    // Revoked through B, it stops working at A.
    let revoked_at = Instant::now();
    let id = made["id"].as_str().unwrap();
    let (s, _) = call(
        &b,
        b.admin_token(),
        "DELETE",
        &format!("/api/v1/tokens/{id}"),
        Value::Null,
    )
    .await;
    assert_eq!(s, 200);
    let (s, body) = call(&a, &viewer, "GET", "/api/v1/services", Value::Null).await;
    assert_eq!(s, 401, "{body}");
    println!(
        "a token revoked through B was refused at A {:?} later",
        revoked_at.elapsed()
    );
    // A join token made at B verifies at A.
    let (s, join) = call(
        &b,
        b.admin_token(),
        "POST",
        "/api/v1/tokens",
        json!({"namespace": "default", "serviceAccount": "web"}),
    )
    .await;
    assert_eq!(s, 200, "{join}");
    assert!(a
        .identity()
        .verify_token(join["token"].as_str().unwrap())
        .await
        .is_ok());

    // Concurrent applies of VIP-allocating Services through both replicas:
    // every Service gets its own address, and both replicas agree.
    let batch = |from: &str| -> Value {
        (0..12)
            .map(|i| {
                json!({"apiVersion": "trellis.dev/v1alpha1", "kind": "Service",
                "metadata": {"name": format!("{from}-{i}")},
                "spec": {"selector": {"app": format!("{from}-{i}")}, "ports": [{"port": 80}]}})
            })
            .collect()
    };
    let mut applies = Vec::new();
    for round in 0..3 {
        for (cp, name) in [(&a, "a"), (&b, "b")] {
            applies.push(call(
                cp,
                cp.admin_token(),
                "POST",
                "/api/v1/apply",
                batch(&format!("{name}{round}")),
            ));
        }
    }
    for (s, body) in futures::future::join_all(applies).await {
        // A concurrent apply may be told to send again (409); send it again.
        assert!(s == 200 || s == 409, "{s} {body}");
    }
    for round in 0..3 {
        for (cp, name) in [(&a, "a"), (&b, "b")] {
            let (s, body) = call(
                cp,
                cp.admin_token(),
                "POST",
                "/api/v1/apply",
                batch(&format!("{name}{round}")),
            )
            .await;
            assert_eq!(s, 200, "{body}");
        }
    }
    let table = |cp: &ControlPlane| {
        let token = cp.admin_token().to_string();
        let cp_addr = cp.http_addr;
        async move {
            let resp = trellis_testkit::http_request(
                "GET".parse().unwrap(),
                &format!("http://{cp_addr}/api/v1/services"),
                &[("authorization", &format!("Bearer {token}"))],
                bytes::Bytes::new(),
                None,
            )
            .await
            .ok()?;
            let v: Value = serde_json::from_slice(resp.body()).ok()?;
            let pairs: Vec<(String, String)> = v
                .as_array()?
                .iter()
                .map(|s| {
                    (
                        s["name"].as_str().unwrap_or("").to_string(),
                        s["vip"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect();
            (pairs.len() == 72 && pairs.iter().all(|(_, v)| !v.is_empty())).then_some(pairs)
        }
    };
    let at_a = eventually("every Service has a VIP at A", WAIT, || table(&a)).await;
    let at_b = eventually("B agrees with A", WAIT, || {
        let want = at_a.clone();
        let f = table(&b);
        async move { f.await.filter(|t| *t == want) }
    })
    .await;
    let unique: std::collections::BTreeSet<&String> = at_b.iter().map(|(_, v)| v).collect();
    assert_eq!(unique.len(), 72, "two Services share a VIP: {at_b:?}");

    // A CA rotation through A reaches B (its bundle and its signer).
    let (s, _) = call(
        &a,
        a.admin_token(),
        "POST",
        "/api/v1/ca/rotate",
        Value::Null,
    )
    .await;
    assert_eq!(s, 200);
    eventually("B uses the rotated CA", WAIT, || async {
        (b.identity().pin() == a.identity().pin()).then_some(())
    })
    .await;

    // Without etcd, writes fail with what to do, and reads of what the
    // replica serves from memory go on.
    cluster.members[0].kill();
    let started = Instant::now();
    let (s, body) = call(&a, a.admin_token(), "POST", "/api/v1/apply", batch("late")).await;
    assert_eq!(s, 503, "{body}");
    let msg = body["error"].as_str().unwrap_or_default();
    assert!(msg.contains("majority") && msg.contains("etcdctl"), "{msg}");
    println!(
        "an apply without etcd was refused after {:?}",
        started.elapsed()
    );
    let (s, body) = call(
        &a,
        a.admin_token(),
        "POST",
        "/api/v1/tokens",
        json!({"role": "viewer"}),
    )
    .await;
    assert_eq!(s, 503, "{body}");
    // etcd back: the same apply goes through, no restart needed.
    cluster.members[0].restart();
    cluster.wait_healthy(WAIT).await;
    eventually("applies work again", WAIT, || async {
        let (s, _) = call(&b, b.admin_token(), "POST", "/api/v1/apply", batch("late")).await;
        (s == 200).then_some(())
    })
    .await;
    a.shutdown().await;
    b.shutdown().await;
}

/// A CA, and a certificate it signed for 127.0.0.1 (server and client
/// use), as PEM files in `dir`: (ca, cert, key).
fn tls_files(
    dir: &std::path::Path,
    name: &str,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        SanType,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&ca_cert.pem(), &ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    leaf.subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let paths = (
        dir.join(format!("{name}-ca.pem")),
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&paths.0, ca_cert.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    trellis_identity::write_secret(&paths.2, key.serialize_pem().as_bytes()).unwrap();
    paths
}

#[tokio::test]
async fn etcd_with_client_certificates() {
    let Some(bin) = trellis_testkit::etcd::binary("etcd_with_client_certificates") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = tls_files(dir.path(), "etcd");
    let (_, other_cert, other_key) = tls_files(dir.path(), "stranger");
    let (client, peer) = (trellis_testkit::free_port(), trellis_testkit::free_port());
    let url = format!("https://127.0.0.1:{client}");
    let log = std::fs::File::create(dir.path().join("etcd.log")).unwrap();
    let mut etcd = std::process::Command::new(&bin)
        .args(["--data-dir", dir.path().join("data").to_str().unwrap()])
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args([
            "--listen-peer-urls",
            &format!("http://127.0.0.1:{peer}"),
            "--initial-advertise-peer-urls",
            &format!("http://127.0.0.1:{peer}"),
            "--initial-cluster",
            &format!("default=http://127.0.0.1:{peer}"),
        ])
        .args(["--cert-file", cert.to_str().unwrap()])
        .args(["--key-file", key.to_str().unwrap()])
        .args([
            "--trusted-ca-file",
            ca.to_str().unwrap(),
            "--client-cert-auth",
        ])
        .args(["--log-level", "warn"])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("etcd starts");
    let cfg = |cert: &std::path::Path, key: &std::path::Path| EtcdConfig {
        endpoints: vec![url.clone()],
        prefix: "/tls".into(),
        ca: Some(ca.clone()),
        cert: Some(cert.to_path_buf()),
        key: Some(key.to_path_buf()),
        lease_ttl: Duration::from_secs(2),
    };
    // With the member's CA and a client certificate it trusts: the store
    // works (etcd may take a moment to serve).
    let store = eventually("the store opens over TLS", WAIT, || async {
        EtcdStore::open(&cfg(&cert, &key), "a", b"{}".to_vec()).await
    })
    .await;
    store.put_state("k", b"v".to_vec()).await.unwrap();
    assert_eq!(
        store.get_state("k").await.unwrap().as_deref(),
        Some(&b"v"[..])
    );
    store.close().await.unwrap();
    // A certificate from another CA is refused, with what to check.
    let e = EtcdStore::open(&cfg(&other_cert, &other_key), "b", b"{}".to_vec())
        .await
        .expect_err("a stranger's certificate is refused")
        .to_string();
    assert!(e.contains("unavailable") && e.contains(&url), "{e}");
    println!("a stranger's certificate: {e}");
    let _ = etcd.kill();
    let _ = etcd.wait();
}
