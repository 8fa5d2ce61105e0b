//! Where the desired state lives. One trait, one file per backend; every
//! command and agent goes through `Store`, selected by a URL.

mod file;

use std::path::PathBuf;

pub use file::FileStore;

use crate::model::{ModelError, State};

/// Store failures. Each message says what is wrong and what to do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported store URL {0:?}: use file:///PATH (the embedded default)")]
    UnsupportedUrl(String),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "store file {path} is not valid ovl state ({source}); fix or move it aside — ovl will not overwrite it"
    )]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "store file {path} has schema version {found}, this ovl understands {supported}; upgrade ovl"
    )]
    SchemaTooNew {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    /// The change broke a rule of the model; nothing was written.
    #[error(transparent)]
    Rejected(#[from] ModelError),
}

/// A place that holds the `State` and changes it atomically.
pub trait Store: Send + Sync {
    /// The current state.
    fn load(&self) -> Result<State, StoreError>;

    /// Applies `change` to the current state and commits the result as one
    /// atomic step, exclusive against every other writer. When `change`
    /// fails nothing is written.
    fn update(
        &self,
        change: &mut dyn FnMut(&mut State) -> Result<(), ModelError>,
    ) -> Result<State, StoreError>;

    /// A short description for logs ("file:///var/lib/ovl").
    fn describe(&self) -> String;
}

/// Applies a change that produces a value, returning it with the new state.
pub fn update_with<T>(
    store: &dyn Store,
    mut change: impl FnMut(&mut State) -> Result<T, ModelError>,
) -> Result<T, StoreError> {
    let mut out = None;
    store.update(&mut |s| {
        out = Some(change(s)?);
        Ok(())
    })?;
    Ok(out.expect("update succeeded, so the change ran and produced a value"))
}

/// Opens the store a URL names.
pub fn open(url: &str) -> Result<Box<dyn Store>, StoreError> {
    match url.split_once("://") {
        Some(("file", path)) if path.starts_with('/') => Ok(Box::new(FileStore::new(path))),
        _ => Err(StoreError::UnsupportedUrl(url.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_select_backends_or_fail_clearly() {
        assert!(open("file:///tmp/x").is_ok());
        for bad in ["file://relative", "/var/lib/ovl", "consul://h:1", ""] {
            let err = open(bad).err().expect("must be refused").to_string();
            assert!(err.contains("file:///PATH"), "{err}");
        }
    }
}
