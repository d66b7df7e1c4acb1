//! The `/meshnode/sync/1` wire format: length-prefixed frames on QUIC bi-streams.
//!
//! A frame is a 4-byte little-endian length and that many bytes; a zero length ends a
//! response. Each request opens its own bi-stream:
//! - request: one frame, JSON [`Request`] (at most [`REQUEST_BYTES_MAX`]);
//! - response: one frame, JSON [`Header`]; then, if it is not an error, one frame per
//!   envelope (raw bytes, at most `EVENT_BYTES_MAX`), in the server's acceptance order; then
//!   an empty frame.

use iroh::endpoint::{RecvStream, SendStream};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The protocol's ALPN.
pub const ALPN: &[u8] = b"/meshnode/sync/1";
/// Largest request frame.
pub const REQUEST_BYTES_MAX: usize = 4 * 1024;
/// Largest header frame.
pub const HEADER_BYTES_MAX: usize = 4 * 1024;
/// Most events one response carries.
pub const EVENTS_PER_RESPONSE_MAX: u32 = 4096;
/// Most envelope bytes one response carries (past its first envelope).
pub const RESPONSE_BYTES_MAX: usize = 16 << 20;

/// What a peer asks for.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// The envelopes of the server's accepted events from leaf `from` of its transparency
    /// log, in that order, at most `max_events`.
    Log {
        /// The network id (hex); a server of another network refuses.
        net: String,
        /// First leaf wanted.
        from: u64,
        /// At most this many (capped at [`EVENTS_PER_RESPONSE_MAX`]).
        max_events: u32,
        /// The asker's own ticket: the server pulls from it in turn (kept only if its id is
        /// the connection's).
        #[serde(default)]
        ticket: Option<String>,
        /// Send [`ELIDED`] in place of the events the asker itself delivered to the server
        /// (they would only come back as duplicates).
        #[serde(default)]
        elide: bool,
        /// Events in the asker's log: a server elides only for an asker that has at least as
        /// many as itself (one that lost its data gets everything back).
        #[serde(default)]
        have: u64,
    },
    /// A sync session of one of the server's documents (the asker keeps a read-only
    /// replica): after the header, the asker sends automerge sync messages (at most
    /// [`crate::amcheck::ASK_BYTES_MAX`], no changes) and the server answers each with one
    /// (an empty frame when it has nothing to say), at most [`DOC_ROUNDS_MAX`] rounds; the
    /// asker's empty frame ends the session.
    Doc {
        /// The network id (hex).
        net: String,
        /// Which document.
        kind: crate::docs::DocKind,
    },
    /// The server's known peers (peer exchange).
    Peers {
        /// The network id (hex).
        net: String,
    },
}

/// The first frame of a response.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Header {
    /// Stable error code, when refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What to fix, when refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Events in the server's transparency log (how far behind the asker is).
    #[serde(default)]
    pub size: u64,
    /// The document's epoch (a `Doc` session): its actor is derived from the server's id,
    /// the kind and the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// Peer exchange: tickets of the server's peers (at most 32).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<String>,
}

/// Rounds of one `Doc` session.
pub const DOC_ROUNDS_MAX: usize = 8;

/// The frame that stands for an event of the log the asker delivered itself (see
/// `Request::Log::elide`): one byte, which no envelope is, so leaves and frames stay one to
/// one.
pub const ELIDED: &[u8] = &[0];

/// Writes one frame.
pub async fn write_frame(send: &mut SendStream, bytes: &[u8]) -> Result<()> {
    let len = u32::try_from(bytes.len()).map_err(|_| Error::protocol("frame too large"))?;
    send.write_all(&len.to_le_bytes())
        .await
        .map_err(Error::transport)?;
    send.write_all(bytes).await.map_err(Error::transport)
}

/// Reads one frame of at most `max` bytes; `None` for the empty end frame.
pub async fn read_frame(recv: &mut RecvStream, max: usize) -> Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await.map_err(Error::transport)?;
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 {
        return Ok(None);
    }
    if len > max {
        return Err(Error::protocol(format!(
            "a frame of {len} bytes, at most {max} allowed"
        )));
    }
    let mut bytes = vec![0u8; len];
    recv.read_exact(&mut bytes)
        .await
        .map_err(Error::transport)?;
    Ok(Some(bytes))
}

/// Writes a JSON frame.
pub async fn write_json<T: Serialize>(send: &mut SendStream, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec(value).map_err(|e| Error::protocol(e.to_string()))?;
    write_frame(send, &bytes).await
}

/// Reads a JSON frame of at most `max` bytes.
pub async fn read_json<T: for<'de> Deserialize<'de>>(
    recv: &mut RecvStream,
    max: usize,
) -> Result<T> {
    let bytes = read_frame(recv, max)
        .await?
        .ok_or_else(|| Error::protocol("an empty frame where a message was expected"))?;
    serde_json::from_slice(&bytes).map_err(|e| Error::protocol(format!("malformed message: {e}")))
}
