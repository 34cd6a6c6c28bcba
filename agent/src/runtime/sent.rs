//! Artifacts a worker receives in pieces from its agent (a microVM cannot read the agent's
//! copy): kept in the guest's tmpfs, their digest checked at deploy like any local copy.

use thiserror::Error;

/// Why a piece could not be kept.
#[derive(Debug, Error)]
pub enum SentError {
    #[error("an artifact named {0:?} (a sha256 in hex was expected)")]
    Name(String),
    #[error("keeping the artifact in {path}: {source} (a VM holds it in its memory: give the task more)")]
    Write {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Where a worker keeps an artifact the agent sent it in pieces (a VM's tmpfs).
pub const SENT_ARTIFACTS: &str = "/tmp/prescient-artifacts";

/// Appends a piece of an artifact to its file in [`SENT_ARTIFACTS`]; the deploy checks the
/// digest of the whole.
pub fn keep_artifact_piece(sha256_hex: &str, data: &[u8]) -> Result<(), SentError> {
    use std::io::Write;
    if sha256_hex.len() != 64 || !sha256_hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(SentError::Name(sha256_hex.to_string()));
    }
    let dir = std::path::Path::new(SENT_ARTIFACTS);
    let path = dir.join(sha256_hex);
    let write = |path: &std::path::Path| -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        f.write_all(data)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            f.set_permissions(std::fs::Permissions::from_mode(0o755))?;
        }
        Ok(())
    };
    write(&path).map_err(|source| SentError::Write { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_artifact_piece_must_be_named_by_its_digest() {
        for bad in ["../../etc/passwd", "abc", &"g".repeat(64)] {
            let e = keep_artifact_piece(bad, b"x").unwrap_err();
            assert!(matches!(e, SentError::Name(_)), "{bad}: {e}");
        }
    }
}
