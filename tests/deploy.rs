//! The Kubernetes manifests in `deploy/` and the objects `meshca init --kubernetes`
//! prints, checked offline.
//!
//! Each kustomize tree is rendered with `kubectl kustomize`, and every document is
//! validated strictly (unknown fields are errors) against the Kubernetes
//! [`KUBERNETES_VERSION`] schemas by the PyPI package kubernetes-validate. Only the
//! custom-resource kinds in [`CRD_KINDS`] are exempt, by apiVersion and kind, since
//! their schemas are not Kubernetes'; this file checks their fields itself. Any
//! other document without a schema (a mistyped apiVersion, say) fails.
//!
//! Beyond schema validity: the RBAC rules equal the documented set (the table in
//! docs/RUNBOOK.md), the Deployment is hardened, its arguments are flags that
//! `meshca serve --help` lists and agree with the mounts, ports, probes and service
//! account, and the Linkerd overlay serves under Linkerd's names. kubectl comes with
//! the machine; `tests/run.sh` installs kubernetes-validate. Without either the tests fail
//! and say so: they never pass by skipping.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic in a test is its failure report
#![cfg(unix)]

use meshca_test_support as support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;
use support::process::bin;

/// The Kubernetes version whose schemas the manifests must satisfy.
const KUBERNETES_VERSION: &str = "1.31";

/// Custom resources, whose schemas ship with their operators rather than with
/// Kubernetes: exempt from kubernetes-validate, checked field by field below.
const CRD_KINDS: [(&str, &str); 4] = [
    ("cert-manager.io/v1", "Issuer"),
    ("cert-manager.io/v1", "Certificate"),
    ("trust.cert-manager.io/v1alpha1", "Bundle"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
];

/// meshca's ClusterRole, rule by rule: (API group, resources, verbs), and the
/// non-resource URLs it may `get`. Nothing else is allowed. docs/RUNBOOK.md lists
/// the same set.
const RBAC_RULES: [(&str, &[&str], &[&str]); 4] = [
    ("authentication.k8s.io", &["tokenreviews"], &["create"]),
    ("", &["events"], &["create", "patch"]),
    ("events.k8s.io", &["events"], &["create", "patch"]),
    ("", &["pods", "nodes"], &["get"]),
];
const RBAC_URLS: [&str; 2] = ["/.well-known/openid-configuration", "/openid/v1/jwks"];
/// meshca's Role in its own namespace (bootstrap token uses as Leases, audit
/// checkpoints as ConfigMaps), rule by rule. docs/RUNBOOK.md lists the same set.
const NAMESPACED_RBAC_RULES: [(&str, &[&str], &[&str]); 2] = [
    ("coordination.k8s.io", &["leases"], &["create", "list", "delete"]),
    ("", &["configmaps"], &["create", "patch"]),
];
/// The Secret holding the audit log's signing key, and where it is mounted.
const AUDIT_KEY_SECRET: &str = "meshca-audit-key";

const MISSING_TOOLS: &str =
    "run `bash tests/run.sh`, which checks for kubectl (v1.27 or later, with kustomize v5) \
     and installs the PyPI package kubernetes-validate";

/// Reads a YAML stream on stdin, validates each document with kubernetes-validate
/// (strict) unless its (apiVersion, kind) is in the skip list, and prints the
/// documents and the verdicts as JSON, so the test needs no YAML parser of its own.
const VALIDATE_PY: &str = r#"
import json, sys
import yaml
import kubernetes_validate
from kubernetes_validate import utils

version, skip = sys.argv[1], {tuple(k) for k in json.loads(sys.argv[2])}
documents = [d for d in yaml.safe_load_all(sys.stdin) if d is not None]
report = []
for d in documents:
    key = (d.get("apiVersion"), d.get("kind"))
    entry = {"apiVersion": key[0], "kind": key[1], "name": (d.get("metadata") or {}).get("name")}
    if key in skip:
        entry["result"] = "skipped"
    else:
        try:
            utils.validate(d, version, strict=True)
            entry["result"] = "valid"
        except utils.ValidationError as e:
            entry["result"] = "invalid"
            entry["error"] = "%s: %s" % (".".join(map(str, e.path)), e.message)
        except utils.SchemaNotFoundError as e:
            entry["result"] = "no schema"
            entry["error"] = e.message
    report.append(entry)
json.dump({"kubernetes_validate": kubernetes_validate.__version__, "documents": documents, "report": report}, sys.stdout)
"#;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(mut cmd: Command, stdin: &str, what: &str) -> Output {
    let mut child = match cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn() {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("{what}: not found on PATH: {MISSING_TOOLS}")
        }
        Err(e) => panic!("{what}: cannot start: {e}"),
    };
    let mut pipe = child.stdin.take().unwrap();
    let input = stdin.to_owned();
    let writer = std::thread::spawn(move || pipe.write_all(input.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    out
}

/// `kubectl kustomize deploy/TREE`.
fn render(tree: &str) -> String {
    let mut cmd = Command::new("kubectl");
    cmd.arg("kustomize").arg(repo().join("deploy").join(tree));
    let out = run(cmd, "", "kubectl");
    assert!(
        out.status.success(),
        "kubectl kustomize deploy/{tree} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Every document of `yaml`, each validated strictly, CRD kinds exempt.
fn validate(yaml: &str, source: &str) -> Vec<Value> {
    let skip = serde_json::to_string(&CRD_KINDS.map(|(api, kind)| [api, kind])).unwrap();
    let mut cmd = Command::new("python3");
    cmd.args(["-c", VALIDATE_PY, KUBERNETES_VERSION, &skip]);
    let out = run(cmd, yaml, "python3");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named"),
        "kubernetes-validate (or PyYAML) is not installed for python3: {MISSING_TOOLS}\n{stderr}"
    );
    assert!(out.status.success(), "validating {source} failed:\n{stderr}");
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    let failures: Vec<String> = result["report"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["result"] != "valid" && e["result"] != "skipped")
        .map(|e| format!("{} {}/{}: {}: {}", e["apiVersion"], e["kind"], e["name"], e["result"], e["error"]))
        .collect();
    assert!(
        failures.is_empty(),
        "{source} against Kubernetes {KUBERNETES_VERSION} (kubernetes-validate {}):\n{}",
        result["kubernetes_validate"],
        failures.join("\n")
    );
    let documents = result["documents"].as_array().unwrap().clone();
    assert!(!documents.is_empty(), "{source} rendered no documents");
    documents
}

fn rendered(tree: &str) -> Vec<Value> {
    validate(&render(tree), &format!("deploy/{tree}"))
}

fn all<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// The one object of `kind` (fails when there are none or several).
fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found = all(docs, kind);
    assert_eq!(found.len(), 1, "expected exactly one {kind}, found {}", found.len());
    found[0]
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str().unwrap_or_else(|| panic!("{what} is not a string: {v}"))
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), str_of(v, k).to_owned())).collect())
        .unwrap_or_default()
}

