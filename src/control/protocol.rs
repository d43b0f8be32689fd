//! QMP commands: parses one JSON message, runs it against the replication node,
//! builds the reply. No I/O here, so every reply shape is unit-tested.

use crate::replication::{Event, Mode, Progress, Replication, Status, SyncMode};
use serde_json::{json, Map, Value};
use std::time::{SystemTime, UNIX_EPOCH};

/// The commands this server knows, for `query-commands`.
pub const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-commands",
    "query-version",
    "query-replication",
    "replication-start",
    "replication-checkpoint",
    "replication-stop",
    "replication-get-error",
    "quit",
];

/// The greeting sent when a client connects.
pub fn greeting() -> Value {
    json!({
        "QMP": {
            "version": version(),
            "capabilities": []
        }
    })
}

fn version() -> Value {
    let mut parts = env!("CARGO_PKG_VERSION")
        .split('.')
        .map(|p| p.parse::<u64>().unwrap_or(0));
    json!({
        "qemu": {
            "major": parts.next().unwrap_or(0),
            "minor": parts.next().unwrap_or(0),
            "micro": parts.next().unwrap_or(0)
        },
        "package": concat!("colo-blk ", env!("CARGO_PKG_VERSION"))
    })
}

/// Per-connection protocol state.
#[derive(Debug, Default)]
pub struct Session {
    negotiated: bool,
}

/// What the connection should do after sending the reply.
#[derive(Debug, PartialEq, Eq)]
pub enum After {
    /// Keep reading commands.
    Continue,
    /// The client asked the daemon to exit (`quit`).
    Quit,
}

/// Builds an error reply in QMP's shape.
pub fn error_reply(desc: impl Into<String>, id: Option<&Value>) -> Value {
    with_id(
        json!({"error": {"class": "GenericError", "desc": desc.into()}}),
        id,
    )
}

fn with_id(mut reply: Value, id: Option<&Value>) -> Value {
    if let (Some(id), Some(obj)) = (id, reply.as_object_mut()) {
        obj.insert("id".into(), id.clone());
    }
    reply
}

impl Session {
    /// Handles one framed JSON text and returns the reply to send.
    pub fn handle(&mut self, text: &[u8], repl: Option<&dyn Replication>) -> (Value, After) {
        let msg: Value = match serde_json::from_slice(text) {
            Ok(v) => v,
            Err(e) => {
                return (
                    error_reply(format!("JSON parse error, {e}"), None),
                    After::Continue,
                )
            }
        };
        let Some(obj) = msg.as_object() else {
            return (
                error_reply("QMP input must be a JSON object", None),
                After::Continue,
            );
        };
        let id = obj.get("id");
        let Some(cmd) = obj.get("execute").and_then(Value::as_str) else {
            return (
                error_reply("QMP input lacks member 'execute'", id),
                After::Continue,
            );
        };
        let empty = Map::new();
        let args = match obj.get("arguments") {
            None => &empty,
            Some(Value::Object(a)) => a,
            Some(_) => {
                return (
                    error_reply("QMP input member 'arguments' must be an object", id),
                    After::Continue,
                )
            }
        };
        if !self.negotiated && cmd != "qmp_capabilities" {
            return (
                error_reply(
                    "Expecting capabilities negotiation with 'qmp_capabilities'",
                    id,
                ),
                After::Continue,
            );
        }
        let (result, after) = match self.run(cmd, args, repl) {
            Ok((value, after)) => (with_id(json!({ "return": value }), id), after),
            Err(desc) => (error_reply(desc, id), After::Continue),
        };
        (result, after)
    }

