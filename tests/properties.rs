//! Property tests (proptest) for the three places where a wrong answer hands out the
//! wrong certificate or lets one lapse:
//! - identity names (`identity::Naming`): names round-trip, no string parses to or
//!   authorizes an identity other than the one it spells, and case, trailing-dot,
//!   look-alike (IDN) and whitespace variants are other names, refused;
//! - the renewal schedule (`agent::schedule`): the renewal moment stays inside the
//!   validity, before expiry minus the safety margin, within the jitter band, and a
//!   client clock off by minutes changes nothing;
//! - the CSR name checks (`ca::csr::check`), on requests built here byte by byte
//!   (several CNs of several string types, SANs in PKCS#9 and Microsoft extension
//!   requests) and by rcgen: a request is accepted exactly when everything it names
//!   is the expected identity; and end to end, no subject, requested name and CSR
//!   yield a certificate naming an identity other than the authenticated one.
//!
//! Case counts are chosen so that the file runs in a few seconds in a debug build.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use meshca_test_support as support;

use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meshca::agent::schedule::{self, Policy};
use meshca::auth::Subject;
use meshca::ca::csr::{self, Expected, KeyPolicy};
use meshca::ca::hierarchy::{self, CaKeyType, HierarchyLifetimes};
use meshca::ca::profile::{self, ChainWindow, Lifetimes};
use meshca::ca::store::Snapshot;
use meshca::identity::{Error as IdentityError, Naming};
use proptest::prelude::*;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

// ---------------------------------------------------------------------------------
// Identity names

/// A DNS-1123 label.
fn label() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?",
        "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?",
        Just("web".to_string()),
        Just("default".to_string()),
    ]
}

/// A deployment's naming: a trust domain of one to three labels, a control-plane namespace.
fn naming() -> impl Strategy<Value = Naming> {
    (prop::collection::vec(label(), 1..=3), label())
        .prop_filter_map("name too long", |(td, cp)| Naming::new(&td.join("."), &cp).ok())
}

fn subject(ns: &str, sa: &str) -> Subject {
    Subject {
        namespace: ns.into(),
        service_account: sa.into(),
        pod_name: None,
        pod_uid: None,
        issuer: "https://kubernetes.default.svc".into(),
    }
}

