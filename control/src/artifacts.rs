//! Content-addressed artifacts (executables, models) uploaded by users and fetched by agents.
//!
//! Architecture invariant: a file under `artifacts/` is named by the sha256 of its contents and
//! appears only after it was fully written and synced (written to a temporary name, then renamed).

use prescient_schemas::Digest;
use sha2::Digest as _;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Largest artifact accepted.
pub const MAX_ARTIFACT_BYTES: u64 = 8 << 30;

/// An artifact operation that failed.
#[derive(Debug, Error)]
pub enum ArtifactError {
    #[error("artifact store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no artifact {0} on this control node (upload it with `prescient upload FILE`)")]
    Unknown(Digest),
    #[error("artifact is larger than the limit of {MAX_ARTIFACT_BYTES} bytes")]
    TooLarge,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ArtifactError + '_ {
    move |source| ArtifactError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone)]
pub struct ArtifactStore {
    dir: PathBuf,
}

/// An upload in progress.
pub struct Upload {
    dir: PathBuf,
    tmp: PathBuf,
    file: std::fs::File,
    hasher: sha2::Sha256,
    size: u64,
}

impl ArtifactStore {
    pub fn open(data_dir: &Path) -> Result<ArtifactStore, ArtifactError> {
        let dir = data_dir.join("artifacts");
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(ArtifactStore { dir })
    }

    pub fn begin(&self) -> Result<Upload, ArtifactError> {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = self.dir.join(format!(".upload-{}-{n}", std::process::id()));
        let file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        Ok(Upload {
            dir: self.dir.clone(),
            tmp,
            file,
            hasher: sha2::Sha256::new(),
            size: 0,
        })
    }

    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(digest.hex())
    }

    /// Reads up to `len` bytes at `offset`; returns them and the artifact's size.
    pub fn read(
        &self,
        digest: &Digest,
        offset: u64,
        len: usize,
    ) -> Result<(Vec<u8>, u64), ArtifactError> {
        let path = self.path(digest);
        let mut f = std::fs::File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ArtifactError::Unknown(*digest),
            _ => ArtifactError::Io {
                path: path.clone(),
                source: e,
            },
        })?;
        let size = f.metadata().map_err(io(&path))?.len();
        f.seek(SeekFrom::Start(offset.min(size)))
            .map_err(io(&path))?;
        let mut buf = Vec::with_capacity(len.min((size - offset.min(size)) as usize));
        f.take(len as u64)
            .read_to_end(&mut buf)
            .map_err(io(&path))?;
        Ok((buf, size))
    }
}

impl Upload {
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), ArtifactError> {
        self.size += chunk.len() as u64;
        if self.size > MAX_ARTIFACT_BYTES {
            return Err(ArtifactError::TooLarge);
        }
        self.hasher.update(chunk);
        self.file.write_all(chunk).map_err(io(&self.tmp))
    }

    /// Stores the artifact under its digest; `created` is false when it was already there.
    pub fn commit(self) -> Result<(Digest, u64, bool), ArtifactError> {
        let digest = Digest(self.hasher.clone().finalize().into());
        self.file.sync_all().map_err(io(&self.tmp))?;
        let dest = self.dir.join(digest.hex());
        let created = !dest.exists();
        if created {
            std::fs::rename(&self.tmp, &dest).map_err(io(&dest))?;
            if let Ok(d) = std::fs::File::open(&self.dir) {
                let _ = d.sync_all();
            }
        } else {
            let _ = std::fs::remove_file(&self.tmp);
        }
        Ok((digest, self.size, created))
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        // An abandoned upload leaves nothing behind (after commit the file was renamed).
        let _ = std::fs::remove_file(&self.tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_and_read_back() {
        let dir = std::env::temp_dir().join(format!("prescient-artifacts-{}", std::process::id()));
        let store = ArtifactStore::open(&dir).unwrap();
        let mut up = store.begin().unwrap();
        up.write(b"hello ").unwrap();
        up.write(b"world").unwrap();
        let (d, size, created) = up.commit().unwrap();
        assert_eq!((d, size, created), (Digest::of(b"hello world"), 11, true));
        assert_eq!(store.read(&d, 6, 100).unwrap(), (b"world".to_vec(), 11));
        let missing = Digest::of(b"nope");
        assert!(matches!(
            store.read(&missing, 0, 1),
            Err(ArtifactError::Unknown(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
