//! Audit events: one JSON object per DNS answer, connection decision, HTTP request and secret
//! substitution. They go to an optional JSON-lines file and to any API subscriber.
//!
//! Events carry names, never secret values: a substitution records the secret's name only, and
//! an HTTP request records the path as the guest sent it (placeholders, not values).

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::broadcast;

/// One audited fact.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// The guest asked Airlock's DNS server something.
    Dns {
        /// Queried name (lowercase, no trailing dot).
        name: String,
        /// Record type asked for (`A`, `AAAA`, `TXT`, ...).
        qtype: String,
        /// Address given, if any.
        #[serde(skip_serializing_if = "Option::is_none")]
        answer: Option<String>,
        /// Whether the name is allowed.
        allowed: bool,
    },
    /// The guest opened (or tried to open) a connection or sent a datagram.
    Connection {
        /// `tcp`, `udp` or `icmp`.
        proto: String,
        /// Destination address as the guest saw it.
        dst: String,
        /// Destination port (0 for ICMP).
        port: u16,
        /// The name behind the address, when Airlock's DNS handed it out.
        #[serde(skip_serializing_if = "Option::is_none")]
        host: Option<String>,
        /// Upstream address actually dialled.
        #[serde(skip_serializing_if = "Option::is_none")]
        upstream: Option<String>,
        /// Whether it was let through.
        allowed: bool,
        /// The allow rule that matched.
        #[serde(skip_serializing_if = "Option::is_none")]
        rule: Option<String>,
        /// Why it was blocked (or failed).
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A TLS connection was checked (SNI against the name behind the address).
    Tls {
        /// Name behind the address.
        #[serde(skip_serializing_if = "Option::is_none")]
        host: Option<String>,
        /// Server name the guest's client hello asked for.
        #[serde(skip_serializing_if = "Option::is_none")]
        sni: Option<String>,
        /// `passthrough`, `mitm` or `blocked`.
        mode: String,
        /// Why it was blocked.
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// An HTTP request seen by the proxy (plain HTTP or terminated TLS).
    Http {
        /// Request method.
        method: String,
        /// Host the request went (or would have gone) to.
        host: String,
        /// Path and query as the guest sent them (placeholders, never values).
        path: String,
        /// Response status (403 when Airlock blocked it).
        status: u16,
        /// Response body bytes passed to the guest.
        bytes: u64,
        /// Why Airlock blocked it.
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// A placeholder was replaced by a secret's value (the name only).
    Substitution {
        /// Secret name.
        secret: String,
        /// Host it was sent to.
        host: String,
        /// Where: `header`, `url`, `body`.
        location: String,
    },
    /// The allow list changed at run time.
    Policy {
        /// `allow` or `remove`.
        action: String,
        /// The rule.
        rule: String,
    },
    /// Events left out of the audit file because the guest produced them faster than
    /// [`FILE_RATE`] per second (subscribers still received them, as far as they kept up).
    Suppressed {
        /// How many.
        count: u64,
    },
}

/// Sustained events per second written to the audit file; bursts up to [`FILE_BURST`]. A guest
/// can make requests as fast as it likes; the file must not grow as fast.
pub const FILE_RATE: u32 = 200;
/// Burst allowance of the audit file.
pub const FILE_BURST: u32 = 2000;

/// A timestamped event as written to the audit file.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// Milliseconds since the Unix epoch.
    pub ts_ms: u64,
    /// The event.
    #[serde(flatten)]
    pub event: Event,
}

/// Where events go. Cheap to clone; all clones feed the same file and subscribers.
#[derive(Clone)]
pub struct Audit {
    inner: Arc<Inner>,
}

struct Inner {
    file: Option<Mutex<FileSink>>,
    tx: broadcast::Sender<Record>,
}

/// The audit file behind a token bucket.
struct FileSink {
    file: std::fs::File,
    tokens: f64,
    last: std::time::Instant,
    suppressed: u64,
}

impl FileSink {
    fn write(&mut self, rec: &Record) {
        let now = std::time::Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * f64::from(FILE_RATE);
        self.tokens = (self.tokens + refill).min(f64::from(FILE_BURST));
        self.last = now;
        if self.tokens < 1.0 {
            self.suppressed += 1;
            return;
        }
        self.tokens -= 1.0;
        if self.suppressed > 0 {
            let note = Record {
                ts_ms: rec.ts_ms,
                event: Event::Suppressed {
                    count: std::mem::take(&mut self.suppressed),
                },
            };
            self.line(&note);
        }
        self.line(rec);
    }

    fn line(&mut self, rec: &Record) {
        if let Ok(mut line) = serde_json::to_vec(rec) {
            line.push(b'\n');
            // One write per line so concurrent writers never interleave within a line.
            let _ = self.file.write_all(&line);
        }
    }
}

impl Drop for FileSink {
    fn drop(&mut self) {
        if self.suppressed > 0 {
            let ts_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as u64;
            let count = self.suppressed;
            self.line(&Record {
                ts_ms,
                event: Event::Suppressed { count },
            });
        }
    }
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit")
            .field("file", &self.inner.file.is_some())
            .finish()
    }
}

