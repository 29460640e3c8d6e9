//! Issuer and trust-anchor rotation without restarts, against a real server: the
//! reloader swaps snapshots under requests in flight, refuses unusable files and
//! keeps retrying, follows a Kubernetes Secret update by notification alone,
//! re-issues the serving certificate, and serves the trust bundle that a root
//! rotation grows and shrinks.
//!
//! The issuer directory is laid out as the kubelet mounts a Secret (files are
//! symlinks through `..data`, which an update replaces in one rename), hence unix.
#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use meshca_test_support as support;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use meshca::agent::client::{connect, connect_as, KeyType};
use meshca::agent::run::{renew_once, Settings};
use meshca::agent::schedule::Policy;
use meshca::audit::sha256_hex;
use meshca::ca::hierarchy::{self, CaKeyType, HierarchyLifetimes};
use meshca::ca::issuer::TrustAnchors;
use meshca::ca::material::to_pem;
use meshca::ca::reload::Outcome;
use meshca::clock::{unix_seconds, Clock};
use meshca::config::ReloadSettings;
use meshca::proto::identity_client::IdentityClient;
use meshca::proto::CertifyRequest;
use meshca::v1::trust_bundle_client::TrustBundleClient;
use meshca::v1::GetTrustBundleRequest;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use support::{chain, csr, issuer_under_anchor, request_id, Options, TestServer, SERVER_NAME};
use tonic::Code;

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap()
}

fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

fn not_after(der: &[u8]) -> SystemTime {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    meshca::ca::issuer::to_system_time(cert.validity().not_after)
}

fn symlink(target: impl AsRef<Path>, link: impl AsRef<Path>) {
    std::os::unix::fs::symlink(target, link).unwrap();
}

/// Turns DIR/issuer into a mounted Secret: tls.crt and tls.key become symlinks
/// through `..data`, itself a symlink to a generation directory.
fn mount_issuer(dir: &Path) {
    let issuer = dir.join("issuer");
    let (crt, key) = (read(&issuer, "tls.crt"), read(&issuer, "tls.key"));
    for name in ["tls.crt", "tls.key"] {
        std::fs::remove_file(issuer.join(name)).unwrap();
        symlink(Path::new("..data").join(name), issuer.join(name));
    }
    update_secret(dir, 0, &crt, &key);
}

/// Updates the mounted issuer as the kubelet does: a new generation directory,
/// then a `..data_tmp` symlink renamed over `..data` (one atomic step).
fn update_secret(dir: &Path, generation: u32, crt: &str, key: &str) {
    let issuer = dir.join("issuer");
    let data = format!("..gen{generation}");
    std::fs::create_dir(issuer.join(&data)).unwrap();
    std::fs::write(issuer.join(&data).join("tls.crt"), crt).unwrap();
    std::fs::write(issuer.join(&data).join("tls.key"), key).unwrap();
    // The kubelet writes a Secret's files with the volume's defaultMode (deploy/: 0440).
    for name in ["tls.crt", "tls.key"] {
        std::fs::set_permissions(
            issuer.join(&data).join(name),
            std::os::unix::fs::PermissionsExt::from_mode(0o440),
        )
        .unwrap();
    }
    symlink(&data, issuer.join("..data_tmp"));
    std::fs::rename(issuer.join("..data_tmp"), issuer.join("..data")).unwrap();
}

/// Replaces DIR/trust-anchors.pem in one step (written beside it, renamed over it).
fn write_anchors(dir: &Path, roots: &[&str]) {
    let tmp = dir.join(".trust-anchors.pem.tmp");
    std::fs::write(&tmp, roots.concat()).unwrap();
    std::fs::rename(tmp, dir.join("trust-anchors.pem")).unwrap();
}

fn anchors(roots: &[CertificateDer<'static>]) -> TrustAnchors {
    TrustAnchors::from_certs(roots.to_vec(), Path::new("test roots")).unwrap()
}

/// A Certify client that verifies meshca against `trusted`.
async fn client(server: &TestServer, trusted: &TrustAnchors) -> IdentityClient<tonic::transport::Channel> {
    IdentityClient::new(connect(&server.url(), trusted, SERVER_NAME).await.unwrap())
}

/// The issuer certificate that signed a fresh leaf for web (token authentication).
async fn signing_issuer(server: &TestServer, trusted: &TrustAnchors) -> CertificateDer<'static> {
    let (_key, req) = server.request("default", "web");
    let resp = client(server, trusted).await.certify(req).await.unwrap().into_inner();
    chain(&resp).1[0].clone()
}

