//! Turning accepted events into rows of the append-only tables, and state into rows of the
//! state tables (Arrow record batches with the schemas of `meshnode_schemas::tables`).

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_array::builder::{
    BooleanBuilder, FixedSizeListBuilder, Float32Builder, Int64Builder, ListBuilder, StringBuilder,
    UInt64Builder,
};
use arrow_array::{ArrayRef, RecordBatch};
use meshnode_ledger::EventRecord;
use meshnode_schemas::tables::table_schema;
use meshnode_schemas::{Payload, SignedEvent};

use crate::error::{Error, Result};

/// Column builders for one table. Each table has its own set of builders, named by column.
pub(crate) struct Builder {
    table: &'static str,
    dim: i32,
    columns: Vec<Column>,
    n_rows: usize,
}

enum Column {
    Text(StringBuilder),
    U64(UInt64Builder),
    I64(Int64Builder),
    Bool(BooleanBuilder),
    Texts(ListBuilder<StringBuilder>),
    U64s(ListBuilder<UInt64Builder>),
    F32(Float32Builder),
    /// A vector column and its dimension.
    Vector(FixedSizeListBuilder<Float32Builder>, i32),
}

/// One value for a column.
pub(crate) enum Value<'a> {
    Text(&'a str),
    OptText(Option<&'a str>),
    U64(u64),
    OptU64(Option<u64>),
    I64(i64),
    Bool(bool),
    Texts(&'a [String]),
    U64s(&'a [u64]),
    Vector(&'a [f32]),
    OptVector(Option<&'a [f32]>),
    OptF32(Option<f32>),
}

impl Builder {
    pub(crate) fn new(table: &'static str, dim: i32) -> Result<Self> {
        let schema = table_schema(table, dim)
            .ok_or_else(|| Error::Internal(format!("no schema for table {table}")))?;
        let columns = schema
            .fields()
            .iter()
            .map(|f| match f.data_type() {
                arrow_schema::DataType::Utf8 => Column::Text(StringBuilder::new()),
                arrow_schema::DataType::UInt64 => Column::U64(UInt64Builder::new()),
                arrow_schema::DataType::Int64 => Column::I64(Int64Builder::new()),
                arrow_schema::DataType::Boolean => Column::Bool(BooleanBuilder::new()),
                arrow_schema::DataType::Float32 => Column::F32(Float32Builder::new()),
                arrow_schema::DataType::List(item)
                    if item.data_type() == &arrow_schema::DataType::UInt64 =>
                {
                    Column::U64s(ListBuilder::new(UInt64Builder::new()))
                }
                arrow_schema::DataType::List(_) => {
                    Column::Texts(ListBuilder::new(StringBuilder::new()))
                }
                arrow_schema::DataType::FixedSizeList(_, d) => {
                    Column::Vector(FixedSizeListBuilder::new(Float32Builder::new(), *d), *d)
                }
                other => unreachable!("invariant: table schemas use only known types, got {other}"),
            })
            .collect();
        Ok(Self {
            table,
            dim,
            columns,
            n_rows: 0,
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.n_rows
    }

    /// Appends one row; `values` must follow the schema's column order.
    pub(crate) fn push(&mut self, values: &[Value<'_>]) {
        debug_assert_eq!(values.len(), self.columns.len(), "row of {}", self.table);
        for (column, value) in self.columns.iter_mut().zip(values) {
            match (column, value) {
                (Column::Text(b), Value::Text(v)) => b.append_value(v),
                (Column::Text(b), Value::OptText(v)) => b.append_option(*v),
                (Column::U64(b), Value::U64(v)) => b.append_value(*v),
                (Column::U64(b), Value::OptU64(v)) => b.append_option(*v),
                (Column::I64(b), Value::I64(v)) => b.append_value(*v),
                (Column::Bool(b), Value::Bool(v)) => b.append_value(*v),
                (Column::Texts(b), Value::Texts(v)) => {
                    for item in v.iter() {
                        b.values().append_value(item);
                    }
                    b.append(true);
                }
                (Column::U64s(b), Value::U64s(v)) => {
                    for item in v.iter() {
                        b.values().append_value(*item);
                    }
                    b.append(true);
                }
                (Column::F32(b), Value::OptF32(v)) => b.append_option(*v),
                (Column::Vector(b, dim), Value::Vector(v)) => push_vector(b, *dim, Some(v)),
                (Column::Vector(b, dim), Value::OptVector(v)) => push_vector(b, *dim, *v),
                _ => unreachable!("invariant: row values follow the schema of {}", self.table),
            }
        }
        self.n_rows += 1;
    }

    /// The rows so far as one record batch (the builder is emptied).
    pub(crate) fn finish(&mut self) -> Result<RecordBatch> {
        let schema = table_schema(self.table, self.dim)
            .ok_or_else(|| Error::Internal(format!("no schema for table {}", self.table)))?;
        let arrays: Vec<ArrayRef> = self
            .columns
            .iter_mut()
            .map(|c| -> ArrayRef {
                match c {
                    Column::Text(b) => Arc::new(b.finish()),
                    Column::U64(b) => Arc::new(b.finish()),
                    Column::I64(b) => Arc::new(b.finish()),
                    Column::Bool(b) => Arc::new(b.finish()),
                    Column::Texts(b) => Arc::new(b.finish()),
                    Column::U64s(b) => Arc::new(b.finish()),
                    Column::F32(b) => Arc::new(b.finish()),
                    Column::Vector(b, _) => Arc::new(b.finish()),
                }
            })
            .collect();
        self.n_rows = 0;
        RecordBatch::try_new(schema, arrays)
            .map_err(|e| Error::Internal(format!("building {} rows: {e}", self.table)))
    }
}

/// Appends a vector, or a null one when it is absent or has another dimension than the
/// column's (the row is kept either way).
fn push_vector(b: &mut FixedSizeListBuilder<Float32Builder>, dim: i32, v: Option<&[f32]>) {
    match v {
        Some(v) if v.len() == dim as usize => {
            b.values().append_slice(v);
            b.append(true);
        }
        _ => {
            for _ in 0..dim {
                b.values().append_null();
            }
            b.append(false);
        }
    }
}

/// The vector dimension an event gives to the table it goes to, if any.
pub(crate) fn vector_dim(event: &SignedEvent) -> Option<(&'static str, i32)> {
    match &event.body.payload {
        Payload::SkillPublish(p) => Some(("skills", p.embedding.dim() as i32)),
        Payload::BasinPublish(p) => Some(("basins", p.coordinates.dim() as i32)),
        Payload::BasinDelta(p) => Some(("basin_versions", p.values.dim() as i32)),
        Payload::NodeAnnounce(p) => Some(("nodes", p.basin_signature.dim() as i32)),
        _ => None,
    }
}

/// Appends the rows an accepted event contributes to the append-only tables; `text` is a
/// skill's derived text and vector, `model` the model that made it.
pub(crate) fn append_rows(
    builders: &mut BTreeMap<&'static str, Builder>,
    record: &EventRecord,
    event: &SignedEvent,
    via: Option<&str>,
    text: Option<&crate::text::Derived>,
    model: Option<&str>,
) {
    let id = record.id.to_hex();
    let author = record.author.to_hex();
    let prev = record.prev.map(|p| p.to_hex());
    let deps: Vec<String> = record.deps.iter().map(|d| d.to_hex()).collect();
    let body = &event.body;
    if let Some(b) = builders.get_mut("events") {
        b.push(&[
            Value::U64(record.index),
            Value::Text(&id),
            Value::Text(&author),
            Value::U64(record.seq),
            Value::Text(record.kind.as_str()),
            Value::I64(record.ts),
            Value::OptText(prev.as_deref()),
            Value::Texts(&deps),
            Value::Text(&record.envelope.to_hex()),
            Value::OptText(via),
        ]);
    }
    match &body.payload {
        Payload::TokenMint(p) => {
            if let Some(b) = builders.get_mut("transfers") {
                b.push(&[
                    Value::U64(record.index),
                    Value::Text(&id),
                    Value::Text(&author),
                    Value::U64(record.seq),
                    Value::Text("mint"),
                    Value::Text(&p.to.to_hex()),
                    Value::U64(p.amount),
                    Value::Text(&p.reason),
                    Value::I64(record.ts),
                ]);
            }
        }
        Payload::TokenTransfer(p) => {
            if let Some(b) = builders.get_mut("transfers") {
                b.push(&[
                    Value::U64(record.index),
                    Value::Text(&id),
                    Value::Text(&author),
                    Value::U64(record.seq),
                    Value::Text("transfer"),
                    Value::Text(&p.to.to_hex()),
                    Value::U64(p.amount),
                    Value::Text(&p.memo),
                    Value::I64(record.ts),
                ]);
            }
        }
        Payload::SkillPublish(p) => {
            if let Some(b) = builders.get_mut("skills") {
                let embedding = p.embedding.values();
                let search_text = text.map_or("", |t| t.text.as_str());
                let text_vec = text.and_then(|t| t.vec.as_deref());
                b.push(&[
                    Value::U64(record.index),
                    Value::Text(&id),
                    Value::Text(&author),
                    Value::Text(&p.skill_id),
                    Value::Text(&p.name),
                    Value::Text(&p.version),
                    Value::Text(&p.description),
                    Value::Text(&p.domain),
                    Value::Texts(&p.capabilities),
                    Value::Texts(&p.specializations),
                    Value::Vector(&embedding),
                    Value::Text(&p.blob.to_hex()),
                    Value::U64(p.size),
                    Value::Text(&p.base_model),
                    Value::Text(&p.license),
                    Value::U64(p.price),
                    Value::I64(record.ts),
                    Value::Text(search_text),
                    Value::OptVector(text_vec),
                    Value::OptText(text_vec.and(model)),
                    Value::OptF32(crate::text::claim_consistency(&embedding, text_vec)),
                ]);
            }
        }
        Payload::SkillEndorse(p) => {
            if let Some(b) = builders.get_mut("skill_endorsements") {
                b.push(&[
                    Value::U64(record.index),
                    Value::Text(&id),
                    Value::Text(&author),
                    Value::Text(&p.skill.to_hex()),
                    Value::Text(&p.verdict),
                    Value::U64(p.score),
                    Value::Text(&p.note),
                    Value::I64(record.ts),
                ]);
            }
        }
        Payload::BasinPublish(_) | Payload::BasinDelta(_) => {
            // Versions are written by the materializer, which knows the basin of a delta.
        }
        Payload::ReputationDelta(p) => {
            if let Some(b) = builders.get_mut("reputation_deltas") {
                let evidence = p.evidence.map(|e| e.to_hex());
                b.push(&[
                    Value::U64(record.index),
                    Value::Text(&id),
                    Value::Text(&author),
                    Value::Text(&p.subject.to_hex()),
                    Value::I64(p.delta),
                    Value::Text(&p.reason),
                    Value::OptText(evidence.as_deref()),
                    Value::I64(record.ts),
                ]);
            }
        }
        Payload::BlobHost(p) => {
            if let Some(b) = builders.get_mut("blob_hosts") {
                b.push(&[
                    Value::U64(record.index),
                    Value::Text(&id),
                    Value::Text(&author),
                    Value::Text(&p.blob.to_hex()),
                    Value::Bool(p.pinned),
                    Value::I64(record.ts),
                ]);
            }
        }
        Payload::NodeAnnounce(_) | Payload::KeyRotate(_) => {}
    }
}
