//! Writes the seed corpus, fuzz/corpus/<target>/, from the fixed keys and clock of
//! the fuzz crate: real CSRs of each key type, complete Certify requests, tokens,
//! PEM variants and an audit log written by the real handler, each next to a few
//! known-bad inputs. Keys generated here (CSR keys, the CA) are fresh on every run;
//! what must stay valid across runs (token signatures, the bodies the `csr` target
//! signs) uses the committed keys.
//!
//! Run from the repository root: `cargo run --manifest-path fuzz/Cargo.toml --example gen_corpus`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use meshca::auth::dev::{compact_jws, DevSigner, TokenClaims};
use meshca::ca::hierarchy::{self, CaKeyType, HierarchyLifetimes};
use meshca::ca::material::to_pem;
use meshca::proto::CertifyRequest;
use meshca_fuzz::der::{self, attribute, extension, p256_spki, rdn, request_info, seq, tlv};
use meshca_fuzz::*;
use prost::Message;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, SanType,
    SignatureAlgorithm, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_RSA_SHA256,
};
use serde_json::json;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

struct Out {
    dir: PathBuf,
    total: usize,
}

impl Out {
    fn target(&mut self, name: &str) -> Result<Target<'_>> {
        let dir = self.dir.join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(&dir)?;
        Ok(Target { dir, out: self })
    }
}

struct Target<'a> {
    dir: PathBuf,
    out: &'a mut Out,
}

impl Target<'_> {
    fn put(&mut self, name: &str, bytes: impl AsRef<[u8]>) -> Result<()> {
        let bytes = bytes.as_ref();
        self.out.total += bytes.len();
        std::fs::write(self.dir.join(name), bytes)?;
        Ok(())
    }
}

fn fixture(name: &str) -> Result<Vec<u8>> {
    Ok(std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(name))?)
}

fn rsa_key(bits: u32) -> Result<KeyPair> {
    let pem = String::from_utf8(fixture(&format!("rsa{bits}.pk8.pem"))?)?;
    Ok(KeyPair::from_pkcs8_pem_and_sign_algo(&pem, &PKCS_RSA_SHA256)?)
}

fn key(alg: &'static SignatureAlgorithm) -> Result<KeyPair> {
    Ok(KeyPair::generate_for(alg)?)
}

fn dns(name: &str) -> Result<SanType> {
    Ok(SanType::DnsName(name.to_string().try_into()?))
}

fn uri(name: &str) -> Result<SanType> {
    Ok(SanType::URI(name.to_string().try_into()?))
}

/// A DER CSR as rcgen (and so a proxy) writes it.
fn csr(key: &KeyPair, cn: Option<&str>, sans: Vec<SanType>, ca: bool) -> Result<Vec<u8>> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    if let Some(cn) = cn {
        params.distinguished_name.push(DnType::CommonName, cn);
    }
    params.subject_alt_names = sans;
    if ca {
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    }
    Ok(params.serialize_request(key)?.der().to_vec())
}

fn identity_csr(key: &KeyPair, id: &str) -> Result<Vec<u8>> {
    csr(key, Some(id), vec![dns(id)?], false)
}

fn san(names: &[(u8, &str)]) -> Vec<u8> {
    let entries: Vec<Vec<u8>> = names.iter().map(|(tag, s)| tlv(*tag, s.as_bytes())).collect();
    tlv(0x30, &entries.concat())
}

fn extension_request(exts: &[Vec<u8>]) -> Vec<u8> {
    tlv(0x30, &exts.concat())
}

