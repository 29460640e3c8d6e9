//! The current issuer and trust anchors, as one immutable snapshot.
//!
//! A request takes one `Arc<Snapshot>` at its start and uses it to the end, so it
//! never sees half a reload: a new snapshot is built and checked completely, then
//! swapped in whole. Watching files for changes (and deciding when to reload)
//! belongs to the reloader ([`super::reload`]); this module only holds and swaps,
//! and lets long-lived tasks (the serving-certificate renewer) [`Store::subscribe`]
//! to swaps.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use rustls_pki_types::CertificateDer;
use tokio::sync::watch;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::issuer::{to_system_time, Algorithms, Issuer, TrustAnchors};
use super::Error;

/// Issuer and anchors that were checked together.
#[derive(Debug)]
pub struct Snapshot {
    pub issuer: Issuer,
    pub anchors: TrustAnchors,
    /// The trust anchor the issuer's chain ends in (what Istio's answer ends with),
    /// found once at load.
    pub root: Option<CertificateDer<'static>>,
}

impl Snapshot {
    /// Loads the anchors bundle and the issuer directory and checks them at `now`
    /// (Windows-compatible algorithms only).
    pub fn load(trust_anchors: &Path, issuer_dir: &Path, now: SystemTime) -> Result<Self, Error> {
        Self::load_with(trust_anchors, issuer_dir, now, Algorithms::WindowsCompatible, None)
    }

    /// Like [`Snapshot::load`], with the algorithms the issuer chain may use.
    pub(crate) fn load_with(
        trust_anchors: &Path,
        issuer_dir: &Path,
        now: SystemTime,
        algorithms: Algorithms,
        token: Option<&std::sync::Arc<super::token::TokenKey>>,
    ) -> Result<Self, Error> {
        let anchors = TrustAnchors::load(trust_anchors)?;
        let issuer = Issuer::load_with(issuer_dir, &anchors, now, algorithms, token)?;
        let root = root_of(issuer.intermediates(), anchors.certificates()).cloned();
        Ok(Snapshot { issuer, anchors, root })
    }

    /// When the first of the trust anchors expires (`None` if none can be parsed,
    /// which `TrustAnchors::load` does not let happen).
    pub(crate) fn anchors_not_after(&self) -> Option<SystemTime> {
        self.anchors
            .certificates()
            .iter()
            .filter_map(|der| X509Certificate::from_der(der).ok())
            .map(|(_, cert)| to_system_time(cert.validity().not_after))
            .min()
    }
}

/// The current snapshot, if any: what [`Store::subscribe`] receivers see.
pub(crate) type Current = Option<Arc<Snapshot>>;

/// Holder of the current snapshot (none until the first successful load).
#[derive(Debug)]
pub struct Store {
    current: watch::Sender<Current>,
}

impl Default for Store {
    fn default() -> Self {
        Store { current: watch::Sender::new(None) }
    }
}

impl Store {
    /// A store holding `snapshot`.
    pub fn new(snapshot: Snapshot) -> Self {
        Store { current: watch::Sender::new(Some(Arc::new(snapshot))) }
    }

    /// The snapshot requests should use now, if any is loaded.
    pub fn current(&self) -> Option<Arc<Snapshot>> {
        self.current.borrow().clone()
    }

    /// Replaces the snapshot whole; subscribers are told.
    pub fn replace(&self, snapshot: Snapshot) -> Arc<Snapshot> {
        let snapshot = Arc::new(snapshot);
        self.current.send_replace(Some(snapshot.clone()));
        snapshot
    }

    /// A receiver that sees every later [`Store::replace`] (the snapshot current
    /// at the call counts as seen).
    pub fn subscribe(&self) -> watch::Receiver<Current> {
        self.current.subscribe()
    }
}
/// The root `chain` ends in: the anchor that issued its last certificate.
fn root_of<'a>(
    chain: &[CertificateDer<'_>],
    anchors: &'a [CertificateDer<'static>],
) -> Option<&'a CertificateDer<'static>> {
    let (_, top) = x509_parser::parse_x509_certificate(chain.last()?).ok()?;
    anchors.iter().find(|anchor| {
        x509_parser::parse_x509_certificate(anchor)
            .is_ok_and(|(_, a)| a.subject().as_raw() == top.issuer().as_raw())
    })
}
