//! The key-file text format: the 32-byte Ed25519 seed as 64 lowercase hex characters and `\n`.

use ed25519_dalek::SigningKey;

use crate::error::{Error, Result};
use crate::ids::AuthorKey;

/// Formats a signing key as key-file text (64 lowercase hex characters and a newline).
pub fn key_file_text(key: &SigningKey) -> String {
    format!("{}\n", hex::encode(key.to_bytes()))
}

/// Parses key-file text: 64 lowercase hex characters, optionally followed by one newline.
pub fn parse_key_file(text: &str) -> Result<SigningKey> {
    let hex_part = text.strip_suffix('\n').unwrap_or(text);
    if hex_part.len() != 64 {
        return Err(Error::BadKeyFile(format!(
            "expected 64 hex characters and a newline, got {} characters",
            hex_part.len()
        )));
    }
    if hex_part
        .bytes()
        .any(|b| !matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return Err(Error::BadKeyFile("expected lowercase hex".into()));
    }
    let mut seed = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut seed)
        .map_err(|e| Error::BadKeyFile(format!("not hex: {e}")))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// The public key of a signing key as an [`AuthorKey`].
pub fn author_of(key: &SigningKey) -> AuthorKey {
    AuthorKey::from(key.verifying_key())
}