/// certificationRequestInfo bodies over the fixed key (the `csr` target signs them).
fn request_infos() -> Vec<(&'static str, Vec<u8>)> {
    let spki = csr_key_spki();
    let cn = |s: &str| rdn(der::OID_CN, 0x0c, s.as_bytes());
    let identity_san = extension(der::OID_SAN, false, &san(&[(0x82, ID), (0x86, SPIFFE)]));
    let pkcs9 = |exts: &[Vec<u8>]| attribute(der::OID_EXTENSION_REQUEST, &extension_request(exts));
    let ms = |exts: &[Vec<u8>]| attribute(der::OID_MS_EXTENSION_REQUEST, &extension_request(exts));
    // certreq.exe's informational attributes: OS version (1.3.6.1.4.1.311.13.2.3).
    let os_version =
        attribute(&[0x2b, 0x06, 0x01, 0x04, 0x01, 0x82, 0x37, 0x0d, 0x02, 0x03], &tlv(0x16, b"10.0.17763.2"));
    let ca = extension(der::OID_BASIC_CONSTRAINTS, true, &seq(&[&[0x01, 0x01, 0xff]]));
    let unknown_critical =
        extension(&[0x2b, 0x06, 0x01, 0x04, 0x01, 0x86, 0x8d, 0x1f, 0x01], true, &[0x05, 0x00]);
    vec![
        ("cri-identity.der", request_info(&[cn(ID)], &spki, &[pkcs9(std::slice::from_ref(&identity_san))])),
        ("cri-nothing.der", request_info(&[], &spki, &[])),
        (
            "cri-windows.der",
            request_info(&[cn(ID)], &spki, &[os_version, ms(std::slice::from_ref(&identity_san))]),
        ),
        (
            "cri-both-attributes.der",
            request_info(
                &[cn(ID)],
                &spki,
                &[pkcs9(std::slice::from_ref(&identity_san)), ms(std::slice::from_ref(&identity_san))],
            ),
        ),
        (
            "cri-ms-other-name.der",
            request_info(&[], &spki, &[ms(&[extension(der::OID_SAN, false, &san(&[(0x82, OTHER_ID)]))])]),
        ),
        ("cri-two-cns.der", request_info(&[cn(ID), cn(OTHER_ID)], &spki, &[])),
        ("cri-printable-cn.der", request_info(&[rdn(der::OID_CN, 0x13, ID.as_bytes())], &spki, &[])),
        ("cri-bmp-cn.der", request_info(&[rdn(der::OID_CN, 0x1e, &[0, b'w', 0, b'e', 0, b'b'])], &spki, &[])),
        ("cri-email-subject.der", request_info(&[rdn(der::OID_EMAIL, 0x16, b"web@example.com")], &spki, &[])),
        ("cri-org.der", request_info(&[rdn(der::OID_O, 0x0c, b"meshca"), cn(ID)], &spki, &[])),
        ("cri-ca.der", request_info(&[cn(ID)], &spki, &[pkcs9(&[ca])])),
        ("cri-critical-unknown.der", request_info(&[], &spki, &[pkcs9(&[unknown_critical])])),
        (
            "cri-other-uri.der",
            request_info(
                &[],
                &spki,
                &[pkcs9(&[extension(der::OID_SAN, false, &san(&[(0x86, OTHER_SPIFFE), (0x82, ID)]))])],
            ),
        ),
        (
            "cri-ip-email.der",
            request_info(
                &[],
                &spki,
                &[pkcs9(&[extension(
                    der::OID_SAN,
                    false,
                    &[tlv(0x30, &[tlv(0x87, &[10, 0, 0, 1]), tlv(0x81, b"a@b.c")].concat())].concat(),
                )])],
            ),
        ),
        (
            "cri-two-values.der",
            request_info(
                &[],
                &spki,
                &[seq(&[
                    &der::oid(der::OID_EXTENSION_REQUEST),
                    &der::set(&[
                        &extension_request(std::slice::from_ref(&identity_san)),
                        &extension_request(&[extension(der::OID_SAN, false, &san(&[(0x82, OTHER_ID)]))]),
                    ]),
                ])],
            ),
        ),
        ("cri-other-key.der", request_info(&[cn(ID)], &p256_spki(&[4; 65]), &[])),
    ]
}