/// Every label of `selector` is on `pods` with the same value (and there is one).
fn assert_selects(selector: &Value, pods: &BTreeMap<String, String>, what: &str) {
    let selector = labels(selector);
    assert!(!selector.is_empty(), "{what}: empty selector");
    for (k, v) in &selector {
        assert_eq!(pods.get(k), Some(v), "{what}: selector {k}={v} does not match the pod labels {pods:?}");
    }
}

/// The long flags `meshca COMMAND --help` lists.
fn flags_of(command: &str) -> BTreeSet<String> {
    let out = support::process::meshca().args([command, "--help"]).output().unwrap();
    assert!(out.status.success(), "meshca {command} --help failed");
    let help = String::from_utf8(out.stdout).unwrap();
    let flags: BTreeSet<String> = help
        .lines()
        .filter_map(|line| line.trim_start().strip_prefix("--"))
        .filter_map(|rest| rest.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')).next())
        .map(str::to_owned)
        .collect();
    assert!(flags.len() > 3, "unexpected help text:\n{help}");
    flags
}

/// `--flag=value` arguments after the subcommand, each a flag of that subcommand.
fn parse_args<'a>(args: &[&'a str], command: &str) -> BTreeMap<&'a str, &'a str> {
    assert_eq!(args.first(), Some(&command), "{args:?}");
    let known = flags_of(command);
    let mut flags = BTreeMap::new();
    for arg in &args[1..] {
        let (flag, value) = arg
            .strip_prefix("--")
            .and_then(|a| a.split_once('='))
            .unwrap_or_else(|| panic!("{arg:?}: write arguments as --flag=value"));
        assert!(known.contains(flag), "--{flag} is not a `meshca {command}` flag (known: {known:?})");
        assert!(flags.insert(flag, value).is_none(), "--{flag} given twice");
    }
    flags
}

/// The rules of a ClusterRole as "group/resource verb" and "url verb" lines.
fn rule_set(rules: &Value) -> BTreeSet<String> {
    let mut set = BTreeSet::new();
    for rule in rules.as_array().unwrap() {
        let allowed: BTreeSet<&str> = ["apiGroups", "resources", "verbs", "nonResourceURLs"].into();
        for key in rule.as_object().unwrap().keys() {
            assert!(allowed.contains(key.as_str()), "unexpected rule field {key} in {rule}");
        }
        let list = |key: &str| -> Vec<&str> {
            rule[key].as_array().map(|a| a.iter().map(|v| str_of(v, key)).collect()).unwrap_or_default()
        };
        for verb in list("verbs") {
            for group in list("apiGroups") {
                for resource in list("resources") {
                    set.insert(format!("{group}/{resource} {verb}"));
                }
            }
            for url in list("nonResourceURLs") {
                set.insert(format!("{url} {verb}"));
            }
        }
    }
    set
}

fn documented_rules() -> BTreeSet<String> {
    let mut set = rules_of(&RBAC_RULES);
    for url in RBAC_URLS {
        set.insert(format!("{url} get"));
    }
    set
}

fn rules_of(rules: &[(&str, &[&str], &[&str])]) -> BTreeSet<String> {
    let mut set = BTreeSet::new();
    for &(group, resources, verbs) in rules {
        for resource in resources {
            for verb in verbs {
                set.insert(format!("{group}/{resource} {verb}"));
            }
        }
    }
    set
}

