//! QMP commands: parses one JSON message, checks it against the command's
//! declared arguments, runs it against the replication node and the NBD export,
//! builds the reply. No I/O here, so every reply shape is unit-tested.
//!
//! Two families of names reach one implementation: colo-blk's own
//! (`replication-start`, ...) and QEMU's (`xen-set-replication`,
//! `nbd-server-start`, ...), so COLO tooling written for QEMU drives colo-blk
//! unchanged (README, "Driving colo-blk with QEMU's commands").

use super::exports::{AddRequest, NbdExports};
use super::schema::{self, opt, req, Member, Ty};
use crate::nbd::NbdAddr;
use crate::replication::{
    Event, Mode, Progress, Replication, ReplicationError, Stage, Status, SyncMode,
};
use crate::stats::{blockstats_json, replication, replication_json, DeviceStats};
use crate::vhost::{Resize, Resized};
use serde_json::{json, Map, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

const MODES: &[&str] = &["primary", "secondary"];
const SYNCS: &[&str] = &["full", "dirty", "none"];
const REMOVE_MODES: &[&str] = &["safe", "hard"];
const EXPORT_TYPES: &[&str] = &["nbd", "vhost-user-blk", "fuse", "vduse-blk"];

const INET: &[Member] = &[
    req("host", Ty::Str),
    req("port", Ty::Str),
    opt("numeric", Ty::Bool),
    opt("to", Ty::U32),
    opt("ipv4", Ty::Bool),
    opt("ipv6", Ty::Bool),
    opt("keep-alive", Ty::Bool),
];
const UNIX: &[Member] = &[
    req("path", Ty::Str),
    opt("abstract", Ty::Bool),
    opt("tight", Ty::Bool),
];
const VSOCK: &[Member] = &[req("cid", Ty::Str), req("port", Ty::Str)];
const FD: &[Member] = &[req("str", Ty::Str)];
const SOCKET_ADDRESS_LEGACY: Ty =
    Ty::Union(&[("inet", INET), ("unix", UNIX), ("vsock", VSOCK), ("fd", FD)]);

/// One command: its wire name and its declared arguments.
struct Command {
    name: &'static str,
    args: &'static [Member],
}

const fn cmd(name: &'static str, args: &'static [Member]) -> Command {
    Command { name, args }
}

/// Every command this server knows, with QEMU's argument declarations for
/// QEMU's names (qapi/migration.json, qapi/block-export.json, qapi/control.json).
const COMMAND_TABLE: &[Command] = &[
    cmd("qmp_capabilities", &[opt("enable", Ty::EnumList(&["oob"]))]),
    cmd("query-commands", &[]),
    cmd("query-version", &[]),
    cmd("quit", &[]),
    // colo-blk's own names.
    cmd("query-replication", &[]),
    cmd(
        "replication-start",
        &[req("mode", Ty::Enum(MODES)), opt("sync", Ty::Enum(SYNCS))],
    ),
    cmd("replication-checkpoint", &[]),
    cmd("replication-stop", &[opt("failover", Ty::Bool)]),
    cmd("replication-get-error", &[]),
    cmd("query-replication-stats", &[]),
    // QEMU's statistics command, in QEMU's return shape.
    cmd("query-blockstats", &[opt("query-nodes", Ty::Bool)]),
    // QEMU's names (CONFIG_REPLICATION and COLO).
    cmd(
        "xen-set-replication",
        &[
            req("enable", Ty::Bool),
            req("primary", Ty::Bool),
            opt("failover", Ty::Bool),
        ],
    ),
    cmd("xen-colo-do-checkpoint", &[]),
    cmd("query-xen-replication-status", &[]),
    cmd("query-colo-status", &[]),
    // QEMU's NBD server and block exports.
    cmd(
        "nbd-server-start",
        &[
            req("addr", SOCKET_ADDRESS_LEGACY),
            opt("tls-creds", Ty::Str),
            opt("tls-authz", Ty::Str),
            opt("max-connections", Ty::U32),
        ],
    ),
    cmd(
        "nbd-server-add",
        &[
            req("device", Ty::Str),
            opt("name", Ty::Str),
            opt("description", Ty::Str),
            opt("writable", Ty::Bool),
            opt("bitmap", Ty::Str),
        ],
    ),
    cmd(
        "nbd-server-remove",
        &[req("name", Ty::Str), opt("mode", Ty::Enum(REMOVE_MODES))],
    ),
    cmd("nbd-server-stop", &[]),
    cmd(
        "block-export-add",
        &[
            req("type", Ty::Enum(EXPORT_TYPES)),
            req("id", Ty::Str),
            opt("fixed-iothread", Ty::Bool),
            opt("iothread", Ty::Str),
            req("node-name", Ty::Str),
            opt("writable", Ty::Bool),
            opt("writethrough", Ty::Bool),
            opt("allow-inactive", Ty::Bool),
            // type nbd:
            opt("name", Ty::Str),
            opt("description", Ty::Str),
            opt("bitmaps", Ty::StrList),
            opt("allocation-depth", Ty::Bool),
        ],
    ),
    cmd(
        "block-export-del",
        &[req("id", Ty::Str), opt("mode", Ty::Enum(REMOVE_MODES))],
    ),
    cmd("query-block-exports", &[]),
    // QEMU's online resize (qapi/block-core.json), plain mode only.
    cmd(
        "block_resize",
        &[
            opt("device", Ty::Str),
            opt("node-name", Ty::Str),
            req("size", Ty::Int),
        ],
    ),
];

/// The commands this server knows, for `query-commands`.
pub fn command_names() -> impl Iterator<Item = &'static str> {
    COMMAND_TABLE.iter().map(|c| c.name)
}

