//! One daemon per database file, whatever path leads to it.
//!
//! Two daemons on one file would spend the API budget twice, and two through different
//! names of one file (a hard link) each keep their own `-wal`, which corrupts it. So the lock
//! is taken twice: an exclusive `flock` on the database file itself (the same inode through
//! every hard link and symlink), and one on `<canonical path>.lock`, which holds our pid for
//! the message a second daemon prints and for operators.
//!
//! `flock` and SQLite's POSIX (`fcntl`) locks do not conflict, but closing any descriptor of
//! a file drops this process's POSIX locks on it: the descriptor is held for the daemon's
//! whole life and closed only after the database is.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another mde-actiond{} is already running on {db}{}; stop it first",
        .pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
        .through.as_ref().map(|t| format!(" (through another name of the same file; it holds {})", t.display())).unwrap_or_default()
    )]
    AlreadyRunning {
        db: PathBuf,
        pid: Option<u32>,
        /// Set when the lock that refused us is the file's own, not `<path>.lock`: the other
        /// daemon reached the file by another path (a hard link).
        through: Option<PathBuf>,
    },
    #[error("cannot lock {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Held while a daemon runs.
#[derive(Debug)]
pub struct InstanceLock {
    _database: File,
    _pid_file: File,
}

impl InstanceLock {
    pub fn acquire(db: &Path) -> Result<Self, LockError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LockError::Io { path, source }
        };
        // An empty file is a new database to SQLite; creating it here lets the lock exist
        // before anything is written.
        crate::store::create_private(db).map_err(io(db))?;
        let database = OpenOptions::new()
            .read(true)
            .write(true)
            .open(db)
            .map_err(io(db))?;
        let canonical = std::fs::canonicalize(db).map_err(io(db))?;
        let mut name = canonical.clone().into_os_string();
        name.push(".lock");
        let pid_path = PathBuf::from(name);
        use std::os::unix::fs::OpenOptionsExt;
        let mut pid_file = OpenOptions::new()
            .mode(0o640)
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&pid_path)
            .map_err(io(&pid_path))?;
        match pid_file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(LockError::AlreadyRunning {
                    db: db.to_path_buf(),
                    pid: read_pid(&mut pid_file),
                    through: None,
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(&pid_path)(e)),
        }
        match database.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(LockError::AlreadyRunning {
                    db: db.to_path_buf(),
                    pid: flock_holder(&database),
                    through: Some(canonical),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(db)(e)),
        }
        let pid = std::process::id();
        let write = |f: &mut File| -> std::io::Result<()> {
            f.set_len(0)?;
            f.rewind()?;
            writeln!(f, "{pid}")
        };
        write(&mut pid_file).map_err(io(&pid_path))?;
        Ok(Self {
            _database: database,
            _pid_file: pid_file,
        })
    }
}

fn read_pid(f: &mut File) -> Option<u32> {
    let mut text = String::new();
    f.rewind().ok()?;
    f.take(32).read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

/// The pid holding a `flock` on this file, from `/proc/locks` (Linux), when it can be told.
fn flock_holder(file: &File) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata().ok()?;
    let dev = meta.dev();
    // Linux's encoding of dev_t; /proc/locks prints major:minor:inode, the first two in hex.
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let key = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let me = std::process::id();
    locks.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // "1: FLOCK  ADVISORY  WRITE 1234 08:01:56789 0 EOF"
        let at = f.iter().position(|w| *w == "FLOCK")?;
        let pid: u32 = f.get(at + 3)?.parse().ok()?;
        (f.get(at + 4) == Some(&key.as_str()) && pid != me).then_some(pid)
    })
}
