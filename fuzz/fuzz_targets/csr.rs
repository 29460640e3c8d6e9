//! `csr::check` on arbitrary bytes, read two ways: as a whole DER request (parsing,
//! key policy, signature), and as a certificationRequestInfo that this target signs
//! with the fixed P-256 key, so that mutated names, attributes and extensions reach
//! the name checks behind the signature.
//!
//! Invariants on acceptance: the key type matches the SubjectPublicKeyInfo, which is
//! returned verbatim; every name the request asks for, read independently with
//! x509-parser, is the expected identity; it asks for no CA; and a request accepted
//! for two different identities names nothing at all.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use meshca::ca::csr::{self, Expected, KeyPolicy, KeyType};
use meshca_fuzz::{requested_names, sign_request_info, ID, OTHER_ID, OTHER_SPIFFE, SPIFFE};
use ring::signature::EcdsaKeyPair;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;

static KEY: LazyLock<EcdsaKeyPair> = LazyLock::new(meshca_fuzz::csr_key);

fn check(der: &[u8]) {
    let policy = KeyPolicy::default();
    let expected = Expected { dns_name: Some(ID), spiffe_id: SPIFFE };
    let result = csr::check(der, &expected, &policy);
    let checked = match result {
        Ok(checked) => checked,
        Err(e) => {
            // Refusals carry a stable code and a message fit for a log line.
            let message = e.to_string();
            assert!(!e.code().is_empty());
            assert!(message.is_ascii() && !message.chars().any(|c| c.is_ascii_control()), "{message:?}");
            assert!(message.len() < 1024, "{} bytes", message.len());
            return;
        }
    };
    let (_, req) = X509CertificationRequest::from_der(der).expect("accepted but x509-parser cannot read it");
    let spki = &req.certification_request_info.subject_pki;
    assert_eq!(checked.spki_der, spki.raw, "SPKI not returned verbatim");
    let alg = spki.algorithm.algorithm.to_id_string();
    match checked.key_type {
        KeyType::P256 | KeyType::P384 => assert_eq!(alg, "1.2.840.10045.2.1"),
        KeyType::Rsa { bits } => {
            assert_eq!(alg, "1.2.840.113549.1.1.1");
            assert!((2048..=4096).contains(&bits), "{bits}");
        }
    }
    let names = requested_names(der).expect("accepted but its names cannot be read");
    assert!(names.only(ID, SPIFFE), "accepted a request naming {names:?}");
    assert!(!names.asks_for_ca, "accepted a CA request");
    let other = Expected { dns_name: Some(OTHER_ID), spiffe_id: OTHER_SPIFFE };
    if csr::check(der, &other, &policy).is_ok() {
        assert!(names.names_nothing(), "accepted for two identities: {names:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if data.len() <= csr::MAX_CSR_LEN {
        check(&sign_request_info(&KEY, data));
    }
});
