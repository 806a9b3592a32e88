//! The Debian package (`scripts/package`, cargo-deb): its control data, its files, and the
//! installed binary run from a scratch root.
//!
//! `scripts/package` builds the package and then runs this test with `FTP_ALG_DEB` naming it;
//! without `FTP_ALG_DEB` (a plain `cargo test`, and CI, which does not install cargo-deb: it
//! takes minutes to build) the test is skipped with a message. Building the package here would
//! run cargo inside cargo test. The package is unpacked with `dpkg-deb -x` rather than installed
//! with `dpkg --root`: its maintainer scripts would run systemctl on the host.

use std::path::PathBuf;
use std::process::Command;

fn output(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The package to test: `FTP_ALG_DEB`, which `scripts/package` sets when it runs this test
/// after building the package.
fn package() -> Option<PathBuf> {
    std::env::var_os("FTP_ALG_DEB").map(PathBuf::from)
}

#[test]
fn the_debian_package_installs_and_runs() {
    let Some(deb) = package() else {
        eprintln!(
            "SKIPPED the_debian_package_installs_and_runs: FTP_ALG_DEB is not set; \
             scripts/package (which needs cargo-deb) builds the package and runs this test"
        );
        return;
    };
    let info = output(Command::new("dpkg-deb").arg("--info").arg(&deb));
    assert!(info.contains(" Package: ftp-alg\n"), "{info}");
    let depends = info
        .lines()
        .find(|l| l.starts_with(" Depends: "))
        .unwrap_or_else(|| panic!("no Depends: {info}"));
    assert!(depends.contains("nftables"), "{depends}");

    let scratch = std::env::temp_dir().join(format!("ftp-alg-deb-{}", std::process::id()));
    let control = scratch.join("DEBIAN");
    let _ = std::fs::remove_dir_all(&scratch);
    output(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&scratch));
    output(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    let conffiles = std::fs::read_to_string(control.join("conffiles")).expect("conffiles");
    assert_eq!(conffiles.trim(), "/etc/ftp-alg/ftp-alg.toml");
    // Installing must not start (or enable) the service.
    for script in ["preinst", "postinst", "prerm", "postrm"] {
        let text = std::fs::read_to_string(control.join(script)).unwrap_or_default();
        for word in [
            "deb-systemd-invoke start",
            "systemctl start",
            "deb-systemd-helper enable",
        ] {
            assert!(!text.contains(word), "{script} runs {word}:\n{text}");
        }
    }

    for file in [
        "usr/sbin/ftp-alg",
        "etc/ftp-alg/ftp-alg.toml",
        "usr/lib/systemd/system/ftp-alg.service",
        "usr/share/man/man1/ftp-alg.1.gz",
        "usr/share/man/man1/ftp-alg-pinholes.1.gz",
        "usr/share/man/man5/ftp-alg.toml.5.gz",
        "usr/share/bash-completion/completions/ftp-alg",
        "usr/share/zsh/vendor-completions/_ftp-alg",
        "usr/share/fish/vendor_completions.d/ftp-alg.fish",
        "usr/share/doc/ftp-alg/gateway.md",
    ] {
        assert!(scratch.join(file).is_file(), "{file} is not in the package");
    }
    let unit = std::fs::read_to_string(scratch.join("usr/lib/systemd/system/ftp-alg.service"))
        .expect("the unit");
    assert!(
        unit.contains("\nExecStart=/usr/sbin/ftp-alg run --config /etc/ftp-alg/ftp-alg.toml\n")
            && unit.contains("\nType=notify\n"),
        "{unit}"
    );
    let page = output(
        Command::new("sh")
            .arg("-c")
            .arg("gzip -dc \"$0\"")
            .arg(scratch.join("usr/share/man/man5/ftp-alg.toml.5.gz")),
    );
    assert!(page.contains("pinholes.ct_mark_mask"), "{page}");

    let bin = scratch.join("usr/sbin/ftp-alg");
    let version = output(Command::new(&bin).arg("--version"));
    assert_eq!(
        version.trim(),
        format!("ftp-alg {}", env!("CARGO_PKG_VERSION"))
    );
    let checked = output(
        Command::new(&bin)
            .arg("check-config")
            .arg(scratch.join("etc/ftp-alg/ftp-alg.toml")),
    );
    assert!(
        checked.contains(": ok") && checked.contains("mode:     gateway"),
        "{checked}"
    );
    // Built without the demo.
    let help = output(Command::new(&bin).arg("--help"));
    assert!(!help.contains("demo"), "{help}");
    std::fs::remove_dir_all(&scratch).expect("remove the scratch root");
}