/// One edit of a name: what a confused or hostile caller might send instead.
#[derive(Clone, Debug)]
enum Edit {
    Upper(usize),
    TrailingDot,
    LeadingDot,
    /// Replace the character at a position with a look-alike or separator.
    Replace(usize, char),
    Insert(usize, char),
    Delete(usize),
    Whitespace(&'static str),
    /// Swap the first two labels (namespace and service account).
    SwapLabels,
    /// The first label in its IDNA A-label form (`xn--…`).
    Punycode,
}

fn edit() -> impl Strategy<Value = Edit> {
    let tricky = prop::sample::select(vec![
        'A', 'Z', '.', '-', '_', ' ', '\0', '\u{0430}', /* Cyrillic a */
        '\u{0435}', /* Cyrillic e */ '\u{ff41}',
        /* fullwidth a */ '\u{200b}', /* zero width */
        '\u{3002}', /* ideographic full stop */ 'é', 'ı', 'K', /* Kelvin sign */
    ]);
    prop_oneof![
        any::<usize>().prop_map(Edit::Upper),
        Just(Edit::TrailingDot),
        Just(Edit::LeadingDot),
        (any::<usize>(), tricky.clone()).prop_map(|(i, c)| Edit::Replace(i, c)),
        (any::<usize>(), tricky).prop_map(|(i, c)| Edit::Insert(i, c)),
        any::<usize>().prop_map(Edit::Delete),
        prop::sample::select(vec![" ", "\t", "\n", "\r\n"]).prop_map(Edit::Whitespace),
        Just(Edit::SwapLabels),
        Just(Edit::Punycode),
    ]
}

fn apply(name: &str, edit: &Edit) -> String {
    let chars: Vec<char> = name.chars().collect();
    let at = |i: usize| i % chars.len().max(1);
    match edit {
        Edit::Upper(i) => {
            let mut c = chars.clone();
            c[at(*i)] = c[at(*i)].to_ascii_uppercase();
            c.into_iter().collect()
        }
        Edit::TrailingDot => format!("{name}."),
        Edit::LeadingDot => format!(".{name}"),
        Edit::Replace(i, ch) => {
            let mut c = chars.clone();
            c[at(*i)] = *ch;
            c.into_iter().collect()
        }
        Edit::Insert(i, ch) => {
            let mut c = chars.clone();
            c.insert(i % (chars.len() + 1), *ch);
            c.into_iter().collect()
        }
        Edit::Delete(i) => {
            let mut c = chars.clone();
            c.remove(at(*i));
            c.into_iter().collect()
        }
        Edit::Whitespace(ws) => format!("{name}{ws}"),
        Edit::SwapLabels => {
            let mut labels: Vec<&str> = name.split('.').collect();
            labels.swap(0, 1);
            labels.join(".")
        }
        Edit::Punycode => {
            let (first, rest) = name.split_once('.').unwrap_or((name, ""));
            format!("xn--{first}-9ja.{rest}")
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn identity_names_round_trip_through_parse_and_authorize(n in naming(), ns in label(), sa in label()) {
        let Ok(id) = n.identity(&ns, &sa) else {
            // Only length can make two valid labels unrepresentable.
            let long = format!("{sa}.{ns}.serviceaccount.identity.{}.{}", n.control_plane_namespace(), n.trust_domain());
            prop_assert!(long.len() > 253);
            return Ok(());
        };
        prop_assert_eq!(&id.dns_name, &format!("{sa}.{ns}.serviceaccount.identity.{}.{}",
            n.control_plane_namespace(), n.trust_domain()));
        prop_assert_eq!(&id.spiffe_id, &format!("spiffe://{}/ns/{ns}/sa/{sa}", n.trust_domain()));
        prop_assert_eq!(n.parse(&id.dns_name), Some((ns.clone(), sa.clone())));
        prop_assert_eq!(n.authorize(&subject(&ns, &sa), &id.dns_name), Ok(id));
    }

    #[test]
    fn an_edited_name_never_parses_to_or_authorizes_another_identity(
        n in naming(), ns in label(), sa in label(), edits in prop::collection::vec(edit(), 1..=3),
    ) {
        let Ok(id) = n.identity(&ns, &sa) else { return Ok(()) };
        let mut name = id.dns_name.clone();
        for e in &edits {
            name = apply(&name, e);
        }
        // Whatever the name parses to, it spells exactly that identity.
        if let Some((pns, psa)) = n.parse(&name) {
            prop_assert_eq!(&n.identity(&pns, &psa).unwrap().dns_name, &name);
        }
        // The subject is authorized for its own name, byte for byte, and nothing else.
        let authorized = n.authorize(&subject(&ns, &sa), &name);
        prop_assert_eq!(authorized.is_ok(), name == id.dns_name, "{:?} for {:?}", authorized, name);
        if let Ok(got) = authorized {
            prop_assert_eq!(got, id);
        }
    }

    #[test]
    fn case_trailing_dot_idn_and_whitespace_variants_are_refused(
        n in naming(), ns in label(), sa in label(), which in 0usize..6, at in any::<usize>(),
    ) {
        let Ok(id) = n.identity(&ns, &sa) else { return Ok(()) };
        let name = &id.dns_name;
        let variant = match which {
            0 => name.to_ascii_uppercase(),
            1 => format!("{name}."),
            2 => apply(name, &Edit::Replace(at, '\u{0430}')),
            3 => name.replace('.', "\u{3002}"),
            4 => format!(" {name}"),
            _ => apply(name, &Edit::Insert(at, '\u{200b}')),
        };
        prop_assert_ne!(&variant, name);
        prop_assert_eq!(n.parse(&variant), None);
        let refused = n.authorize(&subject(&ns, &sa), &variant).unwrap_err();
        prop_assert!(matches!(refused, IdentityError::RequestedMalformed { .. } | IdentityError::Mismatch { .. }), "{refused:?}");
    }

    #[test]
    fn arbitrary_strings_parse_only_to_the_identity_they_spell(
        n in naming(), prefix in "[a-zA-Z0-9.\\-_ \u{430}]{0,40}", with_suffix in any::<bool>(),
    ) {
        let s = if with_suffix {
            format!("{prefix}.serviceaccount.identity.{}.{}", n.control_plane_namespace(), n.trust_domain())
        } else {
            prefix
        };
        if let Some((ns, sa)) = n.parse(&s) {
            prop_assert_eq!(n.identity(&ns, &sa).unwrap().dns_name, s);
        }
    }
}

// ---------------------------------------------------------------------------------
// Renewal schedule

const H: Duration = Duration::from_secs(3600);
/// Rounding of `Duration::mul_f64` is far below this.
const EPSILON: Duration = Duration::from_micros(1);

fn policy() -> impl Strategy<Value = Policy> {
    (0.01f64..0.99, prop_oneof![Just(0.0), 0.0f64..0.99], 0u64..=3_600_000, 0u64..=60_000).prop_map(
        |(renew_at, jitter, margin_ms, floor_ms)| Policy {
            renew_at,
            jitter,
            margin: Duration::from_millis(margin_ms),
            floor: Duration::from_millis(floor_ms),
        },
    )
}

fn lifetime() -> impl Strategy<Value = Duration> {
    prop_oneof![0u64..=10_000, 0u64..=400 * 86_400_000].prop_map(Duration::from_millis)
}

/// Randomness as given, hostile values included.
fn uniform() -> impl Strategy<Value = f64> {
    prop_oneof![8 => 0.0f64..=1.0, 1 => prop::num::f64::ANY]
}

/// The latest a renewal may be: `lifetime − min(margin, lifetime / 2)`.
fn latest(l: Duration, p: &Policy) -> Duration {
    l.saturating_sub(p.margin.min(l / 2))
}

fn clamp(x: Duration, l: Duration, p: &Policy) -> Duration {
    x.min(latest(l, p)).max(p.floor)
}

/// Validity left at receipt, as the agent reckons it (src/agent/run.rs, `renew`): notAfter
/// minus the server's time when the response says it, else the validity minus the
/// server's usual backdate. The client's own wall clock takes no part.
fn remaining(not_before: SystemTime, not_after: SystemTime, server_time: Option<SystemTime>) -> Duration {
    let validity = not_after.duration_since(not_before).unwrap_or_default();
    match server_time {
        Some(t) => not_after.duration_since(t).unwrap_or_default(),
        None => schedule::lifetime(validity, Duration::from_secs(120)),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn renewal_is_after_the_floor_and_before_expiry_minus_the_margin(p in policy(), l in lifetime(), u in uniform()) {
        prop_assert!(p.validate().is_ok());
        let d = schedule::renewal_delay(l, &p, u);
        prop_assert!(d >= p.floor, "{d:?} < floor");
        prop_assert!(d <= latest(l, &p).max(p.floor), "{d:?} past the latest point");
        if l >= p.floor * 2 {
            // Inside the validity, with min(margin, half the lifetime) left to retry in.
            prop_assert!(d <= l && l - d >= p.margin.min(l / 2), "{d:?} leaves too little of {l:?}");
        }
    }

    #[test]
    fn renewal_stays_in_the_jitter_band_and_grows_with_u(p in policy(), l in lifetime(), u in 0.0f64..=1.0, v in 0.0f64..=1.0) {
        let d = schedule::renewal_delay(l, &p, u);
        let lo = clamp(l.mul_f64(p.renew_at * (1.0 - p.jitter)), l, &p);
        let hi = clamp(l.mul_f64((p.renew_at * (1.0 + p.jitter)).min(1.0)), l, &p);
        prop_assert!(d + EPSILON >= lo && d <= hi + EPSILON, "{d:?} outside [{lo:?}, {hi:?}]");
        let (a, b) = (u.min(v), u.max(v));
        prop_assert!(schedule::renewal_delay(l, &p, a) <= schedule::renewal_delay(l, &p, b));
        if p.jitter == 0.0 {
            prop_assert_eq!(d, schedule::renewal_delay(l, &p, 0.5));
        }
    }

    #[test]
    fn backoff_is_bounded_by_the_exponential_ceiling_and_the_cap(attempt in any::<u32>(), u in uniform()) {
        let (base, cap) = (Duration::from_millis(100), Duration::from_secs(60));
        let b = schedule::backoff(attempt, base, cap, u);
        prop_assert!(b <= cap);
        if attempt < 16 {
            prop_assert!(b <= base * (1 << attempt));
        }
    }

    /// The server's clock is off true time by up to ±15 minutes and the answer takes up
    /// to 5 s to arrive; the agent waits on its monotonic clock from receipt. The renewal
    /// falls inside the validity and before notAfter minus the margin, in true time. (The
    /// agent's own wall clock enters nowhere: `remaining` takes none, so its drift needs
    /// no variable here.)
    #[test]
    fn renewal_falls_inside_the_validity_whatever_the_clocks(
        p in policy().prop_filter("margin covers the network delay", |p| p.margin >= Duration::from_secs(10)),
        t in 1_600_000_000u64..2_200_000_000,
        issuance in 60u64..=30 * 86_400,
        skew in 0u64..=600,
        drift in -900i64..=900,
        delay_ms in 0u64..=5_000,
        u in 0.0f64..=1.0,
        server_says_time in any::<bool>(),
    ) {
        let shift = |at: SystemTime, secs: i64| if secs >= 0 {
            at + Duration::from_secs(secs as u64)
        } else {
            at - Duration::from_secs(secs.unsigned_abs())
        };
        let true_now = UNIX_EPOCH + Duration::from_secs(t);
        let server_now = shift(true_now, drift);
        // Without the server's time the agent assumes meshca's default backdate (120 s);
        // a server backdating more than that must send its time (meshca always does).
        let skew = if server_says_time { skew } else { skew.min(120) };
        let lifetimes = Lifetimes {
            issuance_lifetime: Duration::from_secs(issuance),
            clock_skew_allowance: Duration::from_secs(skew),
        };
        let window = ChainWindow { not_before: server_now - 365 * 24 * H, not_after: server_now + 365 * 24 * H };
        let (not_before, not_after) = profile::validity(server_now, &lifetimes, &window).unwrap();
        let left = remaining(not_before, not_after, server_says_time.then_some(server_now));
        let delay = Duration::from_millis(delay_ms);
        let renew_at = true_now + delay + schedule::renewal_delay(left, &p, u);
        // The validity in true time: the server's clock was `drift` ahead.
        let (valid_from, valid_until) = (shift(not_before, -drift), shift(not_after, -drift));
        prop_assert!(renew_at >= valid_from);
        if left >= p.floor * 2 + Duration::from_secs(20) {
            prop_assert!(renew_at < valid_until, "renews at {renew_at:?}, after notAfter {valid_until:?}");
            prop_assert!(renew_at <= valid_until - p.margin.min(left / 2) + delay);
        }
    }
}

// ---------------------------------------------------------------------------------
// CSR name checks

const ID: &str = "web.default.serviceaccount.identity.meshca-system.cluster.local";
const SPIFFE: &str = "spiffe://cluster.local/ns/default/sa/web";
const OTHER: &str = "api.default.serviceaccount.identity.meshca-system.cluster.local";

static KEY: LazyLock<EcdsaKeyPair> = LazyLock::new(|| {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng).unwrap()
});

/// The identity a request is judged against, and a neighbour's.
struct Names<'a> {
    dns: &'a str,
    spiffe: &'a str,
    other_dns: &'a str,
    other_spiffe: &'a str,
}

const WEB: Names<'static> = Names {
    dns: ID,
    spiffe: SPIFFE,
    other_dns: OTHER,
    other_spiffe: "spiffe://cluster.local/ns/default/sa/api",
};

/// A DNS name (CN or DNS SAN) a request might carry, relative to the identity judged.
#[derive(Clone, Debug)]
enum Dns {
    Own,
    Other,
    Upper,
    TrailingDot,
    Wildcard,
    WithNul,
    Arbitrary(String),
}

/// A URI SAN a request might carry, relative to the identity judged.
#[derive(Clone, Debug)]
enum Uri {
    Own,
    Other,
    OtherTrustDomain,
    TrailingSlash,
    Https,
}

impl Dns {
    fn render(&self, n: &Names<'_>) -> String {
        match self {
            Dns::Own => n.dns.to_string(),
            Dns::Other => n.other_dns.to_string(),
            Dns::Upper => n.dns.to_ascii_uppercase(),
            Dns::TrailingDot => format!("{}.", n.dns),
            Dns::Wildcard => format!("*.{}", n.dns),
            Dns::WithNul => format!("{}\0", n.dns),
            Dns::Arbitrary(s) => s.clone(),
        }
    }
}

impl Uri {
    fn render(&self, n: &Names<'_>) -> String {
        match self {
            Uri::Own => n.spiffe.to_string(),
            Uri::Other => n.other_spiffe.to_string(),
            Uri::OtherTrustDomain => n.spiffe.replacen("cluster.local", "other.domain", 1),
            Uri::TrailingSlash => format!("{}/", n.spiffe),
            Uri::Https => format!("https://{}/", n.dns),
        }
    }
}

/// `own` weighs the identity's own name against the others (1 each).
fn dns_name(own: u32) -> impl Strategy<Value = Dns> {
    prop_oneof![
        own => Just(Dns::Own),
        1 => Just(Dns::Other),
        1 => Just(Dns::Upper),
        1 => Just(Dns::TrailingDot),
        1 => Just(Dns::Wildcard),
        1 => Just(Dns::WithNul),
        1 => "[a-z0-9.-]{1,40}".prop_map(Dns::Arbitrary),
    ]
}

fn uri(own: u32) -> impl Strategy<Value = Uri> {
    prop_oneof![
        own => Just(Uri::Own),
        1 => Just(Uri::Other),
        1 => Just(Uri::OtherTrustDomain),
        1 => Just(Uri::TrailingSlash),
        1 => Just(Uri::Https),
    ]
}

/// String types of a CN: UTF8String, PrintableString, IA5String (accepted when the
/// value is the identity), BMPString and TeletexString (never accepted).
const CN_TAGS: [u8; 5] = [0x0c, 0x13, 0x16, 0x1e, 0x14];

#[derive(Clone, Debug)]
enum San {
    Dns(Dns),
    Uri(Uri),
    Email,
    Ip,
}

fn san(own: u32) -> impl Strategy<Value = San> {
    prop_oneof![
        6 => dns_name(own).prop_map(San::Dns),
        4 => uri(own).prop_map(San::Uri),
        1 => Just(San::Email),
        1 => Just(San::Ip),
    ]
}

/// Where the requested SANs go.
#[derive(Clone, Copy, Debug)]
enum Placement {
    Pkcs9,
    Microsoft,
    /// The first half in PKCS#9's attribute, the rest in Microsoft's.
    Both,
}

#[derive(Clone, Debug)]
struct Request {
    cns: Vec<(u8, Dns)>,
    organization: Option<String>,
    email_in_subject: bool,
    sans: Vec<San>,
    placement: Placement,
    asks_for_ca: bool,
}

fn request(own: u32) -> impl Strategy<Value = Request> {
    (
        prop::collection::vec((prop::sample::select(CN_TAGS.to_vec()), dns_name(own)), 0..=2),
        prop::option::of("[A-Za-z0-9 ]{1,20}"),
        prop::bool::weighted(0.05),
        prop::collection::vec(san(own), 0..=4),
        prop_oneof![Just(Placement::Pkcs9), Just(Placement::Microsoft), Just(Placement::Both)],
        prop::bool::weighted(0.05),
    )
        .prop_map(|(cns, organization, email_in_subject, sans, placement, asks_for_ca)| Request {
            cns,
            organization,
            email_in_subject,
            sans,
            placement,
            asks_for_ca,
        })
}

impl Request {
    /// True when the request names only `n`'s identity (or nothing) and asks for no CA.
    fn names_only(&self, n: &Names<'_>) -> bool {
        self.cns.iter().all(|(tag, v)| [0x0c, 0x13, 0x16].contains(tag) && v.render(n) == n.dns)
            && !self.email_in_subject
            && !self.asks_for_ca
            && self.sans.iter().all(|s| match s {
                San::Dns(v) => v.render(n) == n.dns,
                San::Uri(v) => v.render(n) == n.spiffe,
                San::Email | San::Ip => false,
            })
    }

