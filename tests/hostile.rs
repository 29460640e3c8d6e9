//! The hostile-input corpus: requests an attacker would send, through a real Certify
//! call over TLS, each refused with its status code, no certificate, and exactly one
//! audit record (outcome `denied`, its reason code) for its request id.
//!
//! Cases are built here byte by byte where the point is an encoding no honest library
//! writes: truncated and trailing DER, duplicate extensions and attributes, names with
//! NUL bytes, wildcards, IDN, upper-case and trailing-dot variants of the identity, CA
//! requests, RSA keys with exponent 1 or an even modulus, P-256 points off the curve,
//! foreign signatures; tokens with duplicate claims, `kid` path traversal, HMAC keys in
//! the JWKS, nested JWTs, oversized tokens; gRPC messages at the size limits. The
//! server's JWKS holds, besides the test signer's ES256 key, an RSA key and an HMAC
//! (`oct`) key, so that algorithm-confusion attempts have something to aim at.
//!
//! What has no audit record is tested apart, at the transport: messages beyond the
//! decoding limit, slow-loris connections (silent, half a ClientHello, TLS without the
//! HTTP/2 preface), thousands of idle connections, HTTP/2 stream floods, rapid resets
//! and streams the server must reset (each bounded per connection). Every such test
//! shows that a well-behaved client is served meanwhile, within a bound.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use meshca_test_support as support;

use std::convert::Infallible;

use std::time::Duration;

use meshca::auth::dev::{compact_jws, DevSigner};
use meshca::config::{ConnectionSettings, KeyRefresh, KeySource, TokenConfig};
use meshca::proto::CertifyRequest;
use meshca::server::tls::HANDSHAKE_TIMEOUT;
use meshca::server::{MAX_CONCURRENT_STREAMS, MAX_DECODED_MESSAGE, MAX_LOCAL_ERROR_RESETS};
use prost::Message;
use ring::rand::SystemRandom;
use ring::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, RsaKeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivatePkcs8KeyDer;
use serde_json::json;
use support::der::{
    bits, bmp, cn_name, dns, ec_spki, ecdsa_sha256, extension, extension_request, extensions_attribute,
    integer, oid, rdn, rsa_spki, san, seq, sha256_rsa, tlv, uri, utf8, NULL, OID_BASIC_CONSTRAINTS,
    OID_ECDSA_SHA256, OID_EC_PUBLIC_KEY, OID_EMAIL, OID_MS_EXTENSION_REQUEST, OID_P256, OID_SAN, TRUE,
};
use support::h2::{
    certify_headers, frame, RawH2, CANCEL, END_HEADERS, ENHANCE_YOUR_CALM, HEADERS, REFUSED_STREAM,
    RST_STREAM,
};
use support::{Options, TestServer, AUDIENCE, SERVER_NAME, TOKEN_ISSUER};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};
use tonic::Code;

// ---- DER, written by hand (the builders are in support::der) ----

/// One TLV at the start of `input`: (whole TLV, contents, rest).
fn split(input: &[u8]) -> (&[u8], &[u8], &[u8]) {
    let first = usize::from(input[1]);
    let (len, header) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        (input[2..2 + n].iter().fold(0, |acc, b| (acc << 8) | usize::from(*b)), 2 + n)
    };
    (&input[..header + len], &input[header..header + len], &input[header + len..])
}

/// A P-256 key (ring) with its SubjectPublicKeyInfo.
struct P256 {
    key: EcdsaKeyPair,
    spki: Vec<u8>,
}

impl P256 {
    fn new() -> P256 {
        let rng = SystemRandom::new();
        let alg = &signature::ECDSA_P256_SHA256_ASN1_SIGNING;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap();
        let spki = ec_spki(OID_P256, key.public_key().as_ref());
        P256 { key, spki }
    }

    fn sign(&self, data: &[u8]) -> Vec<u8> {
        self.key.sign(&SystemRandom::new(), data).unwrap().as_ref().to_vec()
    }
}

/// A PKCS#10 request, field by field.
#[derive(Clone)]
struct Csr {
    version: u8,
    subject: Vec<u8>,
    spki: Vec<u8>,
    attributes: Vec<Vec<u8>>,
}

impl Csr {
    fn info(&self) -> Vec<u8> {
        let attrs: Vec<&[u8]> = self.attributes.iter().map(Vec::as_slice).collect();
        seq(&[&tlv(0x02, &[&[self.version]]), &self.subject, &self.spki, &tlv(0xa0, &attrs)])
    }

    /// Signed (ECDSA SHA-256) by `key`, whatever key the request carries.
    fn signed(&self, key: &P256) -> Vec<u8> {
        let info = self.info();
        seq(&[&info, &ecdsa_sha256(), &bits(&key.sign(&info))])
    }

    fn with_signature(&self, alg: &[u8], sig: &[u8]) -> Vec<u8> {
        seq(&[&self.info(), alg, &bits(sig)])
    }
}

// ---- The server under attack ----

/// What the cases are built from: the server, its caller's identity, and keys.
struct Kit {
    server: TestServer,
    _jwks_dir: tempfile::TempDir,
    signer: DevSigner,
    hmac_secret: Vec<u8>,
    rsa: RsaKeyPair,
    rsa_kid: String,
    jwks: String,
    id: String,
    spiffe: String,
    key: P256,
}

const HMAC_KID: &str = "hmac-1";

async fn start() -> Kit {
    let jwks_dir = tempfile::tempdir().unwrap();
    let (signer, _) = DevSigner::generate().unwrap();
    let hmac_secret: Vec<u8> = (0u8..32).map(|i| i.wrapping_mul(37) ^ 0x5a).collect();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/jwt-rs256.pk8.pem");
    let pkcs8 = PrivatePkcs8KeyDer::from_pem_file(path).unwrap();
    let rsa = RsaKeyPair::from_pkcs8(pkcs8.secret_pkcs8_der()).unwrap();
    let (_, public, _) = split(rsa.public().as_ref());
    let (_, n, rest) = split(public);
    let (_, e, _) = split(rest);
    let strip = |v: &[u8]| v.iter().skip_while(|b| **b == 0).copied().collect::<Vec<u8>>();
    let rsa_kid = "rsa-1".to_owned();
    let mut keys: serde_json::Value = serde_json::from_str(&signer.jwks_json()).unwrap();
    let list = keys["keys"].as_array_mut().unwrap();
    list.push(json!({"kty": "oct", "kid": HMAC_KID, "alg": "HS256", "use": "sig", "k": meshca::jose::encode(&hmac_secret)}));
    list.push(json!({
        "kty": "RSA", "kid": rsa_kid, "alg": "RS256", "use": "sig",
        "n": meshca::jose::encode(strip(n)), "e": meshca::jose::encode(strip(e)),
    }));
    let jwks = keys.to_string();
    let jwks_path = jwks_dir.path().join("jwks.json");
    std::fs::write(&jwks_path, &jwks).unwrap();
    let token = TokenConfig::Jwks(meshca::config::JwksSettings {
        keys: KeySource::File(jwks_path),
        issuer: Some(TOKEN_ISSUER.into()),
        audiences: vec![AUDIENCE.into()],
        leeway: Duration::from_secs(60),
        refresh: KeyRefresh::default(),
        confirm_pod: None,
    });
    let server = TestServer::start_with(Options { token: Some(token), ..Default::default() }).await;
    let id = server.identity("default", "web");
    let spiffe = "spiffe://cluster.local/ns/default/sa/web".to_owned();
    Kit { server, _jwks_dir: jwks_dir, signer, hmac_secret, rsa, rsa_kid, jwks, id, spiffe, key: P256::new() }
}

