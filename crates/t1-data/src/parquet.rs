//! Parquet datasets, the format of datasets on the Hugging Face Hub, read row by row through
//! the parquet crate's record API: each row becomes the JSON object a JSONL line would hold
//! (strings, numbers, lists such as a `messages` column of `{role, content}` structs).

use std::path::Path;

use parquet::file::reader::SerializedFileReader;
use serde_json::Value;

use crate::DataError;

/// Every row of the Parquet file at `path`, as JSON.
pub fn read_rows(path: &Path) -> Result<Vec<Value>, DataError> {
    let bad = |message: String| DataError::BadRow { path: path.to_path_buf(), row: 0, message };
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let reader = SerializedFileReader::new(file).map_err(|e| bad(format!("not a readable Parquet file: {e}")))?;
    let mut rows = Vec::new();
    for (i, row) in reader.into_iter().enumerate() {
        let row = row.map_err(|e| DataError::BadRow { path: path.to_path_buf(), row: i + 1, message: format!("cannot be decoded: {e}") })?;
        // the record API panics on dates and timestamps out of chrono's range: an error here
        let json = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| row.to_json_value())).map_err(|_| DataError::BadRow {
            path: path.to_path_buf(),
            row: i + 1,
            message: "a value cannot be converted (a date or timestamp out of range?)".into(),
        })?;
        rows.push(json);
    }
    Ok(rows)
}
