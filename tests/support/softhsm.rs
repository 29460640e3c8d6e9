//! A real SoftHSM2 token store for the PKCS#11 tests: a temporary directory with
//! its own `softhsm2.conf`, tokens made with `softhsm2-util` (Debian's `softhsm2`;
//! `tests/run.sh` installs it), and the module's path.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Debian's SoftHSM2 module.
pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
/// The user PIN of every token made here.
pub const PIN: &str = "1234-test-pin";

/// A token directory and its configuration.
pub struct SoftHsm {
    pub dir: tempfile::TempDir,
    pub conf: PathBuf,
}

impl Default for SoftHsm {
    /// A new, empty token store.
    fn default() -> SoftHsm {
        assert!(
            Path::new(MODULE).is_file(),
            "{MODULE} is missing: run `bash tests/run.sh`, which installs softhsm2"
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("tokens")).unwrap();
        let conf = dir.path().join("softhsm2.conf");
        let text = format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            dir.path().join("tokens").display()
        );
        std::fs::write(&conf, text).unwrap();
        std::fs::write(dir.path().join("pin"), format!("{PIN}\n")).unwrap();
        SoftHsm { dir, conf }
    }
}

impl SoftHsm {
    /// Makes the token store this process's (`SOFTHSM2_CONF`): the module reads it
    /// when first loaded, so one store per test process.
    pub fn use_in_this_process(&self) {
        // Before any thread of the test loads the module (each test calls this first).
        std::env::set_var("SOFTHSM2_CONF", &self.conf);
    }

    /// Initialises a token labelled `label` with [`PIN`].
    pub fn init_token(&self, label: &str) {
        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", &self.conf)
            .args(["--init-token", "--free", "--label", label, "--pin", PIN, "--so-pin", "4321-so-pin"])
            .output()
            .expect("softhsm2-util (Debian's softhsm2; tests/run.sh installs it)");
        assert!(out.status.success(), "softhsm2-util: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// The file holding [`PIN`] (and a line feed), written once.
    pub fn pin_file(&self) -> PathBuf {
        self.dir.path().join("pin")
    }

    /// The URI of key `object` in token `token`, its PIN in a file.
    pub fn uri(&self, token: &str, object: &str) -> String {
        format!(
            "pkcs11:token={token};object={object};type=private?module-path={MODULE}&pin-source=file:{}",
            self.pin_file().display()
        )
    }
}