fn csr_corpus(out: &mut Out) -> Result<()> {
    let mut t = out.target("csr")?;
    let p256 = key(&PKCS_ECDSA_P256_SHA256)?;
    t.put("p256.der", csr(&p256, Some(ID), vec![dns(ID)?, uri(SPIFFE)?], false)?)?;
    t.put("p384.der", identity_csr(&key(&PKCS_ECDSA_P384_SHA384)?, ID)?)?;
    t.put("rsa2048.der", identity_csr(&rsa_key(2048)?, ID)?)?;
    t.put("rsa3072.der", identity_csr(&rsa_key(3072)?, ID)?)?;
    t.put("names-nothing.der", csr(&p256, None, vec![], false)?)?;
    t.put("other-identity.der", identity_csr(&p256, OTHER_ID)?)?;
    t.put("uppercase.der", identity_csr(&p256, &ID.to_ascii_uppercase())?)?;
    t.put("trailing-dot.der", identity_csr(&p256, &format!("{ID}."))?)?;
    t.put("ca-requested.der", csr(&p256, Some(ID), vec![dns(ID)?], true)?)?;
    t.put("ip-san.der", csr(&p256, None, vec![SanType::IpAddress("10.0.0.1".parse()?)], false)?)?;
    t.put("email-san.der", csr(&p256, None, vec![SanType::Rfc822Name("a@b.c".try_into()?)], false)?)?;
    t.put("p521-refused.der", fixture("p521.csr.der")?)?;
    t.put("rsa1024-refused.der", fixture("rsa1024.csr.der")?)?;
    let der = identity_csr(&p256, ID)?;
    t.put("pem-not-der.pem", to_pem("CERTIFICATE REQUEST", &der))?;
    t.put("trailing-byte.der", [&der[..], &[0]].concat())?;
    let key = csr_key();
    for (name, info) in request_infos() {
        t.put(&name.replace("cri-", "signed-"), sign_request_info(&key, &info))?;
        t.put(name, info)?;
    }
    Ok(())
}

/// Issued a minute before [`now`], expiring an hour after it.
fn claims(ns: &str, sa: &str) -> TokenClaims {
    let issued_at = now() - Duration::from_secs(60);
    TokenClaims::projected(TOKEN_ISSUER, AUDIENCE, ns, sa, issued_at, Duration::from_secs(60 + 3600))
        .with_pod("web-5d8f7", "0c1b2a39-7d6e-4f5a-8b9c-0d1e2f3a4b5c")
}

fn claims_json(extra: serde_json::Value) -> String {
    let mut c = json!({"iss": TOKEN_ISSUER, "aud": [AUDIENCE], "exp": NOW_SECS + 3600, "iat": NOW_SECS - 60,
        "nbf": NOW_SECS - 60, "sub": "system:serviceaccount:default:web",
        "kubernetes.io": {"namespace": "default", "serviceaccount": {"name": "web", "uid": "u1"},
                          "pod": {"name": "web-0", "uid": "p1"}}});
    for (k, v) in extra.as_object().into_iter().flatten() {
        if v.is_null() {
            c.as_object_mut().map(|o| o.remove(k));
        } else {
            c[k] = v.clone();
        }
    }
    c.to_string()
}

fn rs256(header: &str, claims: &str) -> Result<String> {
    let key = ring::signature::RsaKeyPair::from_pkcs8(&rsa_pkcs8()).map_err(|e| e.to_string())?;
    compact_jws(header.as_bytes(), claims.as_bytes(), |msg| -> Result<Vec<u8>> {
        let mut sig = vec![0; key.public().modulus_len()];
        key.sign(&ring::signature::RSA_PKCS1_SHA256, &ring::rand::SystemRandom::new(), msg, &mut sig)
            .map_err(|e| e.to_string())?;
        Ok(sig)
    })
}

