//! The `jwks` token source: JWTs verified locally against the token issuer's JWKS, which
//! `auth::discovery` fetches (a file, an `https://` URL, or the cluster's service-account
//! issuer) and keeps current, optionally followed by a check through the Kubernetes client
//! that the token's pod still exists (`--jwks-confirm-pod`, `auth::pods`). Owns the
//! `--jwks-*` and `--token-issuer` flags, their checks, and the construction.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use super::Common;
use crate::auth::discovery::{self, RotatingJwksAuthenticator, Settings as KeyRefresh, Source as KeySource};
use crate::auth::pods::{PodConfirmingAuthenticator, Settings as PodSettings};
use crate::auth::{Authenticator, Error};
use crate::setting::{self, duration, within};

/// The jwks source's own flags.
#[derive(Debug, Default, Args, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct JwksFlags {
    /// JWKS file with the token issuer's public keys (jwks mode) [default: the cluster's service-account issuer discovery].
    #[arg(long, env = "MESHCA_JWKS_FILE", value_name = "FILE")]
    pub jwks_file: Option<PathBuf>,
    /// https:// URL serving the token issuer's JWKS (jwks mode; instead of --jwks-file).
    #[arg(long, env = "MESHCA_JWKS_URL", value_name = "URL")]
    pub jwks_url: Option<String>,
    /// PEM bundle trusted for --jwks-url instead of the system's roots.
    #[arg(long, env = "MESHCA_JWKS_CA_FILE", value_name = "FILE")]
    pub jwks_ca_file: Option<PathBuf>,
    /// How often the JWKS is re-fetched (jwks mode) [default: 5m].
    #[arg(long, env = "MESHCA_JWKS_REFRESH_INTERVAL", value_name = "DURATION")]
    pub jwks_refresh_interval: Option<String>,
    /// Shortest time between two re-fetches caused by tokens with unknown key ids [default: 10s].
    #[arg(long, env = "MESHCA_JWKS_REFRESH_MIN_INTERVAL", value_name = "DURATION")]
    pub jwks_refresh_min_interval: Option<String>,
    /// After a token verifies (jwks mode), confirm through the Kubernetes client (--kubeconfig or in-cluster) that the pod it is bound to still exists with the token's uid: --jwks-confirm-pod or --jwks-confirm-pod=BOOL [default: false].
    #[arg(
        long,
        env = "MESHCA_JWKS_CONFIRM_POD",
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        action = clap::ArgAction::Set,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub jwks_confirm_pod: Option<bool>,
    /// Required token `iss` (jwks mode; required with --jwks-file or --jwks-url, else the discovered issuer; dev mode uses "meshca-dev").
    #[arg(long, env = "MESHCA_TOKEN_ISSUER", value_name = "ISS")]
    pub token_issuer: Option<String>,
}

/// `--jwks-confirm-pod`: where pods are looked up and how answers are cached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfirmPod {
    /// `None`: `KUBECONFIG`, `~/.kube/config`, or the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    pub settings: PodSettings,
}

/// The jwks source, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub keys: KeySource,
    /// Required `iss`; `None` only with [`KeySource::Discovery`]: the discovered issuer.
    pub issuer: Option<String>,
    pub audiences: Vec<String>,
    pub leeway: Duration,
    pub refresh: KeyRefresh,
    /// `--jwks-confirm-pod`: confirm the token's pod through the Kubernetes client.
    pub confirm_pod: Option<ConfirmPod>,
}

impl JwksFlags {
    /// In another mode: the flag that would silently do nothing is refused.
    pub(super) fn check_unused(&self) -> Result<(), setting::Error> {
        if self.jwks_confirm_pod.unwrap_or(false) {
            return Err(setting::Error::Invalid {
                setting: "jwks-confirm-pod",
                reason: "only used with --token-validation jwks (tokenreview has the API server confirm the \
                         pod; dev tokens name no real pod)"
                    .into(),
            });
        }
        Ok(())
    }

