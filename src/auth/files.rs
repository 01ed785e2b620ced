//! Reading secret and key files, refusing ones that others can read.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// Refuses a file that users other than the daemon can read, with the command that fixes it.
///
/// Group-readable is accepted in one case: a Kubernetes secret volume (its directory holds
/// the `..data` link of the kubelet's atomic writer) whose group is this process's own, the
/// usual `fsGroup` arrangement, since nothing else runs in the pod's group.
pub fn check_private(path: &Path, key: &str) -> Result<(), String> {
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("{key}: cannot read {}: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    let fix = format!(
        "run: chmod 600 {} (and chown it to the daemon's user)",
        path.display()
    );
    if mode & 0o004 != 0 {
        return Err(format!(
            "{key}: {} is readable by other users (mode {mode:03o}); {fix}",
            path.display()
        ));
    }
    if mode & 0o040 != 0 {
        let kubernetes_volume = path.parent().is_some_and(|dir| dir.join("..data").exists());
        if !(kubernetes_volume && Some(meta.gid()) == effective_gid()) {
            return Err(format!(
                "{key}: {} is readable by its group (mode {mode:03o}); {fix}",
                path.display()
            ));
        }
    }
    Ok(())
}

/// Reads a secret file after `check_private`; trailing newlines are not part of the secret.
pub fn read_private(path: &Path, key: &str) -> Result<String, String> {
    check_private(path, key)?;
    let text = crate::textfile::read(path).map_err(|e| {
        let who = if e.contains("ermission denied") {
            permission_hint(path)
        } else {
            String::new()
        };
        format!("{key}: cannot read {}: {e}{who}", path.display())
    })?;
    let value = text.trim_end_matches(['\r', '\n']);
    if value.trim().is_empty() {
        return Err(format!("{key}: {} is empty", path.display()));
    }
    Ok(value.to_string())
}

/// Who needs access, and the usual ways to give it: a container's uid (65532 in our image)
/// rarely owns a file bind-mounted from the host.
fn permission_hint(path: &Path) -> String {
    let Some(uid) = effective_id("Uid:") else {
        return String::new();
    };
    let p = path.display();
    format!(
        "; this process runs as uid {uid}, which needs read access: chown {uid} {p} (rootless podman: podman unshare chown {uid}:{uid} {p}), or pass it as a podman/docker secret, or on Kubernetes set fsGroup"
    )
}

/// This process's effective group id, from /proc (no libc call needed).
fn effective_gid() -> Option<u32> {
    effective_id("Gid:")
}

/// The effective id on a `Uid:`/`Gid:` line of /proc/self/status (real, effective, ...).
fn effective_id(field: &str) -> Option<u32> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with_mode(dir: &Path, name: &str, mode: u32) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, "s3cret\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn refuses_files_others_can_read_and_says_how_to_fix() {
        let dir = tempfile::tempdir().unwrap();
        let open = file_with_mode(dir.path(), "open", 0o644);
        let err = read_private(&open, "auth.client_secret_file").unwrap_err();
        assert!(
            err.contains("readable by other users") && err.contains("chmod 600"),
            "{err}"
        );
        let group = file_with_mode(dir.path(), "group", 0o640);
        assert!(
            read_private(&group, "k")
                .unwrap_err()
                .contains("by its group")
        );
        let private = file_with_mode(dir.path(), "private", 0o600);
        assert_eq!(read_private(&private, "k").unwrap(), "s3cret");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        std::fs::set_permissions(&empty, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(read_private(&empty, "k").unwrap_err().contains("empty"));
    }

    #[test]
    fn kubernetes_secret_volumes_may_be_group_readable_by_our_group() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(dir.path(), dir.path().join("..data")).unwrap();
        let f = file_with_mode(dir.path(), "client-secret", 0o440);
        // Our own group owns files we create.
        assert_eq!(read_private(&f, "k").unwrap(), "s3cret");
    }
}
