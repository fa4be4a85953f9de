//! The `flotilla` binary's key and bundle commands, run as an operator would run them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn flotilla(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flotilla"))
        .args(args)
        .output()
        .expect("flotilla runs")
}

fn ok(args: &[&str]) -> String {
    let out = flotilla(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let out = flotilla(args);
    assert_eq!(out.status.code(), Some(1), "{args:?} should exit 1");
    String::from_utf8(out.stderr).unwrap()
}

fn model(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models")
        .join(name)
        .to_str()
        .unwrap()
        .to_owned()
}

struct Workdir {
    dir: tempfile::TempDir,
}

impl Workdir {
    fn new() -> Self {
        let w = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        ok(&["keygen", "release", "--dir", &w.s("keys")]);
        ok(&["keygen", "qa", "--dir", &w.s("keys")]);
        w
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn s(&self, rel: &str) -> String {
        self.path(rel).to_str().unwrap().to_owned()
    }
}

#[test]
fn pack_sign_verify_round_trip_with_threshold() {
    let w = Workdir::new();
    let bundle = w.s("embed.fbundle");
    let out = ok(&[
        "bundle",
        "pack",
        &model("tiny-bert-embed"),
        "--out",
        &bundle,
    ]);
    assert!(out.contains("packed tiny-bert-embed@1.0.0 seq 1"), "{out}");
    assert!(out.contains("computed expected outputs"), "{out}");

    let trust = [
        "--trust",
        &w.s("keys/release.pub"),
        "--trust",
        &w.s("keys/qa.pub"),
    ];
    let unsigned = fails(&[&["bundle", "verify", &bundle][..], &trust].concat());
    assert!(unsigned.contains("unsigned"), "{unsigned}");

    ok(&["bundle", "sign", &bundle, "--key", &w.s("keys/release.key")]);
    let one = fails(
        &[
            &["bundle", "verify", &bundle, "--threshold", "2"][..],
            &trust,
        ]
        .concat(),
    );
    assert!(
        one.contains("1 distinct trusted signature(s), 2 required"),
        "{one}"
    );

    ok(&["bundle", "sign", &bundle, "--key", &w.s("keys/qa.key")]);
    let valid = ok(&[
        &[
            "bundle",
            "verify",
            &bundle,
            "--threshold",
            "2",
            "--check-host",
        ][..],
        &trust,
    ]
    .concat());
    assert!(
        valid.starts_with("valid: tiny-bert-embed@1.0.0 seq 1"),
        "{valid}"
    );
    assert_eq!(valid.lines().count(), 1, "one-line summary");

    let floor = fails(&[&["bundle", "verify", &bundle, "--min-seq", "1"][..], &trust].concat());
    assert!(floor.contains("not above the floor 1"), "{floor}");
}

#[test]
fn verify_names_the_tampered_part() {
    let w = Workdir::new();
    let bundle = w.path("raw.fbundle");
    ok(&[
        "bundle",
        "pack",
        &model("tiny-mlp-raw"),
        "--out",
        bundle.to_str().unwrap(),
    ]);
    ok(&[
        "bundle",
        "sign",
        bundle.to_str().unwrap(),
        "--key",
        &w.s("keys/release.key"),
    ]);

    let mut bytes = std::fs::read(&bundle).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&bundle, &bytes).unwrap();
    let err = fails(&[
        "bundle",
        "verify",
        bundle.to_str().unwrap(),
        "--trust",
        &w.s("keys/release.pub"),
    ]);
    assert!(err.contains("chunk 0 does not match its hash"), "{err}");

    let other = fails(&[
        "bundle",
        "verify",
        bundle.to_str().unwrap(),
        "--trust",
        &w.s("keys/qa.pub"),
    ]);
    assert!(other.contains("signed only by unknown keys"), "{other}");
}

#[test]
fn inspect_shows_the_manifest_as_text_and_json() {
    let w = Workdir::new();
    let bundle = w.s("cls.fbundle");
    ok(&[
        "bundle",
        "pack",
        &model("tiny-bert-classify"),
        "--out",
        &bundle,
    ]);
    let text = ok(&["bundle", "inspect", &bundle]);
    assert!(
        text.contains("labels      negative, neutral, positive"),
        "{text}"
    );
    assert!(text.contains("signatures  none"), "{text}");

    let json: serde_json::Value =
        serde_json::from_str(&ok(&["bundle", "inspect", &bundle, "--json"])).unwrap();
    assert_eq!(json["manifest"]["name"], "tiny-bert-classify");
    assert_eq!(json["manifest"]["model"]["task"], "classification");
    assert_eq!(json["digest"].as_str().unwrap().len(), 64);
}

#[test]
fn errors_name_the_missing_file_or_bad_key() {
    let w = Workdir::new();
    let err = fails(&[
        "bundle",
        "verify",
        &w.s("absent.fbundle"),
        "--trust",
        &w.s("keys/release.pub"),
    ]);
    assert!(
        err.contains("cannot read bundle") && err.contains("absent.fbundle"),
        "{err}"
    );

    let bundle = w.s("raw.fbundle");
    ok(&["bundle", "pack", &model("tiny-mlp-raw"), "--out", &bundle]);
    let err = fails(&["bundle", "sign", &bundle, "--key", &w.s("keys/release.pub")]);
    assert!(
        err.contains("bad secret key") && err.contains("release.pub"),
        "{err}"
    );
    let err = fails(&[
        "bundle",
        "verify",
        &bundle,
        "--trust",
        &w.s("keys/release.key"),
    ]);
    assert!(
        err.contains("bad public key") && err.contains("release.key"),
        "{err}"
    );

    let err = fails(&["bundle", "pack", &w.s("keys"), "--out", &w.s("x.fbundle")]);
    assert!(
        err.contains("cannot read bundle spec") && err.contains("bundle.toml"),
        "{err}"
    );
    let err = fails(&["bundle", "inspect", &w.s("keys/release.pub")]);
    assert!(
        err.contains("not a valid bundle") && err.contains("bad magic"),
        "{err}"
    );
    let err = fails(&["keygen", "release", "--dir", &w.s("keys")]);
    assert!(err.contains("already exists"), "{err}");
}

#[test]
fn signing_twice_with_one_key_adds_one_signature() {
    let w = Workdir::new();
    let bundle = w.s("raw.fbundle");
    ok(&["bundle", "pack", &model("tiny-mlp-raw"), "--out", &bundle]);
    ok(&["bundle", "sign", &bundle, "--key", &w.s("keys/release.key")]);
    let again = ok(&["bundle", "sign", &bundle, "--key", &w.s("keys/release.key")]);
    assert!(again.contains("already carries a signature"), "{again}");
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["bundle", "inspect", &bundle, "--json"])).unwrap();
    assert_eq!(json["signatures"].as_array().unwrap().len(), 1);
}
