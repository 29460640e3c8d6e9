//! The current issuer and trust anchors, as one immutable snapshot.
//!
//! A request takes one `Arc<Snapshot>` at its start and uses it to the end, so it
//! never sees half a reload: a new snapshot is built and checked completely, then
//! swapped in whole. Watching files for changes (and deciding when to reload)
//! belongs to the reloader; this module only holds and swaps.

use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use super::issuer::{Issuer, TrustAnchors};
use super::Error;

/// Issuer and anchors that were checked together.
#[derive(Debug)]
pub struct Snapshot {
    pub issuer: Issuer,
    pub anchors: TrustAnchors,
}

impl Snapshot {
    /// Loads the anchors bundle and the issuer directory and checks them at `now`.
    pub fn load(trust_anchors: &Path, issuer_dir: &Path, now: SystemTime) -> Result<Self, Error> {
        let anchors = TrustAnchors::load(trust_anchors)?;
        let issuer = Issuer::load(issuer_dir, &anchors, now)?;
        Ok(Snapshot { issuer, anchors })
    }
}

/// Holder of the current snapshot (none until the first successful load).
#[derive(Debug, Default)]
pub struct Store {
    current: RwLock<Option<Arc<Snapshot>>>,
}

impl Store {
    /// A store holding `snapshot`.
    pub fn new(snapshot: Snapshot) -> Self {
        Store { current: RwLock::new(Some(Arc::new(snapshot))) }
    }

    /// The snapshot requests should use now, if any is loaded.
    pub fn current(&self) -> Option<Arc<Snapshot>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the snapshot whole.
    pub fn replace(&self, snapshot: Snapshot) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(snapshot));
    }
}
