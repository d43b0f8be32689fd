//! `colo-blk serve` command line and the validated [`Config`] it becomes.
//!
//! clap parses syntax; [`Config::try_from`] checks meaning (ranges, which flags
//! belong to which mode) so that every bad command line gets one clear message
//! and exit code 2 before anything is opened.

use clap::Args;
use colo_blk::block::channel::Engine;
use colo_blk::nbd::{NbdAddr, NbdUri, ServerLimits};
use colo_blk::replication::{Mode, OnFenced};
use colo_blk::stats::{MetricsAddr, StatsError};
use colo_blk::virtio_blk::ID_BYTES;
use std::path::PathBuf;
use thiserror::Error;

pub use colo_blk::replication::DEFAULT_CLUSTER_SIZE;
/// Default `--forward-timeout`: long enough for a busy link, short enough that a
/// hung secondary does not stall the primary guest for long.
pub const DEFAULT_FORWARD_TIMEOUT_SECS: u64 = 15;

const MAX_QUEUES: u16 = 64;
/// Default `--poll-us`: off. On the 2-core machines benchmarked
/// (bench-peers.sh), polling won QD1 on the page cache but not on O_DIRECT
/// (the polling worker competes with the guest and the disk's interrupt for
/// the cores); on hosts with a core to spare per queue, `--poll-us 50` is the
/// setting to try.
pub const DEFAULT_POLL_US: u32 = 0;
/// Longest accepted `--poll-us`: beyond this a worker would rather sleep.
const MAX_POLL_US: u32 = 10_000;
const MAX_QUEUE_SIZE: u16 = 32768;
const MAX_CLUSTER_SIZE: u64 = 64 << 20;

