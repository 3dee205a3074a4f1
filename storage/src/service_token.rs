//! The service token: the shared secret a trusted backend presents to follow the directory's
//! change feed. It lives in a file the replicas share (or are each given): 64 lowercase hex
//! characters (32 random bytes) and a newline.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use anyhow::Context as _;

/// Characters of a service token.
pub const LEN: usize = 64;

/// The token in `path`, created first when the file is absent: written whole to a temporary
/// file of mode 0600 beside it, synced, then linked into place, so the file appears complete
/// or not at all, and a file that exists (another replica's, an operator's) is never replaced.
pub fn load_or_create(path: &Path) -> anyhow::Result<String> {
    if let Some(token) = load(path)? {
        return Ok(token);
    }
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut bytes = [0u8; LEN / 2];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("service-token"),
        uuid::Uuid::new_v4().simple()
    ));
    let written = (|| -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        file.write_all(format!("{token}\n").as_bytes())?;
        file.sync_all()
    })();
    let linked = written.and_then(|()| std::fs::hard_link(&tmp, path));
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            if let Ok(dir) = std::fs::File::open(dir) {
                let _ = dir.sync_all();
            }
            tracing::info!(path = %path.display(), "created the service token file");
            Ok(token)
        }
        // Another process created it first: theirs is the token.
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
            load(path)?.with_context(|| format!("{} vanished while being read", path.display()))
        }
        Err(err) => Err(err).with_context(|| format!("cannot create {}", path.display())),
    }
}

/// The token in `path`, or `None` when there is no such file. A file that is not a token is
/// an error.
pub fn load(path: &Path) -> anyhow::Result<Option<String>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err).with_context(|| format!("cannot read {}", path.display())),
    };
    let token = text.trim();
    anyhow::ensure!(
        token.len() == LEN
            && token
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
        "{} is not a service token (64 lowercase hex characters)",
        path.display()
    );
    Ok(Some(token.to_owned()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "service-token-{name}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        dir.join("nested").join("service-token")
    }

    #[test]
    fn created_once_with_mode_0600_and_never_replaced() -> anyhow::Result<()> {
        let path = scratch("create");
        let first = load_or_create(&path)?;
        assert_eq!(first.len(), LEN);
        assert_eq!(std::fs::read_to_string(&path)?, format!("{first}\n"));
        let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            load_or_create(&path)?,
            first,
            "an existing file is read, not replaced"
        );
        let given = "ab".repeat(32);
        std::fs::write(&path, format!("  {given}\n\n"))?;
        assert_eq!(load_or_create(&path)?, given, "trimmed when read");
        let leftovers = std::fs::read_dir(path.parent().unwrap_or(Path::new(".")))?.count();
        assert_eq!(leftovers, 1, "no temporary file is left behind");
        Ok(())
    }

    #[test]
    fn a_file_that_is_not_a_token_is_refused() -> anyhow::Result<()> {
        let path = scratch("bad");
        std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))?;
        for bad in ["", "short\n", &"AB".repeat(32), &"g".repeat(64)] {
            std::fs::write(&path, bad)?;
            assert!(load_or_create(&path).is_err(), "{bad:?}");
        }
        assert_eq!(load(&scratch("absent"))?, None);
        Ok(())
    }
}
