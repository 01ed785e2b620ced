//! The systemd notification protocol (`sd_notify`): READY, STATUS, WATCHDOG and STOPPING
//! datagrams to `$NOTIFY_SOCKET`. A few lines over a unix datagram socket; no library needed.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Where notifications go; does nothing when not started by systemd (no `NOTIFY_SOCKET`).
#[derive(Debug)]
pub struct Notifier {
    target: Option<Target>,
    watchdog: Option<Duration>,
}

#[derive(Debug)]
struct Target {
    socket: UnixDatagram,
    address: std::os::unix::net::SocketAddr,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` from the environment.
    pub fn from_env() -> Self {
        Self::from_vars(
            std::env::var("NOTIFY_SOCKET").ok(),
            std::env::var("WATCHDOG_USEC").ok(),
            std::env::var("WATCHDOG_PID").ok(),
        )
    }

    pub fn disabled() -> Self {
        Self {
            target: None,
            watchdog: None,
        }
    }

    fn from_vars(socket: Option<String>, usec: Option<String>, pid: Option<String>) -> Self {
        let target = socket.and_then(|path| match connect(&path) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(path, error = %e, "NOTIFY_SOCKET is set but unusable; not notifying systemd");
                None
            }
        });
        // WATCHDOG_PID names the process meant to ping; a child that inherited it must not.
        let ours = pid.is_none_or(|p| p.trim() == std::process::id().to_string());
        let watchdog = usec
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|u| *u > 0 && ours)
            .map(Duration::from_micros);
        Self { target, watchdog }
    }

    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// The interval systemd expects pings within, if the watchdog is on.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.target.as_ref().and(self.watchdog)
    }

    /// Sends one notification (`KEY=value` lines). Failures are logged, never fatal: the
    /// daemon's job does not depend on systemd hearing about it.
    pub fn notify(&self, state: &str) {
        if let Some(t) = &self.target
            && let Err(e) = t.socket.send_to_addr(state.as_bytes(), &t.address)
        {
            tracing::debug!(error = %e, "sd_notify failed");
        }
    }

    pub fn ready(&self, status: &str) {
        self.notify(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    pub fn status(&self, status: &str) {
        self.notify(&format!("STATUS={}", one_line(status)));
    }

    pub fn watchdog(&self) {
        self.notify("WATCHDOG=1");
    }

    pub fn stopping(&self, status: &str) {
        self.notify(&format!("STOPPING=1\nSTATUS={}", one_line(status)));
    }
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

fn connect(path: &str) -> std::io::Result<Target> {
    let address = if let Some(name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?
    } else {
        std::os::unix::net::SocketAddr::from_pathname(path)?
    };
    let socket = UnixDatagram::unbound()?;
    Ok(Target { socket, address })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_datagrams_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::from_vars(
            Some(path.display().to_string()),
            Some("2000000".into()),
            None,
        );
        assert!(n.is_enabled());
        assert_eq!(n.watchdog_interval(), Some(Duration::from_secs(2)));
        n.ready("active 3\nof 4");
        let mut buf = [0u8; 256];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=active 3 of 4");
    }

    #[test]
    fn abstract_sockets_and_foreign_watchdog_pids() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("mde-actiond-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier::from_vars(
            Some(format!("@{name}")),
            Some("1000".into()),
            Some("1".into()),
        );
        assert_eq!(
            n.watchdog_interval(),
            None,
            "WATCHDOG_PID of another process"
        );
        n.watchdog();
        let mut buf = [0u8; 64];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");
    }

    #[test]
    fn without_systemd_nothing_happens() {
        let n = Notifier::from_vars(None, Some("1000".into()), None);
        assert!(!n.is_enabled());
        assert_eq!(n.watchdog_interval(), None);
        n.ready("x");
    }
}