/// What differs between installations of the same base.
struct Install {
    namespace: &'static str,
    service_account: &'static str,
    service: &'static str,
    issuer_secret: &'static str,
    trust_roots: &'static str,
}

const MESHCA_SYSTEM: Install = Install {
    namespace: "meshca-system",
    service_account: "meshca",
    service: "meshca",
    issuer_secret: "meshca-issuer",
    trust_roots: "meshca-trust-anchors",
};

const LINKERD: Install = Install {
    namespace: "linkerd",
    service_account: "linkerd-identity",
    service: "linkerd-identity",
    issuer_secret: "linkerd-identity-issuer",
    trust_roots: "linkerd-identity-trust-roots",
};

/// Checks everything a rendered installation must satisfy; returns meshca's
/// serving identity, derived from the Deployment's arguments.
fn check_install(docs: &[Value], install: &Install) -> String {
    let cluster_scoped = ["Namespace", "ClusterRole", "ClusterRoleBinding", "Bundle"];
    for d in docs.iter().filter(|d| !cluster_scoped.contains(&str_of(&d["kind"], "kind"))) {
        assert_eq!(
            d["metadata"]["namespace"], install.namespace,
            "namespace of {} {}",
            d["kind"], d["metadata"]["name"]
        );
    }

    // RBAC: exactly the documented rules, bound to the service account the pods use.
    let role = one(docs, "ClusterRole");
    assert_eq!(
        rule_set(&role["rules"]),
        documented_rules(),
        "ClusterRole rules differ from the documented set"
    );
    let binding = one(docs, "ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    let subject = serde_json::json!([{"kind": "ServiceAccount", "name": install.service_account, "namespace": install.namespace}]);
    assert_eq!(binding["subjects"], subject, "ClusterRoleBinding subjects");
    // In its own namespace (checked above): the Role, bound the same way.
    let role = one(docs, "Role");
    assert_eq!(
        rule_set(&role["rules"]),
        rules_of(&NAMESPACED_RBAC_RULES),
        "Role rules differ from the documented set"
    );
    let binding = one(docs, "RoleBinding");
    assert_eq!(
        (&binding["roleRef"]["kind"], &binding["roleRef"]["name"]),
        (&"Role".into(), &role["metadata"]["name"])
    );
    assert_eq!(binding["subjects"], subject, "RoleBinding subjects");
    assert_eq!(one(docs, "ServiceAccount")["metadata"]["name"], install.service_account);

    let deployment = one(docs, "Deployment");
    let spec = &deployment["spec"];
    let pod = &spec["template"]["spec"];
    let pod_labels = labels(&spec["template"]["metadata"]["labels"]);
    assert_eq!(spec["replicas"], 2);
    assert_selects(&spec["selector"]["matchLabels"], &pod_labels, "Deployment");
    assert_eq!(pod["serviceAccountName"], install.service_account);
    assert_eq!(pod["automountServiceAccountToken"], true, "meshca calls the API server as itself");
    assert_eq!(pod["nodeSelector"], serde_json::json!({"kubernetes.io/os": "linux"}));
    let anti = &pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]
        ["podAffinityTerm"];
    assert_eq!(anti["topologyKey"], "kubernetes.io/hostname", "replicas are spread across nodes");
    assert_selects(&anti["labelSelector"]["matchLabels"], &pod_labels, "pod anti-affinity");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["runAsUser"], 65532);
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    let annotations = labels(&spec["template"]["metadata"]["annotations"]);
    for (k, v) in
        [("prometheus.io/scrape", "true"), ("prometheus.io/port", "9990"), ("prometheus.io/path", "/metrics")]
    {
        assert_eq!(annotations.get(k).map(String::as_str), Some(v), "pod annotation {k}");
    }

    let containers = pod["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["runAsUser"], 65532);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"], serde_json::json!({"drop": ["ALL"]}));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert!(sc.get("privileged").is_none_or(|p| p == false));
    let resources = serde_json::json!({
        "requests": {"cpu": "100m", "memory": "32Mi"},
        "limits": {"cpu": "2", "memory": "160Mi"},
    });
    assert_eq!(c["resources"], resources);
    for (probe, path) in [("livenessProbe", "/live"), ("readinessProbe", "/ready")] {
        assert_eq!(c[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(c[probe]["httpGet"]["port"], 9990, "{probe}");
    }
    let ports: BTreeMap<String, i64> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (str_of(&p["name"], "port name").to_owned(), p["containerPort"].as_i64().unwrap()))
        .collect();
    assert_eq!(ports, BTreeMap::from([("grpc".to_owned(), 8080), ("admin".to_owned(), 9990)]));

    // Volumes: the issuer Secret, the trust-anchor ConfigMap and the audit key Secret,
    // read-only; nothing writable.
    let volumes = pod["volumes"].as_array().unwrap();
    assert_eq!(
        volumes.len(),
        3,
        "only the issuer, the trust anchors and the audit key are mounted: {volumes:?}"
    );
    let volume = |source: &str, key: &str, name: &str| -> String {
        let v = volumes
            .iter()
            .find(|v| v[source][key] == name)
            .unwrap_or_else(|| panic!("no {source} volume for {name}"));
        let vname = str_of(&v["name"], "volume name");
        let mount = c["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == vname).unwrap();
        assert_eq!(mount["readOnly"], true, "{name} is mounted read-only");
        assert!(mount.get("subPath").is_none(), "{name}: a subPath mount would never see updates");
        str_of(&mount["mountPath"], "mountPath").to_owned()
    };
    let issuer_dir = volume("secret", "secretName", install.issuer_secret);
    let anchors_dir = volume("configMap", "name", install.trust_roots);
    let audit_dir = volume("secret", "secretName", AUDIT_KEY_SECRET);
    // The kubelet's default mode (0644) lets every user read a key, and meshca refuses
    // to start with such a key: both Secrets must be mounted owner/group-only.
    for name in [install.issuer_secret, AUDIT_KEY_SECRET] {
        let secret = &volumes.iter().find(|v| v["secret"]["secretName"] == name).unwrap()["secret"];
        let modes = std::iter::once(&secret["defaultMode"])
            .chain(secret["items"].as_array().into_iter().flatten().map(|item| &item["mode"]));
        for mode in modes.filter(|m| !m.is_null()) {
            let mode = mode.as_i64().unwrap();
            assert_eq!(mode & 0o007, 0, "{name} mounted with mode {mode:o}: every user could read the key");
        }
        assert!(secret["defaultMode"].is_i64(), "the {name} Secret volume must set defaultMode (e.g. 0440)");
    }

    // Arguments: `serve`, then --flag=value with flags serve knows.
    let args: Vec<&str> = c["args"].as_array().unwrap().iter().map(|a| str_of(a, "arg")).collect();
    assert!(c.get("command").is_none(), "the image's entrypoint is meshca");
    let flags = parse_args(&args, "serve");
    let trust_anchors = format!("{anchors_dir}/ca-bundle.crt");
    let audit_key = format!("{audit_dir}/audit-signing.key");
    let expected = [
        ("listen", "0.0.0.0:8080"),
        ("admin-listen", "0.0.0.0:9990"),
        ("trust-anchors", trust_anchors.as_str()),
        ("issuer-dir", issuer_dir.as_str()),
        ("token-validation", "tokenreview"),
        ("token-audiences", "identity.l5d.io"),
        ("audit-log", "-"),
        ("audit-signing-key", audit_key.as_str()),
        ("max-in-flight", "4096"),
        ("max-connections", "1024"),
        ("control-plane-namespace", install.namespace),
        ("service-account", install.service_account),
    ];
    assert_eq!(flags, BTreeMap::from(expected), "serve arguments");

    let service = one(docs, "Service");
    assert_eq!(service["metadata"]["name"], install.service);
    assert_selects(&service["spec"]["selector"], &pod_labels, "Service");
    let service_ports: BTreeMap<String, (i64, Value)> = service["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                str_of(&p["name"], "port name").to_owned(),
                (p["port"].as_i64().unwrap(), p["targetPort"].clone()),
            )
        })
        .collect();
    let grpc = service_ports.get("grpc").expect("Service port grpc");
    assert_eq!(grpc.0, 8080);
    assert!(grpc.1 == "grpc" || grpc.1 == 8080, "grpc targetPort {}", grpc.1);
    let admin = service_ports.get("admin").expect("Service port admin");
    assert_eq!(admin.0, 9990);

    let pdb = one(docs, "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["minAvailable"], 1);
    assert_selects(&pdb["spec"]["selector"]["matchLabels"], &pod_labels, "PodDisruptionBudget");

    let ns = flags["control-plane-namespace"];
    format!("{}.{ns}.serviceaccount.identity.{ns}.cluster.local", flags["service-account"])
}