/// `colo-blk serve` flags: the contract (ARCHITECTURE.md, "The contract, as it
/// stands now"); extend, never rename.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// vhost-user socket to listen on. A stale socket left by a dead process is
    /// replaced; the socket is removed on exit.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,

    /// Raw disk image (regular file or block device) to serve.
    #[arg(long, value_name = "IMAGE")]
    pub disk: PathBuf,

    /// Create IMAGE as a sparse file of this size if it does not exist (or extend
    /// a shorter file). Accepts K, M, G, T suffixes (powers of 1024).
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub size: Option<u64>,

    /// Serve the disk read-only (VIRTIO_BLK_F_RO); writes, discards and
    /// write-zeroes are refused.
    #[arg(long)]
    pub readonly: bool,

    /// Number of request queues, 1-64; each gets its own worker thread. The
    /// VMM may use fewer.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub num_queues: u16,

    /// Maximum entries per queue: a power of two, 4-32768.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub queue_size: u16,

    /// Open the image with O_DIRECT (bypass the host page cache).
    #[arg(long)]
    pub direct: bool,

    /// How requests reach the image. auto: io_uring with --direct (the device
    /// then sees the guest's queue depth), synchronous preadv/pwritev on the
    /// queue worker otherwise (page-cache hits are cheapest inline). uring or
    /// sync force one.
    #[arg(long, value_enum, value_name = "auto|uring|sync", default_value_t = Engine::Auto)]
    pub io_engine: Engine,

    /// After serving work, a queue worker with nothing in flight on the disk
    /// polls its ring for the guest's next request for up to this many
    /// microseconds before it sleeps (with requests in flight it sleeps: their
    /// completion wakes it). The window adapts: it shrinks when the guest
    /// keeps it waiting longer, so an idle disk costs no CPU. 0 disables
    /// polling.
    #[arg(long, value_name = "US", default_value_t = DEFAULT_POLL_US)]
    pub poll_us: u32,

    /// Disk serial number returned to GET_ID (at most 20 bytes).
    #[arg(long, value_name = "STR", default_value = "")]
    pub serial: String,

    /// Logical block size advertised to the guest: 512 or 4096.
    #[arg(long, value_name = "512|4096", default_value_t = 512)]
    pub logical_block_size: u32,

    /// QMP control socket: replication (start, checkpoint, stop, status),
    /// statistics, online resize (block_resize, plain mode).
    #[arg(long, value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// COLO replication role. Absent: a plain vhost-user-blk backend.
    #[arg(long, value_enum, value_name = "primary|secondary")]
    pub mode: Option<Mode>,

    /// Secondary: the active overlay (the secondary guest's own writes since
    /// the last checkpoint). Default: IMAGE.active.
    #[arg(long, value_name = "FILE")]
    pub active: Option<PathBuf>,

    /// Secondary: the hidden overlay (old contents of clusters the primary
    /// overwrote since the last checkpoint). Default: IMAGE.hidden.
    #[arg(long, value_name = "FILE")]
    pub hidden: Option<PathBuf>,

    /// Secondary: where the NBD server receiving the primary's writes listens,
    /// `unix:PATH` or `tcp:HOST:PORT`. May be left out with --control: QEMU's
    /// `nbd-server-start` + `nbd-server-add` then open it at runtime.
    #[arg(long, value_name = "unix:PATH|tcp:HOST:PORT")]
    pub nbd_listen: Option<String>,

    /// Secondary: NBD export name of the secondary disk. Default: parent0.
    #[arg(long, value_name = "NAME")]
    pub nbd_export: Option<String>,

    /// Secondary: an NBD client must finish its whole negotiation (TLS
    /// included) this many seconds after it connected, or it is closed; it
    /// is also the longest a client waits for a slot. Default: 30
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    pub nbd_handshake_timeout: Option<u64>,

    /// Secondary: an NBD connection with nothing in flight for this many
    /// seconds may be evicted for a waiting client; a client that takes no
    /// reply bytes, or does not complete a WRITE payload, for this long is
    /// closed. Default: 60
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..))]
    pub nbd_idle_timeout: Option<u64>,

    /// Secondary: WRITE payload bytes the NBD server holds in flight for all
    /// its clients together (K/M/G suffixes; at least 32M); READs are sent in
    /// 256K pieces and need no budget. Default: 256M
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub nbd_max_memory: Option<u64>,

    /// Primary: the secondary's NBD export, `nbd+unix:///NAME?socket=PATH` or
    /// `nbd://HOST:PORT/NAME`.
    #[arg(long, value_name = "URI")]
    pub secondary: Option<String>,

    /// Primary: a forwarded request the secondary has not answered after this
    /// many seconds counts as a lost secondary: the primary records the error,
    /// stops forwarding and keeps serving its guest (0: wait forever).
    /// Default: 15
    #[arg(long, value_name = "SECONDS")]
    pub forward_timeout: Option<u64>,

    /// Primary: what guest writes do once the secondary has taken over (it
    /// refused a forwarded write as fenced): `hold` keeps them pending until
    /// the tooling stops this side (like QEMU's werror=stop), `error` fails
    /// them. Either way none is acknowledged. Default: hold
    #[arg(long, value_enum, value_name = "hold|error")]
    pub on_fenced: Option<OnFenced>,

    /// Replication cluster size (copy-before-write and dirty tracking unit): a
    /// power of two, at least 4096. Accepts K/M suffixes. Default: 64K.
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub cluster_size: Option<u64>,

    /// NBD over TLS (STARTTLS) with QEMU's tls-creds-x509 directory layout:
    /// the secondary reads ca-cert.pem, server-cert.pem, server-key.pem and
    /// requires a client certificate; the primary reads ca-cert.pem,
    /// client-cert.pem, client-key.pem. SIGHUP reloads them.
    #[arg(long, value_name = "DIR")]
    pub tls_creds_x509: Option<PathBuf>,

    /// NBD over TLS with pre-shared keys, in QEMU's tls-creds-psk format: a
    /// keys.psk file of username:hexkey lines (psktool -u NAME -p FILE), or
    /// QEMU's directory holding keys.psk. The secondary picks the key by the
    /// client's username; the primary sends --tls-psk-username. Runs on
    /// GnuTLS (libgnutls.so.30, loaded at start), as QEMU does. SIGHUP
    /// reloads it.
    #[arg(long, value_name = "FILE")]
    pub tls_creds_psk: Option<PathBuf>,

    /// Primary: the username whose keys.psk line --tls-creds-psk uses (QEMU's
    /// tls-creds-psk username=). Default: qemu
    #[arg(long, value_name = "NAME")]
    pub tls_psk_username: Option<String>,

    /// Primary: the name the secondary's certificate must carry. Default: the
    /// host of --secondary (localhost for a Unix socket).
    #[arg(long, value_name = "NAME")]
    pub tls_hostname: Option<String>,

    /// Secondary: client identities allowed in, as certificate subject DNs in
    /// QEMU's rendering (e.g. "C=GB,O=Example,CN=primary") or, with
    /// --tls-creds-psk, PSK usernames; @FILE reads one per line. Default: any
    /// certificate the CA signed, any username of keys.psk.
    #[arg(long, value_name = "IDENTITY", num_args = 1..)]
    pub tls_authz: Vec<String>,

    /// Secondary: allow --nbd-listen (or QMP nbd-server-start) on a
    /// non-loopback TCP address without TLS.
    #[arg(long)]
    pub nbd_insecure: bool,

    /// Serve I/O and replication statistics in Prometheus text format on
    /// `unix:PATH` (mode 0600) or `tcp:HOST:PORT` (loopback only: the
    /// endpoint has no authentication). The same figures are always on the
    /// control socket (query-blockstats, `colo-blk ctl stats`).
    #[arg(long, value_name = "unix:PATH|tcp:HOST:PORT")]
    pub metrics: Option<String>,
}