/// The QEMU release whose QMP commands colo-blk answers as QEMU does:
/// `query-version` reports it as the `qemu` triple (clients compare it against
/// the version that introduced a command); `package` names colo-blk.
pub const QEMU_COMPAT: (u64, u64, u64) = (10, 0, 0);

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
    let (major, minor, micro) = QEMU_COMPAT;
    json!({
        "qemu": {"major": major, "minor": minor, "micro": micro},
        "package": concat!("colo-blk ", env!("CARGO_PKG_VERSION"))
    })
}

/// What happened to COLO in this process, for `query-colo-status`'s
/// `last-mode`: shared by every client of one control socket.
#[derive(Debug, Default)]
pub struct ColoHistory {
    ended: AtomicBool,
}

/// What commands act on. `Default` is a plain backend: nothing to act on.
#[derive(Clone, Copy, Default)]
pub struct Targets<'a> {
    /// The replication node, in a replication mode.
    pub replication: Option<&'a dyn Replication>,
    /// The NBD export, on a secondary.
    pub nbd: Option<&'a NbdExports>,
    /// Process-wide COLO history.
    pub colo: Option<&'a ColoHistory>,
    /// The served disk's request counters.
    pub stats: Option<&'a DeviceStats>,
    /// The served disk's node name (`query-blockstats`, `block_resize`).
    pub node: &'a str,
    /// Online resize, in plain mode.
    pub resize: Option<&'a dyn Resize>,
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

/// QMP's error classes (the ones colo-blk answers with).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Everything but an unknown command.
    Generic,
    /// The command does not exist (or is not allowed in this phase).
    CommandNotFound,
}

impl ErrorClass {
    fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Generic => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
        }
    }
}

/// Builds a GenericError reply in QMP's shape.
pub fn error_reply(desc: impl Into<String>, id: Option<&Value>) -> Value {
    class_error_reply(ErrorClass::Generic, desc, id)
}

fn class_error_reply(class: ErrorClass, desc: impl Into<String>, id: Option<&Value>) -> Value {
    with_id(
        json!({"error": {"class": class.as_str(), "desc": desc.into()}}),
        id,
    )
}

fn with_id(mut reply: Value, id: Option<&Value>) -> Value {
    if let (Some(id), Some(obj)) = (id, reply.as_object_mut()) {
        obj.insert("id".into(), id.clone());
    }
    reply
}

/// Checks the envelope of a request as QEMU's dispatcher does; returns the
/// command name and its arguments.
fn envelope(obj: &Map<String, Value>) -> Result<(&str, &Map<String, Value>), String> {
    static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
    let mut execute = None;
    let mut args = None;
    for (key, value) in obj {
        match key.as_str() {
            "execute" => match value.as_str() {
                Some(s) => execute = Some(s),
                None => return Err("QMP input member 'execute' must be a string".into()),
            },
            "arguments" => match value.as_object() {
                Some(a) => args = Some(a),
                None => return Err("QMP input member 'arguments' must be an object".into()),
            },
            "id" => {}
            other => return Err(format!("QMP input member '{other}' is unexpected")),
        }
    }
    let execute = execute.ok_or("QMP input lacks member 'execute'")?;
    Ok((execute, args.unwrap_or_else(|| EMPTY.get_or_init(Map::new))))
}

impl Session {
    /// Handles one framed JSON text and returns the reply to send.
    pub fn handle(&mut self, text: &[u8], targets: Targets<'_>) -> (Value, After) {
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
        let (name, args) = match envelope(obj) {
            Ok(v) => v,
            Err(desc) => return (error_reply(desc, id), After::Continue),
        };
        let not_found = |desc: String| {
            (
                class_error_reply(ErrorClass::CommandNotFound, desc, id),
                After::Continue,
            )
        };
        let Some(command) = COMMAND_TABLE.iter().find(|c| c.name == name) else {
            return not_found(format!("The command {name} has not been found"));
        };
        if !self.negotiated && name != "qmp_capabilities" {
            return not_found("Expecting capabilities negotiation with 'qmp_capabilities'".into());
        }
        if self.negotiated && name == "qmp_capabilities" {
            return not_found(
                "Capabilities negotiation is already complete, command ignored".into(),
            );
        }
        if let Err(desc) = schema::check(command.args, args) {
            return (error_reply(desc, id), After::Continue);
        }
        match self.run(name, args, targets) {
            Ok((value, after)) => (with_id(json!({ "return": value }), id), after),
            Err(desc) => (error_reply(desc, id), After::Continue),
        }
    }