#[test]
fn base_installs_a_hardened_meshca_in_meshca_system_with_exactly_the_documented_rbac() {
    let docs = rendered("base");
    let identity = check_install(&docs, &MESHCA_SYSTEM);
    assert_eq!(identity, "meshca.meshca-system.serviceaccount.identity.meshca-system.cluster.local");
    let ns = one(&docs, "Namespace");
    assert_eq!(ns["metadata"]["name"], "meshca-system");
    assert_eq!(ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "restricted");
    assert!(docs.iter().all(|d| !CRD_KINDS.iter().any(|(_, kind)| d["kind"] == *kind)));
}

#[test]
fn linkerd_overlay_serves_as_linkerd_identity_with_linkerds_issuer_and_roots() {
    let docs = rendered("overlays/linkerd");
    let identity = check_install(&docs, &LINKERD);
    assert_eq!(identity, "linkerd-identity.linkerd.serviceaccount.identity.linkerd.cluster.local");
    assert!(all(&docs, "Namespace").is_empty(), "the linkerd namespace belongs to Linkerd");
    let service = one(&docs, "Service");
    let grpc = service["spec"]["ports"].as_array().unwrap().iter().find(|p| p["name"] == "grpc").unwrap();
    assert_eq!(grpc["port"], 8080, "Linkerd proxies dial linkerd-identity.linkerd.svc:8080");
    // Linkerd's own selector, so its identity pods and meshca's serve side by side
    // until Linkerd's are scaled down.
    assert_eq!(
        service["spec"]["selector"],
        serde_json::json!({"linkerd.io/control-plane-component": "identity"})
    );
    // Distinct cluster-scoped names, so base and overlay can coexist.
    assert_ne!(one(&docs, "ClusterRole")["metadata"]["name"], "meshca");
    assert_ne!(one(&docs, "ClusterRoleBinding")["metadata"]["name"], "meshca");
}