/// What TrustBundle/Get answers, meshca verified against `trusted`.
async fn bundle(server: &TestServer, trusted: &TrustAnchors) -> Vec<CertificateDer<'static>> {
    let channel = connect(&server.url(), trusted, SERVER_NAME).await.unwrap();
    let resp = TrustBundleClient::new(channel).get(GetTrustBundleRequest {}).await.unwrap().into_inner();
    resp.trust_anchors.into_iter().map(CertificateDer::from).collect()
}

/// The certificate chain meshca presents to a new TLS connection.
async fn served_chain(server: &TestServer) -> Vec<CertificateDer<'static>> {
    let tls = server.tls(&server.tls_config(rustls::crypto::ring::default_provider())).await;
    tls.get_ref().1.peer_certificates().unwrap().to_vec()
}

#[tokio::test]
async fn an_issuer_swapped_under_a_hundred_requests_in_flight_fails_none_and_signs_every_later_one() {
    const CALLERS: usize = 100;
    const ROUNDS: usize = 5;
    let server = TestServer::start_prepared(Options::default(), mount_issuer).await;
    let dir = server.dir.path();
    let old = der(&read(dir, "issuer/tls.crt"));
    let (crt, key) = issuer_under_anchor(dir, server.clock.now());
    let new = der(&crt);

    let client = client(&server, &server.anchors).await;
    let swapped = Arc::new(AtomicBool::new(false));
    let (answered_tx, mut answered) = tokio::sync::mpsc::unbounded_channel();
    let mut callers = Vec::new();
    for _ in 0..CALLERS {
        let requests: Vec<_> = (0..ROUNDS).map(|_| server.request("default", "web").1).collect();
        let (mut client, swapped, answered) = (client.clone(), swapped.clone(), answered_tx.clone());
        callers.push(tokio::spawn(async move {
            let mut results = Vec::new();
            for req in requests {
                let sent_after_swap = swapped.load(Ordering::SeqCst);
                let result = client.certify(req).await;
                let _ = answered.send(());
                results.push((sent_after_swap, result));
            }
            results
        }));
    }
    // A hundred answers in: the callers are mid-stream, about a hundred requests in flight.
    for _ in 0..CALLERS {
        answered.recv().await.unwrap();
    }
    update_secret(dir, 1, &crt, &key);
    let outcome = server.reloader().check();
    assert!(matches!(outcome, Outcome::Reloaded(_)), "{outcome:?}");
    swapped.store(true, Ordering::SeqCst);

    let mut results = Vec::new();
    for caller in callers {
        results.extend(caller.await.unwrap());
    }
    let records: HashMap<String, serde_json::Value> = server
        .audit_records()
        .into_iter()
        .map(|r| (r["request_id"].as_str().unwrap().to_owned(), r))
        .collect();
    let (mut by_old, mut by_new, mut sent_after) = (0, 0, 0);
    for (sent_after_swap, result) in results {
        let resp = result.expect("a request failed across the swap");
        let id = request_id(resp.metadata());
        let (leaf, intermediates) = chain(&resp.into_inner());
        let issuer = intermediates[0].clone();
        // Issuer and anchors from one snapshot: the chain holds, the leaf is signed
        // by the certificate returned with it, and the audit record names that one.
        server.anchors.verify(&leaf, &intermediates, server.clock.now(), None).unwrap();
        anchors(std::slice::from_ref(&issuer)).verify(&leaf, &[], server.clock.now(), None).unwrap();
        assert_eq!(records[&id]["issuer_fingerprint_sha256"], sha256_hex(&issuer), "{id}");
        if issuer == old {
            by_old += 1;
        } else {
            assert_eq!(issuer, new, "signed by an unknown issuer");
            by_new += 1;
        }
        if sent_after_swap {
            sent_after += 1;
            assert_eq!(issuer, new, "a request sent after the swap was signed by the old issuer");
        }
    }
    assert_eq!(by_old + by_new, CALLERS * ROUNDS);
    assert!(by_old >= CALLERS, "the first hundred answers came from the old issuer");
    assert!(sent_after > 0 && by_new >= sent_after, "old {by_old}, new {by_new}, sent after {sent_after}");
    assert_eq!(server.metric("meshca_reloads_total").await, 1);
}

