//! `--audit-node-os` end to end: meshca (tokenreview mode) looks up the caller's
//! pod and its node on the test API server (tests/support/apiserver.rs) through
//! its real `kube` client, records the node's `kubernetes.io/os` label in the
//! audit record, caches what it learnt, and issues as usual when it cannot tell.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use meshca_test_support as support;

use std::time::{Duration, Instant};

use meshca::proto::CertifyRequest;
use serde_json::Value;
use support::apiserver::{ApiServer, Mode};
use support::{request_id, Options, TestServer};

const UID: &str = "0c1b2a39-7d6e-4f5a-8b9c-0d1e2f3a4b5c";

struct Cluster {
    api: ApiServer,
    server: TestServer,
}

async fn cluster(node_os: bool) -> Cluster {
    let api = ApiServer::start().await;
    let token = api.tokenreview_config();
    let options = Options { token: Some(token), node_os, ..Default::default() };
    let server = TestServer::start_with(options).await;
    Cluster { api, server }
}

impl Cluster {
    /// Issues a certificate to `web` from pod `pod` (uid `uid`); returns the audit record.
    async fn issue(&self, pod: &str, uid: &str) -> Value {
        let mut claims = self.server.claims("default", "web");
        claims.pod = Some((pod.into(), uid.into()));
        let request =
            CertifyRequest { token: self.api.token(&claims), ..self.server.request("default", "web").1 };
        let resp = self.server.client().await.certify(request).await.unwrap();
        let record = self.server.audit_record(&request_id(resp.metadata()));
        assert_eq!(record["outcome"], "issued");
        assert_eq!(record["subject"]["pod_name"], pod);
        record
    }
}

#[tokio::test]
async fn the_os_of_the_callers_node_is_in_its_audit_record_and_looked_up_once_per_pod_and_node() {
    let c = cluster(true).await;
    c.api.add_node("node-a", Some("linux"));
    c.api.add_node("node-w", Some("windows"));
    c.api.add_pod("default", "web-0", UID, "node-a");
    c.api.add_pod("default", "web-1", "uid-1", "node-a");
    c.api.add_pod("default", "web-win", "uid-w", "node-w");
    for _ in 0..3 {
        assert_eq!(c.issue("web-0", UID).await["subject"]["node_os"], "linux");
    }
    assert_eq!(c.issue("web-1", "uid-1").await["subject"]["node_os"], "linux");
    assert_eq!(c.issue("web-win", "uid-w").await["subject"]["node_os"], "windows");
    assert_eq!((c.api.pod_gets(), c.api.node_gets()), (3, 2), "each pod and node asked about once");
    assert_eq!(c.server.metric("meshca_node_os_lookups_total").await, 5);
    assert_eq!(c.server.metric("meshca_node_os_lookup_failures_total").await, 0);
}

#[tokio::test]
async fn a_pod_recreated_under_the_same_name_with_another_uid_has_no_node_os() {
    let c = cluster(true).await;
    c.api.add_node("node-a", Some("linux"));
    c.api.add_pod("default", "web-0", "uid-of-the-new-pod", "node-a");
    let record = c.issue("web-0", UID).await;
    assert!(record["subject"].get("node_os").is_none(), "{record}");
}

#[tokio::test]
async fn lookups_that_fail_leave_node_os_out_are_remembered_and_never_refuse() {
    let c = cluster(true).await;
    c.api.add_node("unlabelled", None);
    c.api.add_pod("default", "web-1", "uid-1", "unlabelled");
    for (pod, uid) in [("missing", UID), ("missing", UID), ("web-1", "uid-1"), ("web-1", "uid-1")] {
        let record = c.issue(pod, uid).await;
        assert!(record["subject"].get("node_os").is_none(), "{record}");
    }
    assert_eq!((c.api.pod_gets(), c.api.node_gets()), (2, 1), "failures are remembered too");
    c.api.set_lookups_mode(Mode::Forbidden);
    c.api.add_pod("default", "web-2", "uid-2", "unlabelled");
    assert!(c.issue("web-2", "uid-2").await["subject"].get("node_os").is_none());
    assert_eq!(c.server.metric("meshca_node_os_lookup_failures_total").await, 3);
}

#[tokio::test]
async fn a_lookup_that_hangs_delays_issuance_by_its_timeout_at_most() {
    let c = cluster(true).await;
    c.api.add_node("node-a", Some("linux"));
    c.api.add_pod("default", "web-0", UID, "node-a");
    c.api.set_lookups_mode(Mode::Hold);
    let started = Instant::now();
    let record =
        tokio::time::timeout(Duration::from_secs(30), c.issue("web-0", UID)).await.expect("issuance hung");
    let took = started.elapsed();
    assert!(record["subject"].get("node_os").is_none(), "{record}");
    assert!(took >= meshca::cluster::nodes::LOOKUP_TIMEOUT && took < Duration::from_secs(10), "{took:?}");
    c.api.release();
}

#[tokio::test]
async fn without_audit_node_os_no_pod_or_node_is_looked_up() {
    let c = cluster(false).await;
    c.api.add_node("node-a", Some("linux"));
    c.api.add_pod("default", "web-0", UID, "node-a");
    let record = c.issue("web-0", UID).await;
    assert!(record["subject"].get("node_os").is_none(), "{record}");
    assert_eq!((c.api.pod_gets(), c.api.node_gets()), (0, 0));
    assert!(!c.server.metrics().await.contains("meshca_node_os_"));
}