/// A validated `serve` configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// vhost-user socket path.
    pub socket: PathBuf,
    /// Disk image path.
    pub disk: PathBuf,
    /// Size to create the image with.
    pub size: Option<u64>,
    /// Serve read-only.
    pub read_only: bool,
    /// Number of queues (1-64).
    pub num_queues: u16,
    /// Queue size (power of two, 4-32768).
    pub queue_size: u16,
    /// O_DIRECT.
    pub direct: bool,
    /// Synchronous or io_uring.
    pub io_engine: Engine,
    /// Adaptive polling window, at most this many µs (0: never poll).
    pub poll_us: u32,
    /// GET_ID answer (≤ 20 bytes).
    pub serial: String,
    /// 512 or 4096.
    pub logical_block_size: u32,
    /// QMP control socket.
    pub control: Option<PathBuf>,
    /// Replication cluster size (power of two ≥ 4096).
    pub cluster_size: u64,
    /// Plain backend or replication role.
    pub mode: ModeConfig,
    /// NBD over TLS on the replication link.
    pub tls: Option<TlsConfig>,
    /// Prometheus endpoint.
    pub metrics: Option<MetricsAddr>,
    /// `--nbd-insecure`: a plain-text NBD export may listen beyond loopback
    /// (also when opened later by `nbd-server-start`).
    pub nbd_insecure: bool,
}

/// `--tls-*` settings (credentials in QEMU's layouts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// The credentials.
    pub creds: TlsCreds,
    /// Primary: the server name to check.
    pub hostname: Option<String>,
    /// Secondary: allowed client identities (empty: any the CA signed).
    pub authz: Vec<String>,
}

/// Which credentials `--tls-creds-*` gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsCreds {
    /// `--tls-creds-x509 DIR`.
    X509(PathBuf),
    /// `--tls-creds-psk FILE`, and the primary's `--tls-psk-username`.
    Psk {
        /// keys.psk, or a directory holding it.
        file: PathBuf,
        /// The username the primary sends.
        username: String,
    },
}

impl TlsCreds {
    /// The directory or file, for log lines.
    pub fn path(&self) -> &std::path::Path {
        match self {
            TlsCreds::X509(dir) => dir,
            TlsCreds::Psk { file, .. } => file,
        }
    }
}

/// What the daemon stacks on top of the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModeConfig {
    /// The disk itself.
    Plain,
    /// COLO primary.
    Primary(PrimaryConfig),
    /// COLO secondary.
    Secondary(SecondaryConfig),
}

/// Primary-only settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrimaryConfig {
    /// The secondary's NBD export.
    pub secondary: NbdUri,
    /// How long a forwarded request may go unanswered (`None`: forever).
    pub forward_timeout: Option<std::time::Duration>,
    /// What guest writes do once fenced.
    pub on_fenced: OnFenced,
}

/// Secondary-only settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecondaryConfig {
    /// Active overlay file.
    pub active: PathBuf,
    /// Hidden overlay file.
    pub hidden: PathBuf,
    /// Where the NBD server listens from startup; `None`: opened at runtime
    /// by `nbd-server-start` + `nbd-server-add` on the control socket.
    pub nbd_listen: Option<NbdAddr>,
    /// NBD export name.
    pub nbd_export: String,
    /// What hostile NBD clients meet.
    pub nbd_limits: ServerLimits,
}

/// A command line that parses but does not make sense.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A flag value out of range.
    #[error("--{flag}: {why}")]
    Invalid {
        /// The flag, without dashes.
        flag: &'static str,
        /// What is wrong with it.
        why: String,
    },
    /// A flag that only makes sense in another mode.
    #[error("--{flag} is only valid with --mode {mode}")]
    WrongMode {
        /// The flag, without dashes.
        flag: &'static str,
        /// The mode it belongs to.
        mode: &'static str,
    },
    /// A flag the mode cannot run without.
    #[error("--mode {mode} needs --{flag}")]
    Missing {
        /// The missing flag.
        flag: &'static str,
        /// The mode that needs it.
        mode: &'static str,
    },
}