fn tokens(signer: &DevSigner) -> Result<Vec<(&'static str, String)>> {
    let es = json!({"alg": "ES256", "typ": "JWT", "kid": signer.kid()}).to_string();
    let sign = |claims: &str| signer.sign_raw(es.as_bytes(), claims.as_bytes());
    let good = signer.sign(&claims("default", "web"))?;
    let mut tampered = good.clone().into_bytes();
    let i = tampered.len() / 2;
    tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
    Ok(vec![
        ("es256.jwt", good.clone()),
        ("es256-kidless.jwt", signer.sign_raw(br#"{"alg":"ES256"}"#, claims_json(json!({})).as_bytes())),
        ("es256-crlf.jwt", format!("{good}\r\n")),
        ("rs256.jwt", rs256(&json!({"alg": "RS256", "kid": RSA_KID}).to_string(), &claims_json(json!({})))?),
        ("rs256-kidless.jwt", rs256(r#"{"alg":"RS256"}"#, &claims_json(json!({"kubernetes.io": null})))?),
        ("legacy-sub.jwt", sign(&claims_json(json!({"kubernetes.io": null})))),
        ("expired.jwt", sign(&claims_json(json!({"exp": NOW_SECS - 3600})))),
        ("not-yet-valid.jwt", sign(&claims_json(json!({"nbf": NOW_SECS + 3600})))),
        ("wrong-audience.jwt", sign(&claims_json(json!({"aud": "other"})))),
        ("wrong-issuer.jwt", sign(&claims_json(json!({"iss": "https://elsewhere"})))),
        ("sub-mismatch.jwt", sign(&claims_json(json!({"sub": "system:serviceaccount:kube-system:admin"})))),
        (
            "alg-none.jwt",
            format!(
                "{}.{}.",
                URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
                URL_SAFE_NO_PAD.encode(claims_json(json!({})))
            ),
        ),
        ("hs256.jwt", {
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"secret");
            compact_jws(br#"{"alg":"HS256"}"#, claims_json(json!({})).as_bytes(), |msg| {
                Ok::<_, std::convert::Infallible>(ring::hmac::sign(&key, msg))
            })?
        }),
        ("tampered.jwt", String::from_utf8(tampered)?),
    ])
}

fn jwt_corpus(out: &mut Out, signer: &DevSigner) -> Result<()> {
    let mut t = out.target("jwt")?;
    for (name, token) in tokens(signer)? {
        t.put(name, token)?;
    }
    // `header \0 claims`: the target signs these with the ES256 key.
    let header = r#"{"alg":"ES256","typ":"JWT"}"#;
    let pairs = [
        ("pair-kubernetes.bin", header.to_string(), claims_json(json!({}))),
        ("pair-legacy-sub.bin", header.into(), claims_json(json!({"kubernetes.io": null}))),
        ("pair-no-sub.bin", header.into(), claims_json(json!({"sub": null}))),
        ("pair-sub-mismatch.bin", header.into(), claims_json(json!({"sub": "system:serviceaccount:a:b"}))),
        ("pair-aud-string.bin", header.into(), claims_json(json!({"aud": AUDIENCE}))),
        (
            "pair-float-times.bin",
            header.into(),
            claims_json(json!({"exp": NOW_SECS as f64 + 0.5, "iat": 1.5e9})),
        ),
        ("pair-no-exp.bin", header.into(), claims_json(json!({"exp": null}))),
        (
            "pair-duplicate-keys.bin",
            header.into(),
            format!(
                r#"{{"iss":"{TOKEN_ISSUER}","aud":"{AUDIENCE}","exp":{},"sub":"system:serviceaccount:a:b","s\u0075b":"system:serviceaccount:c:d"}}"#,
                NOW_SECS + 60
            ),
        ),
        ("pair-crit.bin", r#"{"alg":"ES256","crit":["exp"]}"#.into(), claims_json(json!({}))),
        ("pair-typ-jwe.bin", r#"{"alg":"ES256","typ":"JWE"}"#.into(), claims_json(json!({}))),
        (
            "pair-empty-namespace.bin",
            header.into(),
            claims_json(json!({"kubernetes.io": {"namespace": "", "serviceaccount": {"name": "a"}}})),
        ),
    ];
    for (name, header, claims) in pairs {
        t.put(name, [header.as_bytes(), &[0], claims.as_bytes()].concat())?;
    }
    Ok(())
}

fn request(identity: &str, token: &[u8], csr: Vec<u8>) -> Vec<u8> {
    CertifyRequest { identity: identity.into(), token: token.to_vec(), certificate_signing_request: csr }
        .encode_to_vec()
}

fn certify_corpus(out: &mut Out, signer: &DevSigner) -> Result<()> {
    let mut t = out.target("certify")?;
    let token = signer.sign(&claims("default", "web"))?.into_bytes();
    let p256 = key(&PKCS_ECDSA_P256_SHA256)?;
    let csr_p256 = identity_csr(&p256, ID)?;
    t.put("valid-p256.pb", request(ID, &token, csr_p256.clone()))?;
    t.put("valid-p384.pb", request(ID, &token, identity_csr(&key(&PKCS_ECDSA_P384_SHA384)?, ID)?))?;
    t.put("valid-rsa2048.pb", request(ID, &token, identity_csr(&rsa_key(2048)?, ID)?))?;
    t.put(
        "valid-spiffe-san.pb",
        request(ID, &token, csr(&p256, Some(ID), vec![dns(ID)?, uri(SPIFFE)?], false)?),
    )?;
    t.put("valid-names-nothing.pb", request(ID, &token, csr(&p256, None, vec![], false)?))?;
    t.put("valid-token-crlf.pb", request(ID, &[&token[..], b"\r\n"].concat(), csr_p256.clone()))?;
    for (name, token) in tokens(signer)? {
        if name != "es256.jwt" && name != "es256-crlf.jwt" {
            t.put(
                &format!("token-{}", name.replace(".jwt", ".pb")),
                request(ID, token.as_bytes(), csr_p256.clone()),
            )?;
        }
    }
    let db = signer.sign(&claims("default", "db"))?.into_bytes();
    t.put("token-for-another-account.pb", request(ID, &db, csr_p256.clone()))?;
    t.put("no-token.pb", request(ID, b"", csr_p256.clone()))?;
    t.put("wrong-identity.pb", request(OTHER_ID, &token, identity_csr(&p256, OTHER_ID)?))?;
    t.put("uppercase-identity.pb", request(&ID.to_ascii_uppercase(), &token, csr_p256.clone()))?;
    t.put("trailing-dot-identity.pb", request(&format!("{ID}."), &token, csr_p256.clone()))?;
    t.put("csr-other-name.pb", request(ID, &token, identity_csr(&p256, OTHER_ID)?))?;
    t.put("csr-ca.pb", request(ID, &token, csr(&p256, Some(ID), vec![dns(ID)?], true)?))?;
    t.put("csr-pem.pb", request(ID, &token, to_pem("CERTIFICATE REQUEST", &csr_p256).into_bytes()))?;
    t.put("empty.pb", b"")?;
    Ok(())
}

fn pem_corpus(out: &mut Out, signer: &DevSigner) -> Result<()> {
    let mut t = out.target("pem")?;
    let h = hierarchy::generate(&naming(), CaKeyType::P256, now(), HierarchyLifetimes::default())?;
    let chain = format!("{}{}", h.issuer_cert_pem, h.anchor_cert_pem);
    t.put("anchor.pem", &h.anchor_cert_pem)?;
    t.put("chain.pem", &chain)?;
    t.put("chain-crlf.pem", chain.replace('\n', "\r\n"))?;
    t.put("anchor-bom.pem", format!("\u{feff}{}", h.anchor_cert_pem))?;
    t.put(
        "anchor-indented.pem",
        h.anchor_cert_pem.lines().map(|l| format!("  {l}  \n")).collect::<String>(),
    )?;
    t.put("anchor-no-final-newline.pem", h.anchor_cert_pem.trim_end())?;
    t.put("anchor-no-end.pem", h.anchor_cert_pem.replace("-----END CERTIFICATE-----", ""))?;
    t.put("chain-with-comments.pem", format!("subject=root\n{}\nissuer=x\n", h.anchor_cert_pem))?;
    use rustls_pki_types::pem::PemObject;
    let anchor_der = rustls_pki_types::CertificateDer::pem_slice_iter(h.anchor_cert_pem.as_bytes())
        .next()
        .ok_or("no anchor")??;
    t.put("anchor.der", anchor_der.as_ref())?;
    t.put("issuer-key.pem", &h.issuer_key_pem)?;
    // SEC1 (`EC PRIVATE KEY`), as openssl and cert-manager write it: the PKCS#8's inner key.
    let pkcs8 = p256_pkcs8();
    let (_, body, _) = read_tlv(&pkcs8).ok_or("pkcs8")?;
    let (_, _, rest) = read_tlv(body).ok_or("version")?;
    let (_, _, rest) = read_tlv(rest).ok_or("algorithm")?;
    let (_, sec1, _) = read_tlv(rest).ok_or("private key")?;
    t.put("key-sec1.der", sec1)?;
    t.put("key-sec1.pem", to_pem("EC PRIVATE KEY", sec1))?;
    t.put("key-sec1-crlf.pem", to_pem("EC PRIVATE KEY", sec1).replace('\n', "\r\n"))?;
    t.put("dev-key.pem", P256_PEM)?;
    let rsa = rsa_pkcs8();
    let (_, body, _) = read_tlv(&rsa).ok_or("pkcs8")?;
    let (_, _, rest) = read_tlv(body).ok_or("version")?;
    let (_, _, rest) = read_tlv(rest).ok_or("algorithm")?;
    let (_, pkcs1, _) = read_tlv(rest).ok_or("private key")?;
    t.put("key-pkcs1-refused.pem", to_pem("RSA PRIVATE KEY", pkcs1))?;
    t.put("jwks.json", jwks_json())?;
    t.put(
        "jwks-crlf.json",
        serde_json::to_string_pretty(&serde_json::from_str::<serde_json::Value>(&jwks_json())?)?
            .replace('\n', "\r\n"),
    )?;
    t.put("token-newline.txt", format!("{}\n", signer.sign(&claims("default", "web"))?))?;
    t.put("unknown-label.pem", to_pem("X509 CRL", b"\x30\x00"))?;
    t.put("bad-base64.pem", "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n")?;
    Ok(())
}

fn audit_corpus(out: &mut Out, signer: &DevSigner) -> Result<()> {
    // Records written by the real handler: two issued, three denied.
    let h = certify::Harness::new();
    let token = signer.sign(&claims("default", "web"))?.into_bytes();
    let p256 = key(&PKCS_ECDSA_P256_SHA256)?;
    let requests = [
        request(ID, &token, identity_csr(&p256, ID)?),
        request(OTHER_ID, &token, identity_csr(&p256, OTHER_ID)?),
        request(ID, b"", identity_csr(&p256, ID)?),
        request(ID, &token, identity_csr(&key(&PKCS_ECDSA_P384_SHA384)?, ID)?),
        request(ID, &token, identity_csr(&p256, OTHER_ID)?),
    ];
    for bytes in requests {
        let req = CertifyRequest::decode(&bytes[..])?;
        let _ = h.runtime.block_on(meshca::proto::identity_server::Identity::certify(
            &h.certifier,
            tonic::Request::new(req),
        ));
    }
    let log = std::fs::read_to_string(&h.audit_path)?;
    if let Some(dir) = h.audit_path.parent() {
        std::fs::remove_dir_all(dir)?;
    }
    meshca::audit::verify(log.as_bytes())?;
    let lines: Vec<String> = log.split_inclusive('\n').map(String::from).collect();
    let joined = |lines: &[String]| lines.concat();
    let mut t = out.target("audit_verify")?;
    t.put("valid.log", &log)?;
    t.put("one-record.log", &lines[0])?;
    t.put("empty.log", "")?;
    let mut edited = lines.clone();
    edited[1] = edited[1].replacen("denied", "issued", 1);
    t.put("edited.log", joined(&edited))?;
    let mut deleted = lines.clone();
    deleted.remove(2);
    t.put("deleted.log", joined(&deleted))?;
    let mut reordered = lines.clone();
    reordered.swap(1, 2);
    t.put("reordered.log", joined(&reordered))?;
    t.put("truncated.log", &log[..log.len() - 40])?;
    t.put("no-final-newline.log", log.trim_end())?;
    t.put("duplicated.log", format!("{}{}", log, lines[lines.len() - 1]))?;
    t.put("uppercase-hash.log", {
        let last = &lines[0];
        let at = last.rfind("\"hash\":\"").ok_or("hash")? + 8;
        format!("{}{}{}", &last[..at], last[at..at + 64].to_ascii_uppercase(), &last[at + 64..])
    })?;
    t.put("crlf.log", log.replace('\n', "\r\n"))?;
    Ok(())
}

fn main() -> Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut out = Out { dir, total: 0 };
    let signer = signer();
    csr_corpus(&mut out)?;
    certify_corpus(&mut out, &signer)?;
    jwt_corpus(&mut out, &signer)?;
    pem_corpus(&mut out, &signer)?;
    audit_corpus(&mut out, &signer)?;
    println!("seed corpus written to {} ({} bytes)", out.dir.display(), out.total);
    Ok(())
}
