//! token_cost: what signing leaves with an issuer key in a PKCS#11 token costs,
//! beside the same issuer with its key in memory.
//!
//! Makes a SoftHSM2 token store in a temporary directory (the tests' `SoftHsm`:
//! `softhsm2-util`, Debian's `softhsm2`), a P-256 issuer key inside it (`ca::token`) and another in memory,
//! each under a new trust anchor, and signs `--leaves` leaves with each from
//! `--threads` threads (the signing workers), interleaved `--rounds` times: leaves/s,
//! and the p50 and p99 of one `Issuer::issue` call (serial, template, signature).
//! The difference is what the token adds to a certificate; a network HSM adds its
//! round trip to each signature on top.
//!
//! Run in release: `cargo run --release -p meshca-bench --bin token_cost`.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use meshca::ca::csr::{CheckedCsr, KeyType};
use meshca::ca::hierarchy::{self, CaKeyType, HierarchyLifetimes};
use meshca::ca::issuer::{Issuer, TrustAnchors};
use meshca::ca::profile::{Lifetimes, Names};
use meshca::ca::token::{Kind, TokenKey};
use meshca::clock::{Clock, SystemClock};
use meshca::identity::Naming;
use meshca_test_support::softhsm::SoftHsm;
use rcgen::PublicKeyData as _;

#[derive(Parser)]
struct Args {
    /// Leaves signed per run and key.
    #[arg(long, default_value_t = 4000)]
    leaves: usize,
    /// Signing threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Interleaved rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// Signs `n` leaves from `threads` threads: (leaves/s, p50 µs, p99 µs).
fn run(issuer: &Arc<Issuer>, n: usize, threads: usize) -> (f64, f64, f64) {
    let probe = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let csr = Arc::new(CheckedCsr { key_type: KeyType::P256, spki_der: probe.subject_public_key_info() });
    let started = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (issuer, csr) = (issuer.clone(), csr.clone());
            std::thread::spawn(move || {
                let names = Names {
                    dns_name: Some("web.default.serviceaccount.identity.meshca-system.cluster.local"),
                    spiffe_id: "spiffe://cluster.local/ns/default/sa/web",
                };
                let lifetimes = Lifetimes::default();
                let mut took = Vec::new();
                for _ in (t..n).step_by(threads) {
                    let at = Instant::now();
                    issuer.issue(&names, &csr, &lifetimes, SystemClock.now()).expect("a leaf");
                    took.push(at.elapsed());
                }
                took
            })
        })
        .collect();
    let mut took: Vec<Duration> = workers.into_iter().flat_map(|w| w.join().expect("thread")).collect();
    let wall = started.elapsed().as_secs_f64();
    took.sort();
    let at = |q: f64| took[((took.len() as f64 * q) as usize).min(took.len() - 1)].as_secs_f64() * 1e6;
    (n as f64 / wall, at(0.5), at(0.99))
}

fn main() {
    let args = Args::parse();
    // The tests' SoftHSM2 store (meshca-test-support): its own directory and configuration.
    let store = SoftHsm::default();
    store.init_token("bench");
    store.use_in_this_process();
    let tmp = tempfile::tempdir().expect("temporary directory");
    let uri = store.uri("bench", "issuer").parse().expect("uri");
    let token = Arc::new(TokenKey::generate(&uri, Kind::EcP256).expect("a key in the token"));

    let naming = Naming::new("cluster.local", "meshca-system").expect("naming");
    let now = SystemClock.now();
    let file_dir = tmp.path().join("file");
    let h =
        hierarchy::generate(&naming, CaKeyType::P256, now, HierarchyLifetimes::default()).expect("hierarchy");
    meshca::dev::write_hierarchy(&file_dir, &h).expect("write");
    let token_dir = tmp.path().join("token");
    let h = hierarchy::generate_for_key(
        &naming,
        CaKeyType::P256,
        now,
        HierarchyLifetimes::default(),
        token.as_ref(),
    )
    .expect("hierarchy");

    meshca::dev::write_hierarchy(&token_dir, &h).expect("write");

    let load = |dir: &Path, token: Option<&Arc<TokenKey>>| {
        let anchors = TrustAnchors::load(&dir.join("trust-anchors.pem")).expect("anchors");
        let issuer = match token {
            Some(token) => Issuer::load_with_token(&dir.join("issuer"), &anchors, now, token),
            None => Issuer::load(&dir.join("issuer"), &anchors, now),
        };
        Arc::new(issuer.expect("issuer"))
    };
    let issuers = [
        ("key in memory (ring)", load(&file_dir, None)),
        ("key in SoftHSM2 (PKCS#11)", load(&token_dir, Some(&token))),
    ];
    let mut results = vec![Vec::new(); issuers.len()];
    for _ in 0..args.rounds {
        for (i, (_, issuer)) in issuers.iter().enumerate() {
            results[i].push(run(issuer, args.leaves, args.threads));
        }
    }
    println!(
        "leaves signed by Issuer::issue, {} a run, {} threads, {} interleaved rounds",
        args.leaves, args.threads, args.rounds
    );
    for ((name, _), runs) in issuers.iter().zip(&results) {
        let show = |f: fn(&(f64, f64, f64)) -> f64, fmt: fn(f64) -> String| {
            runs.iter().map(|r| fmt(f(r))).collect::<Vec<_>>().join(" ")
        };
        println!(
            "  {name:28} leaves/s {:24} p50 µs {:18} p99 µs {}",
            show(|r| r.0, |v| format!("{v:.0}")),
            show(|r| r.1, |v| format!("{v:.0}")),
            show(|r| r.2, |v| format!("{v:.0}"))
        );
    }
    println!("sessions pooled by the token key afterwards: {}", token.pooled_sessions());
}
