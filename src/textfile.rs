//! Small text files an operator names (configuration, secrets, keys): read only when they
//! are regular files of a sane size. A FIFO, a device or `/dev/zero` given by mistake gets an
//! error instead of a wait forever or unbounded memory.

use std::io::Read;
use std::path::Path;

/// Larger than any configuration, secret, certificate or token file.
pub const MAX_TEXT_FILE: u64 = 1024 * 1024;

pub fn read(path: &Path) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        let kind = if meta.is_dir() {
            "a directory"
        } else {
            "not a regular file (a FIFO, socket or device?)"
        };
        return Err(format!("{kind}; give the path of a file"));
    }
    // The size is checked on what is read, not only on the metadata: the file can grow.
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(|e| e.to_string())?
        .take(MAX_TEXT_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX_TEXT_FILE {
        return Err(format!("larger than {} KiB", MAX_TEXT_FILE / 1024));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_is_not_a_small_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read(dir.path()).unwrap_err().contains("directory"));
        assert!(
            read(Path::new("/dev/zero"))
                .unwrap_err()
                .contains("not a regular file")
        );
        let big = dir.path().join("big");
        std::fs::write(&big, vec![b'a'; MAX_TEXT_FILE as usize + 1]).unwrap();
        assert!(read(&big).unwrap_err().contains("larger than"));
        let ok = dir.path().join("ok");
        std::fs::write(&ok, "x = 1\n").unwrap();
        assert_eq!(read(&ok).unwrap(), "x = 1\n");
    }
}
