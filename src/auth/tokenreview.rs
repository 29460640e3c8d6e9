//! Authentication by Kubernetes TokenReview: [`TokenReviewAuthenticator`] sends the
//! token to the API server (`POST /apis/authentication.k8s.io/v1/tokenreviews`)
//! with the configured audiences and turns its answer into a [`Subject`].
//!
//! The API server does the verifying (signature, expiry, issuer, audience, and that
//! the service account, pod and secret still exist); this module only checks that
//! the answer says so: `status.authenticated` is true, `status.audiences` names one
//! of ours (an answer without audiences is refused, unlike Linkerd's identity
//! controller), and the user is `system:serviceaccount:NS:SA`. Pod name and uid come
//! from the user's `extra` fields when the token was bound to a pod.
//!
//! Every call is bounded by a timeout; a call that times out, fails to connect or
//! gets an HTTP error is [`Error::Unavailable`], with a reason naming what happened
//! and never the token. The client does not retry on its own: callers retry, and
//! [`super::cache`] spares the API server repeated reviews of one token. The
//! API server judges time; the injected `now` only dates, for readiness, the
//! first call that found it unreachable ([`Authenticator::unreachable_since`]:
//! every call since failed with [`Error::Unavailable`]). [`Authenticator::probe`]
//! reviews a placeholder token, which the API server refuses, to learn whether it
//! answers again.

use super::{AuthFuture, Authenticator, Error, Subject};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::{fmt, path::Path, time::Duration, time::SystemTime};

/// `Subject::issuer` for subjects vouched for by TokenReview: the Kubernetes API
/// server answered, and the token's own `iss` is not read.
pub const ISSUER: &str = "kubernetes";
/// `status.user.extra` key naming the pod a bound token belongs to.
pub(crate) const POD_NAME_KEY: &str = "authentication.kubernetes.io/pod-name";
/// `status.user.extra` key carrying that pod's uid.
pub(crate) const POD_UID_KEY: &str = "authentication.kubernetes.io/pod-uid";
/// The token [`Authenticator::probe`] has reviewed: not a JWT, so refused by any
/// API server that answers at all.
pub(crate) const PROBE_TOKEN: &str = "meshca-readiness-probe";

/// What a review asks for and how long it may take.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Sent as `spec.audiences`; `status.audiences` must name at least one of them.
    /// Never empty: without audiences the API server would accept tokens meant for
    /// itself.
    pub audiences: Vec<String>,
    /// Bound on each API call, connecting included.
    pub timeout: Duration,
}

/// Reviews tokens through a Kubernetes API client.
pub(crate) struct TokenReviewAuthenticator {
    api: Api<TokenReview>,
    server: String,
    settings: Settings,
    /// Unix nanoseconds of the `now` of the first call that failed since the API
    /// server last answered; 0 while it answers (and before any call).
    failing_since: AtomicU64,
    /// A probe is running; others do not start one.
    probing: AtomicBool,
}

