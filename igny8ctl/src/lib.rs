//! `igny8ctl`: the development launcher and operator CLI of the igny8
//! credits and settings services.
//!
//! - [`dev`]: `igny8ctl dev` runs billing and settings in one process on the
//!   embedded SQLite default, seeds a demo account and owner, and prints a
//!   token and grpcurl calls that work as printed;
//! - [`ops`]: directory and ledger actions (accounts, users, grants);
//! - [`tokens`]: the development secret and token minting;
//! - [`cli`]: the command line over all of them.

#![forbid(unsafe_code)]

pub mod cli;
pub mod dev;
pub mod error;
pub mod ops;
pub mod tokens;

pub use error::CtlError;
