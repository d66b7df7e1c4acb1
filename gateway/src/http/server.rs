//! The hardened HTTP/1.1 server: a connection cap, header-read and idle timeouts, stalled-I/O
//! timeouts, `TCP_NODELAY`, peer address in request extensions, per-request metrics and
//! graceful shutdown. `warp::serve` has none of these, so the warp filter is served here
//! through hyper directly.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
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
        metrics.connections_total.inc();
        metrics.connections_open.inc();
        let mut stream = TimeoutStream::new(tcp);
        stream.set_read_timeout(Some(io_timeout));
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