    /// Runs a command whose arguments passed [`schema::check`].
    fn run(
        &mut self,
        cmd: &str,
        args: &Map<String, Value>,
        t: Targets<'_>,
    ) -> Result<(Value, After), String> {
        let ok = |v: Value| Ok((v, After::Continue));
        let done = || ok(json!({}));
        match cmd {
            "qmp_capabilities" => {
                if let Some(cap) = args
                    .get("enable")
                    .and_then(Value::as_array)
                    .and_then(|a| a.first())
                {
                    return Err(format!("Capability '{}' not available", str_of(cap)));
                }
                self.negotiated = true;
                done()
            }
            "query-commands" => ok(Value::Array(
                command_names().map(|c| json!({ "name": c })).collect(),
            )),
            "query-version" => ok(version()),
            "query-blockstats" => match t.stats {
                Some(st) => ok(blockstats_json(t.node, &st.per_queue(), st.now_ns())),
                None => ok(json!([])),
            },
            "query-replication-stats" => ok(replication_json(&replication().snapshot())),
            "quit" => Ok((json!({}), After::Quit)),
            "query-replication" => ok(status_json(&need(t)?.status())),
            "replication-start" => {
                let mode = mode_arg(args.get("mode"));
                let sync = match args.get("sync").and_then(Value::as_str) {
                    Some("dirty") => SyncMode::Dirty,
                    Some("none") => SyncMode::None,
                    _ => SyncMode::Full,
                };
                need(t)?.start(mode, sync).map_err(|e| e.to_string())?;
                done()
            }
            "replication-checkpoint" | "xen-colo-do-checkpoint" => {
                need(t)?.checkpoint().map_err(|e| e.to_string())?;
                done()
            }
            "replication-stop" => {
                let failover = bool_arg(args, "failover").unwrap_or(false);
                need(t)?.stop(failover).map_err(|e| e.to_string())?;
                remember_end(t);
                done()
            }
            "replication-get-error" => {
                need(t)?.get_error().map_err(|e| e.to_string())?;
                done()
            }
            "xen-set-replication" => xen_set_replication(args, t).and_then(|()| done()),
            "query-xen-replication-status" => ok(xen_replication_status(t)),
            "query-colo-status" => ok(colo_status(t)),
            "nbd-server-start" => nbd_server_start(args, t).and_then(|()| done()),
            "nbd-server-add" => {
                let device = str_arg(args, "device").unwrap_or_default();
                if let Some(bitmap) = str_arg(args, "bitmap") {
                    return Err(format!("Bitmap '{bitmap}' is not found"));
                }
                let name = str_arg(args, "name").unwrap_or(device);
                need_nbd(t)?.add(&AddRequest {
                    id: name,
                    node: device,
                    name,
                    writable: bool_arg(args, "writable").unwrap_or(false),
                    by_device: true,
                })?;
                done()
            }
            "block-export-add" => {
                let kind = str_arg(args, "type").unwrap_or_default();
                if kind != "nbd" {
                    return Err(format!(
                        "colo-blk exports the secondary disk over NBD only, not as '{kind}' \
                         (the guest is served over vhost-user by serve --socket)"
                    ));
                }
                if let Some(b) = args
                    .get("bitmaps")
                    .and_then(Value::as_array)
                    .and_then(|a| a.first())
                {
                    return Err(format!("Bitmap '{}' is not found", str_of(b)));
                }
                let id = str_arg(args, "id").unwrap_or_default();
                let node = str_arg(args, "node-name").unwrap_or_default();
                need_nbd(t)?.add(&AddRequest {
                    id,
                    node,
                    name: str_arg(args, "name").unwrap_or(node),
                    writable: bool_arg(args, "writable").unwrap_or(false),
                    by_device: false,
                })?;
                done()
            }
            "nbd-server-remove" => {
                need_nbd(t)?.remove(str_arg(args, "name").unwrap_or_default())?;
                done()
            }
            "block-export-del" => {
                need_nbd(t)?.remove(str_arg(args, "id").unwrap_or_default())?;
                done()
            }
            "nbd-server-stop" => {
                need_nbd(t)?.stop()?;
                done()
            }
            "block_resize" => ok(block_resize(args, t)?),
            "query-block-exports" => ok(Value::Array(
                t.nbd
                    .map(NbdExports::list)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|e| {
                        json!({"type": "nbd", "id": e.id, "node-name": e.node,
                               "shutting-down": false})
                    })
                    .collect(),
            )),
            other => Err(format!("The command {other} has not been found")),
        }
    }
}

fn str_of(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
}

fn str_arg<'a>(args: &'a Map<String, Value>, name: &str) -> Option<&'a str> {
    args.get(name).and_then(Value::as_str)
}

fn bool_arg(args: &Map<String, Value>, name: &str) -> Option<bool> {
    args.get(name).and_then(Value::as_bool)
}