    fn names_nothing(&self) -> bool {
        self.cns.is_empty() && self.sans.is_empty() && !self.email_in_subject
    }

    /// The DER request, its names rendered for `n`, signed with [`KEY`].
    fn der(&self, n: &Names<'_>) -> Vec<u8> {
        use support::der::{
            bits, ec_spki, ecdsa_sha256, extension, extensions_attribute, int, rdn, san, seq, tlv,
            OID_BASIC_CONSTRAINTS, OID_CN, OID_EMAIL, OID_EXTENSION_REQUEST, OID_MS_EXTENSION_REQUEST, OID_O,
            OID_P256, TRUE,
        };
        let mut rdns = Vec::new();
        if let Some(o) = &self.organization {
            rdns.push(rdn(OID_O, &tlv(0x0c, &[o.as_bytes()])));
        }
        for (tag, value) in &self.cns {
            let value = value.render(n);
            let bytes = match tag {
                0x1e => value.encode_utf16().flat_map(u16::to_be_bytes).collect(),
                _ => value.into_bytes(),
            };
            rdns.push(rdn(OID_CN, &tlv(*tag, &[&bytes])));
        }
        if self.email_in_subject {
            rdns.push(rdn(OID_EMAIL, &tlv(0x16, &[b"web@example.com"])));
        }
        let general_name = |s: &San| match s {
            San::Dns(v) => support::der::dns(v.render(n).as_bytes()),
            San::Uri(v) => support::der::uri(v.render(n).as_bytes()),
            San::Email => tlv(0x81, &[b"web@example.com"]),
            San::Ip => tlv(0x87, &[&[10, 0, 0, 1]]),
        };
        let extensions = |sans: &[San], ca: bool| {
            let mut exts = Vec::new();
            if !sans.is_empty() {
                let names: Vec<Vec<u8>> = sans.iter().map(general_name).collect();
                exts.push(san(&names));
            }
            if ca {
                exts.push(extension(OID_BASIC_CONSTRAINTS, true, &seq(&[TRUE])));
            }
            exts
        };
        let half = self.sans.len() / 2;
        let (pkcs9, microsoft) = match self.placement {
            Placement::Pkcs9 => (extensions(&self.sans, self.asks_for_ca), Vec::new()),
            Placement::Microsoft => (Vec::new(), extensions(&self.sans, self.asks_for_ca)),
            Placement::Both => {
                (extensions(&self.sans[..half], false), extensions(&self.sans[half..], self.asks_for_ca))
            }
        };
        let mut attributes = Vec::new();
        if !pkcs9.is_empty() {
            attributes.push(extensions_attribute(OID_EXTENSION_REQUEST, &pkcs9));
        }
        if !microsoft.is_empty() {
            attributes.push(extensions_attribute(OID_MS_EXTENSION_REQUEST, &microsoft));
        }
        let spki = ec_spki(OID_P256, KEY.public_key().as_ref());
        let info = seq(&[&int(0), &seq(&[&rdns.concat()]), &spki, &tlv(0xa0, &[&attributes.concat()])]);
        let sig = KEY.sign(&ring::rand::SystemRandom::new(), &info).unwrap();
        seq(&[&info, &ecdsa_sha256(), &bits(sig.as_ref())])
    }
}

fn check_for(der: &[u8], dns: &str, spiffe: &str) -> Result<csr::CheckedCsr, csr::Error> {
    csr::check(der, &Expected { dns_name: Some(dns), spiffe_id: spiffe }, &KeyPolicy::default())
}

/// A generated issuer, valid around [`issued_at`].
static ISSUER: LazyLock<Snapshot> = LazyLock::new(|| {
    let dir = tempfile::tempdir().unwrap();
    let naming = Naming::new("cluster.local", "meshca-system").unwrap();
    let h =
        hierarchy::generate(&naming, CaKeyType::P256, issued_at(), HierarchyLifetimes::default()).unwrap();
    meshca::dev::write_hierarchy(dir.path(), &h).unwrap();
    Snapshot::load(&dir.path().join("trust-anchors.pem"), &dir.path().join("issuer"), issued_at()).unwrap()
});

fn issued_at() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn a_request_is_accepted_exactly_when_it_names_only_the_identity(req in request(4)) {
        let der = req.der(&WEB);
        let result = check_for(&der, ID, SPIFFE);
        prop_assert_eq!(result.is_ok(), req.names_only(&WEB), "{:?}: {:?}", req, result.as_ref().err());
        // Accepted for a second identity too only when it names nothing.
        let other = check_for(&der, WEB.other_dns, WEB.other_spiffe);
        if result.is_ok() && other.is_ok() {
            prop_assert!(req.names_nothing(), "{:?}", req);
        }
    }

