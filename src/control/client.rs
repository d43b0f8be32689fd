//! A minimal QMP client: what `colo-blk ctl` and the tests use.

use super::framing::{Frame, Framer};
use super::ControlError;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// A negotiated QMP connection.
pub struct QmpClient {
    stream: UnixStream,
    framer: Framer,
    pending: Vec<Frame>,
    events: Vec<Value>,
    next_id: u64,
}

impl QmpClient {
    /// Connects, reads the greeting and negotiates capabilities.
    pub fn connect(path: &Path, timeout: Option<Duration>) -> Result<Self, ControlError> {
        let stream =
            UnixStream::connect(path).map_err(|e| ControlError::Connect(path.to_owned(), e))?;
        stream.set_read_timeout(timeout)?;
        let mut c = QmpClient {
            stream,
            framer: Framer::new(16 << 20),
            pending: Vec::new(),
            events: Vec::new(),
            next_id: 1,
        };
        let greeting = c.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(ControlError::Protocol(format!(
                "expected a QMP greeting, got {greeting}"
            )));
        }
        c.execute("qmp_capabilities", json!({}))?;
        Ok(c)
    }

    /// Runs `cmd` and returns its `return` value; a QMP error becomes
    /// [`ControlError::Command`]. Events that arrive meanwhile are kept.
    pub fn execute(&mut self, cmd: &str, args: Value) -> Result<Value, ControlError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"execute": cmd, "id": id});
        if args.as_object().is_some_and(|a| !a.is_empty()) {
            msg["arguments"] = args;
        }
        // One write: a server may close right after reading the object (quit),
        // and a separate newline write would then fail with EPIPE.
        let mut line = msg.to_string().into_bytes();
        line.push(b'\n');
        self.stream.write_all(&line)?;
        loop {
            let reply = self.read_message()?;
            if reply.get("event").is_some() {
                self.events.push(reply);
                continue;
            }
            if reply.get("id") != Some(&json!(id)) {
                return Err(ControlError::Protocol(format!("unexpected reply {reply}")));
            }
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            let desc = reply["error"]["desc"]
                .as_str()
                .unwrap_or("error without description");
            return Err(ControlError::Command(desc.to_owned()));
        }
    }

    /// Events received so far, oldest first; the list is emptied.
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    fn read_message(&mut self) -> Result<Value, ControlError> {
        let mut buf = [0u8; 4096];
        loop {
            if !self.pending.is_empty() {
                return match self.pending.remove(0) {
                    Frame::Json(text) => serde_json::from_slice(&text)
                        .map_err(|e| ControlError::Protocol(format!("bad JSON from server: {e}"))),
                    Frame::Garbage(g) => Err(ControlError::Protocol(format!(
                        "garbage from server: {}",
                        String::from_utf8_lossy(&g)
                    ))),
                };
            }
            let n = self.stream.read(&mut buf)?;
            if n == 0 {
                return Err(ControlError::Protocol(
                    "server closed the connection".into(),
                ));
            }
            self.framer.push(&buf[..n], &mut self.pending);
        }
    }
}
