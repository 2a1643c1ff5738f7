//! End to end, with the project's load generator: 2,000 clients drop at once and resume with
//! their last seq while publishing goes on: all recovered, nothing lost, nothing twice, nothing
//! out of order. (The benchmark runs the same at 10,000: docs/benchmarks.md, S5.)

mod support;

use std::process::Command;

use serde_json::Value;
use support::*;

fn load(server: &Server, args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_ringcast-load"))
        .args([
            "--addr",
            &server.addr.to_string(),
            "--secret",
            SECRET,
            "--api-key",
            API_KEY,
        ])
        .args(["--server-pid", &server.pid().to_string(), "--json", "-"])
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ringcast-load failed:\n{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().expect("a JSON report")).unwrap()
}

#[test]
fn a_reconnect_storm_of_2000_clients_loses_and_reorders_nothing() {
    let server = Server::start();
    let r = load(
        &server,
        &[
            "--mode",
            "storm",
            "--subscribers",
            "2000",
            "--channels",
            "20",
            "--rate",
            "200",
            "--batch",
            "10",
            "--duration",
            "4",
            "--storm-at",
            "1.5",
        ],
    );
    assert_eq!(r["connected"], 2000, "{r}");
    assert_eq!(r["storm_recovered"], 2000, "{r}");
    assert_eq!(r["storm_not_recovered"], 0, "{r}");
    assert_eq!(
        (
            r["lost"].as_u64(),
            r["duplicates"].as_u64(),
            r["gaps"].as_u64()
        ),
        (Some(0), Some(0), Some(0)),
        "{r}"
    );
    assert!(
        r["published"].as_u64().unwrap() >= 700,
        "publishing went on: {r}"
    );
    assert_eq!(r["delivered"], r["expected"], "{r}");
}

#[test]
fn clients_cut_at_random_every_second_receive_everything_in_order() {
    let server = Server::start();
    let r = load(
        &server,
        &[
            "--subscribers",
            "500",
            "--channels",
            "10",
            "--rate",
            "100",
            "--duration",
            "5",
            "--jitter-secs",
            "1",
        ],
    );
    assert_eq!(r["connected"], 500, "{r}");
    assert!(
        r["jitter_cuts"].as_u64().unwrap() >= 1000,
        "clients were cut often: {r}"
    );
    assert_eq!(
        (
            r["lost"].as_u64(),
            r["duplicates"].as_u64(),
            r["gaps"].as_u64()
        ),
        (Some(0), Some(0), Some(0)),
        "{r}"
    );
    assert_eq!(r["delivered"], r["expected"], "100 % delivered: {r}");
}
