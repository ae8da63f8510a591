//! The error type of training.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("cannot access {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("bad config ({origin}): {message}")]
    Config { origin: String, message: String },
    #[error(transparent)]
    Model(#[from] t1_model::ModelError),
    #[error(transparent)]
    Data(#[from] t1_data::DataError),
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("{steps} steps in a row had a non-finite loss or gradient; stopped. The last good checkpoint in {out_dir} is intact: lower optim.lr or check the data, then --resume")]
    Diverged { steps: usize, out_dir: PathBuf },
}

impl TrainError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io { path: path.to_path_buf(), source }
    }
}
