//! Token sources: the ways meshca can check a caller's token, registered in one place.
//!
//! Each source is one file that owns its flags (clap and serde, flattened into `meshca
//! serve`'s: the same names on the command line, in `MESHCA_*` variables and in the
//! config file), the checks that turn them into settings, and the construction of its
//! [`Authenticator`]: [`tokenreview`] (the Kubernetes API server, behind a cache), [`jwks`]
//! (JWTs verified locally against a JWKS kept current), [`dev`] (tokens from `meshca
//! dev-token`). The flags every source shares (mode, audiences, leeway, kubeconfig) are
//! [`TokenFlags`]'s own.
//!
//! Adding a source is a new file here plus its registration below: a [`TokenValidation`]
//! value, its flags flattened into [`TokenFlags`], its settings as a [`TokenConfig`]
//! variant (unless it resolves to an existing one, as [`dev`] does), and its arm in
//! [`TokenFlags::resolve`], [`TokenConfig::connect`] and [`TokenConfig::kubernetes`].

pub(crate) mod dev;
pub(crate) mod jwks;
pub(crate) mod tokenreview;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};

use super::{Authenticator, Error};
use crate::setting::{self, duration};

/// Linkerd proxies' projected-token audience.
pub const DEFAULT_AUDIENCE: &str = "identity.l5d.io";

/// `--token-validation`: which source checks tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenValidation {
    /// Ask the Kubernetes API server (TokenReview; --kubeconfig or in-cluster), with a cache.
    #[value(name = "tokenreview")]
    TokenReview,
    /// Verify JWTs locally against a JWKS: the cluster's service-account issuer discovery, or --jwks-file / --jwks-url with --token-issuer.
    Jwks,
    /// Verify tokens signed by the dev key in --data-dir (`meshca dev-token`).
    Dev,
}

/// The token flags of `meshca serve`: those every source shares, then each source's own.
#[derive(Debug, Default, Args, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct TokenFlags {
    /// How callers prove who they are [default: dev with --dev, tokenreview otherwise].
    #[arg(long, env = "MESHCA_TOKEN_VALIDATION", value_enum, value_name = "MODE")]
    pub token_validation: Option<TokenValidation>,
    #[command(flatten)]
    #[serde(flatten)]
    pub jwks: jwks::JwksFlags,
    /// Accepted token audiences, comma-separated [default: identity.l5d.io].
    #[arg(long, env = "MESHCA_TOKEN_AUDIENCES", value_name = "AUD,...", value_delimiter = ',')]
    pub token_audiences: Option<Vec<String>>,
    /// Leeway applied to token exp/nbf/iat, at most 5m [default: 60s].
    #[arg(long, env = "MESHCA_TOKEN_LEEWAY", value_name = "DURATION")]
    pub token_leeway: Option<String>,
    /// kubeconfig for the Kubernetes API server (tokenreview mode; jwks discovery; --jwks-confirm-pod; Events; node lookups) [default: KUBECONFIG, ~/.kube/config, or in-cluster].
    #[arg(long, env = "MESHCA_KUBECONFIG", value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    #[command(flatten)]
    #[serde(flatten)]
    pub tokenreview: tokenreview::TokenReviewFlags,
}

/// What every source is given besides its own flags.
#[derive(Debug, Clone)]
pub(crate) struct Common {
    /// Accepted `aud` values: none empty, at least one.
    pub audiences: Vec<String>,
    /// Leeway on `exp`, `nbf` and `iat`.
    pub leeway: Duration,
    /// `None`: `KUBECONFIG`, `~/.kube/config`, or the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    /// With `--dev`: the dev signer's JWKS in the data directory.
    pub dev_jwks: Option<PathBuf>,
}

/// How tokens are checked: a source's settings, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenConfig {
    /// Local JWT verification against a JWKS, kept current ([`jwks`], [`dev`]).
    Jwks(jwks::Settings),
    /// Kubernetes TokenReview, behind a cache and a rate limit ([`tokenreview`]).
    TokenReview(tokenreview::Settings),
}

/// `--token-leeway`: 60 s unless given, at most [`super::MAX_TOKEN_LEEWAY`].
pub(crate) fn leeway(value: Option<&str>) -> Result<Duration, setting::Error> {
    let leeway = duration("token-leeway", value, Duration::from_secs(60))?;
    crate::setting::within("token-leeway", leeway, Duration::ZERO, super::MAX_TOKEN_LEEWAY, "at most 5m")
}

impl TokenFlags {
    /// The source's settings, each checked against the mode. `dev_jwks` is `Some` with
    /// `--dev`, which makes `dev` the default mode.
    pub fn resolve(&self, dev_jwks: Option<&Path>) -> Result<TokenConfig, setting::Error> {
        let default = if dev_jwks.is_some() { TokenValidation::Dev } else { TokenValidation::TokenReview };
        let mode = self.token_validation.unwrap_or(default);
        let audiences = self.token_audiences.clone().unwrap_or_else(|| vec![DEFAULT_AUDIENCE.into()]);
        let audiences: Vec<String> =
            audiences.into_iter().map(|a| a.trim().to_owned()).filter(|a| !a.is_empty()).collect();
        if audiences.is_empty() {
            return Err(setting::Error::Invalid {
                setting: "token-audiences",
                reason: "no audience given".into(),
            });
        }
        let common = Common {
            audiences,
            leeway: leeway(self.token_leeway.as_deref())?,
            kubeconfig: self.kubeconfig.clone(),
            dev_jwks: dev_jwks.map(Path::to_path_buf),
        };
        if mode != TokenValidation::Jwks {
            self.jwks.check_unused()?;
        }
        Ok(match mode {
            TokenValidation::Dev => TokenConfig::Jwks(dev::settings(common)?),
            TokenValidation::Jwks => TokenConfig::Jwks(self.jwks.resolve(common)?),
            TokenValidation::TokenReview => TokenConfig::TokenReview(self.tokenreview.resolve(common)?),
        })
    }
}

impl TokenConfig {
    /// The source's authenticator, connected to its backend.
    pub async fn connect(&self) -> Result<Arc<dyn Authenticator>, Error> {
        match self {
            TokenConfig::Jwks(settings) => settings.connect().await,
            TokenConfig::TokenReview(settings) => settings.connect().await,
        }
    }

    /// `Some(kubeconfig)` when this source talks to a Kubernetes API server (the inner
    /// `None`: `KUBECONFIG`, `~/.kube/config` or in-cluster), so a client for Kubernetes
    /// Events can be built the same way.
    pub fn kubernetes(&self) -> Option<Option<&Path>> {
        match self {
            TokenConfig::Jwks(settings) => settings.kubernetes(),
            TokenConfig::TokenReview(settings) => settings.kubernetes(),
        }
    }
}
