//! A real Python `websockets` client against the server (tests/python/client_check.py).
//! The client library is installed into a virtualenv under target/ on first use.

mod support;

use std::path::PathBuf;
use std::process::Command;

use serde_json::json;
use support::*;

/// Both tests of this file share one virtualenv, made once.
fn python_with_websockets() -> PathBuf {
    static PYTHON: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PYTHON.get_or_init(make_python).clone()
}

fn make_python() -> PathBuf {
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("pyenv");
    let python = venv.join("bin/python3");
    let has_it = |py: &PathBuf| {
        Command::new(py)
            .args(["-c", "import websockets, msgpack"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has_it(&python) {
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 is needed for the client tests")
            .success();
        assert!(ok, "python3 -m venv failed");
        let ok = Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "websockets>=13,<16",
                "msgpack>=1,<2",
            ])
            .status()
            .unwrap()
            .success();
        assert!(ok, "pip install websockets failed (PyPI must be reachable)");
    }
    python
}

#[test]
fn python_websockets_client_sees_the_contract() {
    run_script("client_check.py");
}

#[test]
fn python_msgpack_client_gets_what_a_json_client_gets() {
    run_script("msgpack_check.py");
}

#[test]
fn python_deflate_client_gets_compressed_events_intact() {
    run_script("deflate_check.py");
}

fn run_script(name: &str) {
    let python = python_with_websockets();
    let server = Server::start();
    let t = token(json!({"sub": "py", "projects": ["py"]}));
    let script = format!("{}/tests/python/{name}", env!("CARGO_MANIFEST_DIR"));
    // `assert` statements vanish under `python -O` / PYTHONOPTIMIZE: the scripts use `check`.
    let text = std::fs::read_to_string(&script).unwrap();
    let asserts: Vec<&str> = text
        .lines()
        .filter(|l| l.trim_start().starts_with("assert "))
        .collect();
    assert!(asserts.is_empty(), "{name} uses assert: {asserts:?}");
    let out = Command::new(python)
        .arg(script)
        .arg(server.addr.to_string())
        .arg(&t)
        .arg(API_KEY)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python client failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
}