    pub(super) fn resolve(&self, common: Common) -> Result<Settings, setting::Error> {
        let invalid = |setting, reason: &str| setting::Error::Invalid { setting, reason: reason.into() };
        let keys = match (self.jwks_file.clone(), self.jwks_url.clone()) {
            (Some(_), Some(_)) => {
                return Err(invalid("jwks-url", "give --jwks-file or --jwks-url, not both"))
            }
            (Some(path), None) => KeySource::File(path),
            (None, Some(url)) if !url.starts_with("https://") => {
                return Err(invalid("jwks-url", "must be an https:// URL"))
            }
            (None, Some(url)) => KeySource::Url { url, ca_file: self.jwks_ca_file.clone() },
            (None, None) => KeySource::Discovery { kubeconfig: common.kubeconfig.clone() },
        };
        if self.jwks_ca_file.is_some() && !matches!(keys, KeySource::Url { .. }) {
            return Err(invalid("jwks-ca-file", "only used with --jwks-url"));
        }
        if self.token_issuer.is_none() && !matches!(keys, KeySource::Discovery { .. }) {
            return Err(setting::Error::Missing {
                setting: "token-issuer",
                when: "with --jwks-file or --jwks-url (only discovery finds the issuer itself)",
            });
        }
        let refresh_interval = duration(
            "jwks-refresh-interval",
            self.jwks_refresh_interval.as_deref(),
            discovery::DEFAULT_REFRESH_INTERVAL,
        )?;
        let (second, hour) = (Duration::from_secs(1), Duration::from_secs(3600));
        let refresh_interval = within(
            "jwks-refresh-interval",
            refresh_interval,
            second,
            24 * hour,
            "at least 1s and at most 24h",
        )?;
        let refresh_min_interval = duration(
            "jwks-refresh-min-interval",
            self.jwks_refresh_min_interval.as_deref(),
            discovery::DEFAULT_REFRESH_MIN_INTERVAL,
        )?;
        let refresh_min_interval =
            within("jwks-refresh-min-interval", refresh_min_interval, Duration::ZERO, hour, "at most 1h")?;
        let confirm_pod = self
            .jwks_confirm_pod
            .unwrap_or(false)
            .then(|| ConfirmPod { kubeconfig: common.kubeconfig, settings: PodSettings::default() });
        Ok(Settings {
            keys,
            issuer: self.token_issuer.clone(),
            audiences: common.audiences,
            leeway: common.leeway,
            refresh: KeyRefresh { refresh_interval, refresh_min_interval, ..KeyRefresh::default() },
            confirm_pod,
        })
    }
}

impl Settings {
    /// The JWKS authenticator (first keys fetched), wrapped in the pod check when asked.
    pub(super) async fn connect(&self) -> Result<Arc<dyn Authenticator>, Error> {
        let jwks = RotatingJwksAuthenticator::connect(
            &self.keys,
            self.issuer.clone(),
            self.audiences.clone(),
            self.leeway,
            self.refresh,
        )
        .await?;
        match &self.confirm_pod {
            None => Ok(Arc::new(jwks)),
            Some(confirm) => {
                let kubeconfig = confirm.kubeconfig.as_deref();
                let confirming =
                    PodConfirmingAuthenticator::connect(Arc::new(jwks), kubeconfig, confirm.settings).await?;
                Ok(Arc::new(confirming))
            }
        }
    }

    /// A Kubernetes client is used for discovery and for the pod check.
    pub(super) fn kubernetes(&self) -> Option<Option<&Path>> {
        match self {
            Settings { keys: KeySource::Discovery { kubeconfig }, .. }
            | Settings { confirm_pod: Some(ConfirmPod { kubeconfig, .. }), .. } => {
                Some(kubeconfig.as_deref())
            }
            Settings { .. } => None,
        }
    }
}