fn mode_arg(v: Option<&Value>) -> Mode {
    match v.and_then(Value::as_str) {
        Some("primary") => Mode::Primary,
        _ => Mode::Secondary,
    }
}

fn need<'a>(t: Targets<'a>) -> Result<&'a dyn Replication, String> {
    t.replication
        .ok_or_else(|| "Replication is not configured (serve without --mode)".to_string())
}

fn need_nbd<'a>(t: Targets<'a>) -> Result<&'a NbdExports, String> {
    t.nbd.ok_or_else(|| {
        "This colo-blk process has no disk to export over NBD \
         (only serve --mode secondary exports one)"
            .to_string()
    })
}

fn remember_end(t: Targets<'_>) {
    if let Some(c) = t.colo {
        c.ended.store(true, Ordering::Release);
    }
}

/// QEMU numbers replication modes in this error (primary 0, secondary 1);
/// tooling written against QEMU may match the text.
fn qemu_error_text(e: &ReplicationError) -> String {
    let n = |m: &Mode| match m {
        Mode::Primary => 0,
        Mode::Secondary => 1,
    };
    match e {
        ReplicationError::ModeMismatch { expected, got } => format!(
            "The parameter mode's value is invalid, needs {}, but got {}",
            n(expected),
            n(got)
        ),
        other => other.to_string(),
    }
}

/// `xen-set-replication`: start (enable), stop, or fail over. The initial
/// copy of a primary is a full resync (holes skipped): QEMU leaves it to the
/// tooling (drive-mirror), which colo-blk does not offer, and a copy of an
/// already equal disk is only slower, never wrong.
fn xen_set_replication(args: &Map<String, Value>, t: Targets<'_>) -> Result<(), String> {
    let enable = bool_arg(args, "enable").unwrap_or(false);
    let mode = if bool_arg(args, "primary").unwrap_or(false) {
        Mode::Primary
    } else {
        Mode::Secondary
    };
    let failover = bool_arg(args, "failover");
    if enable && failover.is_some() {
        return Err("Parameter 'failover' is only for stopping replication".into());
    }
    let repl = need(t)?;
    if enable {
        return repl
            .start(mode, SyncMode::Full)
            .map_err(|e| qemu_error_text(&e));
    }
    if mode != repl.mode() {
        return Err(qemu_error_text(&ReplicationError::ModeMismatch {
            expected: repl.mode(),
            got: mode,
        }));
    }
    // Unlike QEMU (whose secondary fails a plain stop with "Backup job was
    // cancelled unexpectedly"), a stop without failover checkpoints and stops.
    repl.stop(failover.unwrap_or(false))
        .map_err(|e| qemu_error_text(&e))?;
    remember_end(t);
    Ok(())
}

/// `query-xen-replication-status`: the node's real state. QEMU reports "I/O
/// error occurred" while its failover commit runs; colo-blk reports an error
/// only when one is recorded.
fn xen_replication_status(t: Targets<'_>) -> Value {
    let result = match t.replication {
        None => Err("Replication is not configured (serve without --mode)".to_string()),
        Some(r) => r.get_error().map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => json!({"error": false}),
        Err(desc) => json!({"error": true, "desc": desc}),
    }
}

/// `query-colo-status`, from the replication stage: `mode` is the side while
/// it replicates, `last-mode` the side once replication ended, `reason` why
/// (request: stopped or failed over; error: a recorded error or a failed
/// commit; processing: the failover commit runs).
fn colo_status(t: Targets<'_>) -> Value {
    let ended_before = t.colo.is_some_and(|c| c.ended.load(Ordering::Acquire));
    let Some(repl) = t.replication else {
        return json!({"mode": "none", "last-mode": "none", "reason": "none"});
    };
    let st = repl.status();
    let side = st.mode.as_str();
    let last = if ended_before { side } else { "none" };
    let (mode, last_mode, reason) = match st.stage {
        Stage::None => ("none", last, "none"),
        Stage::Running if st.error.is_some() => ("none", side, "error"),
        Stage::Running => (side, last, "none"),
        Stage::Failover => (side, last, "processing"),
        Stage::FailoverFailed => ("none", side, "error"),
        // Fenced by the new primary: replication ended, not by request.
        Stage::Fenced => ("none", side, "error"),
        Stage::Done => ("none", side, "request"),
    };
    if last_mode != "none" {
        remember_end(t);
    }
    json!({"mode": mode, "last-mode": last_mode, "reason": reason})
}

