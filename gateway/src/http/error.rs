//! JSON errors `{"error": {"code", "message"}}` with stable codes and the right status.

use std::convert::Infallible;

use http::StatusCode;
use serde::Serialize;
use warp::Reply;
use warp::reply::Response;

/// An error answer: status, stable machine-readable code and a message that says what to fix.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable code, e.g. `invalid_id`.
    pub code: &'static str,
    /// Human-readable explanation.
    pub message: String,
    /// Extra headers (e.g. `Content-Range` on 416, `WWW-Authenticate` on 401).
    pub headers: Vec<(http::HeaderName, String)>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorDetail {
    /// Stable machine-readable code.
    code: String,
    /// What went wrong and what to fix.
    message: String,
}

impl ApiError {
    /// Builds an error.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            headers: Vec::new(),
        }
    }

    /// Adds a header.
    pub fn with_header(mut self, name: http::HeaderName, value: String) -> Self {
        self.headers.push((name, value));
        self
    }

    /// 400 with `code`.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 404 with `code`.
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    /// 500 `internal`: our bug or a failure underneath; details go to the log.
    pub fn internal(error: impl std::fmt::Display) -> Self {
        tracing::error!("internal error: {error}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("internal error: {error}"),
        )
    }

    /// 401 `unauthorized`.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
            .with_header(http::header::WWW_AUTHENTICATE, "Bearer".to_string())
    }

    /// 413 `body_too_large`.
    pub fn too_large(limit_bytes: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request body exceeds the limit of {limit_bytes} bytes"),
        )
    }
}

impl Reply for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        let mut response =
            warp::reply::with_status(warp::reply::json(&body), self.status).into_response();
        for (name, value) in self.headers {
            if let Ok(value) = http::HeaderValue::from_str(&value) {
                response.headers_mut().insert(name, value);
            }
        }
        response
    }
}

impl From<meshnode_store::Error> for ApiError {
    fn from(error: meshnode_store::Error) -> Self {
        use meshnode_store::Error as E;
        match error {
            E::NotFound(hash) => ApiError::not_found(
                "blob_not_found",
                format!("blob {hash} is not stored on this node"),
            ),
            E::TooLarge { limit_bytes } => ApiError::too_large(limit_bytes),
            E::InvalidRange { start, end, size } => ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                format!("range {start}..{end} is outside the blob of {size} bytes"),
            )
            .with_header(http::header::CONTENT_RANGE, format!("bytes */{size}")),
            E::Busy => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_busy",
                "the blob store is busy; retry shortly",
            )
            .with_header(http::header::RETRY_AFTER, "1".to_string()),
            E::Corrupt(hash) | E::Quarantined(hash) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "blob_quarantined",
                format!(
                    "blob {hash} failed verification on this node and was quarantined; it is \
                     not served until re-added or re-fetched"
                ),
            ),
            other => ApiError::internal(other),
        }
    }
}

impl From<meshnode_schemas::Error> for ApiError {
    fn from(error: meshnode_schemas::Error) -> Self {
        ApiError::bad_request(error.code(), error.to_string())
    }
}

/// 408: the request body did not arrive in time.
pub(crate) fn body_timeout(limit: std::time::Duration) -> ApiError {
    ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "body_timeout",
        format!(
            "the request body did not arrive within {} ms; send it whole, without pauses",
            limit.as_millis()
        ),
    )
}

/// 408: an upload fell behind the transfer pace.
pub(crate) fn upload_too_slow(pace: super::blobs::Pace) -> ApiError {
    ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "body_timeout",
        format!("the upload fell behind the slowest pace allowed ({pace:?}); send it faster"),
    )
}

/// Turns whatever warp rejected (unknown path, wrong method, unreadable body…) into our JSON
/// error shape.
pub(crate) async fn recover(rejection: warp::Rejection) -> Result<Response, Infallible> {
    // A denial comes from a route whose path and method matched: it outranks the 405 of
    // another route on the same path (`POST /v1/events/own` next to `GET /v1/events/{id}`).
    let error = if let Some(super::body::Denied(e)) = rejection.find() {
        e.clone()
    } else if rejection.is_not_found() {
        ApiError::not_found("route_not_found", "no such route; see /openapi.json")
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed on this route; see /openapi.json",
        )
    } else if let Some(super::body::SlowBody(limit)) = rejection.find() {
        body_timeout(*limit)
    } else if let Some(super::body::TooLarge(limit)) = rejection.find() {
        ApiError::too_large(*limit)
    } else if let Some(super::body::InvalidJson(e)) = rejection.find() {
        ApiError::bad_request("invalid_json", format!("request body is not valid: {e}"))
    } else if let Some(super::body::NotJson(t)) = rejection.find() {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("this route takes application/json, not {t}"),
        )
    } else if let Some(super::body::Unreadable(e)) = rejection.find() {
        ApiError::bad_request(
            "unreadable_body",
            format!("could not read the request body: {e}"),
        )
    } else if rejection.find::<warp::reject::PayloadTooLarge>().is_some() {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "request body too large",
        )
    } else if let Some(e) = rejection.find::<warp::reject::InvalidQuery>() {
        ApiError::bad_request("invalid_query", format!("invalid query string: {e}"))
    } else if let Some(e) = rejection.find::<warp::reject::InvalidHeader>() {
        ApiError::bad_request("invalid_header", e.to_string())
    } else if let Some(e) = rejection.find::<warp::reject::MissingHeader>() {
        ApiError::bad_request("missing_header", e.to_string())
    } else if let Some(e) = rejection.find::<warp::reject::UnsupportedMediaType>() {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            e.to_string(),
        )
    } else if let Some(e) = rejection.find::<warp::filters::body::BodyDeserializeError>() {
        ApiError::bad_request("invalid_json", format!("request body is not valid: {e}"))
    } else if rejection.find::<warp::reject::LengthRequired>().is_some() {
        ApiError::new(
            StatusCode::LENGTH_REQUIRED,
            "length_required",
            "this route needs a Content-Length header",
        )
    } else {
        ApiError::bad_request("bad_request", format!("{rejection:?}"))
    };
    Ok(error.into_response())
}
