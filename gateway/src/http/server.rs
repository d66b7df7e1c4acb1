//! The hardened HTTP/1.1 server: a connection cap and a per-client cap, a header-read
//! timeout (which also closes idle keep-alive connections), a stalled-write timeout,
//! `TCP_NODELAY`, peer address in request extensions, per-request metrics and graceful
//! shutdown. `warp::serve` has none of these, so the warp filter is served here through hyper
//! directly.
//!
//! There is no socket read timeout: hyper polls the socket while a handler runs, so one would
//! cut off every handler that runs longer (a GC, a rebuild, an export). Reads are bounded
//! where they happen instead: headers by the header timeout, whole bodies by
//! the body deadline (`body_timeout_ms`), uploads by a minimum rate.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_io_timeout::TimeoutStream;
use tower::Service;
use warp::Filter;
use warp::reply::Response;

use super::metrics::{Metrics, route_of};
use crate::config::ServerConfig;

/// The client's socket address, put into every request's extensions.
#[derive(Clone, Copy, Debug)]
pub struct PeerAddr(pub SocketAddr);

/// How long shutdown waits for open connections to finish their requests.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Connections being answered 429 at once; more are closed without an answer.
const REFUSALS_MAX: usize = 64;

/// The client a connection counts against: its IPv4 address, or the /64 network of its IPv6
/// address (one host commonly holds a whole /64).
fn client_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut octets = v6.octets();
                octets[8..].fill(0);
                IpAddr::V6(std::net::Ipv6Addr::from(octets))
            }
        },
    }
}

/// Open connections per client address.
#[derive(Default)]
struct Clients(Mutex<HashMap<IpAddr, usize>>);

/// One admitted connection of a client; gives its place back when dropped.
struct ClientSlot {
    clients: Arc<Clients>,
    ip: IpAddr,
}

impl Clients {
    /// A slot for `ip` if it has fewer than `max` connections open.
    fn admit(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<ClientSlot> {
        let mut open = self
            .0
            .lock()
            .expect("invariant: client map is never poisoned");
        let n = open.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            clients: self.clone(),
            ip,
        })
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self
            .clients
            .0
            .lock()
            .expect("invariant: client map is never poisoned");
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Answers a connection over its client's cap with a 429 and closes it (within 1.5 s). The
/// request head is read first (up to 16 KiB, for at most 0.5 s), so that the client reads an
/// answer to its request rather than an unsolicited message.
async fn refuse(mut tcp: tokio::net::TcpStream, max: usize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        let mut head = Vec::with_capacity(1024);
        let mut buf = [0u8; 1024];
        while head.len() < 16 * 1024 && !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    let body = format!(
        "{{\"error\":{{\"code\":\"too_many_connections\",\"message\":\"this client has \
         {max} connections open, the most allowed; reuse them (keep-alive) or close some\"}}}}"
    );
    let response = format!(
        "HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        tcp.write_all(response.as_bytes()).await?;
        tcp.shutdown().await
    })
    .await;
}

/// Serves `filter` on `listener` until `shutdown` resolves, then stops accepting and waits up
/// to 10 s for open connections.
pub async fn serve<F>(
    listener: TcpListener,
    filter: F,
    config: ServerConfig,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) where
    F: Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static,
{
    let connections = Arc::new(Semaphore::new(config.connections_max.max(1)));
    let clients = Arc::new(Clients::default());
    let refusals = Arc::new(Semaphore::new(REFUSALS_MAX));
    let per_client_max = config.connections_per_client_max.max(1);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let header_timeout = Duration::from_millis(config.header_timeout_ms.max(1));
    let io_timeout = Duration::from_millis(config.io_timeout_ms.max(1));
    tokio::pin!(shutdown);
    loop {
        // Wait for a free connection slot first: beyond the cap, clients wait in the kernel's
        // listen backlog instead of consuming memory and tasks here.
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            permit = connections.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("set TCP_NODELAY failed: {e}");
        }
        let Some(slot) = clients.admit(client_of(peer.ip()), per_client_max) else {
            metrics.connections_refused.inc();
            // The refusal takes no connection slot, and refusals in flight are capped
            // themselves: past that, the connection is closed at once.
            drop(permit);
            if let Ok(refusing) = refusals.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    refuse(tcp, per_client_max).await;
                    drop(refusing);
                });
            }
            continue;
        };
        metrics.connections_total.inc();
        metrics.connections_open.inc();
        let mut stream = TimeoutStream::new(tcp);
        stream.set_write_timeout(Some(io_timeout));
        let io = TokioIo::new(Box::pin(stream));
        let warp_service = warp::service(filter.clone());
        let request_metrics = metrics.clone();
        let service = hyper::service::service_fn(move |mut request: http::Request<Incoming>| {
            request.extensions_mut().insert(PeerAddr(peer));
            let route = route_of(request.method(), request.uri().path());
            let method = request.method().clone();
            let started = Instant::now();
            let mut inner = warp_service.clone();
            let metrics = request_metrics.clone();
            async move {
                let response = inner.call(request).await?;
                metrics.observe(
                    route,
                    method.as_str(),
                    response.status().as_u16(),
                    started.elapsed(),
                );
                Ok::<_, Infallible>(response)
            }
        });
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .keep_alive(true)
            .max_buf_size(64 * 1024)
            .serve_connection(io, service);
        let connection = graceful.watch(connection);
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, "connection ended: {e}");
            }
            metrics.connections_open.dec();
            drop(slot);
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(SHUTDOWN_GRACE) => {
            tracing::warn!("open connections did not finish within {SHUTDOWN_GRACE:?}");
        }
    }
}
