//! The igny8 gRPC contracts, generated from `proto/igny8/**.proto`.
//!
//! - [`billing::v1`]: `BillingService` — prices, checks, deducts, grants, ledger.
//! - [`settings::v1`]: `SettingsService` — per-account module switches.
//! - [`FILE_DESCRIPTOR_SET`]: the encoded descriptors (with imports) for
//!   server reflection.

/// `igny8.billing.v1`.
pub mod billing {
    /// Version 1 of the billing contract.
    pub mod v1 {
        #![allow(missing_docs, clippy::all)]
        tonic::include_proto!("igny8.billing.v1");
    }
}

/// `igny8.settings.v1`.
pub mod settings {
    /// Version 1 of the settings contract.
    pub mod v1 {
        #![allow(missing_docs, clippy::all)]
        tonic::include_proto!("igny8.settings.v1");
    }
}

/// Encoded `FileDescriptorSet` of both packages and the well-known types they
/// import, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/igny8_descriptor.bin"));

/// Fully qualified name of the billing service, as health and reflection use it.
pub const BILLING_SERVICE_NAME: &str = "igny8.billing.v1.BillingService";
/// Fully qualified name of the settings service, as health and reflection use it.
pub const SETTINGS_SERVICE_NAME: &str = "igny8.settings.v1.SettingsService";
