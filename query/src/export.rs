//! Export of the tables as Parquet files (for DuckDB and other tools).

use std::path::Path;

use futures::TryStreamExt;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use crate::error::{Result, internal};
use crate::tables::Tables;

/// Writes every table as `<dir>/<table>.parquet` (zstd); returns (table, rows).
pub(crate) async fn parquet(tables: &Tables, dir: &Path) -> Result<Vec<(String, u64)>> {
    std::fs::create_dir_all(dir)?;
    let mut out = Vec::new();
    for (name, dataset) in tables.all() {
        let path = dir.join(format!("{name}.parquet"));
        let schema = std::sync::Arc::new(arrow_schema::Schema::from(dataset.schema()));
        let file = std::fs::File::create(&path)?;
        let properties = WriterProperties::builder()
            .set_compression(Compression::ZSTD(Default::default()))
            .build();
        let mut writer =
            ArrowWriter::try_new(file, schema.clone(), Some(properties)).map_err(internal)?;
        let mut stream = dataset.scan().try_into_stream().await.map_err(internal)?;
        let mut rows = 0u64;
        while let Some(batch) = stream.try_next().await.map_err(internal)? {
            rows += batch.num_rows() as u64;
            writer.write(&batch).map_err(internal)?;
        }
        writer.close().map_err(internal)?;
        out.push((name.to_string(), rows));
    }
    Ok(out)
}
