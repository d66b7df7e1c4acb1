//! The genesis document of a network; its BlobHash is the network id `net`.

use serde::{Deserialize, Serialize};

use crate::cbor::{from_canonical, to_canonical};
use crate::error::{Error, Result};
use crate::ids::{AuthorKey, BlobHash};
use crate::limits::{FORMAT_VERSION, GENESIS_BYTES_MAX, ISSUERS_MAX, TEXT_SHORT_BYTES_MAX};

/// The genesis document: network name, issuer keys, token parameters and basin policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Genesis {
    /// Format version, 1.
    pub v: u64,
    /// Network name.
    pub name: String,
    /// Keys allowed to mint.
    pub issuers: Vec<AuthorKey>,
    /// Token symbol.
    pub symbol: String,
    /// Decimal places of the token's display unit.
    pub decimals: u64,
    /// Starter grant an issuer gives new members, in base units (policy hint).
    pub starter_grant: u64,
    /// Largest distance of a basin delta from the current coordinates that is accepted.
    pub basin_outlier_max: f64,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: i64,
}

impl Genesis {
    /// A genesis with one issuer and default token parameters.
    pub fn new(name: &str, issuer: AuthorKey, created_ms: i64) -> Self {
        Self {
            v: FORMAT_VERSION,
            name: name.to_string(),
            issuers: vec![issuer],
            symbol: "CRD".to_string(),
            decimals: 6,
            starter_grant: 1_000_000_000,
            basin_outlier_max: 10.0,
            created_ms,
        }
    }

    /// Canonical DAG-CBOR bytes.
    pub fn encode(&self) -> Result<Vec<u8>> {
        self.validate()?;
        to_canonical(self)
    }

    /// Decodes and validates canonical genesis bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        if bytes.len() > GENESIS_BYTES_MAX {
            return Err(Error::TooLarge {
                what: "genesis document",
                size: bytes.len() as u64,
                max: GENESIS_BYTES_MAX as u64,
            });
        }
        let genesis: Genesis = from_canonical(bytes)?;
        genesis.validate()?;
        Ok(genesis)
    }

    /// The network id: BLAKE3 of the canonical encoding.
    pub fn net(&self) -> Result<BlobHash> {
        Ok(BlobHash::of(&self.encode()?))
    }

    /// Checks version, text lengths, issuer keys and the outlier threshold.
    pub fn validate(&self) -> Result<()> {
        let field = |field: &'static str, reason: &str| Error::InvalidField {
            field,
            reason: reason.to_string(),
        };
        if self.v != FORMAT_VERSION {
            return Err(Error::Version(self.v));
        }
        if self.name.is_empty() || self.name.len() > TEXT_SHORT_BYTES_MAX {
            return Err(field("name", "must be 1..=256 bytes"));
        }
        if self.symbol.is_empty() || self.symbol.len() > 16 {
            return Err(field("symbol", "must be 1..=16 bytes"));
        }
        if self.decimals > 18 {
            return Err(field("decimals", "must be 0..=18"));
        }
        if self.issuers.is_empty() || self.issuers.len() > ISSUERS_MAX {
            return Err(field("issuers", "must list 1..=64 keys"));
        }
        for issuer in &self.issuers {
            issuer
                .validate()
                .map_err(|e| field("issuers", &e.to_string()))?;
        }
        if !self.basin_outlier_max.is_finite() || self.basin_outlier_max <= 0.0 {
            return Err(field(
                "basin_outlier_max",
                "must be a finite positive number",
            ));
        }
        Ok(())
    }

    /// Whether `key` may mint.
    pub fn is_issuer(&self, key: &AuthorKey) -> bool {
        self.issuers.contains(key)
    }
}
