//! The OpenAPI 3.1 description of every route, generated from the handlers' annotations.

use std::sync::OnceLock;

use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

use super::{blobs, error, ledger, ops, pins, query};

#[derive(OpenApi)]
#[openapi(
    info(title = "meshnode", description = "HTTP API of a meshnode node (DESIGN.md §8)."),
    paths(
        blobs::upload, blobs::get, blobs::head, blobs::fetch,
        pins::put, pins::delete, pins::list,
        ops::healthz, ops::readyz, ops::metrics, ops::status, ops::gc,
        ledger::submit, ledger::submit_own, ledger::event, ledger::log, ledger::account, ledger::account_credits,
        ledger::forks,
        ledger::checkpoint, ledger::inclusion, ledger::consistency, ledger::audit,
        ledger::audit_export,
        ledger::skills, ledger::basins, ledger::basin, ledger::reputation, ledger::nodes,
        query::sql, query::search, query::embeddings, query::tables, query::maintenance, query::export,
    ),
    components(schemas(error::ErrorBody, error::ErrorDetail)),
    modifiers(&BearerAuth),
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The OpenAPI document as JSON text (computed once).
pub fn openapi_json() -> String {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        ApiDoc::openapi()
            .to_pretty_json()
            .expect("invariant: the OpenAPI document serialises")
    })
    .clone()
}
