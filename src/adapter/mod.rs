//! The stream adapters, one per file, over one shared loop (`core`).

mod core;

mod claim_by_key;
mod claim_verdicts;
mod dedup_by_key;
mod try_claim_by_key;
mod try_claim_verdicts;
mod try_dedup_by_key;

pub use self::claim_by_key::ClaimByKey;
pub use self::claim_verdicts::{ClaimVerdicts, Verdict};
pub use self::core::HeldBack;
pub use self::dedup_by_key::DedupByKey;
pub use self::try_claim_by_key::TryClaimByKey;
pub use self::try_claim_verdicts::TryClaimVerdicts;
pub use self::try_dedup_by_key::TryDedupByKey;
