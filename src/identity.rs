//! Identity names and the authorization step.
//!
//! The identity of service account `SA` in namespace `NS` is the DNS name
//! `SA.NS.serviceaccount.identity.CPNS.TD` (Linkerd's format, `CPNS` being the
//! control-plane namespace and `TD` the trust domain); its SPIFFE ID is
//! `spiffe://TD/ns/NS/sa/SA`. Namespaces, service accounts and control-plane
//! namespace are DNS-1123 labels; the trust domain is a DNS name of such labels.
//!
//! [`Naming::authorize`] turns an authenticated [`Subject`] into the one
//! [`Identity`] it may hold and refuses a request for any other name. Who the caller
//! is belongs to `auth`; what the CSR may contain belongs to `ca::csr`.

/// Who the caller proved to be: what an authenticator (`auth`) finds out, and what
/// [`Naming::authorize`] maps to the one identity it may hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subject {
    pub namespace: String,
    pub service_account: String,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    /// The token issuer (`iss`) that vouched for the caller.
    pub issuer: String,
}

/// Why a name or a request for it was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configured name (trust domain, control-plane namespace) is not valid.
    #[error("invalid {what}: {reason}")]
    InvalidConfig { what: &'static str, reason: &'static str },
    /// The request's `identity` field is empty or not a DNS name.
    #[error("the requested identity is malformed: {reason}")]
    RequestedMalformed { reason: &'static str },
    /// The token's namespace or service account cannot form an identity.
    #[error("the token's {what} is not a DNS-1123 label ({reason}); no identity can be issued for it")]
    SubjectNotRepresentable { what: &'static str, reason: &'static str },
    /// The token is valid but belongs to another identity than the one requested.
    #[error("the token is for {held}, not the identity requested; request {held}")]
    Mismatch {
        /// The identity the token's service account holds (the caller's own: no secret).
        held: String,
    },
}

impl Error {
    /// Stable reason code for audit records and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidConfig { .. } => "invalid_config",
            Error::RequestedMalformed { .. } => "identity_malformed",
            Error::SubjectNotRepresentable { .. } => "subject_not_representable",
            Error::Mismatch { .. } => "identity_mismatch",
        }
    }
}

/// The most a DNS name may be (RFC 1035).
const MAX_DNS_NAME: usize = 253;

/// Checks that `s` is a DNS-1123 label: 1–63 of `[a-z0-9-]`, starting and ending
/// with a letter or digit.
pub(crate) fn check_label(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("empty");
    }
    if s.len() > 63 {
        return Err("longer than 63 characters");
    }
    let b = s.as_bytes();
    if !b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-') {
        return Err("only lowercase letters, digits and '-' are allowed");
    }
    if b[0] == b'-' || b[b.len() - 1] == b'-' {
        return Err("must start and end with a letter or digit");
    }
    Ok(())
}

/// Checks that `s` is a DNS name made of DNS-1123 labels (no trailing dot).
pub(crate) fn check_dns_name(s: &str) -> Result<(), &'static str> {
    if s.len() > MAX_DNS_NAME {
        return Err("longer than 253 characters");
    }
    s.split('.').try_for_each(check_label)
}

/// An identity meshca can issue for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub namespace: String,
    pub service_account: String,
    /// `SA.NS.serviceaccount.identity.CPNS.TD`: the leaf's CN and DNS SAN.
    pub dns_name: String,
    /// `spiffe://TD/ns/NS/sa/SA`: the leaf's URI SAN.
    pub spiffe_id: String,
}

/// The naming scheme of one deployment: trust domain and control-plane namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Naming {
    trust_domain: String,
    control_plane_namespace: String,
}