#[tokio::test]
async fn an_unusable_issuer_is_refused_counted_and_retried_until_the_periodic_recheck_loads_a_good_one() {
    // No notifications: only check() and the periodic re-check read the files.
    let reload = ReloadSettings {
        interval: Duration::from_millis(100),
        notifications: false,
        ..ReloadSettings::default()
    };
    let server = TestServer::start_prepared(Options { reload, ..Default::default() }, mount_issuer).await;
    let dir = server.dir.path();
    let now = server.clock.now();
    let old_crt = read(dir, "issuer/tls.crt");
    let old = der(&old_crt);

    // The key of another issuer beside this certificate, then garbage.
    let (_, other_key) = issuer_under_anchor(dir, now);
    update_secret(dir, 1, &old_crt, &other_key);
    let outcome = server.reloader().check();
    assert!(matches!(outcome, Outcome::Failed(meshca::ca::Error::KeyMismatch)), "{outcome:?}");
    update_secret(dir, 2, "garbage", "garbage");
    let outcome = server.reloader().check();
    assert!(matches!(outcome, Outcome::Failed(_)), "{outcome:?}");
    assert!(server.metric("meshca_reload_failures_total").await >= 2);
    assert_eq!(server.metric("meshca_reloads_total").await, 0);
    assert_eq!(signing_issuer(&server, &server.anchors).await, old, "the old issuer still signs");

    // A good issuer, and nobody asks: the periodic re-check finds it.
    let mut swaps = server.reloader().store().subscribe();
    let (crt, key) = issuer_under_anchor(dir, now);
    update_secret(dir, 3, &crt, &key);
    tokio::time::timeout(Duration::from_secs(10), swaps.changed())
        .await
        .expect("the periodic re-check did not load the good issuer")
        .unwrap();
    let new = der(&crt);
    assert_eq!(signing_issuer(&server, &server.anchors).await, new);
    assert_eq!(server.metric("meshca_reloads_total").await, 1);
    assert_eq!(server.metric("meshca_issuer_not_after_seconds").await, unix_seconds(not_after(&new)));
}

#[tokio::test]
async fn a_kubernetes_secret_update_is_picked_up_by_notification_without_waiting_for_the_interval() {
    let reload = ReloadSettings { interval: Duration::from_secs(3600), ..ReloadSettings::default() };
    let server = TestServer::start_prepared(Options { reload, ..Default::default() }, mount_issuer).await;
    let dir = server.dir.path();
    // Serving, so the reloader (started before serving) is watching.
    assert_eq!(signing_issuer(&server, &server.anchors).await, der(&read(dir, "issuer/tls.crt")));
    let mut swaps = server.reloader().store().subscribe();
    let (crt, key) = issuer_under_anchor(dir, server.clock.now());
    update_secret(dir, 1, &crt, &key);
    tokio::time::timeout(Duration::from_secs(10), swaps.changed())
        .await
        .expect("no reload on notification (the interval is an hour)")
        .unwrap();
    assert_eq!(signing_issuer(&server, &server.anchors).await, der(&crt));
    assert_eq!(server.metric("meshca_reloads_total").await, 1);
    assert_eq!(server.metric("meshca_reload_failures_total").await, 0);
}

#[tokio::test]
async fn after_a_swap_new_connections_see_a_serving_certificate_from_the_new_issuer() {
    let server = TestServer::start_prepared(Options::default(), mount_issuer).await;
    let dir = server.dir.path();
    assert_eq!(served_chain(&server).await[1], der(&read(dir, "issuer/tls.crt")));
    let mut serving = server.handles.as_ref().unwrap().serving.clone().unwrap();
    let (crt, key) = issuer_under_anchor(dir, server.clock.now());
    update_secret(dir, 1, &crt, &key);
    assert!(matches!(server.reloader().check(), Outcome::Reloaded(_)));
    tokio::time::timeout(Duration::from_secs(10), serving.changed())
        .await
        .expect("the serving certificate was not re-issued")
        .unwrap();

    let new = der(&crt);
    let served = served_chain(&server).await;
    assert_eq!(served[1], new);
    anchors(std::slice::from_ref(&new))
        .verify(&served[0], &[], server.clock.now(), Some(SERVER_NAME))
        .unwrap();
    // Audited like every serving certificate, naming the issuer that signed it.
    let records: Vec<_> =
        server.audit_records().into_iter().filter(|r| r["request_id"] == "serving-certificate").collect();
    assert_eq!(records.len(), 2);
    assert_eq!(records[1]["issuer_fingerprint_sha256"], sha256_hex(&new));
    assert_eq!(records[1]["fingerprint_sha256"], sha256_hex(&served[0]));
}

/// Chain PEM and key PEM of a fresh certificate for `sa` (token authentication).
async fn issued(server: &TestServer, sa: &str) -> (String, String) {
    let (key, req) = server.request("default", sa);
    let resp = client(server, &server.anchors).await.certify(req).await.unwrap().into_inner();
    let (leaf, intermediates) = chain(&resp);
    let pem = std::iter::once(&leaf).chain(&intermediates).map(|c| to_pem("CERTIFICATE", c)).collect();
    (pem, key.serialize_pem())
}