/// `nbd-server-start`. TLS is configured on the command line
/// (`--tls-creds-x509`, `--tls-creds-psk`), not with QOM objects, so QEMU's
/// object ids cannot name credentials here.
fn nbd_server_start(args: &Map<String, Value>, t: Targets<'_>) -> Result<(), String> {
    if let Some(id) = str_arg(args, "tls-creds") {
        return Err(format!(
            "No TLS credentials with id '{id}': TLS credentials are not configured \
             (colo-blk takes them from serve --tls-creds-x509 or --tls-creds-psk)"
        ));
    }
    if let Some(id) = str_arg(args, "tls-authz") {
        return Err(format!(
            "TLS authorization '{id}' needs TLS credentials, and TLS credentials are \
             not configured (colo-blk takes them from serve --tls-creds-x509 or --tls-creds-psk)"
        ));
    }
    let addr = args.get("addr").cloned().unwrap_or(Value::Null);
    let data = &addr["data"];
    let listen = match addr["type"].as_str() {
        Some("inet") => {
            let host = data["host"].as_str().unwrap_or_default();
            let port = data["port"].as_str().unwrap_or_default();
            if data.get("to").is_some() {
                return Err("colo-blk listens on one port: 'to' is not supported".into());
            }
            let port: u16 = port.parse().map_err(|_| {
                format!("address resolution failed for {host}:{port}: the port must be a number")
            })?;
            NbdAddr::Tcp {
                host: host.to_string(),
                port,
            }
        }
        Some("unix") => {
            if data["abstract"].as_bool() == Some(true) {
                return Err("colo-blk does not listen on abstract unix sockets".into());
            }
            NbdAddr::Unix(data["path"].as_str().unwrap_or_default().into())
        }
        Some(other) => {
            return Err(format!(
                "colo-blk's NBD server listens on inet or unix addresses, not '{other}'"
            ))
        }
        None => return Err("Parameter 'addr.type' is missing".into()),
    };
    let max = args
        .get("max-connections")
        .and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok());
    need_nbd(t)?.start(listen, max)
}

/// `block_resize`: QEMU's argument rules and texts (`bdrv_lookup_bs`, then
/// the size), then colo-blk's: plain mode only, grow only, whole blocks.
/// QEMU returns `{}`; colo-blk adds what happened, for `ctl resize`.
fn block_resize(args: &Map<String, Value>, t: Targets<'_>) -> Result<Value, String> {
    let device = str_arg(args, "device");
    let node_name = str_arg(args, "node-name");
    // One disk per process: its node name answers to both members (the
    // vhost-user device has no block backend name of its own).
    let ours = |name: Option<&str>| !t.node.is_empty() && name == Some(t.node);
    if !ours(device) && !ours(node_name) {
        return Err(format!(
            "Cannot find device='{}' nor node-name='{}'",
            device.unwrap_or_default(),
            node_name.unwrap_or_default()
        ));
    }
    let size = match args.get("size").and_then(Value::as_i64) {
        Some(n) if n >= 0 => n as u64,
        _ => return Err("Parameter 'size' expects a >0 size".into()),
    };
    if let Some(repl) = t.replication {
        return Err(format!(
            "Cannot resize '{}' while it is replicated: colo-blk grows a disk online only \
             in plain mode (serve without --mode); this daemon is a COLO {} and the other \
             copy would have to grow with it",
            t.node,
            repl.mode()
        ));
    }
    let resize = t
        .resize
        .ok_or_else(|| "Online resize is not available in this daemon".to_string())?;
    let done = resize.resize(size).map_err(|e| e.to_string())?;
    Ok(resized_json(&done))
}

fn resized_json(r: &Resized) -> Value {
    let mut v = json!({
        "size": r.new_size,
        "old-size": r.old_size,
        "frontend": r.notice.as_str(),
    });
    if let crate::vhost::Notice::Failed(e) = &r.notice {
        v["error"] = json!(e);
    }
    v
}

fn progress_json(p: Progress) -> Value {
    json!({"done": p.done, "total": p.total})
}

