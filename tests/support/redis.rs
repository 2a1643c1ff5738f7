//! A real `redis-server` on a free loopback port, started by the test and stopped (by its PID)
//! when dropped. No persistence unless asked: a restart loses everything, as a restart of a
//! Redis without `save`/AOF does.

use std::net::TcpStream as StdTcp;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Server, WAIT};

/// A ringcast node in cluster mode on the Redis at `url` (a 500 ms Redis timeout, so faults
/// show fast), with `extra` settings.
pub fn node_at(url: &str, extra: &[(&str, &str)]) -> Server {
    let mut env = vec![
        ("RINGCAST_REDIS_URL", url),
        ("RINGCAST_REDIS_TIMEOUT_MS", "500"),
    ];
    env.extend_from_slice(extra);
    Server::start_with(&env)
}

pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    /// More arguments for `redis-server` (a cluster node's).
    extra: Vec<String>,
}

impl Redis {
    pub fn start() -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Redis::start_with(port, Vec::new())
    }

    fn start_with(port: u16, extra: Vec<String>) -> Redis {
        let mut redis = Redis {
            child: None,
            port,
            extra,
        };
        redis.restart();
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again, on the same port) and waits until it answers PING.
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (Debian package redis-server) on the PATH");
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        while self.cli(&["PING"]) != "PONG" {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server at once (SIGKILL): what it held in memory is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends a signal (SIGSTOP / SIGCONT) to the server.
    pub fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().expect("running").id() as i32;
        unsafe {
            libc::kill(pid, sig);
        }
    }

    /// One command through a raw RESP connection; the reply as text ("" on failure).
    pub fn cli(&self, args: &[&str]) -> String {
        use std::io::{Read, Write};
        let Ok(mut s) = StdTcp::connect(("127.0.0.1", self.port)) else {
            return String::new();
        };
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req += &format!("${}\r\n{a}\r\n", a.len());
        }
        if s.write_all(req.as_bytes()).is_err() {
            return String::new();
        }
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf).unwrap_or(0);
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        text.trim_start_matches(['+', ':']).trim_end().to_owned()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of `n` masters (no replicas) on free loopback ports, each node a `Redis`.
pub struct RedisCluster {
    pub nodes: Vec<Redis>,
    dir: std::path::PathBuf,
}

impl RedisCluster {
    pub fn start(n: usize) -> RedisCluster {
        let ports: Vec<u16> = (0..n)
            .map(|_| {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port()
            })
            .collect();
        let dir = std::env::temp_dir().join(format!("ringcast-redis-cluster-{}", ports[0]));
        std::fs::create_dir_all(&dir).unwrap();
        let nodes: Vec<Redis> = ports
            .iter()
            .map(|&port| {
                let conf = dir.join(format!("nodes-{port}.conf"));
                let _ = std::fs::remove_file(&conf);
                let extra = vec![
                    "--cluster-enabled".into(),
                    "yes".into(),
                    "--cluster-config-file".into(),
                    conf.display().to_string(),
                    "--cluster-node-timeout".into(),
                    "2000".into(),
                ];
                Redis::start_with(port, extra)
            })
            .collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for port in &ports {
            create.arg(format!("127.0.0.1:{port}"));
        }
        let out = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli (Debian package redis-tools) on the PATH");
        assert!(out.status.success(), "redis-cli --cluster create: {out:?}");
        let cluster = RedisCluster { nodes, dir };
        cluster.wait_ok();
        cluster
    }

    /// Waits until every node says the cluster is whole.
    pub fn wait_ok(&self) {
        let deadline = Instant::now() + 2 * WAIT;
        for node in &self.nodes {
            while !node.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok") {
                assert!(Instant::now() < deadline, "the Redis Cluster is not whole");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    pub fn url(&self) -> String {
        self.nodes[0].url()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