impl Kit {
    /// The claims of a valid token for default/web, as JSON text (serde_json keeps
    /// keys sorted, so edits below can rely on the text).
    fn claims(&self) -> String {
        let c = self.server.claims("default", "web");
        let secs = |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let (pod, uid) = c.pod.unwrap();
        json!({
            "iss": c.issuer, "aud": c.audience, "exp": secs(c.expires_at), "iat": secs(c.issued_at),
            "nbf": secs(c.issued_at), "sub": "system:serviceaccount:default:web",
            "kubernetes.io": {"namespace": "default", "serviceaccount": {"name": "web"},
                              "pod": {"name": pod, "uid": uid}},
        })
        .to_string()
    }

    fn header(&self) -> String {
        json!({"alg": "ES256", "typ": "JWT", "kid": self.signer.kid()}).to_string()
    }

    /// ES256-signed by the trusted key, whatever the header and claims say.
    fn jwt(&self, header: &str, claims: &str) -> Vec<u8> {
        self.signer.sign_raw(header.as_bytes(), claims.as_bytes()).into_bytes()
    }

    fn token(&self) -> Vec<u8> {
        self.jwt(&self.header(), &self.claims())
    }

    /// HS256 over `header.claims` with `secret`.
    fn hs256(&self, header: &str, claims: &str, secret: &[u8]) -> Vec<u8> {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
        let Ok(token) = compact_jws(header.as_bytes(), claims.as_bytes(), |msg| {
            Ok::<_, Infallible>(ring::hmac::sign(&key, msg))
        });
        token.into_bytes()
    }

    /// RS256 over `header.claims` with the RSA key the JWKS lists.
    fn rs256(&self, header: &str, claims: &str) -> Vec<u8> {
        let token = compact_jws(header.as_bytes(), claims.as_bytes(), |msg| {
            let mut sig = vec![0; self.rsa.public().modulus_len()];
            self.rsa.sign(&signature::RSA_PKCS1_SHA256, &SystemRandom::new(), msg, &mut sig).map(|()| sig)
        });
        token.unwrap().into_bytes()
    }

    /// The request an honest proxy sends: CN and DNS SAN the identity, URI SAN the SPIFFE ID.
    fn csr(&self) -> Csr {
        Csr {
            version: 0,
            subject: cn_name(&utf8(self.id.as_bytes())),
            spki: self.key.spki.clone(),
            attributes: vec![extension_request(&[san(&[
                dns(self.id.as_bytes()),
                uri(self.spiffe.as_bytes()),
            ])])],
        }
    }

    /// The honest request with these extensions requested instead.
    fn csr_with(&self, exts: &[Vec<u8>]) -> Vec<u8> {
        Csr { attributes: vec![extension_request(exts)], ..self.csr() }.signed(&self.key)
    }

    /// The honest request naming these DNS SANs (and nothing else, CN included).
    fn csr_naming(&self, names: &[&[u8]]) -> Vec<u8> {
        let names: Vec<Vec<u8>> = names.iter().map(|n| dns(n)).collect();
        Csr { subject: seq(&[]), attributes: vec![extension_request(&[san(&names)])], ..self.csr() }
            .signed(&self.key)
    }

    fn request(&self, token: Vec<u8>, csr: Vec<u8>) -> CertifyRequest {
        CertifyRequest { identity: self.id.clone(), token, certificate_signing_request: csr }
    }

    fn for_identity(&self, identity: &str) -> CertifyRequest {
        CertifyRequest {
            identity: identity.to_owned(),
            token: self.token(),
            certificate_signing_request: self.csr().signed(&self.key),
        }
    }
}

/// `req` with its identity padded with `a`s so that it encodes to exactly `len` bytes.
fn encoded_to(mut req: CertifyRequest, len: usize) -> CertifyRequest {
    req.identity.clear();
    let base = req.encoded_len();
    let mut pad = len.saturating_sub(base + 6);
    loop {
        req.identity = "a".repeat(pad);
        match req.encoded_len() {
            n if n == len => return req,
            n if n < len => pad += len - n,
            _ => pad -= 1,
        }
    }
}

// ---- The corpus ----

/// A request that must be refused, with the status and audit reason code it must get.
struct Case {
    name: &'static str,
    request: CertifyRequest,
    code: Code,
    reason: &'static str,
}

