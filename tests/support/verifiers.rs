//! The four independent certificate verifiers the profile and PKCS#11 tests run on
//! every chain meshca issues: rustls-webpki (through [`meshca::ca::issuer::TrustAnchors`]),
//! OpenSSL (`verify -x509_strict`, client and server purposes), GnuTLS (`certtool
//! --verify`, client and server purposes, the server one with the hostname) and NSS
//! (`vfychain`, SSL client and SSL server usages). Each answer is a [`Verdict`] that
//! tells an acceptance, a clear rejection and a crash apart, so a test can demand both
//! that every verifier accepts a chain and that every one rejects it under another CA's
//! anchors (none can pass by failing to look). The programs come from Debian packages
//! `openssl`, `gnutls-bin` and `libnss3-tools`, which `tests/run.sh` installs; a
//! missing one fails the test naming its package.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::SystemTime;

use meshca::ca::issuer::TrustAnchors;
use meshca::ca::material::to_pem;
use rustls_pki_types::CertificateDer;

pub const CLIENT_AUTH: &str = "1.3.6.1.5.5.7.3.2";
pub const SERVER_AUTH: &str = "1.3.6.1.5.5.7.3.1";

/// Runs a verifier to completion; a missing program fails the test naming its package.
pub fn run(cmd: &mut Command) -> Output {
    let program = cmd.get_program().to_string_lossy().into_owned();
    match cmd.stdin(Stdio::null()).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let package = match program.as_str() {
                "certtool" => "gnutls-bin",
                "certutil" | "vfychain" => "libnss3-tools",
                other => other,
            };
            panic!("{program} is not installed (Debian package {package}); run `bash tests/run.sh`, which installs it")
        }
        Err(e) => panic!("cannot run {program}: {e}"),
    }
}

pub fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// One verifier's answer: accepted or rejected, with the line that says so.
#[derive(Debug)]
pub struct Verdict {
    pub verifier: &'static str,
    pub accepted: bool,
    /// The verifier's own words for a clear rejection; false for a crash or a usage error.
    pub rejected: bool,
    pub said: String,
}

impl Verdict {
    /// From a command: accepted on exit 0 with `ok` in its output, rejected on a
    /// non-zero exit with `bad` in it.
    pub fn of(verifier: &'static str, out: &Output, ok: &str, bad: &str) -> Self {
        let all = text(out);
        let line = |needle: &str| all.lines().find(|l| l.contains(needle)).map(|l| l.trim().to_owned());
        let accepted = out.status.success() && line(ok).is_some();
        let rejected = !out.status.success() && line(bad).is_some();
        let said = if accepted { line(ok) } else { line(bad) };
        Verdict { verifier, accepted, rejected, said: said.unwrap_or(all) }
    }
}

/// The chain as files the command-line verifiers read.
pub struct ChainFiles {
    dir: tempfile::TempDir,
    identity: String,
}