    fn run(
        &mut self,
        cmd: &str,
        args: &Map<String, Value>,
        repl: Option<&dyn Replication>,
    ) -> Result<(Value, After), String> {
        let ok = |v: Value| Ok((v, After::Continue));
        match cmd {
            "qmp_capabilities" => {
                if self.negotiated {
                    return Err(
                        "Capabilities negotiation is already complete, command ignored".into(),
                    );
                }
                if let Some(enable) = args.get("enable").and_then(Value::as_array) {
                    if let Some(cap) = enable.first() {
                        return Err(format!("Capability '{}' not available", str_of(cap)));
                    }
                }
                self.negotiated = true;
                ok(json!({}))
            }
            "query-commands" => ok(Value::Array(
                COMMANDS.iter().map(|c| json!({ "name": c })).collect(),
            )),
            "query-version" => ok(version()),
            "quit" => Ok((json!({}), After::Quit)),
            "query-replication" => ok(status_json(&need(repl)?.status())),
            "replication-start" => {
                let repl = need(repl)?;
                let mode = match args.get("mode").and_then(Value::as_str) {
                    Some("primary") => Mode::Primary,
                    Some("secondary") => Mode::Secondary,
                    Some(other) => {
                        return Err(format!("Parameter 'mode' does not accept value '{other}'"))
                    }
                    None => return Err("Parameter 'mode' is missing".into()),
                };
                let sync = match args.get("sync").and_then(Value::as_str) {
                    None | Some("full") => SyncMode::Full,
                    Some("dirty") => SyncMode::Dirty,
                    Some("none") => SyncMode::None,
                    Some(other) => {
                        return Err(format!("Parameter 'sync' does not accept value '{other}'"))
                    }
                };
                repl.start(mode, sync).map_err(|e| e.to_string())?;
                ok(json!({}))
            }
            "replication-checkpoint" => {
                need(repl)?.checkpoint().map_err(|e| e.to_string())?;
                ok(json!({}))
            }
            "replication-stop" => {
                let failover = match args.get("failover") {
                    None => false,
                    Some(Value::Bool(b)) => *b,
                    Some(_) => return Err("Parameter 'failover' expects a boolean".into()),
                };
                need(repl)?.stop(failover).map_err(|e| e.to_string())?;
                ok(json!({}))
            }
            "replication-get-error" => {
                need(repl)?.get_error().map_err(|e| e.to_string())?;
                ok(json!({}))
            }
            other => Err(format!("The command {other} has not been found")),
        }
    }
}

fn str_of(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
}

fn need(repl: Option<&dyn Replication>) -> Result<&dyn Replication, String> {
    repl.ok_or_else(|| "Replication is not configured (serve without --mode)".to_string())
}

fn progress_json(p: Progress) -> Value {
    json!({"done": p.done, "total": p.total})
}

/// The `query-replication` return value.
pub fn status_json(s: &Status) -> Value {
    let mut v = json!({
        "mode": s.mode.as_str(),
        "stage": s.stage.as_str(),
        "error": s.error,
    });
    let obj = v.as_object_mut().expect("literal object");
    if let Some(p) = s.resync {
        obj.insert("resync".into(), progress_json(p));
    }
    if let Some(p) = s.commit {
        obj.insert("commit".into(), progress_json(p));
    }
    if let Some(n) = s.dirty_clusters {
        obj.insert("dirty-clusters".into(), json!(n));
    }
    if let Some(f) = &s.fence {
        obj.insert(
            "fence".into(),
            json!({"on-fenced": f.policy.as_str(), "reason": f.reason,
                   "held-writes": f.held_writes, "failed-writes": f.failed_writes}),
        );
    }
    v
}