fn corpus(k: &Kit) -> Vec<Case> {
    use Code::{InvalidArgument as Invalid, PermissionDenied as Denied, Unauthenticated as Unauth};
    let good = k.csr().signed(&k.key);
    // Cases that change one thing of a good request: the CSR, the token, the identity.
    let csr = |name, der, code, reason| Case { name, request: k.request(k.token(), der), code, reason };
    let token =
        |name, token, code, reason| Case { name, request: k.request(token, good.clone()), code, reason };
    let identity =
        |name, identity: &str, code, reason| Case { name, request: k.for_identity(identity), code, reason };
    let message = |name, request, code, reason| Case { name, request, code, reason };

    let id = k.id.as_bytes();
    let fixture =
        |name: &str| std::fs::read(format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    // The good request's pieces: CertificationRequest ::= SEQUENCE { info, algorithm, signature }.
    let (_, outer, _) = split(&good);
    let (info, _, after_info) = split(outer);
    let (sig_alg, _, sig_bits) = split(after_info);
    let (_, sig_contents, _) = split(sig_bits);
    let (outer_hi, outer_lo) = ((outer.len() >> 8) as u8, outer.len() as u8);
    let mut noise = 0x2545_f491_4f6c_dd1du64;
    let random: Vec<u8> = (0..600)
        .map(|_| {
            noise ^= noise << 13;
            noise ^= noise >> 7;
            noise ^= noise << 17;
            noise as u8
        })
        .collect();
    let no_attributes = seq(&[&tlv(0x02, &[&[0]]), &cn_name(&utf8(id)), &k.key.spki]);
    // Requests naming only this CN; requesting only these extensions; adding this attribute.
    let cn_only = |cn: Vec<u8>| Csr { subject: cn_name(&cn), attributes: vec![], ..k.csr() }.signed(&k.key);
    let requesting = |exts: &[Vec<u8>]| k.csr_with(exts);
    let adding = |attribute: Vec<u8>| {
        let mut csr = k.csr();
        csr.attributes.push(attribute);
        csr.signed(&k.key)
    };

    let san_id = san(&[dns(id)]);
    let admin = k.server.identity("kube-system", "admin");
    let with_nul = [id, b"\0.evil.example"].concat();
    let wildcard = "*.default.serviceaccount.identity.meshca-system.cluster.local";
    let upper = k.id.to_ascii_uppercase();
    let dotted = format!("{}.", k.id);
    let idn = k.id.replacen("web", "wéb", 1);
    let puny = k.id.replacen("web", "xn--wb-9ia", 1);
    let long = format!("{}.{}", "a".repeat(10_000), k.id);
    // Enough SAN entries to make a request just over 64 KiB and within the decoding limit.
    let many_ids: Vec<&[u8]> = std::iter::repeat_n(id, 66 * 1024 / (id.len() + 2)).collect();
    let many_short: Vec<&[u8]> = std::iter::repeat_n(&b"a"[..], 10_000).collect();
    let db = k.server.identity("default", "db");
    let then_other: Vec<&[u8]> = std::iter::repeat_n(id, 150).chain([db.as_bytes()]).collect();
    let upn = tlv(0xa0, &[&oid("1.3.6.1.4.1.311.20.2.3"), &tlv(0xa0, &[&utf8(b"admin@corp")])]);
    let email_subject = seq(&[&rdn(OID_EMAIL, &tlv(0x16, &[b"a@b.c"]))]);
    let bc = |body: &[u8]| extension(OID_BASIC_CONSTRAINTS, true, &seq(&[body]));

    // Keys: RSA ones are refused before their (bogus) signature is looked at; EC
    // points are refused by the structure check or by ring when it verifies.
    let modulus = |bytes: usize, last: u8| [vec![0xc5; bytes - 1], vec![last]].concat();
    let rsa = |n: Vec<u8>, e: &[u8]| {
        Csr { spki: rsa_spki(&seq(&[&integer(&n), &integer(e)])), ..k.csr() }
            .with_signature(&sha256_rsa(), &[0x42; 256])
    };
    let point = |x: u8, y: u8| [&[4u8][..], &[x; 32], &[y; 32]].concat();
    let ec = |spki: Vec<u8>| Csr { spki, ..k.csr() }.signed(&k.key);
    let mut y_flipped = k.key.spki.clone();
    *y_flipped.last_mut().unwrap() ^= 1;
    let explicit_curve =
        seq(&[&seq(&[&oid(OID_EC_PUBLIC_KEY), &seq(&[&tlv(0x02, &[&[1]])])]), &bits(&point(1, 1))]);
    let dsa = seq(&[&seq(&[&oid("1.2.840.10040.4.1")]), &bits(&tlv(0x02, &[&[5; 128]]))]);
    let ed25519 = {
        let rng = SystemRandom::new();
        let ed = Ed25519KeyPair::from_pkcs8(Ed25519KeyPair::generate_pkcs8(&rng).unwrap().as_ref()).unwrap();
        let csr =
            Csr { spki: seq(&[&seq(&[&oid("1.3.101.112")]), &bits(ed.public_key().as_ref())]), ..k.csr() };
        csr.with_signature(&seq(&[&oid("1.3.101.112")]), ed.sign(&csr.info()).as_ref())
    };
    let zero_signature = seq(&[&tlv(0x02, &[&[0]]), &tlv(0x02, &[&[0]])]);
    let own_signature = k.key.sign(&k.csr().info());
    let signed_as = |alg: Vec<u8>| k.csr().with_signature(&alg, &own_signature);

    // Tokens: the claims of a good one, as JSON text, edited.
    let claims = k.claims();
    let rest = &claims[1..];
    let kid = |kid: &str| json!({"alg": "ES256", "kid": kid}).to_string();
    let attacker = DevSigner::generate().unwrap().0;
    let attacker_jwk =
        serde_json::from_str::<serde_json::Value>(&attacker.jwks_json()).unwrap()["keys"][0].clone();
    let embedded = json!({"alg": "ES256", "kid": k.signer.kid(), "jwk": attacker_jwk, "jku": "https://evil.example/jwks"});
    let inner = String::from_utf8(k.token()).unwrap();
    let mut nul_token = k.token();
    nul_token.insert(10, 0);
    let none = format!("{}.{}.", meshca::jose::encode(r#"{"alg":"nOnE"}"#), meshca::jose::encode(&claims));
    let limit = meshca::server::grpc::MAX_REQUEST_LEN;

    vec![
        // -- CSR: malformed and truncated DER --
        csr("csr: empty", vec![], Invalid, "csr_empty"),
        csr("csr: one byte (0x30)", vec![0x30], Invalid, "csr_malformed"),
        csr("csr: truncated by one byte", good[..good.len() - 1].to_vec(), Invalid, "csr_malformed"),
        csr("csr: truncated to half", good[..good.len() / 2].to_vec(), Invalid, "csr_malformed"),
        csr(
            "csr: truncated inside the signature header",
            [&good[..good.len() - sig_bits.len()], &sig_bits[..2]].concat(),
            Invalid,
            "csr_malformed",
        ),
        csr("csr: trailing NUL byte", [&good[..], &[0]].concat(), Invalid, "csr_malformed"),
        csr("csr: two requests back to back", [&good[..], &good[..]].concat(), Invalid, "csr_malformed"),
        csr("csr: trailing garbage inside the outer SEQUENCE", seq(&[outer, NULL]), Invalid, "csr_malformed"),
        csr(
            "csr: non-minimal outer length",
            [&[0x30, 0x83, 0, outer_hi, outer_lo][..], outer].concat(),
            Invalid,
            "csr_malformed",
        ),
        csr(
            "csr: BER indefinite length",
            [&[0x30, 0x80][..], outer, &[0, 0]].concat(),
            Invalid,
            "csr_malformed",
        ),
        csr(
            "csr: outer length claims 4 GiB",
            [&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff][..], outer].concat(),
            Invalid,
            "csr_malformed",
        ),
        csr(
            "csr: PEM instead of DER",
            meshca::ca::material::to_pem("CERTIFICATE REQUEST", &good).into_bytes(),
            Invalid,
            "csr_malformed",
        ),
        csr("csr: version 2", Csr { version: 1, ..k.csr() }.signed(&k.key), Invalid, "csr_malformed"),
        csr("csr: 600 random bytes", random, Invalid, "csr_malformed"),
        csr(
            "csr: a certificate instead of a request",
            k.server.anchors.certificates()[0].to_vec(),
            Invalid,
            "csr_malformed",
        ),
        csr("csr: 16 KiB + 1 of zeros", vec![0; 16 * 1024 + 1], Invalid, "csr_too_large"),
        csr(
            "csr: signature BIT STRING with unused bits",
            seq(&[info, sig_alg, &tlv(0x03, &[&[3], &sig_contents[1..]])]),
            Invalid,
            "csr_malformed",
        ),
        csr(
            "csr: attributes [0] missing",
            seq(&[&no_attributes, &ecdsa_sha256(), &bits(&k.key.sign(&no_attributes))]),
            Invalid,
            "csr_malformed",
        ),
        // -- CSR: extensions and attributes --
        csr(
            "csr: duplicate SAN extension",
            requesting(&[san_id.clone(), san_id.clone()]),
            Invalid,
            "csr_malformed",
        ),
        csr(
            "csr: duplicate extensionRequest attribute",
            adding(extension_request(std::slice::from_ref(&san_id))),
            Invalid,
            "csr_malformed",
        ),
        csr(
            "csr: unknown critical extension",
            requesting(&[extension("1.3.6.1.4.1.99999.1", true, NULL)]),
            Invalid,
            "csr_malformed",
        ),
        csr(
            "csr: SAN extension with trailing garbage",
            requesting(&[extension(OID_SAN, false, &[&seq(&[&dns(id)])[..], NULL].concat())]),
            Invalid,
            "csr_malformed",
        ),
        csr(
            "csr: another identity hidden in the Microsoft extension attribute",
            adding(extensions_attribute(OID_MS_EXTENSION_REQUEST, &[san(&[dns(admin.as_bytes())])])),
            Denied,
            "csr_name_not_allowed",
        ),
        // -- CSR: names --
        csr("csr: DNS SAN with a NUL byte", k.csr_naming(&[&with_nul]), Denied, "csr_name_not_allowed"),
        csr(
            "csr: DNS SAN of the identity plus NUL",
            k.csr_naming(&[&[id, b"\0"].concat()]),
            Denied,
            "csr_name_not_allowed",
        ),
        csr("csr: CN with a NUL byte", cn_only(utf8(&with_nul)), Denied, "csr_name_not_allowed"),
        csr(
            "csr: URI SAN of the SPIFFE ID plus NUL",
            requesting(&[san(&[uri(&[k.spiffe.as_bytes(), b"\0"].concat())])]),
            Denied,
            "csr_name_not_allowed",
        ),
        csr("csr: wildcard DNS SAN *.", k.csr_naming(&[wildcard.as_bytes()]), Denied, "csr_name_not_allowed"),
        csr("csr: DNS SAN *", k.csr_naming(&[b"*"]), Denied, "csr_name_not_allowed"),
        csr("csr: wildcard CN", cn_only(utf8(wildcard.as_bytes())), Denied, "csr_name_not_allowed"),
        csr("csr: upper-case DNS SAN", k.csr_naming(&[upper.as_bytes()]), Denied, "csr_name_not_allowed"),
        csr("csr: upper-case CN", cn_only(utf8(upper.as_bytes())), Denied, "csr_name_not_allowed"),
        csr("csr: trailing-dot DNS SAN", k.csr_naming(&[dotted.as_bytes()]), Denied, "csr_name_not_allowed"),
        csr("csr: trailing-dot CN", cn_only(utf8(dotted.as_bytes())), Denied, "csr_name_not_allowed"),
        csr("csr: IDN (UTF-8) DNS SAN", k.csr_naming(&[idn.as_bytes()]), Denied, "csr_name_not_allowed"),
        csr("csr: punycode DNS SAN", k.csr_naming(&[puny.as_bytes()]), Denied, "csr_name_not_allowed"),
        csr("csr: CN as BMPString", cn_only(bmp(&k.id)), Denied, "csr_name_not_allowed"),
        csr(
            "csr: DNS SAN of 10,000 characters",
            k.csr_naming(&[long.as_bytes()]),
            Denied,
            "csr_name_not_allowed",
        ),
        csr("csr: CN of 10,000 characters", cn_only(utf8(long.as_bytes())), Denied, "csr_name_not_allowed"),
        csr(
            "csr: 66 KiB of SAN entries, each the identity",
            k.csr_naming(&many_ids),
            Invalid,
            "request_too_large",
        ),
        csr("csr: 10,000 one-letter SAN entries", k.csr_naming(&many_short), Invalid, "csr_too_large"),
        csr(
            "csr: 150 SANs of the identity, then another",
            k.csr_naming(&then_other),
            Denied,
            "csr_name_not_allowed",
        ),
        csr(
            "csr: IP SAN",
            requesting(&[san(&[dns(id), tlv(0x87, &[&[127, 0, 0, 1]])])]),
            Denied,
            "csr_name_not_allowed",
        ),
        csr(
            "csr: email SAN",
            requesting(&[san(&[tlv(0x81, &[b"web@example.com"])])]),
            Denied,
            "csr_name_not_allowed",
        ),
        csr("csr: otherName SAN (UPN)", requesting(&[san(&[upn])]), Denied, "csr_name_not_allowed"),
        csr(
            "csr: URI SAN of another SPIFFE ID",
            requesting(&[san(&[uri(b"spiffe://cluster.local/ns/kube-system/sa/admin")])]),
            Denied,
            "csr_name_not_allowed",
        ),
        csr(
            "csr: directoryName SAN",
            requesting(&[san(&[tlv(0xa4, &[&cn_name(&utf8(id))])])]),
            Denied,
            "csr_name_not_allowed",
        ),
        csr(
            "csr: emailAddress in the subject",
            Csr { subject: email_subject, ..k.csr() }.signed(&k.key),
            Denied,
            "csr_name_not_allowed",
        ),
        // -- CSR: CA rights --
        csr("csr: CA:TRUE", requesting(&[san_id.clone(), bc(TRUE)]), Denied, "csr_ca_requested"),
        csr(
            "csr: CA:TRUE with pathLen 0",
            requesting(&[bc(&[TRUE, &tlv(0x02, &[&[0]])].concat())]),
            Denied,
            "csr_ca_requested",
        ),
        csr(
            "csr: pathLen without CA:TRUE",
            requesting(&[bc(&tlv(0x02, &[&[5]]))]),
            Denied,
            "csr_ca_requested",
        ),
        csr(
            "csr: CA:TRUE hidden in the Microsoft extension attribute",
            adding(extensions_attribute(OID_MS_EXTENSION_REQUEST, &[bc(TRUE)])),
            Denied,
            "csr_ca_requested",
        ),
        // -- CSR: keys --
        csr("csr: RSA 1024", fixture("rsa1024.csr.der"), Invalid, "csr_weak_key"),
        csr("csr: RSA exponent 1", rsa(modulus(256, 0x01), &[1]), Invalid, "csr_invalid_key"),
        csr("csr: RSA even modulus", rsa(modulus(256, 0x02), &[1, 0, 1]), Invalid, "csr_invalid_key"),
        csr("csr: RSA even exponent", rsa(modulus(256, 0x01), &[1, 0, 0]), Invalid, "csr_invalid_key"),
        csr("csr: RSA 4104-bit modulus", rsa(modulus(513, 0x01), &[1, 0, 1]), Invalid, "csr_key_too_large"),
        csr(
            "csr: P-256 point (1,1), off the curve",
            ec(ec_spki(OID_P256, &point(1, 1))),
            Invalid,
            "csr_bad_signature",
        ),
        csr("csr: P-256 point (0,0)", ec(ec_spki(OID_P256, &point(0, 0))), Invalid, "csr_bad_signature"),
        csr("csr: P-256 point with y flipped, off the curve", ec(y_flipped), Invalid, "csr_bad_signature"),
        csr(
            "csr: P-256 point in compressed form",
            ec(ec_spki(OID_P256, &[&[2u8][..], &[7; 32]].concat())),
            Invalid,
            "csr_invalid_key",
        ),
        csr(
            "csr: P-256 point at infinity (one zero byte)",
            ec(ec_spki(OID_P256, &[0])),
            Invalid,
            "csr_invalid_key",
        ),
        csr("csr: P-521 key", fixture("p521.csr.der"), Invalid, "csr_unsupported_key"),
        csr("csr: Ed25519 key", ed25519, Invalid, "csr_unsupported_key"),
        csr("csr: EC key with explicit curve parameters", ec(explicit_curve), Invalid, "csr_unsupported_key"),
        csr("csr: DSA key", ec(dsa), Invalid, "csr_unsupported_key"),
        csr("csr: signed by a different key", k.csr().signed(&P256::new()), Invalid, "csr_bad_signature"),
        csr(
            "csr: signature of zeros",
            k.csr().with_signature(&ecdsa_sha256(), &zero_signature),
            Invalid,
            "csr_bad_signature",
        ),
        csr(
            "csr: the key's signature over something else",
            seq(&[info, sig_alg, &bits(&k.key.sign(b"another request"))]),
            Invalid,
            "csr_bad_signature",
        ),
        csr(
            "csr: RSA-PSS signature algorithm on an EC key",
            signed_as(seq(&[&oid("1.2.840.113549.1.1.10"), &seq(&[])])),
            Invalid,
            "csr_unsupported_signature_algorithm",
        ),
        csr(
            "csr: RSA signature algorithm on an EC key",
            signed_as(sha256_rsa()),
            Invalid,
            "csr_unsupported_signature_algorithm",
        ),
        csr(
            "csr: ECDSA with SHA-1",
            signed_as(seq(&[&oid("1.2.840.10045.4.1")])),
            Invalid,
            "csr_unsupported_signature_algorithm",
        ),
        csr(
            "csr: ECDSA SHA-256 with NULL parameters",
            signed_as(seq(&[&oid(OID_ECDSA_SHA256), NULL])),
            Invalid,
            "csr_unsupported_signature_algorithm",
        ),
        // -- The requested identity --
        identity("identity: upper case", &upper, Invalid, "identity_malformed"),
        identity("identity: trailing dot", &dotted, Invalid, "identity_malformed"),
        identity("identity: IDN (UTF-8)", &idn, Invalid, "identity_malformed"),
        identity("identity: punycode look-alike", &puny, Denied, "identity_mismatch"),
        identity("identity: wildcard *.", wildcard, Invalid, "identity_malformed"),
        identity("identity: NUL byte", &format!("{}\0", k.id), Invalid, "identity_malformed"),
        identity("identity: leading space", &format!(" {}", k.id), Invalid, "identity_malformed"),
        identity(
            "identity: 300 characters",
            &format!("{}{}", "a.".repeat(120), k.id),
            Invalid,
            "identity_malformed",
        ),
        identity("identity: 60 KiB", &"a".repeat(60 * 1024), Invalid, "identity_malformed"),
        identity("identity: another service account's", &admin, Denied, "identity_mismatch"),
        // -- Tokens --
        token(
            "token: duplicate sub claim",
            k.jwt(&k.header(), &format!(r#"{{"sub":"system:serviceaccount:kube-system:admin",{rest}"#)),
            Unauth,
            "token_malformed",
        ),
        token(
            "token: duplicate sub claim, one escaped (s\\u0075b)",
            k.jwt(&k.header(), &format!(r#"{{"s\u0075b":"system:serviceaccount:kube-system:admin",{rest}"#)),
            Unauth,
            "token_malformed",
        ),
        token(
            "token: duplicate exp claim",
            k.jwt(&k.header(), &format!(r#"{{"exp":99999999999,{rest}"#)),
            Unauth,
            "token_malformed",
        ),
        token(
            "token: duplicate namespace inside kubernetes.io",
            k.jwt(
                &k.header(),
                &claims.replace(
                    r#""namespace":"default""#,
                    r#""namespace":"kube-system","namespace":"default""#,
                ),
            ),
            Unauth,
            "token_malformed",
        ),
        token(
            "token: duplicate alg in the header",
            k.jwt(r#"{"alg":"HS256","alg":"ES256"}"#, &claims),
            Unauth,
            "token_malformed",
        ),
        token(
            "token: sub disagreeing with kubernetes.io",
            k.jwt(
                &k.header(),
                &claims.replace("serviceaccount:default:web", "serviceaccount:kube-system:admin"),
            ),
            Unauth,
            "token_malformed",
        ),
        token(
            "token: kid path traversal ../../etc/passwd",
            k.jwt(&kid("../../../../../../etc/passwd"), &claims),
            Unauth,
            "unknown_key",
        ),
        token("token: kid /dev/zero", k.jwt(&kid("/dev/zero"), &claims), Unauth, "unknown_key"),
        token(
            "token: kid file:// URL",
            k.jwt(&kid("file:///var/run/secrets/kubernetes.io/serviceaccount/token"), &claims),
            Unauth,
            "unknown_key",
        ),
        token("token: kid with a NUL byte", k.jwt(&kid("x\0y"), &claims), Unauth, "unknown_key"),
        token("token: kid of 8 KiB", k.jwt(&kid(&"k".repeat(8 * 1024)), &claims), Unauth, "unknown_key"),
        token(
            "token: HS256 with the JWKS's own HMAC key",
            k.hs256(&json!({"alg": "HS256", "kid": HMAC_KID}).to_string(), &claims, &k.hmac_secret),
            Unauth,
            "unsupported_algorithm",
        ),
        token(
            "token: HS256 keyed with the published JWKS (key confusion)",
            k.hs256(&json!({"alg": "HS256", "kid": k.signer.kid()}).to_string(), &claims, k.jwks.as_bytes()),
            Unauth,
            "unsupported_algorithm",
        ),
        token(
            "token: ES256 naming the HMAC key's kid",
            k.jwt(&kid(HMAC_KID), &claims),
            Unauth,
            "unknown_key",
        ),
        token(
            "token: RS256 signed by the RSA key, naming the EC key's kid",
            k.rs256(&json!({"alg": "RS256", "kid": k.signer.kid()}).to_string(), &claims),
            Unauth,
            "unknown_key",
        ),
        token(
            "token: ES256 naming the RSA key's kid",
            k.jwt(&kid(&k.rsa_kid), &claims),
            Unauth,
            "unknown_key",
        ),
        token(
            "token: ES256 header over an RS256 signature",
            k.rs256(&kid(k.signer.kid()), &claims),
            Unauth,
            "bad_signature",
        ),
        token("token: alg nOnE", none.into_bytes(), Unauth, "unsupported_algorithm"),
        token(
            "token: attacker's key embedded as jwk and jku headers",
            attacker.sign_raw(embedded.to_string().as_bytes(), claims.as_bytes()).into_bytes(),
            Unauth,
            "bad_signature",
        ),
        token(
            "token: nested JWT (cty JWT)",
            k.jwt(&json!({"alg": "ES256", "cty": "JWT", "kid": k.signer.kid()}).to_string(), &inner),
            Unauth,
            "token_malformed",
        ),
        token("token: a JWT as the payload of a JWT", k.jwt(&k.header(), &inner), Unauth, "token_malformed"),
        token(
            "token: five segments (JWE shape)",
            [&k.token()[..], b".e30.e30"].concat(),
            Unauth,
            "token_malformed",
        ),
        token(
            "token: crit header",
            k.jwt(&json!({"alg": "ES256", "crit": ["b64"], "b64": false}).to_string(), &claims),
            Unauth,
            "token_malformed",
        ),
        token("token: NUL byte inside", nul_token, Unauth, "token_malformed"),
        token(
            "token: exp 1e300",
            k.jwt(&k.header(), &format!(r#"{{"exp":1e300,{}"#, rest.replacen(r#""exp":"#, r#""x-exp":"#, 1))),
            Unauth,
            "token_malformed",
        ),
        token(
            "token: signed by an unknown key under the trusted kid",
            attacker.sign_raw(k.header().as_bytes(), claims.as_bytes()).into_bytes(),
            Unauth,
            "bad_signature",
        ),
        token("token: 60 KiB", vec![b'a'; 60 * 1024], Invalid, "token_too_large"),
        token(
            "token: the decoding limit less 2 KiB",
            vec![b'a'; MAX_DECODED_MESSAGE - 2048],
            Invalid,
            "request_too_large",
        ),
        // -- gRPC message sizes (beyond the decoding limit: the transport test below) --
        message(
            "message: exactly 64 KiB",
            encoded_to(k.request(k.token(), good.clone()), limit),
            Invalid,
            "identity_malformed",
        ),
        message(
            "message: 64 KiB + 1",
            encoded_to(k.request(k.token(), good.clone()), limit + 1),
            Invalid,
            "request_too_large",
        ),
        message(
            "message: exactly the 68 KiB decoding limit",
            encoded_to(k.request(k.token(), good.clone()), MAX_DECODED_MESSAGE),
            Invalid,
            "request_too_large",
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hostile_request_is_refused_with_its_code_no_certificate_and_one_audit_record() {
    let kit = start().await;
    let server = &kit.server;
    let mut client = server.client().await;

    // The builders above make acceptable requests when nothing is wrong with them.
    let baseline = kit.request(kit.token(), kit.csr().signed(&kit.key));
    let issued = client.certify(baseline).await.expect("the baseline request is issued").into_inner();
    assert!(!issued.leaf_certificate.is_empty());

    let cases = corpus(&kit);
    assert!(cases.len() >= 60, "{} cases", cases.len());
    let mut names = std::collections::HashSet::new();
    let mut failures = Vec::new();
    let mut table = String::new();
    for case in cases {
        assert!(names.insert(case.name), "duplicate case name {}", case.name);
        let before = server.audit_records().len();
        let status = match client.certify(case.request).await {
            Ok(resp) => {
                let resp = resp.into_inner();
                failures.push(format!(
                    "{}: answered OK (leaf of {} bytes, {} intermediates)",
                    case.name,
                    resp.leaf_certificate.len(),
                    resp.intermediate_certificates.len()
                ));
                continue;
            }
            Err(status) => status,
        };
        let name = case.name;
        let Some(id) = status.metadata().get("x-request-id").map(|v| v.to_str().unwrap().to_owned()) else {
            failures.push(format!("{name}: refused below the handler, unaudited: {status:?}"));
            continue;
        };
        let records = server.audit_records();
        let mine: Vec<_> = records.iter().filter(|r| r["request_id"] == id.as_str()).collect();
        let reason = mine.first().and_then(|r| r["reason"].as_str()).unwrap_or("(no record)");
        let reason_code = reason.split(':').next().unwrap_or_default();
        table.push_str(&format!("{:<62} {:<17} {reason_code}\n", case.name, format!("{:?}", status.code())));
        let mut wrong = Vec::new();
        if status.code() != case.code {
            wrong.push(format!("code {:?} (expected {:?}): {}", status.code(), case.code, status.message()));
        }
        if mine.len() != 1 || records.len() != before + 1 {
            wrong.push(format!(
                "{} records for the request, {} new in all",
                mine.len(),
                records.len() - before
            ));
        }
        if let Some(record) = mine.first() {
            if record["outcome"] != "denied" {
                wrong.push(format!("outcome {}", record["outcome"]));
            }
            if record["code"] != meshca::status::code_name(case.code) {
                wrong.push(format!("audited code {}", record["code"]));
            }
            if reason_code != case.reason {
                wrong.push(format!("reason {reason:?} (expected {})", case.reason));
            }
            if record.get("serial").is_some() || record.get("fingerprint_sha256").is_some() {
                wrong.push("the record names a certificate".into());
            }
        }
        if !wrong.is_empty() {
            failures.push(format!("{}: {}", case.name, wrong.join("; ")));
        }
    }
    println!("{table}");
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        names.len(),
        failures.join("\n")
    );
    let issued = server.audit_records().iter().filter(|r| r["outcome"] == "issued").count();
    assert_eq!(issued, 2, "only the serving certificate and the baseline were issued");
    meshca::audit::verify_file(&server.audit_path).unwrap();
}

// ---- The transport ----

/// A good client gets a certificate within `bound`, on a new connection.
async fn assert_served(server: &TestServer, bound: Duration, while_: &str) {
    let started = Instant::now();
    let certified = timeout(bound, async {
        let (_key, req) = server.request("default", "web");
        server.client().await.certify(req).await
    })
    .await;
    match certified {
        Ok(Ok(resp)) => assert!(!resp.into_inner().leaf_certificate.is_empty()),
        Ok(Err(status)) => panic!("{while_}: a good client was refused: {status:?}"),
        Err(_) => panic!("{while_}: a good client was not served within {bound:?}"),
    }
    eprintln!("{while_}: a good client was served in {:?}", started.elapsed());
}

/// Reads until the server closes the connection (end of stream or an error).
async fn closed<S: tokio::io::AsyncRead + Unpin>(mut stream: S) {
    let mut buf = [0u8; 1024];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}

/// Waits, at most until `deadline`, for the server to close every one of `streams`;
/// returns how many it closed.
async fn closed_by<S: tokio::io::AsyncRead + Unpin + Send + 'static>(
    streams: Vec<S>,
    deadline: Instant,
) -> usize {
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|s| tokio::spawn(async move { tokio::time::timeout_at(deadline, closed(s)).await.is_ok() }))
        .collect();
    let mut count = 0;
    for t in tasks {
        count += usize::from(t.await.unwrap());
    }
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_beyond_the_decoding_limit_are_refused_by_the_transport_unaudited_and_service_goes_on() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let (_key, req) = server.request("default", "web");
    let before = server.audit_records().len();
    let over = encoded_to(req.clone(), MAX_DECODED_MESSAGE + 1);
    let mega_token = CertifyRequest { token: vec![b'a'; 1024 * 1024], ..req.clone() };
    for (what, request) in [("68 KiB + 1 message", over), ("1 MiB token", mega_token)] {
        assert!(request.encoded_len() > MAX_DECODED_MESSAGE);
        let status = client.certify(request).await.unwrap_err();
        assert_eq!(status.code(), Code::OutOfRange, "{what}: {status:?}");
        assert!(status.metadata().get("x-request-id").is_none(), "{what}: never reached the handler");
    }
    assert_eq!(server.audit_records().len(), before, "no audit record below the handler");
    // The same channel, then a new one, are still served.
    assert!(client.certify(req).await.is_ok());
    assert_served(&server, Duration::from_secs(5), "after oversized messages").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_connections_are_cut_at_the_handshake_deadline_while_a_good_client_is_served() {
    let server = TestServer::start().await;
    let config = server.tls_config(rustls::crypto::ring::default_provider());
    let opened = Instant::now();
    let mut silent = Vec::new();
    let mut half_hello = Vec::new();
    for _ in 0..100 {
        silent.push(TcpStream::connect(server.addr).await.unwrap());
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        // A TLS record header announcing a ClientHello, and then nothing.
        s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await.unwrap();
        half_hello.push(s);
    }
    let mut no_preface = Vec::new();
    let mut half_preface = Vec::new();
    for _ in 0..50 {
        no_preface.push(server.tls(&config).await);
        let mut s = server.tls(&config).await;
        s.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        s.flush().await.unwrap();
        half_preface.push(s);
    }
    assert_served(&server, Duration::from_secs(5), "300 slow-loris connections held open").await;
    // Each is cut HANDSHAKE_TIMEOUT after its accept; all were opened after `opened`.
    let deadline = opened.elapsed() + HANDSHAKE_TIMEOUT + Duration::from_secs(5);
    let deadline = opened + deadline;
    assert_eq!(closed_by(silent, deadline).await, 100, "silent TCP connections closed");
    assert_eq!(closed_by(half_hello, deadline).await, 100, "half ClientHellos closed");
    assert_eq!(closed_by(no_preface, deadline).await, 50, "TLS without the HTTP/2 preface closed");
    assert_eq!(closed_by(half_preface, deadline).await, 50, "half an HTTP/2 preface closed");
    assert!(opened.elapsed() >= HANDSHAKE_TIMEOUT - Duration::from_secs(1), "closed before the deadline");
    assert_served(&server, Duration::from_secs(5), "after the slow-loris connections").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_idle_connections_do_not_keep_a_good_client_out_and_are_closed() {
    const IDLE: usize = 2000;
    let server = TestServer::start().await;
    let opened = Instant::now();
    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        idle.push(TcpStream::connect(server.addr).await.unwrap());
    }
    let connected = opened.elapsed();
    assert_served(&server, Duration::from_secs(5), &format!("{IDLE} idle connections")).await;
    let deadline = opened + connected + HANDSHAKE_TIMEOUT + Duration::from_secs(10);
    assert_eq!(closed_by(idle, deadline).await, IDLE, "idle connections closed after the handshake timeout");
}

// ---- HTTP/2, frame by frame (support::h2) ----

async fn raw_h2(server: &TestServer) -> RawH2 {
    RawH2::handshake(server.tls(&server.tls_config(rustls::crypto::ring::default_provider())).await).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_flood_is_refused_beyond_the_stream_limit_and_then_cut_off() {
    let server = TestServer::start().await;
    let mut h2 = raw_h2(&server).await;
    let limit = MAX_CONCURRENT_STREAMS as usize;
    let block = certify_headers(SERVER_NAME, &[]);
    // Streams opened and never finished (no END_STREAM, no message): the limit's worth,
    // then as many again and more, which must be refused.
    let streams = limit + MAX_LOCAL_ERROR_RESETS + 100;
    h2.send((0..streams as u32).map(|i| frame(HEADERS, END_HEADERS, 2 * i + 1, &block))).await;
    assert_served(&server, Duration::from_secs(5), "a stream flood on another connection").await;
    let seen = h2.outcome(Duration::from_secs(20)).await;
    eprintln!("stream flood: the server sent {seen:?}");
    assert_eq!(seen.max_concurrent_streams, Some(MAX_CONCURRENT_STREAMS), "{seen:?}");
    let refused = seen.resets.get(&REFUSED_STREAM).copied().unwrap_or(0);
    assert!(refused > 0 && refused <= MAX_LOCAL_ERROR_RESETS, "{seen:?}");
    assert_eq!(seen.goaway.map(|g| g.1), Some(ENHANCE_YOUR_CALM), "{seen:?}");
    assert_served(&server, Duration::from_secs(5), "after the stream flood").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_request_is_cancelled_at_the_request_timeout_so_an_aged_connection_closes() {
    let request_timeout = Duration::from_secs(2);
    let connections = ConnectionSettings {
        max_age: Some(Duration::from_millis(300)),
        request_timeout,
        ..Default::default()
    };
    let server = TestServer::start_with(Options { connections, ..Default::default() }).await;
    let mut h2 = raw_h2(&server).await;
    let opened = Instant::now();
    // A request's headers, then nothing: no message, no END_STREAM. Past its age the
    // connection is asked to close (GOAWAY) but waits for this request, which only
    // the request timeout ends.
    h2.send(std::iter::once(frame(HEADERS, END_HEADERS, 1, &certify_headers(SERVER_NAME, &[])))).await;
    let seen = h2.outcome(request_timeout + Duration::from_secs(20)).await;
    assert!(seen.goaway.is_some(), "{seen:?}");
    let held = opened.elapsed();
    assert!(
        held >= request_timeout - Duration::from_millis(200),
        "closed after {held:?}, before the request timeout"
    );
    assert_served(&server, Duration::from_secs(5), "after the unfinished request").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_resets_are_cut_off_with_enhance_your_calm() {
    let server = TestServer::start().await;
    let mut h2 = raw_h2(&server).await;
    let block = certify_headers(SERVER_NAME, &[]);
    // CVE-2023-44487: open a stream and cancel it at once, over and over.
    let pairs = (0..20_000u32).flat_map(|i| {
        let id = 2 * i + 1;
        [frame(HEADERS, END_HEADERS, id, &block), frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes())]
    });
    h2.send(pairs).await;
    assert_served(&server, Duration::from_secs(5), "a rapid-reset flood on another connection").await;
    let seen = h2.outcome(Duration::from_secs(20)).await;
    eprintln!("rapid resets: the server sent {seen:?}");
    assert_eq!(seen.goaway.map(|g| g.1), Some(ENHANCE_YOUR_CALM), "{seen:?}");
    assert_served(&server, Duration::from_secs(5), "after the rapid-reset flood").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_the_server_must_reset_are_bounded_per_connection() {
    let server = TestServer::start().await;
    let mut h2 = raw_h2(&server).await;
    // A malformed request (a connection-specific header, forbidden in HTTP/2) is a
    // stream error: the server resets the stream itself, and the stream never counts
    // against the concurrency limit. Without a bound on such resets a client could
    // keep the server resetting forever ("MadeYouReset"); with it, it is cut off.
    let block = certify_headers(SERVER_NAME, &[("connection", "keep-alive")]);
    let streams = MAX_LOCAL_ERROR_RESETS as u32 + 200;
    h2.send((0..streams).map(|i| frame(HEADERS, END_HEADERS, 2 * i + 1, &block))).await;
    assert_served(&server, Duration::from_secs(5), "a reset-provoking flood on another connection").await;
    let seen = h2.outcome(Duration::from_secs(20)).await;
    eprintln!("reset-provoking flood: the server sent {seen:?}");
    let resets: usize = seen.resets.values().sum();
    assert!(resets <= MAX_LOCAL_ERROR_RESETS, "{seen:?}");
    assert_eq!(seen.goaway.map(|g| g.1), Some(ENHANCE_YOUR_CALM), "{seen:?}");
    assert_served(&server, Duration::from_secs(5), "after the reset-provoking flood").await;
}

#[test]
fn the_limits_the_corpus_is_built_around_are_the_servers() {
    // Guards the constants the corpus relies on against silent drift.
    assert_eq!(meshca::server::grpc::MAX_REQUEST_LEN, 64 * 1024);
    assert_eq!(MAX_DECODED_MESSAGE, 68 * 1024);
    assert_eq!(meshca::ca::csr::MAX_CSR_LEN, 16 * 1024);
    assert_eq!(meshca::auth::MAX_TOKEN_LEN, 16 * 1024);
    assert!(HANDSHAKE_TIMEOUT <= Duration::from_secs(10), "the transport tests wait this long");
}

/// A Certify whose message is `first`, then one byte every `every` (or nothing more
/// when `every` is `None`), never finished; the gRPC status it gets and when.
async fn unfinished_call(server: &TestServer, first: Vec<u8>, every: Option<Duration>) -> (String, Duration) {
    use http_body_util::BodyExt;
    use tower_service::Service;
    let mut channel =
        meshca::agent::client::connect(&server.url(), &server.anchors, SERVER_NAME).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<http_body::Frame<bytes::Bytes>, tonic::Status>>(8);
    let body = tonic::body::Body::new(http_body_util::StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(rx),
    ));
    let request = http::Request::post(format!("{}/io.linkerd.proxy.identity.Identity/Certify", server.url()))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .unwrap();
    tx.send(Ok(http_body::Frame::data(first.into()))).await.unwrap();
    let trickle = tokio::spawn(async move {
        while let Some(every) = every {
            tokio::time::sleep(every).await;
            if tx.send(Ok(http_body::Frame::data(bytes::Bytes::from_static(b"a")))).await.is_err() {
                return;
            }
        }
        tx.closed().await;
    });
    let started = std::time::Instant::now();
    std::future::poll_fn(|cx| channel.poll_ready(cx)).await.unwrap();
    let response = timeout(Duration::from_secs(30), channel.call(request)).await.unwrap().unwrap();
    let (parts, body) = response.into_parts();
    let trailers = timeout(Duration::from_secs(30), body.collect())
        .await
        .unwrap()
        .ok()
        .and_then(|b| b.trailers().cloned());
    let status = trailers.as_ref().and_then(|t| t.get("grpc-status")).or(parts.headers.get("grpc-status"));
    trickle.abort();
    (status.map(|s| s.to_str().unwrap().to_owned()).unwrap_or_default(), started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_stalled_or_trickled_is_cut_at_the_body_deadline_and_service_goes_on() {
    let server = TestServer::start().await;
    let before = server.audit_records().len();
    // Half of a message announcing 40,000 bytes, then nothing, or a byte every 200 ms.
    let start = support::h2::unfinished_message(40_000, 20_000);
    let stalled = unfinished_call(&server, start.clone(), None);
    let trickled = unfinished_call(&server, start, Some(Duration::from_millis(200)));
    let ((stalled, stalled_after), (trickled, trickled_after)) = tokio::join!(stalled, trickled);
    assert_eq!(server.audit_records().len(), before, "nothing was decoded, so nothing to record");
    assert_served(&server, Duration::from_secs(5), "after the body deadline").await;
    let deadline_exceeded = (tonic::Code::DeadlineExceeded as i32).to_string();
    for (what, status, after) in [("stalled", stalled, stalled_after), ("trickled", trickled, trickled_after)]
    {
        assert_eq!(status, deadline_exceeded, "{what}");
        assert!(after >= meshca::server::BODY_TIMEOUT, "{what}: cut after {after:?}");
        assert!(after < meshca::server::BODY_TIMEOUT + Duration::from_secs(5), "{what}: cut after {after:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_anonymous_refusals_is_recorded_up_to_the_quota_and_counted_beyond() {
    use meshca::audit::quota::PER_PEER_BURST;
    let mut server = TestServer::start().await;
    let mut client = server.client().await;
    let (_key, good) = server.request("default", "web");
    let flood = 3 * PER_PEER_BURST as usize;
    for _ in 0..flood {
        let request = CertifyRequest { token: b"not.a.token".to_vec(), ..good.clone() };
        assert_eq!(client.certify(request).await.unwrap_err().code(), Code::Unauthenticated);
    }
    // An authenticated caller's decisions are recorded, quota or not.
    let issued = client.certify(good).await.expect("a good request is served");
    let id = support::request_id(issued.metadata());
    server.stop().await.unwrap();
    let records = server.audit_records();
    assert!(records.iter().any(|r| r["request_id"] == id.as_str() && r["outcome"] == "issued"));
    let one_by_one = records
        .iter()
        .filter(|r| r["reason"].as_str().is_some_and(|r| r.starts_with("token_malformed")))
        .count();
    assert_eq!(one_by_one, PER_PEER_BURST as usize, "recorded one by one up to the burst");
    let counts: Vec<_> = records
        .iter()
        .filter(|r| r["reason"].as_str().is_some_and(|r| r.starts_with("suppressed:")))
        .collect();
    assert_eq!(counts.len(), 1, "{counts:?}");
    let reason = counts[0]["reason"].as_str().unwrap();
    let expected = format!("suppressed: {} refusals", flood - PER_PEER_BURST as usize);
    assert!(reason.starts_with(&expected) && reason.ends_with("token_malformed"), "{reason}");
    assert_eq!(counts[0]["peer"].as_str().unwrap(), "127.0.0.1");
    assert_eq!(counts[0]["code"], "Unauthenticated");
    let report = meshca::audit::verify_file(&server.audit_path).expect("the log verifies");
    assert_eq!(report.records as usize, records.len());
}
