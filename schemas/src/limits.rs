//! Size and field limits shared by every node: events outside them are invalid everywhere.

/// Maximum size of an event envelope (the stored blob), in bytes.
pub const EVENT_BYTES_MAX: usize = 64 * 1024;
/// Maximum size of a genesis document, in bytes.
pub const GENESIS_BYTES_MAX: usize = 16 * 1024;
/// Maximum length of short text fields (names, ids, versions, reasons, memos), in bytes.
pub const TEXT_SHORT_BYTES_MAX: usize = 256;
/// Maximum length of long text fields (descriptions, notes, addresses), in bytes.
pub const TEXT_LONG_BYTES_MAX: usize = 4096;
/// Maximum number of items in a list of text (capabilities, endpoints, specializations).
pub const LIST_ITEMS_MAX: usize = 64;
/// Maximum number of causal dependencies of one event.
pub const DEPS_MAX: usize = 64;
/// Maximum dimension of a vector field.
pub const VECTOR_DIM_MAX: usize = 4096;
/// Maximum number of entries in a basin's metadata map.
pub const METADATA_ENTRIES_MAX: usize = 64;
/// Maximum number of genesis issuer keys.
pub const ISSUERS_MAX: usize = 64;
/// Largest score of a `skill.endorse`.
pub const ENDORSE_SCORE_MAX: u64 = 1000;
/// Bound of the absolute value of a `reputation.delta`.
pub const REPUTATION_DELTA_ABS_MAX: i64 = 1000;
/// Largest `weight_ppm` of a `basin.delta` (one million parts per million).
pub const WEIGHT_PPM_MAX: u64 = 1_000_000;
/// The signing domain: signatures are over this prefix followed by the 32-byte EventId.
pub const SIGNING_DOMAIN: &[u8] = b"meshnode/event/v1";
/// The only supported format version of event bodies and genesis documents.
pub const FORMAT_VERSION: u64 = 1;