impl fmt::Debug for TokenReviewAuthenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenReviewAuthenticator")
            .field("server", &self.server)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl TokenReviewAuthenticator {
    /// Builds the client from `kubeconfig` when given, else from `KUBECONFIG`,
    /// `~/.kube/config` or the in-cluster service account (in that order). A
    /// configuration that cannot be loaded is an [`Error::Config`] naming
    /// `--kubeconfig`.
    pub(crate) async fn connect(kubeconfig: Option<&Path>, settings: Settings) -> Result<Self, Error> {
        let config = super::discovery::kube_config(kubeconfig, "send TokenReviews to").await?;
        Self::from_config(config, settings)
    }

    /// Builds the client from a loaded configuration.
    pub(crate) fn from_config(mut config: kube::Config, settings: Settings) -> Result<Self, Error> {
        if settings.audiences.is_empty() {
            return Err(Error::Config { reason: "TokenReview needs at least one audience".into() });
        }
        // kube retries 429/503/504 by default: those retries would multiply the calls
        // the cache's rate limit allows and outlast the timeout. Callers retry.
        config.default_retry = false;
        config.connect_timeout = Some(settings.timeout);
        // Host and port only: a URL may carry credentials.
        let url = &config.cluster_url;
        let server = format!("{}:{}", url.host().unwrap_or_default(), url.port_u16().unwrap_or(443));
        let client = kube::Client::try_from(config)
            .map_err(|e| Error::Config { reason: format!("cannot build the Kubernetes client: {e}") })?;
        Ok(TokenReviewAuthenticator {
            api: Api::all(client),
            server,
            settings,
            failing_since: AtomicU64::new(0),
            probing: AtomicBool::new(false),
        })
    }

    async fn review(&self, token: &[u8], now: SystemTime) -> Result<Subject, Error> {
        let token = super::trimmed(token)?;
        let token =
            std::str::from_utf8(token).map_err(|_| Error::Malformed { what: "token is not UTF-8 text" })?;
        let answer = self.call(token).await;
        self.contact(!matches!(answer, Err(Error::Unavailable { .. })), now);
        answer
    }

    /// Notes whether a call got an answer, for [`Authenticator::unreachable_since`].
    fn contact(&self, answered: bool, now: SystemTime) {
        if answered {
            self.failing_since.store(0, Ordering::Relaxed);
        } else {
            let nanos = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
            let nanos = u64::try_from(nanos).unwrap_or(u64::MAX).max(1);
            let _ = self.failing_since.compare_exchange(0, nanos, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// One TokenReview call and what its answer vouches for.
    async fn call(&self, token: &str) -> Result<Subject, Error> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(self.settings.audiences.clone()),
            },
            ..Default::default()
        };
        let timeout = self.settings.timeout;
        let answer = tokio::time::timeout(timeout, self.api.create(&PostParams::default(), &review)).await;
        match answer {
            Err(_) => Err(Error::Unavailable {
                reason: format!(
                    "the Kubernetes API server did not answer the TokenReview within {}",
                    humantime::format_duration(timeout)
                ),
            }),
            Ok(Err(e)) => Err(unavailable(&e)),
            Ok(Ok(review)) => subject(review.status, &self.settings.audiences),
        }
    }
}

impl Authenticator for TokenReviewAuthenticator {
    fn authenticate<'a>(&'a self, token: &'a [u8], now: SystemTime) -> AuthFuture<'a> {
        Box::pin(self.review(token, now))
    }

    fn name(&self) -> &'static str {
        "tokenreview"
    }

    fn unreachable_since(&self) -> Option<SystemTime> {
        match self.failing_since.load(Ordering::Relaxed) {
            0 => None,
            nanos => SystemTime::UNIX_EPOCH.checked_add(Duration::from_nanos(nanos)),
        }
    }

    fn probe(&self, now: SystemTime) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            if self.probing.swap(true, Ordering::AcqRel) {
                return;
            }
            // Cleared however this ends, a dropped future included.
            struct Probing<'a>(&'a AtomicBool);
            impl Drop for Probing<'_> {
                fn drop(&mut self) {
                    self.0.store(false, Ordering::Release);
                }
            }
            let _probing = Probing(&self.probing);
            match self.review(PROBE_TOKEN.as_bytes(), now).await {
                Err(Error::Unavailable { reason }) => {
                    tracing::debug!(%reason, "readiness probe: the Kubernetes API server is still unreachable")
                }
                _ => {
                    tracing::info!(server = %self.server, "the Kubernetes API server answers TokenReviews again")
                }
            }
        })
    }
}

/// The subject a TokenReview answer vouches for, or why it vouches for none.
pub fn subject(status: Option<TokenReviewStatus>, audiences: &[String]) -> Result<Subject, Error> {
    let Some(status) = status else {
        return Err(Error::Unavailable {
            reason: "the Kubernetes API server answered a TokenReview without a status".into(),
        });
    };
    if status.authenticated != Some(true) {
        return Err(Error::Rejected { summary: summarise(status.error.as_deref()) });
    }
    let granted = status.audiences.unwrap_or_default();
    if !granted.iter().any(|a| audiences.contains(a)) {
        return Err(Error::WrongAudience);
    }
    let user = status.user.unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let (namespace, service_account) = match username.split(':').collect::<Vec<_>>()[..] {
        ["system", "serviceaccount", ns, sa] if !ns.is_empty() && !sa.is_empty() => {
            (ns.to_owned(), sa.to_owned())
        }
        _ => return Err(Error::MissingIdentity),
    };
    let mut extra = user.extra.unwrap_or_default();
    let mut take = |key| extra.remove(key).and_then(|v| v.into_iter().next()).filter(|v| !v.is_empty());
    let (pod_name, pod_uid) = (take(POD_NAME_KEY), take(POD_UID_KEY));
    Ok(Subject { namespace, service_account, pod_name, pod_uid, issuer: ISSUER.into() })
}

