//! Canonical DAG-CBOR: one encoding per value, enforced on decode by re-encoding.

use serde::{Serialize, de::DeserializeOwned};

use crate::error::{Error, Result};

/// Encodes `value` as canonical DAG-CBOR (map keys sorted length-first, minimal integers,
/// floats as f64, no indefinite lengths).
pub fn to_canonical<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    serde_ipld_dagcbor::to_vec(value).map_err(|e| Error::Malformed(format!("cannot encode: {e}")))
}

/// Decodes `bytes` as `T` and checks that they are exactly the canonical encoding of the
/// decoded value. Returns [`Error::Malformed`] for bytes that do not decode and
/// [`Error::NonCanonical`] for bytes that decode but are not canonical (unsorted or duplicate
/// keys, non-minimal lengths, `null` for an absent field, trailing bytes, …).
pub fn from_canonical<T: Serialize + DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    let value: T =
        serde_ipld_dagcbor::from_slice(bytes).map_err(|e| Error::Malformed(e.to_string()))?;
    let again = to_canonical(&value)?;
    if again != bytes {
        return Err(Error::NonCanonical);
    }
    Ok(value)
}