impl Default for Audit {
    fn default() -> Self {
        Audit::new(None).expect("no file to open")
    }
}

impl Audit {
    /// Events go to subscribers and, with `file`, appended to it as JSON lines (mode 0600).
    pub fn new(file: Option<&Path>) -> std::io::Result<Audit> {
        let file = match file {
            Some(p) => {
                use std::os::unix::fs::OpenOptionsExt;
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(p)
                    .map_err(|e| {
                        std::io::Error::new(
                            e.kind(),
                            format!("cannot open audit log {}: {e}", p.display()),
                        )
                    })?;
                Some(Mutex::new(FileSink {
                    file: f,
                    tokens: f64::from(FILE_BURST),
                    last: std::time::Instant::now(),
                    suppressed: 0,
                }))
            }
            None => None,
        };
        // Lagging subscribers lose old events rather than slowing the network down.
        let (tx, _) = broadcast::channel(4096);
        Ok(Audit {
            inner: Arc::new(Inner { file, tx }),
        })
    }

    /// Records an event.
    pub fn record(&self, event: Event) {
        let ts_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let rec = Record { ts_ms, event };
        tracing::debug!(event = ?rec.event, "audit");
        if let Some(f) = &self.inner.file {
            f.lock().unwrap().write(&rec);
        }
        let _ = self.inner.tx.send(rec);
    }

    /// A stream of events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Record> {
        self.inner.tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.jsonl");
        let a = Audit::new(Some(&p)).unwrap();
        let mut rx = a.subscribe();
        a.record(Event::Substitution {
            secret: "KEY".into(),
            host: "api.example.com".into(),
            location: "header".into(),
        });
        let text = std::fs::read_to_string(&p).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["type"], "substitution");
        assert_eq!(v["secret"], "KEY");
        assert!(v["ts_ms"].as_u64().unwrap() > 0);
        assert!(matches!(
            rx.try_recv().unwrap().event,
            Event::Substitution { .. }
        ));
    }

    #[test]
    fn a_flood_is_capped_in_the_file_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.jsonl");
        let a = Audit::new(Some(&p)).unwrap();
        let n = FILE_BURST as u64 * 3;
        for i in 0..n {
            a.record(Event::Dns {
                name: format!("n{i}.exfil.test"),
                qtype: "A".into(),
                answer: None,
                allowed: false,
            });
        }
        drop(a);
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let written = lines.iter().filter(|v| v["type"] == "dns").count() as u64;
        let suppressed: u64 = lines
            .iter()
            .filter(|v| v["type"] == "suppressed")
            .map(|v| v["count"].as_u64().unwrap())
            .sum();
        // The burst and whatever refilled while the loop ran, never the whole flood.
        assert!(written >= FILE_BURST as u64 && written < n, "{written}");
        assert_eq!(written + suppressed, n);
    }
}
