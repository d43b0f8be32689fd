//! Man pages and shell completions are generated from the clap definitions:
//! every subcommand gets a page that man(1) renders with its flags, and the
//! bash script parses and completes the flags.

mod common;

use common::BIN;
use std::process::Command;

#[test]
fn man_writes_a_rendered_page_per_subcommand_with_its_flags() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .arg("man")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for page in [
        "colo-blk.1",
        "colo-blk-serve.1",
        "colo-blk-ctl.1",
        "colo-blk-ctl-stats.1",
        "colo-blk-ctl-stop.1",
        "colo-blk-bench.1",
    ] {
        assert!(dir.path().join(page).is_file(), "{page} missing");
    }
    let serve = std::fs::read_to_string(dir.path().join("colo-blk-serve.1")).unwrap();
    // roff escapes the dashes of flags.
    for flag in ["tls\\-creds\\-x509", "metrics", "nbd\\-listen"] {
        assert!(serve.contains(flag), "{flag} not in colo-blk-serve.1");
    }
    let stop = std::fs::read_to_string(dir.path().join("colo-blk-ctl-stop.1")).unwrap();
    assert!(stop.contains("colo\\-blk ctl stop"), "{stop}");
    // man(1) itself renders the page, when installed.
    if let Ok(r) = Command::new("man")
        .arg("-l")
        .arg(dir.path().join("colo-blk-serve.1"))
        .env("MANWIDTH", "100")
        .env("MANPAGER", "cat")
        .output()
    {
        let text = String::from_utf8_lossy(&r.stdout);
        assert!(r.status.success(), "man -l failed");
        assert!(text.contains("--tls-creds-x509"), "{text}");
    }
}

#[test]
fn bash_completion_parses_and_offers_the_serve_flags() {
    let out = Command::new(BIN)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let script = String::from_utf8(out.stdout).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("colo-blk.bash");
    std::fs::write(&path, &script).unwrap();
    // Source it and ask for completions of `colo-blk serve --tls`.
    let probe = format!(
        "source {}; COMP_WORDS=(colo-blk serve --tls); COMP_CWORD=2; \
         _colo__blk colo-blk --tls serve; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        path.display()
    );
    let r = Command::new("bash").args(["-c", &probe]).output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let offered = String::from_utf8_lossy(&r.stdout);
    for flag in ["--tls-creds-x509", "--tls-hostname", "--tls-authz"] {
        assert!(
            offered.lines().any(|l| l == flag),
            "{flag} not offered: {offered}"
        );
    }
    for shell in ["zsh", "fish"] {
        let out = Command::new(BIN)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("tls-creds-x509"));
    }
}