    #[test]
    fn requests_written_by_rcgen_are_accepted_exactly_when_they_name_only_the_identity(
        cn in prop::option::of(dns_name(4).prop_filter("rcgen writes text", |d| !matches!(d, Dns::WithNul))),
        sans in prop::collection::vec(san(4), 0..=3),
    ) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        if let Some(cn) = &cn {
            params.distinguished_name.push(rcgen::DnType::CommonName, cn.render(&WEB));
        }
        for s in &sans {
            params.subject_alt_names.push(match s {
                San::Dns(v) => rcgen::SanType::DnsName(v.render(&WEB).try_into().unwrap()),
                San::Uri(v) => rcgen::SanType::URI(v.render(&WEB).try_into().unwrap()),
                San::Email => rcgen::SanType::Rfc822Name("web@example.com".try_into().unwrap()),
                San::Ip => rcgen::SanType::IpAddress("10.0.0.1".parse().unwrap()),
            });
        }
        let der = params.serialize_request(&key).unwrap().der().to_vec();
        let req = Request {
            cns: cn.into_iter().map(|v| (0x0c, v)).collect(),
            organization: None,
            email_in_subject: false,
            sans,
            placement: Placement::Pkcs9,
            asks_for_ca: false,
        };
        let result = check_for(&der, ID, SPIFFE);
        prop_assert_eq!(result.is_ok(), req.names_only(&WEB), "{:?}: {:?}", req, result.as_ref().err());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Authenticated as (ns, sa), asking for any name with any CSR: a certificate comes
    /// out only for the subject's own identity, and it names that identity alone.
    #[test]
    fn no_input_yields_a_certificate_naming_another_identity(
        ns in prop::sample::select(vec!["default", "api", "kube-system"]),
        sa in prop::sample::select(vec!["web", "api", "db"]),
        ask in prop_oneof![
            4 => Just(None),
            2 => (prop::sample::select(vec!["default", "api"]), prop::sample::select(vec!["web", "db"]))
                .prop_map(Some),
        ],
        edits in prop::collection::vec(edit(), 0..=1),
        req in request(12),
    ) {
        let naming = Naming::new("cluster.local", "meshca-system").unwrap();
        let own = naming.identity(ns, sa).unwrap();
        // The name asked for: the subject's own or another's, perhaps edited.
        let mut requested = match ask {
            None => own.dns_name.clone(),
            Some((ns, sa)) => naming.identity(ns, sa).unwrap().dns_name,
        };
        for e in &edits {
            requested = apply(&requested, e);
        }
        let Ok(identity) = naming.authorize(&subject(ns, sa), &requested) else {
            prop_assert_ne!(&requested, &own.dns_name);
            return Ok(());
        };
        prop_assert_eq!(&identity, &own);
        prop_assert_eq!(&requested, &own.dns_name);
        // The CSR's names are rendered around the subject's identity; "other" is a neighbour's.
        let neighbour = naming.identity(ns, if sa == "db" { "web" } else { "db" }).unwrap();
        let names = Names {
            dns: &own.dns_name,
            spiffe: &own.spiffe_id,
            other_dns: &neighbour.dns_name,
            other_spiffe: &neighbour.spiffe_id,
        };
        let der = req.der(&names);
        let Ok(checked) = check_for(&der, &identity.dns_name, &identity.spiffe_id) else {
            prop_assert!(!req.names_only(&names), "{:?}", req);
            return Ok(());
        };
        prop_assert!(req.names_only(&names), "{:?}", req);
        let names = meshca::ca::profile::Names { dns_name: Some(&identity.dns_name), spiffe_id: &identity.spiffe_id };
        let leaf = ISSUER.issuer.issue(&names, &checked, &Lifetimes::default(), issued_at()).unwrap();
        let (_, cert) = X509Certificate::from_der(&leaf.der).unwrap();
        let cns: Vec<_> = cert.subject().iter_common_name().map(|c| c.as_str().unwrap().to_owned()).collect();
        prop_assert_eq!(cns, vec![own.dns_name.clone()]);
        let san = cert.subject_alternative_name().unwrap().unwrap();
        prop_assert_eq!(
            san.value.general_names.clone(),
            vec![GeneralName::DNSName(&own.dns_name), GeneralName::URI(&own.spiffe_id)]
        );
        prop_assert!(!cert.is_ca());
        let intermediates = ISSUER.issuer.intermediates();
        ISSUER.anchors.verify(&leaf.der, intermediates, issued_at(), Some(&own.dns_name)).unwrap();
    }
}