#[test]
fn cert_manager_overlay_issues_meshcas_issuer_and_publishes_the_anchors() {
    let docs = rendered("overlays/cert-manager");
    check_install(&docs, &MESHCA_SYSTEM);

    let issuer = one(&docs, "Issuer");
    assert_eq!(issuer["apiVersion"], "cert-manager.io/v1");
    assert_eq!(issuer["metadata"]["namespace"], "meshca-system");
    let root_secret = str_of(&issuer["spec"]["ca"]["secretName"], "Issuer spec.ca.secretName");

    let cert = one(&docs, "Certificate");
    let spec = &cert["spec"];
    assert_eq!(cert["metadata"]["namespace"], "meshca-system");
    assert_eq!(spec["secretName"], MESHCA_SYSTEM.issuer_secret);
    assert_eq!(spec["isCA"], true);
    let usages: BTreeSet<&str> =
        spec["usages"].as_array().unwrap().iter().map(|u| str_of(u, "usage")).collect();
    assert_eq!(usages, BTreeSet::from(["cert sign", "crl sign", "digital signature"]));
    assert_eq!(spec["privateKey"]["algorithm"], "ECDSA");
    assert_eq!(spec["privateKey"]["size"], 256);
    assert_eq!(spec["duration"], "8760h");
    assert_eq!(spec["renewBefore"], "720h");
    assert_eq!(spec["issuerRef"]["kind"], "Issuer");
    assert_eq!(spec["issuerRef"]["name"], issuer["metadata"]["name"]);

    let bundle = one(&docs, "Bundle");
    assert_eq!(bundle["apiVersion"], "trust.cert-manager.io/v1alpha1");
    assert!(bundle["metadata"].get("namespace").is_none(), "Bundle is cluster-scoped");
    assert_eq!(
        bundle["metadata"]["name"], MESHCA_SYSTEM.trust_roots,
        "the ConfigMap trust-manager writes is named after the Bundle"
    );
    assert_eq!(bundle["spec"]["target"]["configMap"]["key"], "ca-bundle.crt");
    assert_eq!(
        bundle["spec"]["target"]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "meshca-system"
    );
    let sources = bundle["spec"]["sources"].as_array().unwrap();
    assert_eq!(
        sources[0]["secret"]["name"], root_secret,
        "the Bundle publishes the root the Issuer signs with"
    );
    assert_eq!(sources[0]["secret"]["key"], "tls.crt", "only the root's certificate is published");
}

