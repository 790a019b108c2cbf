//! Plugin archives: a `.tar.gz` or `.zip` holding `plugin.json` and its component, at the top or
//! in one folder (as GitHub's source archives have it). Read into memory with limits, so a hostile
//! archive (a bomb, thousands of entries, paths out of the archive) is refused, not unpacked.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use super::PluginError;

/// Largest total of the files an archive may unpack to.
const MAX_UNPACKED_BYTES: u64 = 256 << 20;
const MAX_ENTRIES: usize = 10_000;

/// The regular files of an archive, by path inside it.
pub type Files = BTreeMap<PathBuf, Vec<u8>>;

fn refuse(path: &Path, why: impl std::fmt::Display) -> PluginError {
    PluginError::InvalidArchive(format!("{}: {why}", path.display()))
}

/// True for a path that stays inside the archive.
fn contained(path: &Path) -> bool {
    path.components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// Unpacks an archive (recognised by its first bytes) into memory; `path` names it in errors.
pub fn read(path: &Path, bytes: &[u8]) -> Result<Files, PluginError> {
    match bytes.get(..4) {
        Some([0x1f, 0x8b, ..]) => read_tar_gz(path, bytes),
        Some(b"PK\x03\x04") => read_zip(path, bytes),
        _ => Err(refuse(path, "not a plugin folder, .tar.gz or .zip archive")),
    }
}

fn read_tar_gz(path: &Path, bytes: &[u8]) -> Result<Files, PluginError> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(bytes));
    let mut files = Files::new();
    let mut total = 0u64;
    for entry in archive.entries().map_err(|e| refuse(path, e))? {
        let mut entry = entry.map_err(|e| refuse(path, e))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry.path().map_err(|e| refuse(path, e))?.into_owned();
        let data = take(path, &name, &mut entry, &mut total)?;
        insert(path, &mut files, name, data)?;
    }
    Ok(files)
}

fn read_zip(path: &Path, bytes: &[u8]) -> Result<Files, PluginError> {
    let mut archive =
        zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| refuse(path, e))?;
    if archive.len() > MAX_ENTRIES {
        return Err(refuse(path, format!("more than {MAX_ENTRIES} entries")));
    }
    let mut files = Files::new();
    let mut total = 0u64;
    for index in 0..archive.len() {
        let mut entry = archive.by_index(index).map_err(|e| refuse(path, e))?;
        if entry.is_dir() {
            continue;
        }
        let name = entry
            .enclosed_name()
            .ok_or_else(|| refuse(path, "an entry's path leaves the archive"))?;
        let data = take(path, &name, &mut entry, &mut total)?;
        insert(path, &mut files, name, data)?;
    }
    Ok(files)
}

/// Reads one entry, counting it against the archive's limit.
fn take(
    path: &Path,
    name: &Path,
    entry: &mut impl Read,
    total: &mut u64,
) -> Result<Vec<u8>, PluginError> {
    let mut data = Vec::new();
    let room = MAX_UNPACKED_BYTES - *total;
    entry
        .take(room + 1)
        .read_to_end(&mut data)
        .map_err(|e| refuse(path, format!("{}: {e}", name.display())))?;
    *total += data.len() as u64;
    if *total > MAX_UNPACKED_BYTES {
        return Err(refuse(
            path,
            format!("unpacks to more than {} MiB", MAX_UNPACKED_BYTES >> 20),
        ));
    }
    Ok(data)
}

fn insert(path: &Path, files: &mut Files, name: PathBuf, data: Vec<u8>) -> Result<(), PluginError> {
    if !contained(&name) {
        return Err(refuse(
            path,
            format!("the entry {} leaves the archive", name.display()),
        ));
    }
    if files.len() >= MAX_ENTRIES {
        return Err(refuse(path, format!("more than {MAX_ENTRIES} entries")));
    }
    files.insert(name, data);
    Ok(())
}

/// `plugin.json`'s folder inside the archive: the top, or the one folder holding it.
pub fn manifest_folder(path: &Path, files: &Files) -> Result<PathBuf, PluginError> {
    files
        .keys()
        .filter(|p| p.file_name().is_some_and(|n| n == "plugin.json"))
        .filter(|p| p.components().count() <= 2)
        .min_by_key(|p| p.components().count())
        .map(|p| p.parent().map(Path::to_path_buf).unwrap_or_default())
        .ok_or_else(|| {
            refuse(
                path,
                "no plugin.json at the top of the archive or in its folder",
            )
        })
}