/// The `query-replication` return value.
pub fn status_json(s: &Status) -> Value {
    let mut obj = Map::new();
    obj.insert("mode".into(), json!(s.mode.as_str()));
    obj.insert("stage".into(), json!(s.stage.as_str()));
    obj.insert("error".into(), json!(s.error));
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
    Value::Object(obj)
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

    fn targets(fake: &Fake) -> Targets<'_> {
        Targets {
            replication: Some(fake),
            ..Targets::default()
        }
    }

    fn negotiated() -> Session {
        let mut s = Session::default();
        let (r, _) = s.handle(br#"{"execute":"qmp_capabilities"}"#, Targets::default());
        assert_eq!(r, json!({"return": {}}));
        s
    }

    fn ask(s: &mut Session, t: Targets<'_>, msg: Value) -> Value {
        s.handle(msg.to_string().as_bytes(), t).0
    }

    #[test]
    fn commands_before_negotiation_are_refused_with_id_echoed() {
        let mut s = Session::default();
        let (r, _) = s.handle(br#"{"execute":"query-version","id":7}"#, Targets::default());
        assert_eq!(r["id"], json!(7));
        assert_eq!(r["error"]["class"], "CommandNotFound");
        assert_eq!(
            r["error"]["desc"],
            "Expecting capabilities negotiation with 'qmp_capabilities'"
        );
    }

    #[test]
    fn start_passes_mode_and_sync_and_reports_mismatch() {
        let fake = Fake::default();
        let mut s = negotiated();
        let (r, _) = s.handle(
            br#"{"execute":"replication-start","arguments":{"mode":"secondary"},"id":"a"}"#,
            targets(&fake),
        );
        assert_eq!(r, json!({"return": {}, "id": "a"}));
        let (r, _) = s.handle(
            br#"{"execute":"replication-start","arguments":{"mode":"primary","sync":"dirty"}}"#,
            targets(&fake),
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
            targets(&fake),
        );
        assert_eq!(r, json!({"return": {}}));
        s.handle(br#"{"execute":"replication-checkpoint"}"#, targets(&fake));
        let (r, _) = s.handle(br#"{"execute":"replication-get-error"}"#, targets(&fake));
        assert_eq!(r["error"]["desc"], "Block replication is not running");
        let (r, _) = s.handle(br#"{"execute":"query-replication"}"#, targets(&fake));
        assert_eq!(
            r["return"],
            json!({"mode": "secondary", "stage": "running", "error": null,
                   "commit": {"done": 1, "total": 2}})
        );
        assert_eq!(*fake.calls.lock().unwrap(), vec!["stop true", "checkpoint"]);
    }

    #[test]
    fn wrongly_typed_or_unknown_arguments_never_reach_the_node() {
        let fake = Fake::default();
        let mut s = negotiated();
        let cases = [
            (
                json!({"execute": "replication-start", "arguments": {"mode": "secondary", "sync": 7}}),
                "Invalid parameter type for 'sync', expected: string",
            ),
            (
                json!({"execute": "replication-stop", "arguments": {"failover": true, "extra": {}}}),
                "Parameter 'extra' is unexpected",
            ),
            (
                json!({"execute": "replication-start", "arguments": {"mode": 5}}),
                "Invalid parameter type for 'mode', expected: string",
            ),
            (
                json!({"execute": "replication-start", "arguments": {}}),
                "Parameter 'mode' is missing",
            ),
            (
                json!({"execute": "replication-stop", "arguments": {"failover": "yes"}}),
                "Invalid parameter type for 'failover', expected: boolean",
            ),
            (
                json!({"execute": "xen-set-replication", "arguments": {"enable": true}}),
                "Parameter 'primary' is missing",
            ),
            (
                json!({"execute": "xen-set-replication",
                       "arguments": {"enable": false, "primary": false, "failover": 1}}),
                "Invalid parameter type for 'failover', expected: boolean",
            ),
        ];
        for (msg, want) in cases {
            let r = ask(&mut s, targets(&fake), msg.clone());
            assert_eq!(r["error"]["class"], "GenericError", "{msg}");
            assert_eq!(r["error"]["desc"], want, "{msg}");
        }
        assert!(fake.calls.lock().unwrap().is_empty());
    }

    #[test]
    fn every_command_refuses_an_unexpected_member_with_qemus_text() {
        let fake = Fake::default();
        for name in command_names() {
            let mut s = if name == "qmp_capabilities" {
                Session::default()
            } else {
                negotiated()
            };
            // Give every required member a valid value first, so the unknown
            // member is the only problem.
            let command = COMMAND_TABLE.iter().find(|c| c.name == name).unwrap();
            let mut args = Map::new();
            for m in command.args.iter().filter(|m| m.required) {
                let v = match m.ty {
                    Ty::Str => json!("parent0"),
                    Ty::Bool => json!(false),
                    Ty::U32 | Ty::Int => json!(1),
                    Ty::Enum(values) => json!(values[0]),
                    Ty::Union(_) => json!({"type": "unix", "data": {"path": "/nonexistent"}}),
                    _ => json!([]),
                };
                args.insert(m.name.into(), v);
            }
            args.insert("bogus-member".into(), json!(1));
            let r = ask(
                &mut s,
                targets(&fake),
                json!({"execute": name, "arguments": args}),
            );
            assert_eq!(
                r["error"]["desc"], "Parameter 'bogus-member' is unexpected",
                "{name}: {r}"
            );
        }
        assert!(fake.calls.lock().unwrap().is_empty());
    }

    #[test]
    fn envelope_errors_use_qemus_texts_and_classes() {
        let mut s = negotiated();
        let cases = [
            (
                json!({"execute": 5}),
                "GenericError",
                "QMP input member 'execute' must be a string",
            ),
            (
                json!({"execute": "quit", "extra": 1}),
                "GenericError",
                "QMP input member 'extra' is unexpected",
            ),
            (
                json!({"execute": "quit", "arguments": []}),
                "GenericError",
                "QMP input member 'arguments' must be an object",
            ),
            (
                json!({"id": 1}),
                "GenericError",
                "QMP input lacks member 'execute'",
            ),
            (
                json!({"execute": "nosuch"}),
                "CommandNotFound",
                "The command nosuch has not been found",
            ),
            (
                json!({"execute": "qmp_capabilities"}),
                "CommandNotFound",
                "Capabilities negotiation is already complete, command ignored",
            ),
        ];
        for (msg, class, desc) in cases {
            let r = ask(&mut s, Targets::default(), msg.clone());
            assert_eq!(r["error"]["class"], class, "{msg}");
            assert_eq!(r["error"]["desc"], desc, "{msg}");
        }
    }

    #[test]
    fn xen_set_replication_starts_stops_and_fails_over_through_the_same_node() {
        let fake = Fake::default();
        let colo = ColoHistory::default();
        let t = Targets {
            replication: Some(&fake),
            colo: Some(&colo),
            ..Targets::default()
        };
        let mut s = negotiated();
        let xen = |s: &mut Session, args: Value| {
            ask(
                s,
                t,
                json!({"execute": "xen-set-replication", "arguments": args}),
            )
        };
        assert_eq!(
            xen(&mut s, json!({"enable": true, "primary": false}))["return"],
            json!({})
        );
        let r = xen(&mut s, json!({"enable": true, "primary": true}));
        assert_eq!(
            r["error"]["desc"],
            "The parameter mode's value is invalid, needs 1, but got 0"
        );
        let r = xen(
            &mut s,
            json!({"enable": true, "primary": false, "failover": true}),
        );
        assert_eq!(
            r["error"]["desc"],
            "Parameter 'failover' is only for stopping replication"
        );
        assert_eq!(
            ask(&mut s, t, json!({"execute": "xen-colo-do-checkpoint"}))["return"],
            json!({})
        );
        xen(&mut s, json!({"enable": false, "primary": false}));
        xen(
            &mut s,
            json!({"enable": false, "primary": false, "failover": true}),
        );
        assert_eq!(
            *fake.calls.lock().unwrap(),
            vec![
                "start secondary Full",
                "start primary Full",
                "checkpoint",
                "stop false",
                "stop true"
            ]
        );
    }

    #[test]
    fn replication_status_and_colo_status_follow_the_stage() {
        let fake = Fake::default();
        let colo = ColoHistory::default();
        let t = Targets {
            replication: Some(&fake),
            colo: Some(&colo),
            ..Targets::default()
        };
        let mut s = negotiated();
        let status = |s: &mut Session| {
            (
                ask(s, t, json!({"execute": "query-xen-replication-status"}))["return"].clone(),
                ask(s, t, json!({"execute": "query-colo-status"}))["return"].clone(),
            )
        };
        *fake.stage.lock().unwrap() = Some(Stage::None);
        let (x, c) = status(&mut s);
        assert_eq!(
            x,
            json!({"error": true, "desc": "Block replication is not running"})
        );
        assert_eq!(
            c,
            json!({"mode": "none", "last-mode": "none", "reason": "none"})
        );
        *fake.stage.lock().unwrap() = Some(Stage::Running);
        *fake.error.lock().unwrap() = None;
        let (x, c) = status(&mut s);
        assert_eq!(x, json!({"error": false}));
        assert_eq!(
            c,
            json!({"mode": "secondary", "last-mode": "none", "reason": "none"})
        );
        *fake.stage.lock().unwrap() = Some(Stage::Failover);
        let (x, c) = status(&mut s);
        assert_eq!(x, json!({"error": false}), "a running commit is no error");
        assert_eq!(c["reason"], "processing");
        *fake.stage.lock().unwrap() = Some(Stage::Done);
        let (_, c) = status(&mut s);
        assert_eq!(
            c,
            json!({"mode": "none", "last-mode": "secondary", "reason": "request"})
        );
        *fake.stage.lock().unwrap() = Some(Stage::FailoverFailed);
        *fake.error.lock().unwrap() = Some("commit: EIO".into());
        let (x, c) = status(&mut s);
        assert_eq!(x, json!({"error": true, "desc": "commit: EIO"}));
        assert_eq!(
            c,
            json!({"mode": "none", "last-mode": "secondary", "reason": "error"})
        );
    }

    #[test]
    fn query_commands_lists_both_families_and_query_version_looks_like_qemu() {
        let mut s = negotiated();
        let r = ask(
            &mut s,
            Targets::default(),
            json!({"execute": "query-commands"}),
        );
        let names: Vec<&str> = r["return"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        for n in [
            "replication-start",
            "query-replication",
            "xen-set-replication",
            "xen-colo-do-checkpoint",
            "query-xen-replication-status",
            "query-colo-status",
            "nbd-server-start",
            "nbd-server-add",
            "nbd-server-remove",
            "nbd-server-stop",
            "block-export-add",
            "query-commands",
            "query-version",
        ] {
            assert!(names.contains(&n), "{n} missing from {names:?}");
        }
        let v = ask(
            &mut s,
            Targets::default(),
            json!({"execute": "query-version"}),
        );
        assert_eq!(v["return"]["qemu"]["major"], 10);
        assert!(v["return"]["package"]
            .as_str()
            .unwrap()
            .starts_with("colo-blk"));
    }

    #[test]
    fn tls_arguments_are_refused_until_tls_is_configured() {
        let mut s = negotiated();
        let r = ask(
            &mut s,
            Targets::default(),
            json!({"execute": "nbd-server-start", "arguments": {
                "addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": "0"}},
                "tls-creds": "tls0"}}),
        );
        let desc = r["error"]["desc"].as_str().unwrap();
        assert!(
            desc.contains("TLS credentials are not configured"),
            "{desc}"
        );
    }

    #[test]
    fn malformed_input_gets_generic_errors_and_quit_ends_the_session() {
        let mut s = negotiated();
        for bad in [&br#"{"execute": }"#[..], b"[1,2]", br#"{"x":1}"#] {
            let (r, after) = s.handle(bad, Targets::default());
            assert_eq!(r["error"]["class"], "GenericError", "{r}");
            assert_eq!(after, After::Continue);
        }
        let (r, _) = s.handle(br#"{"execute":"query-replication"}"#, Targets::default());
        assert!(r["error"]["desc"]
            .as_str()
            .unwrap()
            .contains("not configured"));
        let (r, after) = s.handle(br#"{"execute":"quit"}"#, Targets::default());
        assert_eq!((r, after), (json!({"return": {}}), After::Quit));
    }

    /// A disk of 1 MiB that records the sizes asked for.
    #[derive(Default)]
    struct FakeResize {
        asked: std::sync::Mutex<Vec<u64>>,
    }

    impl Resize for FakeResize {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn resize(&self, new_size: u64) -> Result<Resized, crate::vhost::ResizeError> {
            self.asked.lock().unwrap().push(new_size);
            if new_size < self.size() {
                return Err(crate::vhost::ResizeError::Shrink {
                    old: self.size(),
                    new: new_size,
                });
            }
            Ok(Resized {
                old_size: self.size(),
                new_size,
                notice: crate::vhost::Notice::NoChannel,
            })
        }
    }

    #[test]
    fn block_resize_checks_arguments_as_qemu_does_and_reaches_the_disk() {
        let disk = FakeResize::default();
        let t = Targets {
            node: "vm0.img",
            resize: Some(&disk),
            ..Targets::default()
        };
        let mut s = negotiated();
        let resize = |s: &mut Session, args: Value| {
            ask(s, t, json!({"execute": "block_resize", "arguments": args}))
        };
        let refused = [
            (
                json!({"node-name": "vm0.img"}),
                "Parameter 'size' is missing",
            ),
            (
                json!({"node-name": "vm0.img", "size": "2G"}),
                "Invalid parameter type for 'size', expected: integer",
            ),
            (
                json!({"node-name": "vm0.img", "size": 1.5}),
                "Invalid parameter type for 'size', expected: integer",
            ),
            (
                json!({"node-name": 7, "size": 1}),
                "Invalid parameter type for 'node-name', expected: string",
            ),
            (
                json!({"node-name": "vm0.img", "size": 1, "shrink": true}),
                "Parameter 'shrink' is unexpected",
            ),
            (
                json!({"size": 1 << 21}),
                "Cannot find device='' nor node-name=''",
            ),
            (
                json!({"device": "drive0", "node-name": "other", "size": 1 << 21}),
                "Cannot find device='drive0' nor node-name='other'",
            ),
            (
                json!({"node-name": "vm0.img", "size": -1}),
                "Parameter 'size' expects a >0 size",
            ),
        ];
        for (args, want) in refused {
            let r = resize(&mut s, args.clone());
            assert_eq!(r["error"]["class"], "GenericError", "{args}");
            assert_eq!(r["error"]["desc"], want, "{args}");
        }
        assert!(disk.asked.lock().unwrap().is_empty());

        let r = resize(&mut s, json!({"node-name": "vm0.img", "size": 2 << 20}));
        assert_eq!(
            r["return"],
            json!({"size": 2 << 20, "old-size": 1 << 20, "frontend": "no-backend-channel"})
        );
        // `device` names the same disk.
        let r = resize(&mut s, json!({"device": "vm0.img", "size": 1 << 19}));
        assert_eq!(
            r["error"]["desc"],
            "Cannot shrink the disk from 1048576 to 524288 bytes: colo-blk only grows a disk \
             online (the guest may hold data past the new end)"
        );
        assert_eq!(*disk.asked.lock().unwrap(), vec![2 << 20, 1 << 19]);
    }

    #[test]
    fn block_resize_is_refused_while_replicating() {
        let fake = Fake::default();
        let disk = FakeResize::default();
        let t = Targets {
            replication: Some(&fake),
            node: "parent0",
            resize: Some(&disk),
            ..Targets::default()
        };
        let mut s = negotiated();
        let r = ask(
            &mut s,
            t,
            json!({"execute": "block_resize",
                   "arguments": {"node-name": "parent0", "size": 2 << 20}}),
        );
        assert_eq!(
            r["error"]["desc"],
            "Cannot resize 'parent0' while it is replicated: colo-blk grows a disk online \
             only in plain mode (serve without --mode); this daemon is a COLO secondary and \
             the other copy would have to grow with it"
        );
        assert!(disk.asked.lock().unwrap().is_empty());
        assert!(fake.calls.lock().unwrap().is_empty());
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
