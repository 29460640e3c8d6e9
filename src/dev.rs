//! The embedded default (`meshca serve --dev`): state created on first start.
//!
//! In the data directory: a trust anchor and its key, an issuer, a dev
//! token-signing key with its JWKS, and the audit log's signing key with its
//! verifier key (`audit-signing.key`, `audit.pub`). Later starts reuse whatever is there, so
//! certificates and tokens from earlier runs stay valid. `meshca dev-token` signs
//! with the same key. Nothing here is meant for production: the anchor key sits
//! next to the issuer.

use std::path::Path;
use std::time::SystemTime;

use crate::auth::dev::DevSigner;
use crate::ca::hierarchy::{self, CaKeyType, HierarchyLifetimes};
use crate::config::DevPaths;
use crate::files::{write_new, Access};
use crate::identity::Naming;

/// Why dev state could not be prepared.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("cannot write {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("{0}")]
    Ca(#[from] crate::ca::Error),
    #[error("{0}")]
    Auth(#[from] crate::auth::Error),
    #[error("{0}")]
    Token(String),
    #[error("{path} is incomplete ({missing} is missing); remove the directory or restore the file")]
    Incomplete { path: String, missing: String },
}

fn write(path: &Path, contents: &str, access: Access) -> Result<(), Error> {
    write_new(path, contents.as_bytes(), access)
        .map_err(|source| Error::Write { path: path.display().to_string(), source })
}

/// What `prepare` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prepared {
    pub created_ca: bool,
    pub created_token_key: bool,
    pub created_audit_key: bool,
}

/// Creates the dev CA, token key and audit key in `paths.data_dir` unless they exist.
/// With `issuer_key` (`serve --dev --issuer-key URI`), a new issuer's key is made in
/// that PKCS#11 token and no `tls.key` is written.
pub fn prepare(
    paths: &DevPaths,
    naming: &Naming,
    now: SystemTime,
    issuer_key: Option<&crate::ca::token::Uri>,
) -> Result<Prepared, Error> {
    let anchors = paths.trust_anchors();
    let issuer_dir = paths.issuer_dir();
    let created_ca = !anchors.exists();
    if created_ca {
        if issuer_dir.join("tls.crt").exists() {
            return Err(Error::Incomplete {
                path: paths.data_dir.display().to_string(),
                missing: "trust-anchors.pem".into(),
            });
        }
        let h = match issuer_key {
            None => hierarchy::generate(naming, CaKeyType::P256, now, HierarchyLifetimes::default())?,
            Some(uri) => {
                let key = crate::ca::token::TokenKey::generate(uri, crate::ca::token::Kind::EcP256)
                    .map_err(|e| Error::Token(format!("--issuer-key {}: {e}", uri.display())))?;
                hierarchy::generate_for_key(
                    naming,
                    CaKeyType::P256,
                    now,
                    HierarchyLifetimes::default(),
                    &key,
                )?
            }
        };
        write_hierarchy(&paths.data_dir, &h)?;
    }
    let created_token_key = !paths.token_key().exists();
    if created_token_key {
        let (signer, pkcs8) = DevSigner::generate()?;
        write(&paths.token_key(), &DevSigner::pkcs8_pem(&pkcs8), Access::Private)?;
        let _ = std::fs::remove_file(paths.jwks());
        write(&paths.jwks(), &signer.jwks_json(), Access::Public)?;
    } else if !paths.jwks().exists() {
        let pem = std::fs::read_to_string(paths.token_key())
            .map_err(|source| Error::Write { path: paths.token_key().display().to_string(), source })?;
        let signer = DevSigner::from_pem(&pem)?;
        write(&paths.jwks(), &signer.jwks_json(), Access::Public)?;
    }
    let created_audit_key = !paths.audit_signing_key().exists();
    if created_audit_key {
        write_audit_key(&paths.data_dir, naming.trust_domain())?;
    }
    Ok(Prepared { created_ca, created_token_key, created_audit_key })
}

/// Writes a new audit signing key to DIR/audit-signing.key (0600) and its verifier
/// key to DIR/audit.pub; refuses to overwrite either.
pub fn write_audit_key(dir: &Path, trust_domain: &str) -> Result<(), Error> {
    let name = crate::audit::checkpoint::key_name(trust_domain);
    let (key, pem) = crate::audit::checkpoint::SigningKey::generate(&name).map_err(|e| Error::Write {
        path: dir.join("audit-signing.key").display().to_string(),
        source: std::io::Error::other(e),
    })?;
    let _ = std::fs::remove_file(dir.join("audit.pub"));
    write(&dir.join("audit-signing.key"), &pem, Access::Private)?;
    write(&dir.join("audit.pub"), &format!("{}\n", key.verifier()), Access::Public)
}

/// Writes DIR/trust-anchors.pem, DIR/trust-anchor.key, DIR/issuer/tls.{crt,key};
/// refuses to overwrite any of them.
pub fn write_hierarchy(dir: &Path, h: &hierarchy::Hierarchy) -> Result<(), Error> {
    // Check first so a refusal leaves nothing half-written.
    for p in [
        dir.join("trust-anchors.pem"),
        dir.join("trust-anchor.key"),
        dir.join("issuer/tls.crt"),
        dir.join("issuer/tls.key"),
    ] {
        if p.exists() {
            return Err(Error::Write {
                path: p.display().to_string(),
                source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "refusing to overwrite"),
            });
        }
    }
    // No key file for an issuer whose key stays in a token.
    if !h.issuer_key_pem.is_empty() {
        write(&dir.join("issuer/tls.key"), &h.issuer_key_pem, Access::Private)?;
    }
    write(&dir.join("issuer/tls.crt"), &h.issuer_cert_pem, Access::Public)?;
    write(&dir.join("trust-anchor.key"), &h.anchor_key_pem, Access::Private)?;
    write(&dir.join("trust-anchors.pem"), &h.anchor_cert_pem, Access::Public)?;
    Ok(())
}
