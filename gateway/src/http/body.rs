//! Whole request bodies under a cap.
//!
//! warp's `content_length_limit` refuses an oversized body without reading it, and hyper then
//! closes the connection while the client is still sending. The kernel answers the unread
//! bytes with a reset, which can destroy the 413 before the client reads it: the client sees
//! "connection reset" instead of a clear error. Like nginx's lingering close, these filters
//! read and discard a bounded amount of an oversized body (at most [`DRAIN_BYTES_MAX`], for at
//! most [`DRAIN_TIME_MAX`]) before answering, so ordinary clients get their 413. Bodies far
//! over any limit are still refused at once, without reading them.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use warp::Filter;
use warp::Rejection;

/// Most bytes of an oversized body read and thrown away so that the 413 reaches the client.
pub(crate) const DRAIN_BYTES_MAX: u64 = 4 << 20;
/// Longest time spent draining an oversized body.
pub(crate) const DRAIN_TIME_MAX: Duration = Duration::from_secs(2);

/// The body was over the route's limit (carries the limit in bytes).
#[derive(Debug)]
pub(crate) struct TooLarge(pub(crate) u64);
impl warp::reject::Reject for TooLarge {}

/// The connection failed while the body was being read.
#[derive(Debug)]
pub(crate) struct Unreadable(pub(crate) String);
impl warp::reject::Reject for Unreadable {}

/// A JSON route got a body that is not valid JSON for it.
#[derive(Debug)]
pub(crate) struct InvalidJson(pub(crate) String);
impl warp::reject::Reject for InvalidJson {}

/// The request is not authorized (checked before any of the body is read).
#[derive(Debug)]
pub(crate) struct Denied(pub(crate) super::ApiError);
impl warp::reject::Reject for Denied {}

/// The body did not arrive within the route's deadline (`server.body_timeout_ms`).
#[derive(Debug)]
pub(crate) struct SlowBody(pub(crate) Duration);
impl warp::reject::Reject for SlowBody {}

/// A JSON route got a body declared as something else.
#[derive(Debug)]
pub(crate) struct NotJson(pub(crate) String);
impl warp::reject::Reject for NotJson {}

/// The whole body, if it is at most `limit` bytes; otherwise a [`TooLarge`] rejection.
/// A client that trickles bytes cannot hold a connection slot and a buffer for longer than
/// `deadline`.
pub(crate) fn bounded(
    limit: u64,
    deadline: Duration,
) -> impl Filter<Extract = (Bytes,), Error = Rejection> + Clone + Send + Sync + 'static {
    warp::header::optional::<u64>("content-length")
        .and(warp::body::stream())
        .and_then(move |length: Option<u64>, body| async move {
            match tokio::time::timeout(deadline, read(length, body, limit)).await {
                Ok(result) => result,
                Err(_) => Err(warp::reject::custom(SlowBody(deadline))),
            }
        })
}

/// The body parsed as JSON, if it is at most `limit` bytes and declared as JSON (or not
/// declared at all).
pub(crate) fn json<T: DeserializeOwned + Send + 'static>(
    limit: u64,
    deadline: Duration,
) -> impl Filter<Extract = (T,), Error = Rejection> + Clone + Send + Sync + 'static {
    warp::header::optional::<String>("content-type")
        .and_then(|content_type: Option<String>| async move {
            match content_type {
                Some(t) if !is_json(&t) => Err(warp::reject::custom(NotJson(t))),
                _ => Ok(()),
            }
        })
        .untuple_one()
        .and(bounded(limit, deadline))
        .and_then(|bytes: Bytes| async move {
            serde_json::from_slice::<T>(&bytes)
                .map_err(|e| warp::reject::custom(InvalidJson(e.to_string())))
        })
}

fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence.ends_with("+json")
}

async fn read<S, B>(length: Option<u64>, body: S, limit: u64) -> Result<Bytes, Rejection>
where
    S: Stream<Item = Result<B, warp::Error>> + Send,
    B: Buf,
{
    let mut body = std::pin::pin!(body);
    if let Some(length) = length
        && length > limit
    {
        if length <= DRAIN_BYTES_MAX {
            drain(body, DRAIN_BYTES_MAX).await;
        }
        return Err(warp::reject::custom(TooLarge(limit)));
    }
    // Grow with what arrives: a declared length alone reserves at most 64 KiB.
    let capacity = length.unwrap_or(0).min(limit).min(64 * 1024);
    let mut buf = BytesMut::with_capacity(usize::try_from(capacity).unwrap_or(0));
    while let Some(chunk) = body.next().await {
        let mut chunk = chunk.map_err(|e| warp::reject::custom(Unreadable(e.to_string())))?;
        if (buf.len() + chunk.remaining()) as u64 > limit {
            let budget = DRAIN_BYTES_MAX.saturating_sub((buf.len() + chunk.remaining()) as u64);
            drain(body, budget).await;
            return Err(warp::reject::custom(TooLarge(limit)));
        }
        while chunk.has_remaining() {
            let piece = chunk.chunk();
            let n = piece.len();
            buf.put_slice(piece);
            chunk.advance(n);
        }
    }
    Ok(buf.freeze())
}

/// Reads and discards up to `budget` bytes, for at most [`DRAIN_TIME_MAX`].
async fn drain<S, B>(mut body: std::pin::Pin<&mut S>, budget: u64)
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let work = async {
        let mut left = budget;
        while let Some(Ok(chunk)) = body.next().await {
            let n = chunk.remaining() as u64;
            if n >= left {
                return;
            }
            left -= n;
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME_MAX, work).await;
}
