//! The whole Certify decision on arbitrary request bytes (decoded with prost): a real
//! `Certifier` with a generated issuer, the JWKS verifier with fixed keys, a frozen
//! clock and an audit log in a scratch file.
//!
//! Invariants:
//! - a certificate is returned only if the token authenticates a subject, the
//!   requested identity is exactly that subject's, and the CSR passes the check; the
//!   leaf then names exactly that identity (CN, one DNS SAN, one URI SAN), carries the
//!   CSR's key, is not a CA and chains to the trust anchors for that name;
//! - conversely, a request meeting all of those (and the size limit) is issued;
//! - every decision leaves exactly one audit record: `issued` with the leaf's
//!   fingerprint for a certificate, `denied` with a status code otherwise;
//! - a refusal's message never repeats the token.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use meshca::ca::csr::{self, Expected, KeyPolicy};
use meshca::proto::identity_server::Identity;
use meshca::proto::CertifyRequest;
use meshca::server::grpc::MAX_REQUEST_LEN;
use meshca_fuzz::certify::Harness;
use prost::Message;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

static HARNESS: LazyLock<Harness> = LazyLock::new(Harness::new);

/// The identity `req` may be issued, computed without the handler.
fn entitled(h: &Harness, req: &CertifyRequest) -> Option<meshca::identity::Identity> {
    let subject = h.authenticator.verify(&req.token, meshca_fuzz::now()).ok()?;
    let identity = h.naming.identity(&subject.namespace, &subject.service_account).ok()?;
    (req.identity == identity.dns_name).then_some(identity)
}

fn audit_record(h: &Harness) -> serde_json::Value {
    let text = std::fs::read_to_string(&h.audit_path).expect("audit log");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "one audit record per decision, found {}", lines.len());
    serde_json::from_str(lines[0]).expect("audit record is JSON")
}

fuzz_target!(|data: &[u8]| {
    let Ok(req) = CertifyRequest::decode(data) else { return };
    let h = &*HARNESS;
    std::fs::File::options().write(true).open(&h.audit_path).and_then(|f| f.set_len(0)).expect("truncate");

    let result = h.runtime.block_on(h.certifier.certify(tonic::Request::new(req.clone())));
    let record = audit_record(h);
    let entitled = entitled(h, &req);
    let csr_ok = entitled.as_ref().is_some_and(|id| {
        let expected = Expected { dns_name: Some(&id.dns_name), spiffe_id: &id.spiffe_id };
        csr::check(&req.certificate_signing_request, &expected, &KeyPolicy::default()).is_ok()
    });

    let response = match result {
        Ok(response) => response.into_inner(),
        Err(status) => {
            assert_eq!(record["outcome"], "denied", "{record}");
            assert!(record["code"].is_string() && record["reason"].is_string(), "{record}");
            assert!(
                !(csr_ok && req.encoded_len() <= MAX_REQUEST_LEN),
                "refused an entitled request: {status:?}"
            );
            // No part of the token is repeated, unless the caller also put it in a name
            // (requested names are echoed). Parts: runs of the base64url alphabet of 24
            // bytes or more mixing upper case, lower case and digits, which nothing
            // else in a status or a record does (reason codes, hex, times do not).
            let has = |hay: &[u8], part: &[u8]| hay.windows(part.len()).any(|w| w == part);
            let record_text = record.to_string();
            for part in req.token.split(|b| !(b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')) {
                let mixed = part.iter().any(u8::is_ascii_uppercase)
                    && part.iter().any(u8::is_ascii_lowercase)
                    && part.iter().any(u8::is_ascii_digit);
                if part.len() < 24 || !mixed {
                    continue;
                }
                let echoed =
                    has(req.identity.as_bytes(), part) || has(&req.certificate_signing_request, part);
                assert!(echoed || !has(status.message().as_bytes(), part), "status repeats the token");
                assert!(echoed || !has(record_text.as_bytes(), part), "audit record repeats the token");
            }
            return;
        }
    };

    let id = entitled.expect("issued without an authenticated subject holding the requested identity");
    assert!(csr_ok, "issued for a CSR that fails the check");
    assert_eq!(record["outcome"], "issued", "{record}");
    assert_eq!(record["fingerprint_sha256"], meshca::audit::sha256_hex(&response.leaf_certificate));

    let (rest, leaf) = X509Certificate::from_der(&response.leaf_certificate).expect("leaf parses");
    assert!(rest.is_empty());
    let cns: Vec<_> = leaf.subject().iter_common_name().map(|cn| cn.as_str().ok()).collect();
    assert_eq!(cns, [Some(id.dns_name.as_str())], "leaf CN");
    let san = leaf.subject_alternative_name().expect("SAN parses").expect("leaf has a SAN");
    let sans: Vec<_> = san.value.general_names.iter().collect();
    assert_eq!(sans, [&GeneralName::DNSName(&id.dns_name), &GeneralName::URI(&id.spiffe_id)], "leaf SANs");
    assert!(!leaf.is_ca(), "leaf is a CA");
    let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(
        &req.certificate_signing_request,
    )
    .expect("issued CSR parses");
    assert_eq!(
        leaf.public_key().subject_public_key.data,
        csr.certification_request_info.subject_pki.subject_public_key.data,
        "leaf key is not the CSR's"
    );
    let valid_until = response.valid_until.expect("valid_until");
    let (not_before, not_after) =
        (leaf.validity().not_before.timestamp(), leaf.validity().not_after.timestamp());
    assert_eq!(valid_until.seconds, not_after);
    let now = meshca_fuzz::NOW_SECS as i64;
    assert_eq!(not_before, now - h.lifetimes.clock_skew_allowance.as_secs() as i64, "notBefore");
    assert_eq!(not_after, now + h.lifetimes.issuance_lifetime.as_secs() as i64, "notAfter");
    let intermediates: Vec<_> =
        response.intermediate_certificates.iter().map(|c| c.clone().into()).collect::<Vec<_>>();
    h.anchors
        .verify(
            &response.leaf_certificate.clone().into(),
            &intermediates,
            meshca_fuzz::now(),
            Some(&id.dns_name),
        )
        .expect("leaf chains to the anchors for its identity");
});