fn invalid(flag: &'static str, why: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        flag,
        why: why.into(),
    }
}

impl TryFrom<ServeArgs> for Config {
    type Error = ConfigError;

    fn try_from(a: ServeArgs) -> Result<Self, ConfigError> {
        if a.socket.as_os_str().is_empty() {
            return Err(invalid("socket", "empty path"));
        }
        if a.disk.as_os_str().is_empty() {
            return Err(invalid("disk", "empty path"));
        }
        if !matches!(a.logical_block_size, 512 | 4096) {
            return Err(invalid(
                "logical-block-size",
                format!("{} is neither 512 nor 4096", a.logical_block_size),
            ));
        }
        if let Some(size) = a.size {
            let lbs = u64::from(a.logical_block_size);
            if size == 0 || size % lbs != 0 {
                return Err(invalid(
                    "size",
                    format!("{size} is not a positive multiple of the {lbs}-byte block size"),
                ));
            }
        } else if !a.disk.exists() {
            return Err(invalid(
                "disk",
                format!(
                    "{} does not exist (pass --size to create it)",
                    a.disk.display()
                ),
            ));
        }
        if !(1..=MAX_QUEUES).contains(&a.num_queues) {
            return Err(invalid(
                "num-queues",
                format!("{} is not in 1..={MAX_QUEUES}", a.num_queues),
            ));
        }
        if a.poll_us > MAX_POLL_US {
            return Err(invalid(
                "poll-us",
                format!("{} is more than {MAX_POLL_US} microseconds", a.poll_us),
            ));
        }
        if !a.queue_size.is_power_of_two() || !(4..=MAX_QUEUE_SIZE).contains(&a.queue_size) {
            return Err(invalid(
                "queue-size",
                format!(
                    "{} is not a power of two in 4..={MAX_QUEUE_SIZE}",
                    a.queue_size
                ),
            ));
        }
        if a.serial.len() > ID_BYTES {
            return Err(invalid(
                "serial",
                format!("{:?} is longer than 20 bytes", a.serial),
            ));
        }
        let cluster_size = a.cluster_size.unwrap_or(DEFAULT_CLUSTER_SIZE);
        if !cluster_size.is_power_of_two() || !(4096..=MAX_CLUSTER_SIZE).contains(&cluster_size) {
            return Err(invalid(
                "cluster-size",
                format!("{cluster_size} is not a power of two between 4096 and 64M"),
            ));
        }
        let mode = mode_config(&a)?;
        if a.readonly && mode != ModeConfig::Plain {
            return Err(invalid("readonly", "replication needs a writable disk"));
        }
        let tls = tls_config(&a, &mode)?;
        let metrics = match &a.metrics {
            None => None,
            Some(m) => Some(MetricsAddr::parse(m).map_err(|e| match e {
                StatsError::Addr(_, why) => invalid("metrics", why),
                other => invalid("metrics", other.to_string()),
            })?),
        };
        Ok(Config {
            socket: a.socket,
            disk: a.disk,
            size: a.size,
            read_only: a.readonly,
            num_queues: a.num_queues,
            queue_size: a.queue_size,
            direct: a.direct,
            io_engine: a.io_engine,
            poll_us: a.poll_us,
            serial: a.serial,
            logical_block_size: a.logical_block_size,
            control: a.control,
            cluster_size,
            mode,
            tls,
            metrics,
            nbd_insecure: a.nbd_insecure,
        })
    }
}