/// Turns a replication [`Event`] into a QMP event message.
pub fn event_json(ev: &Event) -> Value {
    let (name, data) = match ev {
        Event::StageChanged { mode, stage } => (
            "REPLICATION_STAGE_CHANGED",
            json!({"mode": mode.as_str(), "stage": stage.as_str()}),
        ),
        Event::Error { mode, message } => (
            "REPLICATION_ERROR",
            json!({"mode": mode.as_str(), "error": message}),
        ),
        Event::ResyncProgress(p) => ("REPLICATION_RESYNC_PROGRESS", progress_json(*p)),
        Event::CommitProgress(p) => ("REPLICATION_COMMIT_PROGRESS", progress_json(*p)),
        Event::Fenced { policy, reason } => (
            "REPLICATION_FENCED",
            json!({"mode": "primary", "on-fenced": policy.as_str(), "reason": reason}),
        ),
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    json!({
        "event": name,
        "data": data,
        "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()}
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::fake::Fake;

    fn negotiated() -> Session {
        let mut s = Session::default();
        let (r, _) = s.handle(br#"{"execute":"qmp_capabilities"}"#, None);
        assert_eq!(r, json!({"return": {}}));
        s
    }

    #[test]
    fn commands_before_negotiation_are_refused_with_id_echoed() {
        let mut s = Session::default();
        let (r, _) = s.handle(br#"{"execute":"query-version","id":7}"#, None);
        assert_eq!(r["id"], json!(7));
        assert_eq!(r["error"]["class"], "GenericError");
    }

    #[test]
    fn start_passes_mode_and_sync_and_reports_mismatch() {
        let fake = Fake::default();
        let mut s = negotiated();
        let (r, _) = s.handle(
            br#"{"execute":"replication-start","arguments":{"mode":"secondary"},"id":"a"}"#,
            Some(&fake),
        );
        assert_eq!(r, json!({"return": {}, "id": "a"}));
        let (r, _) = s.handle(
            br#"{"execute":"replication-start","arguments":{"mode":"primary","sync":"dirty"}}"#,
            Some(&fake),
        );
        assert_eq!(
            r["error"]["desc"],
            "The parameter mode's value is invalid, needs secondary, but got primary"
        );
        assert_eq!(
            *fake.calls.lock().unwrap(),
            vec!["start secondary Full", "start primary Dirty"]
        );
    }

    #[test]
    fn stop_failover_checkpoint_get_error_and_query_reach_the_node() {
        let fake = Fake::default();
        let mut s = negotiated();
        let (r, _) = s.handle(
            br#"{"execute":"replication-stop","arguments":{"failover":true}}"#,
            Some(&fake),
        );
        assert_eq!(r, json!({"return": {}}));
        s.handle(br#"{"execute":"replication-checkpoint"}"#, Some(&fake));
        let (r, _) = s.handle(br#"{"execute":"replication-get-error"}"#, Some(&fake));
        assert_eq!(r["error"]["desc"], "Block replication is not running");
        let (r, _) = s.handle(br#"{"execute":"query-replication"}"#, Some(&fake));
        assert_eq!(
            r["return"],
            json!({"mode": "secondary", "stage": "running", "error": null,
                   "commit": {"done": 1, "total": 2}})
        );
        assert_eq!(*fake.calls.lock().unwrap(), vec!["stop true", "checkpoint"]);
    }

    #[test]
    fn malformed_input_gets_generic_errors_and_quit_ends_the_session() {
        let mut s = negotiated();
        for bad in [
            &br#"{"execute": }"#[..],
            b"[1,2]",
            br#"{"x":1}"#,
            br#"{"execute":"nope"}"#,
        ] {
            let (r, after) = s.handle(bad, None);
            assert_eq!(r["error"]["class"], "GenericError", "{r}");
            assert_eq!(after, After::Continue);
        }
        let (r, _) = s.handle(br#"{"execute":"query-replication"}"#, None);
        assert!(r["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("not configured"));
        let (r, after) = s.handle(br#"{"execute":"quit"}"#, None);
        assert_eq!((r, after), (json!({"return": {}}), After::Quit));
    }

    #[test]
    fn events_carry_name_data_and_timestamp() {
        let v = event_json(&Event::Error {
            mode: Mode::Primary,
            message: "boom".into(),
        });
        assert_eq!(v["event"], "REPLICATION_ERROR");
        assert_eq!(v["data"], json!({"mode": "primary", "error": "boom"}));
        assert!(v["timestamp"]["seconds"].as_u64().unwrap() > 0);
    }
}
