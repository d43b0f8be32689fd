//! The secondary's NBD export as QEMU's NBD-server commands see it
//! (`nbd-server-start`, `nbd-server-add`, `block-export-add`,
//! `nbd-server-remove`, `block-export-del`, `nbd-server-stop`).
//!
//! colo-blk serves one NBD export: the secondary disk's primary view. The
//! commands open and close the same [`nbd::Server`] that `--nbd-listen` opens at
//! startup. QEMU keeps one listener and adds exports to it; here the listener
//! is bound when the export is added (the server is built for one export
//! name), so between `nbd-server-start` and `nbd-server-add` a client cannot
//! connect, where QEMU would refuse its export name: the same outcome for a
//! primary. A TCP address is still checked at `nbd-server-start` by binding it
//! once, so an address in use is reported where QEMU reports it.

use crate::block::{BlockDev, BlockError, Extent, SharedDev};
use crate::nbd::{self, NbdAddr, NbdError};
use crate::sync::MutexExt;
use std::sync::{Arc, Mutex, MutexGuard};
use vm_memory::VolatileSlice;

/// One export as `query-block-exports` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// The export id (`nbd-server-add`: its name).
    pub id: String,
    /// The node it serves (the name the client used for the disk).
    pub node: String,
}

struct Export {
    id: String,
    name: String,
    node: String,
    server: nbd::Server,
}

#[derive(Default)]
struct State {
    /// Set by `nbd-server-start` (or `--nbd-listen`): where to listen.
    listen: Option<(NbdAddr, Option<u32>)>,
    export: Option<Export>,
}

/// How an export is asked for.
#[derive(Debug, Clone)]
pub struct AddRequest<'a> {
    /// Export id (`nbd-server-add`: the name; `block-export-add`: `id`).
    pub id: &'a str,
    /// The node to serve.
    pub node: &'a str,
    /// Export name clients ask for.
    pub name: &'a str,
    /// Whether clients may write.
    pub writable: bool,
    /// `nbd-server-add` names the node `device`; QEMU's error text differs.
    pub by_device: bool,
}

/// The NBD export a control socket can open and close. Shared by all clients.
pub struct NbdExports {
    dev: SharedDev,
    nodes: Vec<String>,
    base: nbd::ServerOptions,
    /// `--nbd-insecure`: a plain-text export may listen beyond loopback.
    plain_network: std::sync::atomic::AtomicBool,
    state: Mutex<State>,
}

impl NbdExports {
    /// Exports of `dev`, known under the node names `nodes` (QEMU setups call
    /// the secondary disk `parent0`; the configured export name is accepted
    /// too). `base` gives the server's limits; its export name is replaced by
    /// the one each `add` asks for.
    pub fn new(dev: SharedDev, nodes: Vec<String>, base: nbd::ServerOptions) -> Arc<Self> {
        Arc::new(NbdExports {
            dev,
            nodes,
            base,
            plain_network: std::sync::atomic::AtomicBool::new(false),
            state: Mutex::new(State::default()),
        })
    }

    /// Lets `nbd-server-start` listen beyond loopback without TLS, as
    /// `--nbd-insecure` lets `--nbd-listen` do.
    pub fn allow_plain_network(&self) {
        self.plain_network
            .store(true, std::sync::atomic::Ordering::Release);
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock_or_recover()
    }

    /// `--nbd-listen`: listen on `addr` and serve the disk, writable, as `name`
    /// (export id and node name `name` too).
    pub fn start_now(&self, addr: NbdAddr, name: &str) -> Result<(), NbdError> {
        let mut st = self.state();
        st.listen = Some((addr.clone(), None));
        let server = self.serve(&addr, None, name, true)?;
        st.export = Some(Export {
            id: name.to_string(),
            name: name.to_string(),
            node: name.to_string(),
            server,
        });
        Ok(())
    }

    fn serve(
        &self,
        addr: &NbdAddr,
        max_connections: Option<u32>,
        name: &str,
        writable: bool,
    ) -> Result<nbd::Server, NbdError> {
        let mut opts = self.base.clone();
        opts.export_name = name.to_string();
        // QEMU's 0 means "no limit"; ours always has one.
        if let Some(n) = max_connections.filter(|&n| n > 0) {
            opts.max_connections = n as usize;
        }
        let dev: SharedDev = if writable {
            self.dev.clone()
        } else {
            Arc::new(ReadOnly(self.dev.clone()))
        };
        nbd::Server::start(addr, dev, opts)
    }