impl ChainFiles {
    pub fn write(
        leaf: &[u8],
        intermediates: &[CertificateDer<'_>],
        anchors: &[CertificateDer<'_>],
        identity: &str,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pem = |ders: &[&[u8]]| ders.iter().map(|d| to_pem("CERTIFICATE", d)).collect::<String>();
        let inter: Vec<&[u8]> = intermediates.iter().map(|c| c.as_ref()).collect();
        let roots: Vec<&[u8]> = anchors.iter().map(|c| c.as_ref()).collect();
        let write = |name: &str, contents: &[u8]| std::fs::write(dir.path().join(name), contents).unwrap();
        write("leaf.pem", pem(&[leaf]).as_bytes());
        write("leaf.der", leaf);
        write("intermediates.pem", pem(&inter).as_bytes());
        write("anchors.pem", pem(&roots).as_bytes());
        // GnuTLS reads the leaf and the intermediates from one file, leaf first.
        write("chain.pem", pem(&[&[leaf], inter.as_slice()].concat()).as_bytes());
        // NSS: a fresh database holding the anchors (trusted to issue server and client
        // certificates: "CT,,") and the intermediates (no trust of their own: ",,").
        let db = format!("sql:{}", dir.path().join("nss").display());
        std::fs::create_dir(dir.path().join("nss")).unwrap();
        let out = run(Command::new("certutil").args(["-N", "--empty-password", "-d", &db]));
        assert!(out.status.success(), "certutil -N: {}", text(&out));
        let certs = roots.iter().map(|d| (d, "CT,,")).chain(inter.iter().map(|d| (d, ",,")));
        for (i, (der, trust)) in certs.enumerate() {
            let file = dir.path().join(format!("nss-{i}.der"));
            std::fs::write(&file, der).unwrap();
            let nickname = format!("cert{i}");
            let out = run(Command::new("certutil")
                .args(["-A", "-d", &db, "-n", &nickname, "-t", trust, "-i"])
                .arg(&file));
            assert!(out.status.success(), "certutil -A: {}", text(&out));
        }
        ChainFiles { dir, identity: identity.to_owned() }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn openssl(&self, purpose: &str) -> Output {
        run(Command::new("openssl")
            .args(["verify", "-x509_strict", "-purpose", purpose, "-CAfile"])
            .arg(self.path("anchors.pem"))
            .arg("-untrusted")
            .arg(self.path("intermediates.pem"))
            .arg(self.path("leaf.pem")))
    }

    fn certtool(&self, purpose: &str, hostname: Option<&str>) -> Output {
        let mut cmd = Command::new("certtool");
        cmd.args(["--verify", "--verify-profile", "medium", "--verify-purpose", purpose])
            .arg("--load-ca-certificate")
            .arg(self.path("anchors.pem"))
            .arg("--infile")
            .arg(self.path("chain.pem"));
        if let Some(name) = hostname {
            cmd.args(["--verify-hostname", name]);
        }
        run(&mut cmd)
    }

    /// `vfychain -u USAGE`: 0 is SSL client, 1 SSL server (`vfychain` with no arguments lists them).
    fn vfychain(&self, usage: &str) -> Output {
        let db = format!("sql:{}", self.path("nss").display());
        run(Command::new("vfychain").args(["-d", &db, "-p", "-u", usage]).arg(self.path("leaf.der")))
    }

    /// Every verifier's answer for this chain at `now`, against `anchors`.
    pub fn verdicts(
        &self,
        anchors: &TrustAnchors,
        leaf: &[u8],
        intermediates: &[CertificateDer<'_>],
        now: SystemTime,
    ) -> Vec<Verdict> {
        let webpki = anchors.verify(&CertificateDer::from(leaf), intermediates, now, Some(&self.identity));
        let webpki = Verdict {
            verifier: "rustls-webpki",
            accepted: webpki.is_ok(),
            rejected: webpki.is_err(),
            said: match webpki {
                Ok(()) => format!("valid for server and client use and for {}", self.identity),
                Err(e) => e,
            },
        };
        vec![
            webpki,
            Verdict::of(
                "openssl verify -x509_strict -purpose sslclient",
                &self.openssl("sslclient"),
                ": OK",
                "error",
            ),
            Verdict::of(
                "openssl verify -x509_strict -purpose sslserver",
                &self.openssl("sslserver"),
                ": OK",
                "error",
            ),
            Verdict::of(
                "certtool --verify (clientAuth)",
                &self.certtool(CLIENT_AUTH, None),
                "Chain verification output: Verified.",
                "Chain verification output: Not verified.",
            ),
            Verdict::of(
                "certtool --verify (serverAuth, hostname)",
                &self.certtool(SERVER_AUTH, Some(&self.identity)),
                "Chain verification output: Verified.",
                "Chain verification output: Not verified.",
            ),
            Verdict::of(
                "vfychain -p -u 0 (SSL client)",
                &self.vfychain("0"),
                "Chain is good!",
                "Chain is bad!",
            ),
            Verdict::of(
                "vfychain -p -u 1 (SSL server)",
                &self.vfychain("1"),
                "Chain is good!",
                "Chain is bad!",
            ),
        ]
    }
}

/// Every verifier accepts `leaf` (through `intermediates`) under `anchors` for client
/// and server use and for `identity`, and every one rejects the same chain under
/// `other`, another CA's anchors. `what` names the chain in the failure messages.
pub fn assert_every_verifier_accepts_only_under_its_anchors(
    what: &str,
    leaf: &[u8],
    intermediates: &[CertificateDer<'_>],
    anchors: &TrustAnchors,
    other: &TrustAnchors,
    identity: &str,
    now: SystemTime,
) {
    let files = ChainFiles::write(leaf, intermediates, anchors.certificates(), identity);
    let verdicts = files.verdicts(anchors, leaf, intermediates, now);
    assert_eq!(verdicts.len(), 7);
    for v in &verdicts {
        assert!(v.accepted, "{what}: {} rejected the chain: {}", v.verifier, v.said);
        println!("{what}: {}: {}", v.verifier, v.said);
    }
    let files = ChainFiles::write(leaf, intermediates, other.certificates(), identity);
    for v in files.verdicts(other, leaf, intermediates, now) {
        assert!(v.rejected, "{what}: {} did not reject a leaf under another CA: {}", v.verifier, v.said);
        println!("{what}, another CA's anchors: {}: {}", v.verifier, v.said);
    }
}

/// The anchors of a fresh CA made with `naming`'s names (P-256): a chain from any other
/// CA must fail under them, and only the keys tell the two apart.
pub fn another_cas_anchors(naming: &meshca::identity::Naming, now: SystemTime) -> TrustAnchors {
    use meshca::ca::hierarchy::{self, CaKeyType, HierarchyLifetimes};
    use rustls_pki_types::pem::PemObject;
    let other = hierarchy::generate(naming, CaKeyType::P256, now, HierarchyLifetimes::default()).unwrap();
    let anchor = CertificateDer::from_pem_slice(other.anchor_cert_pem.as_bytes()).unwrap();
    TrustAnchors::from_certs(vec![anchor], std::path::Path::new("(another CA)")).unwrap()
}