#[test]
fn prometheus_rules_alert_on_metrics_that_meshca_exports() {
    let docs = rendered("monitoring");
    let rule = one(&docs, "PrometheusRule");
    assert_eq!(rule["metadata"]["namespace"], "meshca-system");
    let rules: Vec<&Value> = rule["spec"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    let exprs: BTreeMap<&str, &str> =
        rules.iter().map(|r| (str_of(&r["alert"], "alert"), str_of(&r["expr"], "expr"))).collect();
    let must = [
        ("MeshcaIssuerExpiringSoon", "meshca_issuer_not_after_seconds - time() < 7 * 86400"),
        (
            "MeshcaTrustAnchorExpiringSoon",
            "meshca_trust_anchor_earliest_not_after_seconds - time() < 30 * 86400",
        ),
        ("MeshcaDenialRateHigh", r#"rate(meshca_certify_total{outcome="denied"}[5m])"#),
        ("MeshcaAuditWriteFailures", "increase(meshca_audit_write_failures_total[5m]) > 0"),
        ("MeshcaTokenReviewErrors", "increase(meshca_token_review_errors_total[5m]) > 0"),
    ];
    for (alert, fragment) in must {
        let expr = exprs.get(alert).unwrap_or_else(|| panic!("no alert {alert}"));
        assert!(expr.contains(fragment), "{alert}: {expr:?} lacks {fragment:?}");
    }
    for r in &rules {
        assert!(r["labels"]["severity"].is_string(), "{} has no severity", r["alert"]);
        assert!(r["annotations"]["summary"].is_string(), "{} has no summary", r["alert"]);
    }
    // Every metric named must be one meshca exports (its name appears in the source;
    // a counter is registered without the `_total` that prometheus-client appends).
    let source = source_text(&repo().join("src"));
    for expr in exprs.values() {
        for metric in expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("meshca_"))
        {
            let counter = metric.strip_suffix("_total").map(|stem| format!("\"{stem}\""));
            assert!(
                source.contains(&format!("\"{metric}")) || counter.is_some_and(|c| source.contains(&c)),
                "{metric} is not exported by meshca"
            );
        }
    }
}

/// The README's `my-meshca/kustomization.yaml`, as printed, beside a checkout named
/// `meshca`: with its `resources` line at each tree the README offers, the rendered
/// Deployment runs the registry's image and nothing names the bare `meshca` image.
#[cfg(unix)]
#[test]
fn the_readmes_kustomization_sets_the_registrys_image_on_each_tree_it_offers() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let block = readme
        .split("# my-meshca/kustomization.yaml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("README.md: the my-meshca/kustomization.yaml block");
    let tmp = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(repo(), tmp.path().join("meshca")).unwrap();
    for tree in ["deploy/base", "deploy/overlays/linkerd", "deploy/overlays/cert-manager"] {
        let own = tmp.path().join(format!("my-{}", tree.replace('/', "-")));
        std::fs::create_dir(&own).unwrap();
        let text = block.replace("../meshca/deploy/base", &format!("../meshca/{tree}"));
        assert!(text.contains(&format!("../meshca/{tree}")), "{block}");
        std::fs::write(own.join("kustomization.yaml"), text).unwrap();
        let mut cmd = Command::new("kubectl");
        cmd.arg("kustomize").arg(&own);
        let out = run(cmd, "", "kubectl");
        assert!(out.status.success(), "{tree}: {}", String::from_utf8_lossy(&out.stderr));
        let docs = validate(&String::from_utf8(out.stdout).unwrap(), &format!("my-meshca on {tree}"));
        let images: Vec<&str> = one(&docs, "Deployment")["spec"]["template"]["spec"]["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| str_of(&c["image"], "image"))
            .collect();
        assert_eq!(images, ["REGISTRY/meshca:0.1.0"], "{tree}");
        for doc in &docs {
            let text = doc.to_string();
            assert!(!text.contains("\"meshca:0.1.0\""), "{tree}: the bare image is still named in {text}");
        }
    }
}

#[test]
fn verify_pod_certifies_its_own_identity_with_a_token_for_meshcas_audience() {
    // Rendered as a kustomize tree, as the documentation lists it.
    let docs = validate(&render("verify"), "deploy/verify");
    let pod = one(&docs, "Pod");
    let spec = &pod["spec"];
    let c = &spec["containers"][0];
    let args: Vec<&str> = c["args"].as_array().unwrap().iter().map(|a| str_of(a, "arg")).collect();
    let flags = parse_args(&args, "certify");

    let (ns, sa) =
        (str_of(&pod["metadata"]["namespace"], "namespace"), str_of(&spec["serviceAccountName"], "sa"));
    let cpns = MESHCA_SYSTEM.namespace;
    assert_eq!(flags["identity"], format!("{sa}.{ns}.serviceaccount.identity.{cpns}.cluster.local"));
    assert_eq!(flags["addr"], format!("https://{}.{cpns}.svc:8080", MESHCA_SYSTEM.service));
    assert!(!flags.contains_key("server-name"), "the default server name is meshca's in meshca-system");

    let mount_of = |volume: &Value| -> String {
        let name = &volume["name"];
        let mount = c["volumeMounts"].as_array().unwrap().iter().find(|m| m["name"] == *name).unwrap();
        str_of(&mount["mountPath"], "mountPath").to_owned()
    };
    let volumes = spec["volumes"].as_array().unwrap();
    let token = volumes.iter().find(|v| v.get("projected").is_some()).unwrap();
    let projected = &token["projected"]["sources"][0]["serviceAccountToken"];
    assert_eq!(projected["audience"], "identity.l5d.io", "the audience meshca's --token-audiences accepts");
    assert_eq!(flags["token-file"], format!("{}/{}", mount_of(token), str_of(&projected["path"], "path")));
    let anchors = volumes.iter().find(|v| v["configMap"]["name"] == MESHCA_SYSTEM.trust_roots).unwrap();
    assert_eq!(flags["trust-anchors"], format!("{}/ca-bundle.crt", mount_of(anchors)));
    assert_eq!(spec["automountServiceAccountToken"], false);
}

fn source_text(dir: &Path) -> String {
    let mut text = String::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            text += &source_text(&path);
        } else if path.extension().is_some_and(|e| e == "rs") {
            text += &std::fs::read_to_string(&path).unwrap();
        }
    }
    text
}

#[test]
fn documented_rbac_in_the_runbook_is_the_tested_set() {
    let runbook = std::fs::read_to_string(repo().join("docs/RUNBOOK.md")).unwrap();
    let row = |group: &str, resources: &[&str], verbs: &[&str]| {
        let group = if group.is_empty() { "core (`\"\"`)".to_owned() } else { format!("`{group}`") };
        format!("| {group} | `{}` | `{}` |", resources.join("`, `"), verbs.join("`, `"))
    };
    for (group, resources, verbs) in RBAC_RULES {
        let row = row(group, resources, verbs);
        assert!(runbook.contains(&row), "docs/RUNBOOK.md lacks the RBAC row {row}");
    }
    for (group, resources, verbs) in NAMESPACED_RBAC_RULES {
        let row = row(group, resources, verbs);
        assert!(runbook.contains(&row), "docs/RUNBOOK.md lacks the namespaced RBAC row {row}");
    }
    let urls = format!("| non-resource URLs | `{}` | `get` |", RBAC_URLS.join("`, `"));
    assert!(runbook.contains(&urls), "docs/RUNBOOK.md lacks the RBAC row {urls}");
}

fn meshca(args: &[&str]) -> Output {
    support::process::command(bin()).args(args).stdin(Stdio::null()).output().unwrap()
}

