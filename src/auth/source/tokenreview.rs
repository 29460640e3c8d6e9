//! The `tokenreview` token source (the default outside `--dev`): each token is sent to
//! the Kubernetes API server's TokenReview API (`auth::tokenreview`), behind a cache,
//! request coalescing and a rate limit (`auth::cache`) so the API server is asked once
//! per token, not once per request. Owns the `--token-review-*` and `--token-cache-*`
//! flags, their checks, and the construction.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use super::Common;
use crate::auth::cache::{self, CachingAuthenticator};
use crate::auth::tokenreview::{self, TokenReviewAuthenticator};
use crate::auth::{Authenticator, Error};
use crate::setting::{self, duration, within};

/// The tokenreview source's own flags.
#[derive(Debug, Default, Args, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct TokenReviewFlags {
    /// Bound on each TokenReview call, connecting included [default: 2s].
    #[arg(long, env = "MESHCA_TOKEN_REVIEW_TIMEOUT", value_name = "DURATION")]
    pub token_review_timeout: Option<String>,
    /// TokenReview calls per second, sustained [default: 100].
    #[arg(long, env = "MESHCA_TOKEN_REVIEW_QPS", value_name = "N")]
    pub token_review_qps: Option<u32>,
    /// TokenReview calls allowed at once after a quiet period [default: 200].
    #[arg(long, env = "MESHCA_TOKEN_REVIEW_BURST", value_name = "N")]
    pub token_review_burst: Option<u32>,
    /// How long an accepted token is remembered, at most until its exp [default: 5m].
    #[arg(long, env = "MESHCA_TOKEN_CACHE_TTL", value_name = "DURATION")]
    pub token_cache_ttl: Option<String>,
    /// How long a refused token is remembered [default: 10s].
    #[arg(long, env = "MESHCA_TOKEN_CACHE_FAILURE_TTL", value_name = "DURATION")]
    pub token_cache_failure_ttl: Option<String>,
}

/// The tokenreview source, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// `None`: `KUBECONFIG`, `~/.kube/config`, or the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    pub audiences: Vec<String>,
    /// Bound on each API call; also the longest wait for a rate-limit turn.
    pub timeout: Duration,
    pub qps: u32,
    pub burst: u32,
    pub cache_ttl: Duration,
    pub cache_failure_ttl: Duration,
}

impl TokenReviewFlags {
    pub(super) fn resolve(&self, common: Common) -> Result<Settings, setting::Error> {
        let timeout =
            duration("token-review-timeout", self.token_review_timeout.as_deref(), Duration::from_secs(2))?;
        let timeout = within(
            "token-review-timeout",
            timeout,
            Duration::from_nanos(1),
            Duration::from_secs(60),
            "more than 0 and at most 60s",
        )?;
        let at_least_one = |setting, value: Option<u32>, default| match value.unwrap_or(default) {
            0 => Err(setting::Error::Invalid { setting, reason: "must be at least 1".into() }),
            n => Ok(n),
        };
        let cache_ttl =
            duration("token-cache-ttl", self.token_cache_ttl.as_deref(), Duration::from_secs(300))?;
        let cache_ttl =
            within("token-cache-ttl", cache_ttl, Duration::ZERO, Duration::from_secs(3600), "at most 1h")?;
        let cache_failure_ttl = duration(
            "token-cache-failure-ttl",
            self.token_cache_failure_ttl.as_deref(),
            Duration::from_secs(10),
        )?;
        let cache_failure_ttl = within(
            "token-cache-failure-ttl",
            cache_failure_ttl,
            Duration::ZERO,
            Duration::from_secs(600),
            "at most 10m",
        )?;
        Ok(Settings {
            kubeconfig: common.kubeconfig,
            audiences: common.audiences,
            timeout,
            qps: at_least_one("token-review-qps", self.token_review_qps, 100)?,
            burst: at_least_one("token-review-burst", self.token_review_burst, 200)?,
            cache_ttl,
            cache_failure_ttl,
        })
    }
}

impl Settings {
    /// The TokenReview client behind the cache.
    pub(super) async fn connect(&self) -> Result<Arc<dyn Authenticator>, Error> {
        let settings = tokenreview::Settings { audiences: self.audiences.clone(), timeout: self.timeout };
        let reviewer = TokenReviewAuthenticator::connect(self.kubeconfig.as_deref(), settings).await?;
        let settings = cache::Settings {
            ttl: self.cache_ttl,
            failure_ttl: self.cache_failure_ttl,
            qps: self.qps,
            burst: self.burst,
            max_wait: self.timeout,
            max_entries: cache::DEFAULT_MAX_ENTRIES,
        };
        Ok(Arc::new(CachingAuthenticator::new(Arc::new(reviewer), settings)))
    }

    /// Always a Kubernetes client: the API server is the source.
    pub(super) fn kubernetes(&self) -> Option<Option<&Path>> {
        Some(self.kubeconfig.as_deref())
    }
}
