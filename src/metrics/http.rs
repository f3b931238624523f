//! The `/metrics` and `/healthz` responder: a minimal HTTP/1.1 server on one thread of its
//! own (one request head of at most 8 KiB, `GET`/`HEAD`, `Connection: close`).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::{Listen, Metrics, MetricsConfig};

/// A listening socket of either kind.
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    fn fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        }
    }
}

/// Binds `listen`. A unix socket path that exists is taken over only when it is a stale
/// socket (nobody accepts on it); a live one is "in use", anything else is refused.
fn bind(listen: &Listen) -> std::io::Result<Listener> {
    match listen {
        Listen::Tcp(a) => TcpListener::bind(a).map(Listener::Tcp),
        Listen::Unix(p) => {
            use std::os::unix::fs::FileTypeExt;
            if let Ok(m) = std::fs::symlink_metadata(p) {
                if !m.file_type().is_socket() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::AlreadyExists,
                        "the path exists and is not a socket",
                    ));
                }
                if UnixStream::connect(p).is_ok() {
                    return Err(std::io::Error::from(std::io::ErrorKind::AddrInUse));
                }
                std::fs::remove_file(p)?;
            }
            UnixListener::bind(p).map(|l| Listener::Unix(l, p.clone()))
        }
    }
}

/// The HTTP server: a thread accepting on the listener until [`Server::stop`].
pub struct Server {
    listen: Listen,
    fd: RawFd,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Binds `cfg.listen` and starts serving `metrics`. The error names the configuration
    /// file, the line and the value.
    pub fn start(
        config: &Path,
        cfg: &MetricsConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Server, String> {
        let l = bind(&cfg.listen).map_err(|e| {
            format!(
                "{}:{}: metrics.listen: cannot listen on \"{}\": {e}",
                config.display(),
                cfg.line,
                cfg.listen
            )
        })?;
        let fd = l.fd();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("masqd-metrics".into())
            .spawn(move || serve(l, &metrics, &stop2))
            .map_err(|e| format!("starting the metrics thread: {e}"))?;
        tracing::info!("serving /metrics and /healthz on {}", cfg.listen);
        Ok(Server {
            listen: cfg.listen.clone(),
            fd,
            stop,
            thread: Some(thread),
        })
    }

    /// Where it listens.
    pub fn listen(&self) -> &Listen {
        &self.listen
    }

    /// Stops accepting (`shutdown(2)` wakes the blocked `accept`), waits for the thread, and
    /// removes a unix socket.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        let Some(t) = self.thread.take() else { return };
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // SAFETY: the fd belongs to the listener the thread owns until it is joined below.
        unsafe {
            libc::shutdown(self.fd, libc::SHUT_RDWR);
        }
        let _ = t.join();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.halt();
    }
}

fn serve(l: Listener, metrics: &Metrics, stop: &std::sync::atomic::AtomicBool) {
    loop {
        let conn: std::io::Result<Box<dyn ReadWrite>> = match &l {
            Listener::Tcp(t) => t.accept().map(|(s, _)| {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
                Box::new(s) as Box<dyn ReadWrite>
            }),
            Listener::Unix(u, _) => u.accept().map(|(s, _)| {
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
                Box::new(s) as Box<dyn ReadWrite>
            }),
        };
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            break;
        }
        match conn {
            Ok(mut s) => handle(&mut *s, metrics),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!("metrics: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    if let Listener::Unix(_, p) = &l {
        let _ = std::fs::remove_file(p);
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// Reads one request head and answers it.
fn handle(s: &mut dyn ReadWrite, metrics: &Metrics) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let (status, ctype, body, head_only) = respond(&head, metrics);
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    let _ = s.write_all(&out);
}

pub(super) const TEXT: &str = "text/plain; charset=utf-8";
pub(super) const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub(super) const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The Prometheus text format (0.0.4) of an OpenMetrics exposition: a counter's HELP and TYPE
/// name its `_total` samples, and there is no `# EOF` (what `promtool check metrics` and
/// clients that do not ask for OpenMetrics read).
pub fn prometheus_text(openmetrics: &str) -> String {
    let mut counters = BTreeSet::new();
    for l in openmetrics.lines() {
        if let Some(name) = l
            .strip_prefix("# TYPE ")
            .and_then(|r| r.strip_suffix(" counter"))
        {
            counters.insert(name.to_string());
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for l in openmetrics.lines() {
        if l == "# EOF" || l.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| l.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((p, rest)) => {
                let name = rest.split(' ').next().unwrap_or_default();
                if counters.contains(name) {
                    out.push_str(&format!("{p}{name}_total{}", &rest[name.len()..]));
                } else {
                    out.push_str(l);
                }
            }
            None => out.push_str(l),
        }
        out.push('\n');
    }
    out
}

/// Status line, content type, body, and whether to send the head only.
pub(super) fn respond(
    head: &[u8],
    metrics: &Metrics,
) -> (&'static str, &'static str, String, bool) {
    let text = String::from_utf8_lossy(head);
    let mut words = text.lines().next().unwrap_or_default().split_whitespace();
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or_default();
    let openmetrics = text.lines().any(|l| {
        l.split_once(':').is_some_and(|(k, v)| {
            k.eq_ignore_ascii_case("accept") && v.contains("application/openmetrics-text")
        })
    });
    let head_only = method == "HEAD";
    if method != "GET" && !head_only {
        let body = "only GET and HEAD\n".to_string();
        return ("405 Method Not Allowed", TEXT, body, false);
    }
    match path {
        "/metrics" if openmetrics => ("200 OK", OPENMETRICS, metrics.render(), head_only),
        "/metrics" => (
            "200 OK",
            PROMETHEUS_TEXT,
            prometheus_text(&metrics.render()),
            head_only,
        ),
        "/healthz" => match metrics.health() {
            Ok(()) => ("200 OK", TEXT, "ok\n".into(), head_only),
            Err(why) => (
                "503 Service Unavailable",
                TEXT,
                format!("{}\n", crate::systemd::one_line(&why)),
                head_only,
            ),
        },
        _ => (
            "404 Not Found",
            TEXT,
            "masqd serves /metrics and /healthz\n".into(),
            head_only,
        ),
    }
}