fn tls_config(a: &ServeArgs, mode: &ModeConfig) -> Result<Option<TlsConfig>, ConfigError> {
    if a.tls_hostname.is_some() && !matches!(mode, ModeConfig::Primary(_)) {
        return Err(ConfigError::WrongMode {
            flag: "tls-hostname",
            mode: "primary",
        });
    }
    if a.tls_psk_username.is_some() && !matches!(mode, ModeConfig::Primary(_)) {
        return Err(ConfigError::WrongMode {
            flag: "tls-psk-username",
            mode: "primary",
        });
    }
    if !a.tls_authz.is_empty() && !matches!(mode, ModeConfig::Secondary(_)) {
        return Err(ConfigError::WrongMode {
            flag: "tls-authz",
            mode: "secondary",
        });
    }
    if a.nbd_insecure && !matches!(mode, ModeConfig::Secondary(_)) {
        return Err(ConfigError::WrongMode {
            flag: "nbd-insecure",
            mode: "secondary",
        });
    }
    if a.tls_creds_x509.is_some() && a.tls_creds_psk.is_some() {
        return Err(invalid(
            "tls-creds-psk",
            "give either --tls-creds-x509 or --tls-creds-psk, not both",
        ));
    }
    if a.tls_creds_psk.is_some() && a.tls_hostname.is_some() {
        return Err(invalid(
            "tls-hostname",
            "only with --tls-creds-x509: a pre-shared key has no certificate to check",
        ));
    }
    if a.tls_psk_username.is_some() && a.tls_creds_psk.is_none() {
        return Err(invalid("tls-psk-username", "needs --tls-creds-psk"));
    }
    let creds = match (&a.tls_creds_x509, &a.tls_creds_psk) {
        (Some(dir), _) => TlsCreds::X509(dir.clone()),
        (None, Some(file)) => {
            let username = a
                .tls_psk_username
                .clone()
                .unwrap_or_else(|| colo_blk::tls::psk::DEFAULT_USERNAME.to_string());
            if username.is_empty() || username.contains([':', '\n', '\0']) {
                return Err(invalid(
                    "tls-psk-username",
                    format!("{username:?} cannot be a keys.psk username"),
                ));
            }
            TlsCreds::Psk {
                file: file.clone(),
                username,
            }
        }
        (None, None) => {
            if a.tls_hostname.is_some() || !a.tls_authz.is_empty() {
                return Err(invalid(
                    if a.tls_hostname.is_some() {
                        "tls-hostname"
                    } else {
                        "tls-authz"
                    },
                    "needs --tls-creds-x509 or --tls-creds-psk",
                ));
            }
            if let ModeConfig::Secondary(SecondaryConfig {
                nbd_listen: Some(listen),
                ..
            }) = mode
            {
                if !a.nbd_insecure && !listen.is_loopback_or_unix() {
                    return Err(invalid(
                        "nbd-listen",
                        format!(
                            "{listen} is reachable from the network: give --tls-creds-x509 \
                             or --tls-creds-psk, or --nbd-insecure to serve the disk there \
                             in plain text"
                        ),
                    ));
                }
            }
            return Ok(None);
        }
    };
    if *mode == ModeConfig::Plain {
        return Err(invalid(
            match creds {
                TlsCreds::X509(_) => "tls-creds-x509",
                TlsCreds::Psk { .. } => "tls-creds-psk",
            },
            "only valid with --mode primary or --mode secondary",
        ));
    }
    let mut authz = Vec::new();
    for entry in &a.tls_authz {
        match entry.strip_prefix('@') {
            Some(file) => {
                let text = std::fs::read_to_string(file)
                    .map_err(|e| invalid("tls-authz", format!("{file}: {e}")))?;
                authz.extend(
                    text.lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty() && !l.starts_with('#'))
                        .map(String::from),
                );
            }
            None => authz.push(entry.clone()),
        }
    }
    Ok(Some(TlsConfig {
        creds,
        hostname: a.tls_hostname.clone(),
        authz,
    }))
}

