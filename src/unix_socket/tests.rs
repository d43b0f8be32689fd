use super::*;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

/// Every entry of `dir`, sorted, so leftovers show up in assertion messages.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// What a client that waits for the path sees at the first moment it exists.
struct FirstSight {
    mode: u32,
    connect: io::Result<UnixStream>,
}

/// Starts a thread that polls for `path` and, the moment it exists, records
/// its mode and connects. Returns once the thread is polling.
fn watch(path: &Path) -> thread::JoinHandle<Option<FirstSight>> {
    let path = path.to_owned();
    let ready = Arc::new(Barrier::new(2));
    let r = Arc::clone(&ready);
    let t = thread::spawn(move || {
        r.wait();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(m) = std::fs::symlink_metadata(&path) {
                return Some(FirstSight {
                    mode: m.permissions().mode() & 0o777,
                    connect: UnixStream::connect(&path),
                });
            }
            thread::yield_now();
        }
        None
    });
    ready.wait();
    t
}

/// Binds `path` `rounds` times while a client waits for the path; returns the
/// mode each client saw, failing on the first refused connection.
fn race_clients(path: &Path, mode: Option<u32>, rounds: usize) -> Vec<u32> {
    let dir = path.parent().unwrap();
    (0..rounds)
        .map(|i| {
            let watcher = watch(path);
            let (listener, file) = bind(path, mode).unwrap();
            let seen = watcher.join().unwrap().expect("path never appeared");
            let stream = seen
                .connect
                .unwrap_or_else(|e| panic!("round {i}: connect as soon as the path exists: {e}"));
            let (accepted, _) = listener.accept().unwrap();
            drop((stream, accepted, listener, file));
            assert_eq!(entries(dir), Vec::<String>::new(), "round {i}: leftovers");
            seen.mode
        })
        .collect()
}

#[test]
fn a_client_that_waits_for_the_path_is_never_refused() {
    let dir = tempfile::tempdir().unwrap();
    race_clients(&dir.path().join("vhost.sock"), None, 2000);
}

#[test]
fn a_private_socket_is_never_visible_with_another_mode() {
    let dir = tempfile::tempdir().unwrap();
    let modes = race_clients(&dir.path().join("ctl.sock"), Some(0o600), 300);
    if let Some(m) = modes.iter().find(|&&m| m != 0o600) {
        panic!("the socket was visible with mode {m:o}");
    }
}

#[test]
fn without_a_mode_the_socket_keeps_the_umask_default_and_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    let (listener, _file) = bind(&path, None).unwrap();
    let _c = UnixStream::connect(&path).unwrap();
    listener.accept().unwrap();
    let mode = std::fs::symlink_metadata(&path)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    // A plain bind() gives the same mode, whatever this process's umask is.
    let plain = dir.path().join("plain.sock");
    let _l = UnixListener::bind(&plain).unwrap();
    let want = std::fs::symlink_metadata(&plain)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, want);
}

#[test]
fn a_stale_socket_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vhost.sock");
    // A listener that is closed leaves its file: what a crashed daemon leaves.
    drop(UnixListener::bind(&path).unwrap());
    UnixStream::connect(&path).unwrap_err();
    let (listener, _file) = bind(&path, Some(0o600)).unwrap();
    let _c = UnixStream::connect(&path).unwrap();
    listener.accept().unwrap();
    assert_eq!(entries(dir.path()), ["vhost.sock"]);
}

#[test]
fn a_live_socket_is_refused_and_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vhost.sock");
    let (first, _file) = bind(&path, None).unwrap();
    let err = bind(&path, None).unwrap_err();
    assert!(matches!(err, UnixSocketError::InUse(_)), "{err:?}");
    assert!(
        err.to_string().contains("another process is listening"),
        "{err}"
    );
    // The refusal's liveness probe is the first connection in the backlog.
    first.accept().unwrap();
    let _c = UnixStream::connect(&path).unwrap();
    first.accept().unwrap();
    assert_eq!(entries(dir.path()), ["vhost.sock"], "no staging leftovers");
}

#[test]
fn a_file_that_is_not_a_socket_is_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    std::fs::write(&path, b"data").unwrap();
    let err = bind(&path, None).unwrap_err();
    assert!(matches!(err, UnixSocketError::NotASocket(_)), "{err:?}");
    assert_eq!(std::fs::read(&path).unwrap(), b"data");
    assert_eq!(entries(dir.path()), ["disk.img"], "no staging leftovers");
}

#[test]
fn an_error_after_binding_leaves_no_staging_directory() {
    let dir = tempfile::tempdir().unwrap();
    // A directory is neither a socket nor replaceable; the error comes after
    // the socket was bound in the staging directory.
    let path = dir.path().join("taken");
    std::fs::create_dir(&path).unwrap();
    assert!(matches!(
        bind(&path, Some(0o600)),
        Err(UnixSocketError::NotASocket(_))
    ));
    assert_eq!(entries(dir.path()), ["taken"]);
}

#[test]
fn a_missing_directory_is_an_error_that_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no/such/dir/s.sock");
    let err = bind(&path, None).unwrap_err();
    assert!(matches!(err, UnixSocketError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("no/such/dir/s.sock"), "{err}");
    assert_eq!(entries(dir.path()), Vec::<String>::new());
}

#[test]
fn a_path_too_long_for_sun_path_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let name = "x".repeat(MAX_PATH_LEN);
    let path = dir.path().join(name);
    let err = bind(&path, None).unwrap_err();
    assert!(
        matches!(err, UnixSocketError::PathTooLong { .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("too long"), "{err}");
    assert_eq!(entries(dir.path()), Vec::<String>::new());
}

#[test]
fn a_path_of_the_maximum_length_works_though_the_staging_path_is_longer() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().as_os_str().len();
    // DIR/ddd.../s: exactly MAX_PATH_LEN bytes with a one-letter socket name.
    let sub = dir.path().join("d".repeat(MAX_PATH_LEN - base - 3));
    std::fs::create_dir(&sub).unwrap();
    let path = sub.join("s");
    assert_eq!(path.as_os_str().len(), MAX_PATH_LEN);
    let (listener, file) = bind(&path, Some(0o600)).unwrap();
    let _c = UnixStream::connect(&path).unwrap();
    listener.accept().unwrap();
    assert_eq!(entries(&sub), ["s"]);
    drop(file);
    assert_eq!(entries(&sub), Vec::<String>::new());
}

#[test]
fn dropping_the_file_removes_our_socket_but_not_a_successor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let (_l1, ours) = bind(&path, None).unwrap();
    assert_eq!(ours.path(), path);
    // Someone unlinked our socket and another daemon took the path.
    std::fs::remove_file(&path).unwrap();
    let (_l2, theirs) = bind(&path, None).unwrap();
    drop(ours);
    assert!(
        UnixStream::connect(&path).is_ok(),
        "successor's socket kept"
    );
    drop(theirs);
    assert!(!path.exists());
}

#[test]
fn concurrent_binders_of_one_path_get_one_winner() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("race.sock");
    let start = Arc::new(Barrier::new(4));
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let (path, start) = (path.clone(), Arc::clone(&start));
            thread::spawn(move || {
                start.wait();
                bind(&path, None)
            })
        })
        .collect();
    let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let winners = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(winners, 1, "{results:?}");
    for r in &results {
        if let Err(e) = r {
            assert!(matches!(e, UnixSocketError::InUse(_)), "{e:?}");
        }
    }
    assert_eq!(entries(dir.path()), ["race.sock"]);
}
