//! Sluice broker library.
pub use sluice_protocol as protocol;

#[cfg(feature = "server")]
pub mod cli;