    /// `nbd-server-start`.
    pub fn start(&self, addr: NbdAddr, max_connections: Option<u32>) -> Result<(), String> {
        let mut st = self.state();
        if st.listen.is_some() {
            return Err("NBD server already running".into());
        }
        // The same policy as --nbd-listen: plain text stays on this host.
        if self.base.tls.is_none()
            && !addr.is_loopback_or_unix()
            && !self
                .plain_network
                .load(std::sync::atomic::Ordering::Acquire)
        {
            return Err(format!(
                "{addr} is reachable from the network and this daemon has no TLS \
                 credentials: start it with --tls-creds-x509 or --tls-creds-psk, or with \
                 --nbd-insecure to serve the disk there in plain text"
            ));
        }
        if let NbdAddr::Tcp { host, port } = &addr {
            std::net::TcpListener::bind((host.as_str(), *port))
                .map_err(|e| format!("Failed to bind socket: {e}"))?;
        }
        st.listen = Some((addr, max_connections));
        Ok(())
    }

    /// `nbd-server-add` / `block-export-add`.
    pub fn add(&self, req: &AddRequest<'_>) -> Result<(), String> {
        let mut st = self.state();
        let Some((addr, max)) = st.listen.clone() else {
            return Err("NBD server not running".into());
        };
        if !self.nodes.iter().any(|n| n == req.node) {
            let device = if req.by_device { req.node } else { "" };
            return Err(format!(
                "Cannot find device='{device}' nor node-name='{}'",
                req.node
            ));
        }
        if let Some(e) = &st.export {
            if e.id == req.id {
                return Err(format!("Block export id '{}' is already in use", req.id));
            }
            if e.name == req.name {
                return Err(format!(
                    "NBD server already has export named '{}'",
                    req.name
                ));
            }
            return Err(format!(
                "colo-blk serves one NBD export (the secondary disk); remove export '{}' first",
                e.id
            ));
        }
        let server = self
            .serve(&addr, max, req.name, req.writable)
            .map_err(|e| format!("Failed to start the NBD export: {e}"))?;
        st.export = Some(Export {
            id: req.id.to_string(),
            name: req.name.to_string(),
            node: req.node.to_string(),
            server,
        });
        Ok(())
    }

    /// `nbd-server-remove` / `block-export-del`: the export goes and its
    /// clients are disconnected (in both of QEMU's modes: an old primary must
    /// not keep writing through a connection it already had).
    pub fn remove(&self, id: &str) -> Result<(), String> {
        let export = {
            let mut st = self.state();
            match &st.export {
                Some(e) if e.id == id => st.export.take(),
                _ => return Err(format!("Export '{id}' is not found")),
            }
        };
        if let Some(e) = export {
            e.server.shutdown();
        }
        Ok(())
    }

    /// `nbd-server-stop`: closes the listener and every connection.
    pub fn stop(&self) -> Result<(), String> {
        let export = {
            let mut st = self.state();
            if st.listen.take().is_none() {
                return Err("NBD server not running".into());
            }
            st.export.take()
        };
        if let Some(e) = export {
            e.server.shutdown();
        }
        Ok(())
    }

    /// `query-block-exports`.
    pub fn list(&self) -> Vec<ExportInfo> {
        self.state()
            .export
            .iter()
            .map(|e| ExportInfo {
                id: e.id.clone(),
                node: e.node.clone(),
            })
            .collect()
    }

    /// The address the export listens on, once one is open (the real port of
    /// `tcp:HOST:0`).
    pub fn local_addr(&self) -> Option<NbdAddr> {
        self.state()
            .export
            .as_ref()
            .map(|e| e.server.local_addr().clone())
    }

    /// Daemon shutdown: like `nbd-server-stop`, without the error when the
    /// server was never started. After it returns no primary write is running.
    pub fn shutdown(&self) {
        let _ = self.stop();
    }
}

/// A read-only view of a node (`nbd-server-add` without `writable`).
struct ReadOnly(SharedDev);

impl BlockDev for ReadOnly {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read_vectored(&self, offset: u64, bufs: &[VolatileSlice<'_>]) -> crate::block::Result<()> {
        self.0.read_vectored(offset, bufs)
    }
    fn write_vectored(&self, _: u64, _: &[VolatileSlice<'_>]) -> crate::block::Result<()> {
        Err(BlockError::ReadOnly)
    }
    fn flush(&self) -> crate::block::Result<()> {
        self.0.flush()
    }
    fn discard(&self, _: u64, _: u64) -> crate::block::Result<()> {
        Err(BlockError::ReadOnly)
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> crate::block::Result<()> {
        Err(BlockError::ReadOnly)
    }
    fn block_status(&self, offset: u64, len: u64) -> crate::block::Result<Extent> {
        self.0.block_status(offset, len)
    }
}