/// One fixed description for the API server's `status.error`, whose text may quote
/// token claims (audiences, for one) and is therefore never passed on.
fn summarise(error: Option<&str>) -> &'static str {
    let error = error.unwrap_or_default().to_ascii_lowercase();
    let has = |words: &[&str]| words.iter().any(|w| error.contains(w));
    if error.trim().is_empty() {
        "no reason given"
    } else if has(&["expired"]) {
        "token has expired"
    } else if has(&["not valid yet", "not yet valid", "used before"]) {
        "token is not valid yet"
    } else if has(&["audience"]) {
        "token audience is not accepted"
    } else if has(&["invalidated", "not found", "deleted", "does not exist"]) {
        "token's service account, pod or secret no longer exists"
    } else if has(&["signature", "cryptographic", "algorithm"]) {
        "token signature does not verify with the cluster's keys"
    } else if has(&["issuer"]) {
        "token issuer is not trusted by the cluster"
    } else {
        "token is not valid for this cluster"
    }
}

/// Why a TokenReview call failed, in words that name what happened. Response
/// bodies are never quoted: a real API server echoes the reviewed token in them.
fn unavailable(e: &kube::Error) -> Error {
    let reason = match e {
        kube::Error::Api(status) => match status.code {
            401 => "the Kubernetes API server answered 401: it refused meshca's own credentials \
                    (check --kubeconfig or the pod's service account token)"
                .to_owned(),
            403 => "the Kubernetes API server answered 403: meshca's service account may not create \
                    tokenreviews (bind it to the system:auth-delegator cluster role)"
                .to_owned(),
            code => format!("the Kubernetes API server answered {code}"),
        },
        kube::Error::SerdeError(_) => {
            "the Kubernetes API server's TokenReview answer does not parse".to_owned()
        }
        other => super::discovery::unreachable_reason(other, ""),
    };
    Error::Unavailable { reason }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use k8s_openapi::api::authentication::v1::UserInfo;
    use std::collections::BTreeMap;

    fn audiences() -> Vec<String> {
        vec!["identity.l5d.io".into()]
    }
    fn answer(username: &str, granted: Option<&[&str]>, pod: bool) -> Option<TokenReviewStatus> {
        let extra = pod.then(|| {
            BTreeMap::from([
                (POD_NAME_KEY.to_owned(), vec!["web-0".to_owned()]),
                (POD_UID_KEY.to_owned(), vec!["p-uid".to_owned()]),
            ])
        });
        Some(TokenReviewStatus {
            authenticated: Some(true),
            audiences: granted.map(|a| a.iter().map(|s| s.to_string()).collect()),
            user: Some(UserInfo { username: Some(username.into()), extra, ..Default::default() }),
            error: None,
        })
    }

    #[tokio::test]
    async fn debug_names_the_api_server_and_settings_and_the_method_is_tokenreview() {
        let config = kube::Config::new("https://127.0.0.1:6443".parse().unwrap());
        let settings = Settings { audiences: audiences(), timeout: Duration::from_secs(5) };
        let auth = TokenReviewAuthenticator::from_config(config, settings).unwrap();
        assert_eq!(
            format!("{auth:?}"),
            "TokenReviewAuthenticator { server: \"127.0.0.1:6443\", settings: Settings { audiences: \
             [\"identity.l5d.io\"], timeout: 5s }, .. }"
        );
        assert_eq!(auth.name(), "tokenreview");
    }

    #[test]
    fn an_authenticated_service_account_with_our_audience_is_a_subject_with_its_pod() {
        let subject = subject(
            answer("system:serviceaccount:web:web-sa", Some(&["identity.l5d.io"]), true),
            &audiences(),
        );
        let subject = subject.unwrap();
        assert_eq!((&*subject.namespace, &*subject.service_account), ("web", "web-sa"));
        assert_eq!((subject.pod_name.as_deref(), subject.pod_uid.as_deref()), (Some("web-0"), Some("p-uid")));
        assert_eq!(subject.issuer, ISSUER);
        let unbound = super::subject(
            answer("system:serviceaccount:web:web-sa", Some(&["identity.l5d.io"]), false),
            &audiences(),
        );
        assert_eq!(unbound.unwrap().pod_name, None);
    }

    #[test]
    fn an_answer_without_our_audience_is_refused_even_when_authenticated() {
        for granted in [None, Some(&[][..]), Some(&["https://kubernetes.default.svc"][..])] {
            let result = subject(answer("system:serviceaccount:web:web-sa", granted, true), &audiences());
            assert!(matches!(result, Err(Error::WrongAudience)), "{granted:?}: {result:?}");
        }
    }

    #[test]
    fn users_that_are_not_service_accounts_have_no_identity() {
        for username in [
            "alice",
            "system:serviceaccount:web",
            "system:serviceaccount::sa",
            "system:serviceaccount:a:b:c",
            "",
        ] {
            let result = subject(answer(username, Some(&["identity.l5d.io"]), true), &audiences());
            assert!(matches!(result, Err(Error::MissingIdentity)), "{username}: {result:?}");
        }
    }

    #[test]
    fn an_unauthenticated_answer_is_summarised_without_quoting_the_api_server() {
        let refused = |error: &str| {
            let status = TokenReviewStatus {
                error: Some(error.into()),
                user: Some(UserInfo::default()),
                ..Default::default()
            };
            let e = subject(Some(status), &audiences()).unwrap_err();
            assert_eq!(e.code(), "token_rejected");
            e.to_string()
        };
        let text = refused(
            r#"[invalid bearer token, token audiences ["aud-marker-7f3a"] is invalid for the target audiences ["identity.l5d.io"]]"#,
        );
        assert!(text.contains("audience is not accepted") && !text.contains("aud-marker-7f3a"), "{text}");
        assert!(refused("[invalid bearer token, service account token has expired]").contains("expired"));
        assert!(refused("[invalid bearer token, square/go-jose: error in cryptographic primitive]")
            .contains("signature"));
        assert!(refused("something new").contains("not valid for this cluster"));
        let missing = subject(Some(TokenReviewStatus::default()), &audiences()).unwrap_err();
        assert!(missing.to_string().contains("no reason given"), "{missing}");
        assert!(matches!(subject(None, &audiences()), Err(Error::Unavailable { .. })));
    }

    #[test]
    fn api_errors_name_the_status_code_and_never_the_body() {
        let status = kube::core::Status::failure("spec.token: eyJhbGciOi-marker", "Failed").with_code(500);
        let e = unavailable(&kube::Error::Api(status.boxed())).to_string();
        assert!(e.contains("answered 500") && !e.contains("marker"), "{e}");
        let forbidden = kube::core::Status::failure("no", "Forbidden").with_code(403);
        assert!(unavailable(&kube::Error::Api(forbidden.boxed()))
            .to_string()
            .contains("system:auth-delegator"));
    }

    #[tokio::test]
    async fn the_first_unanswered_call_dates_the_outage_and_calls_that_never_left_do_not() {
        // A port nothing listens on: every call is refused.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let config = kube::Config::new(format!("http://127.0.0.1:{port}").parse().unwrap());
        let settings = Settings { audiences: audiences(), timeout: Duration::from_secs(2) };
        let auth = TokenReviewAuthenticator::from_config(config, settings).unwrap();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(auth.unreachable_since(), None, "no call yet");
        assert!(matches!(auth.authenticate(b"\xff", t0).await, Err(Error::Malformed { .. })));
        assert_eq!(auth.unreachable_since(), None, "a token that is not text is never sent");
        assert!(matches!(auth.authenticate(b"a.b.c", t0).await, Err(Error::Unavailable { .. })));
        assert_eq!(auth.unreachable_since(), Some(t0));
        auth.probe(t0 + Duration::from_secs(30)).await;
        assert_eq!(auth.unreachable_since(), Some(t0), "dated by the first failure");
        auth.contact(true, t0 + Duration::from_secs(40));
        assert_eq!(auth.unreachable_since(), None, "an answer ends the outage");
        auth.probe(t0 + Duration::from_secs(50)).await;
        assert_eq!(auth.unreachable_since(), Some(t0 + Duration::from_secs(50)));
    }

    #[tokio::test]
    async fn a_missing_kubeconfig_is_a_configuration_error_naming_the_flag() {
        let settings = Settings { audiences: audiences(), timeout: Duration::from_secs(2) };
        let err =
            TokenReviewAuthenticator::connect(Some(Path::new("/nonexistent/kubeconfig")), settings.clone())
                .await
                .unwrap_err();
        assert!(
            matches!(err, Error::Config { .. })
                && err.to_string().contains("--kubeconfig /nonexistent/kubeconfig"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubeconfig");
        std::fs::write(&path, "users: [{name: x, user: {token: secret-marker-91}}\n").unwrap();
        let err = TokenReviewAuthenticator::connect(Some(&path), settings).await.unwrap_err().to_string();
        assert!(err.contains("--kubeconfig") && !err.contains("secret-marker-91"), "{err}");
    }
}
