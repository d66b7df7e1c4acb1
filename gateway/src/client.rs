//! The HTTP client the CLI uses to talk to a running node.

use std::time::Duration;

use anyhow::{Context, anyhow};
use serde::de::DeserializeOwned;

/// Time to establish a connection to the node.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A client of one node's HTTP API.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

/// reqwest is built with `rustls-no-provider` (iroh's choice); the client never speaks TLS to a
/// node, but building one needs a process-wide provider.
pub fn install_crypto_provider() {
    // Err means one is installed already.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// An error answer of the API, shown as `code: message`.
#[derive(Debug, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct ApiFailure {
    /// HTTP status.
    pub status: u16,
    /// Stable error code.
    pub code: String,
    /// Message.
    pub message: String,
}

impl Client {
    /// A client for the API at `base` (e.g. `http://127.0.0.1:8080`), with an optional token.
    pub fn new(base: &str, token: Option<String>) -> anyhow::Result<Self> {
        install_crypto_provider();
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .no_proxy()
            .build()?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_string(),
            token,
        })
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// A request builder for `path` with the token attached if known.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let builder = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }

    /// Sends a request, turning connection failures and error answers into clear errors.
    pub async fn send(
        &self,
        builder: reqwest::RequestBuilder,
    ) -> anyhow::Result<reqwest::Response> {
        let response = builder.send().await.map_err(|e| {
            if e.is_connect() {
                anyhow!(
                    "no meshnode is answering at {}; start one with `meshnode serve` or pass \
                     --api URL",
                    self.base
                )
            } else {
                anyhow!("request to {} failed: {e}", self.base)
            }
        })?;
        if response.status().is_success() || response.status() == reqwest::StatusCode::NOT_MODIFIED
        {
            return Ok(response);
        }
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        let parsed: Option<serde_json::Value> = serde_json::from_str(&text).ok();
        let (code, message) = match parsed.as_ref().and_then(|v| v.get("error")) {
            Some(error) => (
                error["code"].as_str().unwrap_or("unknown").to_string(),
                error["message"].as_str().unwrap_or("").to_string(),
            ),
            None => ("http_error".to_string(), text.chars().take(500).collect()),
        };
        Err(ApiFailure {
            status,
            code,
            message,
        }
        .into())
    }

    /// Sends and decodes a JSON answer.
    pub async fn json<T: DeserializeOwned>(
        &self,
        builder: reqwest::RequestBuilder,
    ) -> anyhow::Result<T> {
        let response = self.send(builder).await?;
        response
            .json::<T>()
            .await
            .context("the node's answer is not the expected JSON")
    }
}
