//! The client side: getting a certificate from meshca and keeping it on disk.
//!
//! - [`client`]: make a key and CSR, call Certify, verify the returned chain.
//! - `crate::files`: writing certificates and keys atomically, keys readable by the
//!   owner only (shared with the server's state files).
//! - [`schedule`]: when to renew and how long to back off (pure).
//! - [`status`] and [`admin`]: what the agent knows, served on `/ready` and `/metrics`.
//!
//! `meshca certify` runs this once; platform-specific file handling stays in `crate::files`.

pub mod admin;
pub mod client;
pub mod run;
pub mod schedule;
pub mod status;
