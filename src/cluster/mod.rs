//! What meshca tells and asks the Kubernetes cluster about its decisions, beside
//! the request path and never in its way: each decision as an Event on the
//! caller's service account ([`events`], a bounded queue, drops counted), and the OS
//! of the caller's node for its audit record ([`nodes`], cached, bounded lookups),
//! and the audit log's latest signed checkpoint in a ConfigMap ([`checkpoints`]).

pub mod checkpoints;
pub(crate) mod events;
pub mod nodes;
