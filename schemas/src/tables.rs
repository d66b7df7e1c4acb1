//! Arrow schemas of the query tables (DESIGN.md §6). Ids, keys and hashes are lowercase hex
//! strings so that SQL can compare them with literals; vectors are
//! `FixedSizeList<Float32, dim>` with the dimension fixed per table when it is created.

use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema, SchemaRef};

/// Every table, in a fixed order.
pub const TABLES: [&str; 12] = [
    "events",
    "transfers",
    "balances",
    "skills",
    "skill_endorsements",
    "basins",
    "basin_versions",
    "reputation",
    "reputation_deltas",
    "nodes",
    "blobs",
    "blob_hosts",
];

/// Append-only tables: one row per accepted event of some kinds, in acceptance order, each
/// with its `leaf_index` (position in the transparency log).
pub const APPEND_TABLES: [&str; 7] = [
    "events",
    "transfers",
    "skills",
    "skill_endorsements",
    "basin_versions",
    "reputation_deltas",
    "blob_hosts",
];

/// State tables: the current value of something, rewritten as it changes.
pub const STATE_TABLES: [&str; 5] = ["balances", "basins", "reputation", "nodes", "blobs"];

/// Dimension of the derived `text_vec` columns: the node's text embedding model
/// (all-MiniLM-L6-v2) gives 384 values.
pub const TEXT_VEC_DIM: i32 = 384;

/// Tables with derived text columns (`search_text`, `text_vec`, `text_model`,
/// `claim_consistency`): what the node's own model made of their text.
pub const TEXT_TABLES: [&str; 3] = ["skills", "basins", "nodes"];

/// Tables with a vector column, and its name.
pub const VECTOR_COLUMNS: [(&str, &str); 4] = [
    ("skills", "embedding"),
    ("basins", "coordinates"),
    ("basin_versions", "values"),
    ("nodes", "basin_signature"),
];

fn text(name: &str) -> Field {
    Field::new(name, DataType::Utf8, false)
}

fn text_opt(name: &str) -> Field {
    Field::new(name, DataType::Utf8, true)
}

fn u64f(name: &str) -> Field {
    Field::new(name, DataType::UInt64, false)
}

fn i64f(name: &str) -> Field {
    Field::new(name, DataType::Int64, false)
}

fn texts(name: &str) -> Field {
    Field::new(
        name,
        DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
        false,
    )
}

/// The Arrow type of a vector column of `dim` dimensions.
pub fn vector_type(dim: i32) -> DataType {
    DataType::FixedSizeList(Arc::new(Field::new("item", DataType::Float32, true)), dim)
}

/// The derived columns of a [`TEXT_TABLES`] table: the text the node embedded (and indexes
/// for full-text search), its vector, the model that made it (null without a model) and the
/// cosine between the author's own vector and `text_vec` (null where their dimensions differ).
fn text_columns() -> [Field; 4] {
    [
        text("search_text"),
        vector("text_vec", TEXT_VEC_DIM),
        text_opt("text_model"),
        Field::new("claim_consistency", DataType::Float32, true),
    ]
}

fn vector(name: &str, dim: i32) -> Field {
    // Nullable: a row whose vector has another dimension than the table's keeps a null.
    Field::new(name, vector_type(dim), true)
}

/// The schema of `table`, with `dim` the dimension of its vector column (ignored for tables
/// without one). `None` for an unknown table.
pub fn table_schema(table: &str, dim: i32) -> Option<SchemaRef> {
    let mut fields = match table {
        "events" => vec![
            u64f("leaf_index"),
            text("id"),
            text("author"),
            u64f("seq"),
            text("kind"),
            i64f("ts"),
            text_opt("prev"),
            texts("deps"),
            text("envelope"),
            // The peer whose log delivered the event first (null: posted here, or accepted
            // after waiting for its dependencies). Local.
            text_opt("via"),
        ],
        "transfers" => vec![
            u64f("leaf_index"),
            text("id"),
            text("author"),
            u64f("seq"),
            text("kind"),
            text("to"),
            u64f("amount"),
            text("memo"),
            i64f("ts"),
        ],
        "balances" => vec![
            text("account"),
            i64f("balance"),
            u64f("received"),
            u64f("received_contested"),
            u64f("sent"),
            u64f("sent_contested"),
            u64f("minted"),
        ],
        "skills" => vec![
            u64f("leaf_index"),
            text("id"),
            text("author"),
            text("skill_id"),
            text("name"),
            text("version"),
            text("description"),
            text("domain"),
            texts("capabilities"),
            texts("specializations"),
            vector("embedding", dim),
            text("blob"),
            u64f("size"),
            text("base_model"),
            text("license"),
            u64f("price"),
            i64f("ts"),
        ],
        "skill_endorsements" => vec![
            u64f("leaf_index"),
            text("id"),
            text("author"),
            text("skill"),
            text("verdict"),
            u64f("score"),
            text("note"),
            i64f("ts"),
        ],
        "basins" => vec![
            text("id"),
            text("owner"),
            text("basin_id"),
            vector("coordinates", dim),
            u64f("n_versions"),
            text("head"),
        ],
        "basin_versions" => vec![
            u64f("leaf_index"),
            text("id"),
            text("basin"),
            text_opt("parent"),
            text("author"),
            text("basin_id"),
            Field::new(
                "indices",
                DataType::List(Arc::new(Field::new("item", DataType::UInt64, true))),
                false,
            ),
            vector("values", dim),
            u64f("weight_ppm"),
            i64f("ts"),
        ],
        "reputation" => vec![text("subject"), i64f("score"), u64f("n_deltas")],
        "reputation_deltas" => vec![
            u64f("leaf_index"),
            text("id"),
            text("author"),
            text("subject"),
            i64f("delta"),
            text("reason"),
            text_opt("evidence"),
            i64f("ts"),
        ],
        "nodes" => vec![
            text("author"),
            text("service"),
            texts("endpoints"),
            texts("capabilities"),
            text("addr"),
            vector("basin_signature", dim),
            text("last_event"),
            i64f("last_heartbeat_ms"),
            u64f("n_announces"),
        ],
        "blobs" => vec![
            text("blob"),
            Field::new("size", DataType::UInt64, true),
            Field::new("pinned", DataType::Boolean, false),
            texts("hosts"),
            u64f("n_hosts"),
            text_opt("skill"),
        ],
        "blob_hosts" => vec![
            u64f("leaf_index"),
            text("id"),
            text("author"),
            text("blob"),
            Field::new("pinned", DataType::Boolean, false),
            i64f("ts"),
        ],
        _ => return None,
    };
    if TEXT_TABLES.contains(&table) {
        fields.extend(text_columns());
    }
    Some(Arc::new(Schema::new(fields)))
}