fn pem_der(pem: &[u8]) -> Vec<u8> {
    let (rest, pem) = x509_parser::pem::parse_x509_pem(pem).unwrap();
    assert!(String::from_utf8_lossy(rest).trim().is_empty(), "one PEM block expected, found more");
    pem.contents
}

#[test]
fn init_kubernetes_prints_valid_objects_whose_issuer_chains_to_the_anchor_and_keeps_the_key_out() {
    use base64::Engine as _;
    let tmp = tempfile::tempdir().unwrap();
    let dir: PathBuf = tmp.path().join("ca");
    let dir_arg = dir.to_str().unwrap();
    let out = meshca(&["init", "--kubernetes", "--dir", dir_arg]);
    assert!(out.status.success(), "init --kubernetes: {}", String::from_utf8_lossy(&out.stderr));
    let yaml = String::from_utf8(out.stdout).unwrap();
    let docs = validate(&yaml, "meshca init --kubernetes");
    assert_eq!(docs.len(), 3);
    let named =
        |name: &str| docs.iter().find(|d| d["metadata"]["name"] == name).unwrap_or_else(|| panic!("{name}"));

    // The audit key: an Opaque Secret of its own, its verifier key in --dir for auditors.
    let audit = named("meshca-audit-key");
    assert_eq!((&audit["kind"], &audit["type"]), (&"Secret".into(), &"Opaque".into()));
    assert_eq!(audit["metadata"]["namespace"], "meshca-system");
    // Labelled apart, so that `kubectl apply -l` installs or replaces one without the other.
    let components: BTreeSet<(&str, &str)> = docs
        .iter()
        .map(|d| {
            (
                str_of(&d["metadata"]["name"], "name"),
                str_of(&d["metadata"]["labels"]["app.kubernetes.io/component"], "component"),
            )
        })
        .collect();
    let expected =
        [("meshca-issuer", "ca"), ("meshca-trust-anchors", "ca"), ("meshca-audit-key", "audit-key")];
    assert_eq!(components, BTreeSet::from(expected));
    let audit_pem = base64::engine::general_purpose::STANDARD
        .decode(str_of(&audit["data"]["audit-signing.key"], "audit-signing.key"))
        .unwrap();
    let audit_key_file = tmp.path().join("audit-signing.key");
    std::fs::write(&audit_key_file, &audit_pem).unwrap();
    std::fs::set_permissions(&audit_key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let signing =
        meshca::audit::checkpoint::SigningKey::read("meshca/cluster.local", &audit_key_file).unwrap();
    let published = std::fs::read_to_string(dir.join("audit.pub")).unwrap();
    assert_eq!(published.trim(), signing.verifier().to_string(), "audit.pub verifies the key in the Secret");

    let secret = named("meshca-issuer");
    assert_eq!(secret["type"], "kubernetes.io/tls");
    assert_eq!(secret["metadata"]["name"], "meshca-issuer");
    assert_eq!(secret["metadata"]["namespace"], "meshca-system");
    let data = secret["data"].as_object().unwrap();
    let keys: BTreeSet<&str> = data.keys().map(String::as_str).collect();
    assert_eq!(keys, BTreeSet::from(["tls.crt", "tls.key", "ca.crt"]));
    let decode = |k: &str| base64::engine::general_purpose::STANDARD.decode(str_of(&data[k], k)).unwrap();
    let (crt, key, ca) = (decode("tls.crt"), decode("tls.key"), decode("ca.crt"));

    let config_map = named("meshca-trust-anchors");
    assert_eq!(config_map["kind"], "ConfigMap");
    assert_eq!(config_map["metadata"]["namespace"], "meshca-system");
    let bundle = str_of(&config_map["data"]["ca-bundle.crt"], "ca-bundle.crt");
    let anchors_file = std::fs::read_to_string(dir.join("trust-anchors.pem")).unwrap();
    assert_eq!(bundle, anchors_file, "the ConfigMap carries the anchor written to --dir");
    assert_eq!(ca, anchors_file.as_bytes(), "ca.crt is the anchor");

    // The issuer chains to the anchor: names, CA flags, signature.
    let issuer_der = pem_der(&crt);
    let anchor_der = pem_der(bundle.as_bytes());
    let (_, issuer) = x509_parser::parse_x509_certificate(&issuer_der).unwrap();
    let (_, anchor) = x509_parser::parse_x509_certificate(&anchor_der).unwrap();
    assert!(issuer.is_ca() && anchor.is_ca());
    assert_eq!(issuer.issuer(), anchor.subject());
    assert_ne!(issuer.subject(), anchor.subject());
    issuer.verify_signature(Some(anchor.public_key())).expect("the issuer is signed by the anchor");
    anchor.verify_signature(None).expect("the anchor is self-signed");
    let now = x509_parser::time::ASN1Time::now();
    assert!(issuer.validity().is_valid_at(now) && anchor.validity().is_valid_at(now));

    // tls.key is the issuer's key; the anchor's key is in --dir only (0600).
    let issuer_key = rcgen::KeyPair::from_pem(std::str::from_utf8(&key).unwrap()).unwrap();
    assert_eq!(issuer_key.public_key_raw(), issuer.public_key().subject_public_key.data.as_ref());
    let anchor_key_pem = std::fs::read_to_string(dir.join("trust-anchor.key")).unwrap();
    let anchor_key = rcgen::KeyPair::from_pem(&anchor_key_pem).unwrap();
    assert_eq!(anchor_key.public_key_raw(), anchor.public_key().subject_public_key.data.as_ref());
    let mode = std::fs::metadata(dir.join("trust-anchor.key")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let anchor_key_b64 = base64::engine::general_purpose::STANDARD.encode(&anchor_key_pem);
    let anchor_key_body: String = anchor_key_pem.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(
        !yaml.contains(&anchor_key_b64) && !yaml.contains(&anchor_key_body[..40]),
        "the anchor key leaked"
    );
    assert!(!dir.join("issuer").exists(), "the issuer goes to the cluster only");

    // A second run into the same directory refuses, prints nothing and changes nothing.
    let again = meshca(&["init", "--kubernetes", "--dir", dir_arg]);
    assert_eq!(again.status.code(), Some(2));
    assert!(again.stdout.is_empty());
    assert_eq!(std::fs::read_to_string(dir.join("trust-anchor.key")).unwrap(), anchor_key_pem);
}

#[test]
fn init_kubernetes_takes_a_namespace_and_needs_a_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let out = meshca(&["init", "--kubernetes", "--namespace", "linkerd", "--dir", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let docs =
        validate(&String::from_utf8(out.stdout).unwrap(), "meshca init --kubernetes --namespace linkerd");
    assert!(docs.iter().all(|d| d["metadata"]["namespace"] == "linkerd"));

    let no_dir = meshca(&["init", "--kubernetes"]);
    assert_eq!(no_dir.status.code(), Some(2), "without --dir there is nowhere to keep the anchor key");
    assert!(no_dir.stdout.is_empty());
    let bad = meshca(&[
        "init",
        "--kubernetes",
        "--namespace",
        "Not_A_Label",
        "--dir",
        tmp.path().join("x").to_str().unwrap(),
    ]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(!tmp.path().join("x").exists());
}

#[test]
fn pkcs11_overlay_loads_the_module_an_init_container_copies_and_reads_the_pin_from_a_group_only_secret() {
    let mut docs = rendered("overlays/pkcs11");
    let deployment = docs.iter_mut().find(|d| d["kind"] == "Deployment").unwrap();
    let pod = &mut deployment["spec"]["template"]["spec"];

    // The one new argument names a key in a token, its module and PIN under what is mounted.
    let args = pod["containers"][0]["args"].as_array_mut().unwrap();
    let at = args.iter().position(|a| a.as_str().is_some_and(|a| a.starts_with("--issuer-key="))).unwrap();
    let arg = args.remove(at);
    let uri: meshca::ca::token::Uri = str_of(&arg, "arg")["--issuer-key=".len()..].parse().unwrap();
    assert_eq!((uri.token.as_deref(), uri.object.as_deref()), (Some("meshca"), Some("issuer")));
    let mounts = pod["containers"][0]["volumeMounts"].as_array().unwrap().clone();
    let mounted = |path: &std::path::Path| -> String {
        let m = mounts
            .iter()
            .find(|m| path.starts_with(str_of(&m["mountPath"], "mountPath")))
            .unwrap_or_else(|| panic!("{} is not under a mounted volume", path.display()));
        assert_eq!(m["readOnly"], true, "{} is mounted read-only", path.display());
        str_of(&m["name"], "name").to_owned()
    };
    let module_volume = mounted(&uri.module_path);
    let pin_volume = mounted(uri.pin_file().expect("the PIN comes from a file"));
    let volumes = pod["volumes"].as_array().unwrap().clone();
    let volume = |name: &str| volumes.iter().find(|v| v["name"] == name).unwrap().clone();
    let pin = volume(&pin_volume);
    assert_eq!(pin["secret"]["secretName"], "meshca-hsm-pin");
    assert_eq!(pin["secret"]["defaultMode"].as_i64().unwrap() & 0o007, 0, "the PIN is group-only");
    assert!(volume(&module_volume)["emptyDir"].is_object(), "the module is copied into an emptyDir");

    // The init container fills that volume and is as restricted as meshca.
    let init = pod["initContainers"].as_array().unwrap();
    assert_eq!(init.len(), 1);
    let fills = init[0]["volumeMounts"].as_array().unwrap();
    assert!(fills.iter().any(|m| m["name"] == module_volume.as_str() && m["readOnly"] != true));
    let sc = &init[0]["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"], serde_json::json!({"drop": ["ALL"]}));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");

    // Without those additions, what is left is deploy/base exactly as checked there.
    let pod = &mut docs.iter_mut().find(|d| d["kind"] == "Deployment").unwrap()["spec"]["template"]["spec"];
    pod.as_object_mut().unwrap().remove("initContainers");
    let extra = [module_volume, pin_volume];
    pod["volumes"].as_array_mut().unwrap().retain(|v| !extra.iter().any(|e| v["name"] == e.as_str()));
    pod["containers"][0]["volumeMounts"]
        .as_array_mut()
        .unwrap()
        .retain(|m| !extra.iter().any(|e| m["name"] == e.as_str()));
    check_install(&docs, &MESHCA_SYSTEM);
}
