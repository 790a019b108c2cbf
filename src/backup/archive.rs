//! The archive itself: a zstd-compressed tar (with zstd's own frame checksum) whose first entry
//! is `manifest.json`, then every file the manifest lists, each checked against its sha256 when
//! read back.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{io, BackupError, FileEntry, Manifest, Step, FORMAT};

const MANIFEST_ENTRY: &str = "manifest.json";
/// zstd's level: fast, and still a fraction of the size of the JSON-heavy databases.
const LEVEL: i32 = 3;

/// Counts bytes on their way to the file, for the progress display.
struct Counting<'a, W> {
    inner: W,
    written: u64,
    progress: &'a mut dyn FnMut(Step),
}

impl<W: Write> Write for Counting<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        let before = self.written >> 22;
        self.written += n as u64;
        if self.written >> 22 != before {
            (self.progress)(Step::Written(self.written));
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the archive of `staged` files to `target`: under a temporary name, synced, then
/// renamed, so `target` is either absent or complete. The file is private to its owner (it
/// holds tokens and plugin secrets).
pub(super) fn write(
    staged: &Path,
    manifest: &Manifest,
    target: &Path,
    progress: &mut dyn FnMut(Step),
) -> Result<(), BackupError> {
    use std::os::unix::fs::OpenOptionsExt;
    let partial = partial_name(target);
    let context = format!("cannot write {}", partial.display());
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)
        .map_err(io(context.clone()))?;
    let result = (|| {
        let counting = Counting {
            inner: std::io::BufWriter::new(file),
            written: 0,
            progress,
        };
        let mut encoder = zstd::Encoder::new(counting, LEVEL)?;
        encoder.include_checksum(true)?;
        let mut tar = tar::Builder::new(encoder);
        // Plain entries only: a state file with holes is stored whole, so any tar reads it.
        tar.sparse(false);
        let manifest_json = serde_json::to_vec_pretty(manifest).map_err(std::io::Error::other)?;
        let mut header = tar::Header::new_gnu();
        header.set_size(manifest_json.len() as u64);
        header.set_mode(0o600);
        header.set_mtime(chrono::Utc::now().timestamp().max(0) as u64);
        header.set_cksum();
        tar.append_data(&mut header, MANIFEST_ENTRY, manifest_json.as_slice())?;
        for entry in &manifest.files {
            let mut file = std::fs::File::open(staged.join(&entry.path))?;
            tar.append_file(&entry.path, &mut file)?;
        }
        let counting = tar.into_inner()?.finish()?;
        let file = counting.inner.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&partial);
        return Err(io(context)(e));
    }
    std::fs::rename(&partial, target).map_err(io(format!(
        "cannot rename {} to {}",
        partial.display(),
        target.display()
    )))?;
    if let Some(dir) = target.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(dir) = std::fs::File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

fn partial_name(target: &Path) -> PathBuf {
    let mut name = target.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

/// Reads an archive through: the manifest, then every file, each checked against its size and
/// sha256; nothing unlisted, nothing missing. `extract` (if given) receives each checked file's
/// path inside the archive and where it was written.
pub(super) fn read(
    archive: &Path,
    mut extract_into: Option<&Path>,
) -> Result<Manifest, BackupError> {
    let corrupt = |detail: String| BackupError::Corrupt {
        archive: archive.to_owned(),
        detail,
    };
    let file =
        std::fs::File::open(archive).map_err(io(format!("cannot open {}", archive.display())))?;
    let decoder = zstd::Decoder::new(file).map_err(|e| corrupt(e.to_string()))?;
    let mut tar = tar::Archive::new(decoder);
    let mut entries = tar.entries().map_err(|e| corrupt(e.to_string()))?;

    let mut first = entries
        .next()
        .ok_or_else(|| corrupt("it is empty".into()))?
        .map_err(|e| corrupt(e.to_string()))?;
    let first_path = entry_path(&first).map_err(&corrupt)?;
    if first_path != MANIFEST_ENTRY {
        return Err(corrupt(format!(
            "its first entry is {first_path:?}, not {MANIFEST_ENTRY}"
        )));
    }
    let mut text = Vec::new();
    (&mut first)
        .take(16 << 20)
        .read_to_end(&mut text)
        .map_err(|e| corrupt(e.to_string()))?;
    let manifest: Manifest =
        serde_json::from_slice(&text).map_err(|e| corrupt(format!("unreadable manifest: {e}")))?;
    if manifest.format != FORMAT {
        return Err(corrupt(format!(
            "archive format {} (this build reads format {FORMAT})",
            manifest.format
        )));
    }
    let mut seen: Vec<&FileEntry> = Vec::new();
    for entry in entries.by_ref() {
        let mut entry = entry.map_err(|e| corrupt(e.to_string()))?;
        let path = entry_path(&entry).map_err(&corrupt)?;
        let listed = manifest
            .files
            .iter()
            .find(|f| f.path == path)
            .ok_or_else(|| corrupt(format!("{path:?} is not in its manifest")))?;
        if seen.iter().any(|f| f.path == path) {
            return Err(corrupt(format!("{path:?} appears twice")));
        }
        let mut out = match extract_into.as_mut() {
            Some(dir) => {
                let target = dir.join(&path);
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(io(format!("cannot create {}", parent.display())))?;
                }
                Some(
                    std::fs::File::create(&target)
                        .map_err(io(format!("cannot write {}", target.display())))?,
                )
            }
            None => None,
        };
        // Never more than the manifest promised, whatever the header claims.
        let mut limited = (&mut entry).take(listed.bytes.saturating_add(1));
        let (bytes, sha256) = checksum(&mut limited, out.as_mut()).map_err(|e| match e {
            ReadFailure::Archive(e) => corrupt(format!("{path}: {e}")),
            ReadFailure::Output(e) => io(format!("cannot write {path}"))(e),
        })?;
        if let Some(out) = out {
            out.sync_all().map_err(io(format!("cannot write {path}")))?;
        }
        if bytes != listed.bytes || sha256 != listed.sha256 {
            return Err(corrupt(format!(
                "{path} does not match its checksum ({bytes} bytes, sha256 {sha256}; the manifest says {} bytes, {})",
                listed.bytes, listed.sha256
            )));
        }
        seen.push(listed);
    }
    // Reading to the end checks zstd's frame checksum too.
    std::io::copy(&mut tar.into_inner(), &mut std::io::sink())
        .map_err(|e| corrupt(format!("after its last file: {e}")))?;
    if let Some(missing) = manifest
        .files
        .iter()
        .find(|f| !seen.iter().any(|s| s.path == f.path))
    {
        return Err(corrupt(format!("{} is missing", missing.path)));
    }
    Ok(manifest)
}

/// Checks an archive from end to end without writing anything; returns its manifest.
pub fn verify(archive: &Path) -> Result<Manifest, BackupError> {
    read(archive, None)
}

/// A relative path inside the archive, refusing anything that could climb out of a directory.
fn entry_path<R: Read>(entry: &tar::Entry<R>) -> Result<String, String> {
    let path = entry.path().map_err(|e| e.to_string())?;
    let text = path.to_string_lossy().into_owned();
    let safe = path
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)));
    if !safe || text.is_empty() {
        return Err(format!("unsafe path {text:?} in the archive"));
    }
    if !matches!(entry.header().entry_type(), tar::EntryType::Regular) {
        return Err(format!("{text:?} is not a regular file"));
    }
    Ok(text)
}

enum ReadFailure {
    Archive(std::io::Error),
    Output(std::io::Error),
}

fn checksum(
    from: &mut impl Read,
    mut out: Option<&mut std::fs::File>,
) -> Result<(u64, String), ReadFailure> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut bytes = 0u64;
    loop {
        let n = from.read(&mut buf).map_err(ReadFailure::Archive)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
        if let Some(out) = out.as_mut() {
            out.write_all(&buf[..n]).map_err(ReadFailure::Output)?;
        }
    }
    Ok((bytes, format!("{:x}", hasher.finalize())))
}