/// Unix sockets and loopback TCP stay usable without TLS.
fn mode_config(a: &ServeArgs) -> Result<ModeConfig, ConfigError> {
    let secondary_only = [
        ("active", a.active.is_some()),
        ("hidden", a.hidden.is_some()),
        ("nbd-listen", a.nbd_listen.is_some()),
        ("nbd-export", a.nbd_export.is_some()),
        ("nbd-handshake-timeout", a.nbd_handshake_timeout.is_some()),
        ("nbd-idle-timeout", a.nbd_idle_timeout.is_some()),
        ("nbd-max-memory", a.nbd_max_memory.is_some()),
    ];
    let primary_only = [
        ("secondary", a.secondary.is_some()),
        ("forward-timeout", a.forward_timeout.is_some()),
        ("on-fenced", a.on_fenced.is_some()),
    ];
    let misplaced = |flags: &[(&'static str, bool)], mode| {
        flags
            .iter()
            .find(|(_, given)| *given)
            .map_or(Ok(()), |(flag, _)| {
                Err(ConfigError::WrongMode { flag, mode })
            })
    };
    match a.mode {
        None => {
            misplaced(&secondary_only, "secondary")?;
            misplaced(&primary_only, "primary")?;
            Ok(ModeConfig::Plain)
        }
        Some(Mode::Primary) => {
            misplaced(&secondary_only, "secondary")?;
            let uri = a.secondary.as_deref().ok_or(ConfigError::Missing {
                flag: "secondary",
                mode: "primary",
            })?;
            let timeout = a.forward_timeout.unwrap_or(DEFAULT_FORWARD_TIMEOUT_SECS);
            Ok(ModeConfig::Primary(PrimaryConfig {
                secondary: parse_nbd_uri(uri).map_err(|why| invalid("secondary", why))?,
                forward_timeout: (timeout > 0).then(|| std::time::Duration::from_secs(timeout)),
                on_fenced: a.on_fenced.unwrap_or_default(),
            }))
        }
        Some(Mode::Secondary) => {
            misplaced(&primary_only, "primary")?;
            if a.nbd_listen.is_none() && a.control.is_none() {
                // Without either, nothing could ever open the NBD server.
                return Err(ConfigError::Missing {
                    flag: "nbd-listen",
                    mode: "secondary",
                });
            }
            let export = a
                .nbd_export
                .clone()
                .unwrap_or(colo_blk::nbd::DEFAULT_EXPORT.into());
            if export.is_empty() || export.len() > 4096 {
                return Err(invalid("nbd-export", "must be 1 to 4096 bytes"));
            }
            let sibling = |ext: &str| {
                let mut p = a.disk.clone().into_os_string();
                p.push(ext);
                PathBuf::from(p)
            };
            Ok(ModeConfig::Secondary(SecondaryConfig {
                active: a.active.clone().unwrap_or_else(|| sibling(".active")),
                hidden: a.hidden.clone().unwrap_or_else(|| sibling(".hidden")),
                nbd_listen: a
                    .nbd_listen
                    .as_deref()
                    .map(parse_nbd_listen)
                    .transpose()
                    .map_err(|why| invalid("nbd-listen", why))?,
                nbd_export: export,
                nbd_limits: nbd_limits(a)?,
            }))
        }
    }
}

fn nbd_limits(a: &ServeArgs) -> Result<ServerLimits, ConfigError> {
    let mut l = ServerLimits::default();
    if let Some(s) = a.nbd_handshake_timeout {
        l.handshake_timeout = std::time::Duration::from_secs(s);
    }
    if let Some(s) = a.nbd_idle_timeout {
        l.idle_timeout = std::time::Duration::from_secs(s);
    }
    if let Some(b) = a.nbd_max_memory {
        if b < u64::from(colo_blk::nbd::MAX_PAYLOAD) {
            return Err(invalid(
                "nbd-max-memory",
                "must be at least 32M (one request)",
            ));
        }
        l.max_memory = b;
    }
    Ok(l)
}

/// Parses a byte count with an optional K/M/G/T suffix (powers of 1024);
/// shared with `ctl resize`.
pub use colo_blk::units::parse_size;

/// Parses `--nbd-listen`: `unix:PATH` or `tcp:HOST:PORT` (`tcp:[v6addr]:PORT`).
pub fn parse_nbd_listen(s: &str) -> Result<NbdAddr, String> {
    let addr = NbdAddr::parse_listen(s).map_err(|e| e.to_string())?;
    if matches!(addr, NbdAddr::Tcp { port: 0, .. }) {
        return Err(format!("{s:?}: port 0 would be unknown to the primary"));
    }
    Ok(addr)
}

/// Parses `--secondary`: QEMU's `nbd+unix:///NAME?socket=PATH` or
/// `nbd://HOST[:PORT]/NAME`.
pub fn parse_nbd_uri(s: &str) -> Result<NbdUri, String> {
    NbdUri::parse(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn parse(extra: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec![
            "serve",
            "--socket",
            "/tmp/s.sock",
            "--disk",
            "/nonexistent/img",
        ];
        argv.extend_from_slice(extra);
        if !extra.contains(&"--size") {
            argv.extend_from_slice(&["--size", "1M"]);
        }
        Config::try_from(Cli::try_parse_from(argv).unwrap().serve)
    }

    #[test]
    fn plain_defaults() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.mode, ModeConfig::Plain);
        assert_eq!(
            (c.num_queues, c.queue_size, c.logical_block_size),
            (1, 256, 512)
        );
        assert_eq!(c.cluster_size, 64 * 1024);
        assert_eq!(c.size, Some(1 << 20));
    }

    #[test]
    fn out_of_range_values_are_rejected_with_the_flag_named() {
        let flag = |extra: &[&str]| match parse(extra) {
            Err(ConfigError::Invalid { flag, .. }) => flag,
            other => panic!("{extra:?} gave {other:?}"),
        };
        assert_eq!(
            flag(&["--logical-block-size", "1024"]),
            "logical-block-size"
        );
        assert_eq!(flag(&["--num-queues", "0"]), "num-queues");
        assert_eq!(flag(&["--num-queues", "65"]), "num-queues");
        assert_eq!(flag(&["--queue-size", "100"]), "queue-size");
        assert_eq!(flag(&["--queue-size", "2"]), "queue-size");
        assert_eq!(flag(&["--serial", "123456789012345678901"]), "serial");
        assert_eq!(flag(&["--cluster-size", "2048"]), "cluster-size");
        assert_eq!(flag(&["--cluster-size", "12K"]), "cluster-size");
        assert_eq!(flag(&["--size", "1000"]), "size");
        assert_eq!(
            flag(&["--size", "2K", "--logical-block-size", "4096"]),
            "size"
        );
        let missing = Config::try_from(
            Cli::try_parse_from(["serve", "--socket", "s", "--disk", "/nonexistent/img"])
                .unwrap()
                .serve,
        );
        assert!(matches!(
            missing,
            Err(ConfigError::Invalid { flag: "disk", .. })
        ));
    }

    #[test]
    fn mode_flags_are_checked_against_the_mode() {
        assert_eq!(
            parse(&["--active", "a"]),
            Err(ConfigError::WrongMode {
                flag: "active",
                mode: "secondary"
            })
        );
        assert_eq!(
            parse(&[
                "--mode",
                "primary",
                "--nbd-listen",
                "unix:/x",
                "--secondary",
                "nbd://h/e"
            ]),
            Err(ConfigError::WrongMode {
                flag: "nbd-listen",
                mode: "secondary"
            })
        );
        assert_eq!(
            parse(&["--mode", "primary"]),
            Err(ConfigError::Missing {
                flag: "secondary",
                mode: "primary"
            })
        );
        assert_eq!(
            parse(&["--mode", "secondary"]),
            Err(ConfigError::Missing {
                flag: "nbd-listen",
                mode: "secondary"
            })
        );
        assert!(matches!(
            parse(&[
                "--mode",
                "secondary",
                "--nbd-listen",
                "unix:/x",
                "--readonly"
            ]),
            Err(ConfigError::Invalid {
                flag: "readonly",
                ..
            })
        ));
    }

    #[test]
    fn secondary_defaults_follow_the_image_name() {
        let c = parse(&["--mode", "secondary", "--nbd-listen", "tcp:127.0.0.1:10809"]).unwrap();
        let ModeConfig::Secondary(s) = c.mode else {
            panic!("not secondary")
        };
        assert_eq!(s.active, PathBuf::from("/nonexistent/img.active"));
        assert_eq!(s.hidden, PathBuf::from("/nonexistent/img.hidden"));
        assert_eq!(s.nbd_export, "parent0");
        assert_eq!(
            s.nbd_listen,
            Some(NbdAddr::Tcp {
                host: "127.0.0.1".into(),
                port: 10809
            })
        );
    }

    #[test]
    fn nbd_addresses_parse() {
        assert_eq!(
            parse_nbd_uri("nbd+unix:///parent0?socket=/run/s.sock").unwrap(),
            NbdUri {
                addr: NbdAddr::Unix("/run/s.sock".into()),
                export: "parent0".into()
            }
        );
        assert_eq!(
            parse_nbd_uri("nbd://[::1]:10810/disk").unwrap(),
            NbdUri {
                addr: NbdAddr::Tcp {
                    host: "::1".into(),
                    port: 10810
                },
                export: "disk".into()
            }
        );
        assert_eq!(
            parse_nbd_uri("nbd://host/e").unwrap(),
            NbdUri {
                addr: NbdAddr::Tcp {
                    host: "host".into(),
                    port: 10809
                },
                export: "e".into()
            }
        );
        parse_nbd_uri("nbd+unix:///e").unwrap_err();
        parse_nbd_uri("http://x").unwrap_err();
        parse_nbd_listen("tcp:host").unwrap_err();
        parse_nbd_listen("tcp:host:0").unwrap_err();
        assert_eq!(
            parse_nbd_listen("unix:/a/b").unwrap(),
            NbdAddr::Unix("/a/b".into())
        );
    }

    #[test]
    fn non_loopback_nbd_listen_needs_tls_or_nbd_insecure() {
        let sec = |listen: &str, extra: &[&str]| {
            let mut v = vec!["--mode", "secondary", "--nbd-listen", listen];
            v.extend_from_slice(extra);
            parse(&v)
        };
        match sec("tcp:0.0.0.0:10809", &[]) {
            Err(
                e @ ConfigError::Invalid {
                    flag: "nbd-listen", ..
                },
            ) => {
                assert!(e.to_string().contains("--nbd-insecure"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        sec("tcp:0.0.0.0:10809", &["--nbd-insecure"]).unwrap();
        sec("tcp:0.0.0.0:10809", &["--tls-creds-x509", "/d"]).unwrap();
        sec("tcp:127.0.0.1:10809", &[]).unwrap();
        sec("tcp:[::1]:10809", &[]).unwrap();
        sec("tcp:localhost:10809", &[]).unwrap();
        sec("unix:/x", &[]).unwrap();
    }

    #[test]
    fn tls_flags_are_checked_against_the_mode() {
        let primary = |extra: &[&str]| {
            let mut v = vec!["--mode", "primary", "--secondary", "nbd://h/e"];
            v.extend_from_slice(extra);
            parse(&v)
        };
        let psk = primary(&["--tls-creds-psk", "/k"]).unwrap().tls.unwrap();
        assert_eq!(
            psk.creds,
            TlsCreds::Psk {
                file: "/k".into(),
                username: "qemu".into()
            }
        );
        let named = primary(&["--tls-creds-psk", "/k", "--tls-psk-username", "alice"]);
        assert!(matches!(
            named.unwrap().tls.unwrap().creds,
            TlsCreds::Psk { username, .. } if username == "alice"
        ));
        for (extra, flag) in [
            (&["--tls-psk-username", "alice"][..], "tls-psk-username"),
            (
                &["--tls-creds-psk", "/k", "--tls-hostname", "h"][..],
                "tls-hostname",
            ),
            (
                &["--tls-creds-psk", "/k", "--tls-psk-username", "a:b"][..],
                "tls-psk-username",
            ),
        ] {
            match primary(extra) {
                Err(ConfigError::Invalid { flag: f, .. }) if f == flag => {}
                other => panic!("{extra:?}: {other:?}"),
            }
        }
        primary(&["--tls-creds-psk", "/k", "--tls-creds-x509", "/d"]).unwrap_err();
        assert!(matches!(
            parse(&[
                "--mode",
                "secondary",
                "--nbd-listen",
                "unix:/x",
                "--tls-creds-psk",
                "/k",
                "--tls-psk-username",
                "a"
            ]),
            Err(ConfigError::WrongMode {
                flag: "tls-psk-username",
                ..
            })
        ));
        let sec = parse(&[
            "--mode",
            "secondary",
            "--nbd-listen",
            "tcp:0.0.0.0:10809",
            "--tls-creds-psk",
            "/k",
            "--tls-authz",
            "alice",
        ])
        .unwrap()
        .tls
        .unwrap();
        assert_eq!(sec.authz, vec!["alice".to_string()]);
        assert!(matches!(
            parse(&[
                "--mode",
                "secondary",
                "--nbd-listen",
                "unix:/x",
                "--tls-hostname",
                "h"
            ]),
            Err(ConfigError::WrongMode {
                flag: "tls-hostname",
                ..
            })
        ));
        assert!(matches!(
            parse(&[
                "--mode",
                "primary",
                "--secondary",
                "nbd://h/e",
                "--tls-authz",
                "CN=a"
            ]),
            Err(ConfigError::WrongMode {
                flag: "tls-authz",
                ..
            })
        ));
        assert!(matches!(
            parse(&["--tls-creds-x509", "/d"]),
            Err(ConfigError::Invalid {
                flag: "tls-creds-x509",
                ..
            })
        ));
        let c = parse(&[
            "--mode",
            "secondary",
            "--nbd-listen",
            "unix:/x",
            "--tls-creds-x509",
            "/d",
            "--tls-authz",
            "CN=a,O=B",
            "CN=c",
        ])
        .unwrap();
        assert_eq!(
            c.tls.unwrap().authz,
            vec!["CN=a,O=B".to_string(), "CN=c".to_string()]
        );
    }
}