/// Certify with an empty token over mutual TLS as `holder`: renewal by proof of possession.
async fn renew_by_possession(
    server: &TestServer,
    trusted: &TrustAnchors,
    holder: &(String, String),
) -> Result<tonic::Response<meshca::proto::CertifyResponse>, tonic::Status> {
    let channel = connect_as(&server.url(), trusted, SERVER_NAME, Some(holder)).await.unwrap();
    let identity = server.identity("default", "web");
    let (_, csr) = csr(&identity, &rcgen::PKCS_ECDSA_P256_SHA256);
    IdentityClient::new(channel)
        .certify(CertifyRequest { identity, token: Vec::new(), certificate_signing_request: csr })
        .await
}

#[tokio::test]
async fn a_root_rotation_reaches_agents_through_the_bundle_and_the_removed_root_stops_renewing() {
    let server = TestServer::start_prepared(Options::default(), mount_issuer).await;
    let dir = server.dir.path();
    let now = server.clock.now();
    let old_root_pem = read(dir, "trust-anchors.pem");
    let old_root = der(&old_root_pem);
    assert_eq!(
        server.metric("meshca_trust_anchor_earliest_not_after_seconds").await,
        unix_seconds(not_after(&old_root))
    );
    // A workload holding a certificate under the old root.
    let holder = issued(&server, "web").await;

    // 1. The bundle grows to old + new root; the issuer stays. The new root expires
    //    first, so the earliest-expiry gauge moves to it.
    let lifetimes =
        HierarchyLifetimes { anchor: Duration::from_secs(5 * 365 * 86_400), ..Default::default() };
    let next = hierarchy::generate(&server.naming, CaKeyType::P256, now, lifetimes).unwrap();
    let new_root = der(&next.anchor_cert_pem);
    write_anchors(dir, &[&old_root_pem, &next.anchor_cert_pem]);
    assert!(matches!(server.reloader().check(), Outcome::Reloaded(_)));
    let both = vec![old_root.clone(), new_root.clone()];
    assert_eq!(bundle(&server, &server.anchors).await, both);
    assert_eq!(
        server.metric("meshca_trust_anchor_earliest_not_after_seconds").await,
        unix_seconds(not_after(&new_root))
    );
    renew_by_possession(&server, &server.anchors, &holder)
        .await
        .expect("the old root still renews while in the bundle");

    // An agent whose own --trust-anchors holds the old root alone writes both roots to ca.crt.
    std::fs::write(dir.join("agent-anchors.pem"), &old_root_pem).unwrap();
    std::fs::write(dir.join("token"), server.token("default", "web")).unwrap();
    let settings = Settings {
        addr: server.url(),
        trust_anchors: dir.join("agent-anchors.pem"),
        token_file: dir.join("token"),
        identity: server.identity("default", "web"),
        out: dir.join("out"),
        server_name: SERVER_NAME.into(),
        key_type: KeyType::P256,
        policy: Policy::default(),
        offset_warning: Duration::from_secs(30),
        on_renew: None,
        check_with: None,
    };
    renew_once(&settings, &server.clock).await.unwrap();
    let written = std::fs::read(dir.join("out/ca.crt")).unwrap();
    let written: Vec<_> = CertificateDer::pem_slice_iter(&written).collect::<Result<_, _>>().unwrap();
    assert_eq!(written, both);

    // 2. An issuer under the new root, and the bundle shrinks to the new root.
    write_anchors(dir, &[&next.anchor_cert_pem]);
    update_secret(dir, 1, &next.issuer_cert_pem, &next.issuer_key_pem);
    assert!(matches!(server.reloader().check(), Outcome::Reloaded(_)));
    // Clients trusting both roots reach meshca whichever serving certificate it presents.
    let trust_both = anchors(&both);
    assert_eq!(bundle(&server, &trust_both).await, vec![new_root.clone()]);

    // The old root's certificate no longer renews by proof of possession, at once.
    let status = renew_by_possession(&server, &trust_both, &holder).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{}", status.message());
    let record = server.audit_record(&request_id(status.metadata()));
    assert_eq!(record["outcome"], "denied");
    assert_eq!(record["auth_method"], "certificate");
    assert!(record["reason"].as_str().unwrap().starts_with("client_certificate_untrusted"), "{record}");

    // A token still gets a certificate, and it chains to the new root only.
    let (_key, req) = server.request("default", "web");
    let resp = client(&server, &trust_both).await.certify(req).await.unwrap().into_inner();
    let (leaf, intermediates) = chain(&resp);
    let web = server.identity("default", "web");
    anchors(&[new_root]).verify(&leaf, &intermediates, server.clock.now(), Some(&web)).unwrap();
    assert!(anchors(&[old_root]).verify(&leaf, &intermediates, server.clock.now(), None).is_err());
}
