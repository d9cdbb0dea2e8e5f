//! meshctl: the mesh's command-line tool, and the local-mode orchestration
//! (control plane in-process, one sidecar per workload) that `demo` and the
//! end-to-end tests share.
#![forbid(unsafe_code)]

pub mod analyze;
pub mod apply;
pub mod authz;
pub mod ca;
pub mod controlplane;
pub mod demo;
pub mod inspect;
pub mod install;
pub mod pods;
pub mod prometheus;
pub mod tap;
pub mod traffic;
pub mod workloads;