impl Naming {
    /// Validates and stores the deployment's names.
    pub fn new(trust_domain: &str, control_plane_namespace: &str) -> Result<Self, Error> {
        check_dns_name(trust_domain)
            .map_err(|reason| Error::InvalidConfig { what: "trust domain", reason })?;
        check_label(control_plane_namespace)
            .map_err(|reason| Error::InvalidConfig { what: "control-plane namespace", reason })?;
        Ok(Naming {
            trust_domain: trust_domain.to_owned(),
            control_plane_namespace: control_plane_namespace.to_owned(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn control_plane_namespace(&self) -> &str {
        &self.control_plane_namespace
    }

    /// The identity of `service_account` in `namespace`.
    pub fn identity(&self, namespace: &str, service_account: &str) -> Result<Identity, Error> {
        check_label(namespace)
            .map_err(|reason| Error::SubjectNotRepresentable { what: "namespace", reason })?;
        check_label(service_account)
            .map_err(|reason| Error::SubjectNotRepresentable { what: "service account", reason })?;
        let dns_name = format!(
            "{service_account}.{namespace}.serviceaccount.identity.{}.{}",
            self.control_plane_namespace, self.trust_domain
        );
        if dns_name.len() > MAX_DNS_NAME {
            return Err(Error::SubjectNotRepresentable {
                what: "identity",
                reason: "longer than 253 characters",
            });
        }
        Ok(Identity {
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            spiffe_id: format!("spiffe://{}/ns/{namespace}/sa/{service_account}", self.trust_domain),
            dns_name,
        })
    }

    /// meshca's own identity (its serving certificate's name): service account
    /// `service_account` in the control-plane namespace.
    pub(crate) fn own_identity(&self, service_account: &str) -> Result<Identity, Error> {
        self.identity(&self.control_plane_namespace, service_account)
    }

    /// Reads an identity name of this deployment back into (namespace, service
    /// account); `None` for any other name.
    pub fn parse(&self, dns_name: &str) -> Option<(String, String)> {
        let suffix =
            format!(".serviceaccount.identity.{}.{}", self.control_plane_namespace, self.trust_domain);
        let (sa, ns) = dns_name.strip_suffix(&suffix)?.split_once('.')?;
        check_label(sa).ok()?;
        check_label(ns).ok()?;
        Some((ns.to_owned(), sa.to_owned()))
    }

    /// Reads a SPIFFE ID of this deployment (`spiffe://TD/ns/NS/sa/SA`) back into
    /// (namespace, service account); `None` for any other name.
    pub(crate) fn parse_spiffe(&self, spiffe_id: &str) -> Option<(String, String)> {
        let path = spiffe_id.strip_prefix("spiffe://")?.strip_prefix(self.trust_domain.as_str())?;
        let (ns, sa) = path.strip_prefix("/ns/")?.split_once("/sa/")?;
        check_label(sa).ok()?;
        check_label(ns).ok()?;
        Some((ns.to_owned(), sa.to_owned()))
    }

    /// The authorization step: the identity `subject` holds, provided it is exactly
    /// the one `requested`. Comparison is byte-exact: case, trailing-dot and IDN
    /// variants are other names.
    pub fn authorize(&self, subject: &Subject, requested: &str) -> Result<Identity, Error> {
        if requested.is_empty() {
            return Err(Error::RequestedMalformed { reason: "empty" });
        }
        check_dns_name(requested).map_err(|reason| Error::RequestedMalformed { reason })?;
        self.authorize_as(subject, requested, |identity| &identity.dns_name)
    }

    /// Like [`Naming::authorize`], for a requested name in another form than the
    /// DNS name (`name` gives the subject's own in that form, e.g. its SPIFFE ID):
    /// byte-exact equality, nothing else.
    pub(crate) fn authorize_as(
        &self,
        subject: &Subject,
        requested: &str,
        name: impl Fn(&Identity) -> &str,
    ) -> Result<Identity, Error> {
        if requested.is_empty() {
            return Err(Error::RequestedMalformed { reason: "empty" });
        }
        let identity = self.identity(&subject.namespace, &subject.service_account)?;
        if name(&identity) != requested {
            return Err(Error::Mismatch { held: name(&identity).to_owned() });
        }
        Ok(identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject(ns: &str, sa: &str) -> Subject {
        Subject {
            namespace: ns.into(),
            service_account: sa.into(),
            pod_name: None,
            pod_uid: None,
            issuer: "iss".into(),
        }
    }

    fn naming() -> Naming {
        Naming::new("cluster.local", "meshca-system").unwrap()
    }

    #[test]
    fn identity_follows_linkerd_and_spiffe_formats() {
        let id = naming().identity("default", "web").unwrap();
        assert_eq!(id.dns_name, "web.default.serviceaccount.identity.meshca-system.cluster.local");
        assert_eq!(id.spiffe_id, "spiffe://cluster.local/ns/default/sa/web");
    }

    #[test]
    fn labels_follow_dns_1123() {
        for ok in ["a", "web-1", "0abc", &"x".repeat(63)] {
            assert_eq!(check_label(ok), Ok(()), "{ok}");
        }
        for bad in ["", "-a", "a-", "Web", "a_b", "a.b", "é", "a\0", &"x".repeat(64)] {
            assert!(check_label(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn subject_authorizes_only_its_own_identity() {
        let n = naming();
        let s = subject("default", "web");
        let own = "web.default.serviceaccount.identity.meshca-system.cluster.local";
        assert_eq!(n.authorize(&s, own).unwrap().service_account, "web");
        for other in [
            "db.default.serviceaccount.identity.meshca-system.cluster.local",
            "WEB.default.serviceaccount.identity.meshca-system.cluster.local",
            "web.default.serviceaccount.identity.meshca-system.cluster.local.",
            "web.default.serviceaccount.identity.meshca-system.other.local",
        ] {
            assert!(n.authorize(&s, other).is_err(), "{other}");
        }
        assert_eq!(
            n.authorize(&s, "db.default.serviceaccount.identity.meshca-system.cluster.local"),
            Err(Error::Mismatch {
                held: "web.default.serviceaccount.identity.meshca-system.cluster.local".into()
            })
        );
        assert_eq!(n.authorize(&s, ""), Err(Error::RequestedMalformed { reason: "empty" }));
    }

    #[test]
    fn subject_with_invalid_names_is_not_representable() {
        let n = naming();
        let err = n.authorize(&subject("Default", "web"), "x").unwrap_err();
        assert!(matches!(err, Error::SubjectNotRepresentable { what: "namespace", .. }));
        let err = n.identity("default", "web_1").unwrap_err();
        assert!(matches!(err, Error::SubjectNotRepresentable { what: "service account", .. }));
    }

    #[test]
    fn identity_names_parse_back_only_for_this_deployment() {
        let n = naming();
        let own = n.identity("default", "web").unwrap().dns_name;
        assert_eq!(n.parse(&own), Some(("default".into(), "web".into())));
        for other in [
            "web.default.serviceaccount.identity.meshca-system.other.local",
            "web.default.serviceaccount.identity.linkerd.cluster.local",
            "a.web.default.serviceaccount.identity.meshca-system.cluster.local",
            "default.serviceaccount.identity.meshca-system.cluster.local",
            "Web.default.serviceaccount.identity.meshca-system.cluster.local",
            "",
        ] {
            assert_eq!(n.parse(other), None, "{other}");
        }
    }

    #[test]
    fn spiffe_ids_parse_back_only_for_this_deployment() {
        let n = naming();
        let own = n.identity("default", "web").unwrap().spiffe_id;
        assert_eq!(n.parse_spiffe(&own), Some(("default".into(), "web".into())));
        for other in [
            "spiffe://other.local/ns/default/sa/web",
            "spiffe://cluster.local.evil/ns/default/sa/web",
            "spiffe://cluster.local/ns/default/sa/Web",
            "spiffe://cluster.local/ns/default/sa/web/x",
            "spiffe://cluster.local/sa/web/ns/default",
            "https://cluster.local/ns/default/sa/web",
            "",
        ] {
            assert_eq!(n.parse_spiffe(other), None, "{other}");
        }
    }

    /// A trust domain of 63-character labels (the last one shorter), `len` characters long.
    fn trust_domain_of(len: usize) -> String {
        let mut td = String::new();
        while td.len() < len {
            if !td.is_empty() {
                td.push('.');
            }
            td.push_str(&"d".repeat((len - td.len()).min(63)));
        }
        td
    }

    #[test]
    fn dns_names_of_253_characters_are_valid_and_longer_ones_are_not() {
        for len in [252, 253, 254] {
            let name = trust_domain_of(len);
            assert_eq!(name.len(), len);
            assert!(name.split('.').all(|l| check_label(l).is_ok()), "{name}");
            let expected = if len <= 253 { Ok(()) } else { Err("longer than 253 characters") };
            assert_eq!(check_dns_name(&name), expected, "{len}");
        }
    }

    #[test]
    fn identities_of_253_characters_are_issued_and_longer_ones_are_not_representable() {
        // "a.b.serviceaccount.identity." is 28 characters, the control-plane namespace
        // 63 and a dot: a trust domain of 161 makes the identity exactly 253 long.
        let cpns = "c".repeat(63);
        let n = Naming::new(&trust_domain_of(161), &cpns).unwrap();
        let at_limit = n.identity("b", "a").unwrap();
        assert_eq!(at_limit.dns_name.len(), 253);
        assert_eq!(n.authorize(&subject("b", "a"), &at_limit.dns_name), Ok(at_limit.clone()));

        let over = Error::SubjectNotRepresentable { what: "identity", reason: "longer than 253 characters" };
        assert_eq!(n.identity("b", "aa"), Err(over.clone()));
        assert_eq!(n.authorize(&subject("b", "aa"), &at_limit.dns_name), Err(over));
        // A requested name over the bound is malformed whoever asks for it.
        let requested = format!("a{}", at_limit.dns_name);
        assert_eq!(
            n.authorize(&subject("b", "aa"), &requested),
            Err(Error::RequestedMalformed { reason: "longer than 253 characters" })
        );
    }

    #[test]
    fn invalid_configuration_is_refused() {
        assert!(Naming::new("cluster.local.", "meshca-system").is_err());
        assert!(Naming::new("cluster.local", "Meshca").is_err());
        assert!(Naming::new("", "meshca").is_err());
    }
}
