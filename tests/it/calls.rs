//! Ledger round trips of one operation, counted by Redis itself: `MONITOR` shows every command a
//! client sends (and, tagged `lua`, every command a function runs inside it), so the commands a
//! flow sends to the ledger are exactly the monitor's lines from a client address. What a
//! purchase costs the ledger, per protocol, and so what a change to a flow must not silently grow.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::support::RedisServer;

/// A `redis-cli monitor` watching one server.
pub struct LedgerCalls {
    child: Child,
    lines: mpsc::Receiver<String>,
    port: u16,
}

impl LedgerCalls {
    /// Starts watching; returns once the monitor sees commands.
    pub fn watch(redis: &RedisServer) -> LedgerCalls {
        let mut child = Command::new("redis-cli")
            .args(["-p", &redis.port.to_string(), "monitor"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-cli");
        let stdout = child.stdout.take().expect("piped stdout");
        let (send, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        let mut calls = LedgerCalls { child, lines, port: redis.port };
        // The monitor is attached once it reports a command sent after it started.
        calls.drain_until(redis, "spendcap-monitor-ready");
        calls
    }

    /// Sends `ECHO marker` until the monitor shows it, and returns the client commands before it.
    fn drain_until(&mut self, redis: &RedisServer, marker: &str) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        loop {
            assert!(Instant::now() < deadline, "the monitor did not show {marker}");
            redis.cli(&["ECHO", marker]).expect("echo");
            while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                if line.contains(&format!("\"{marker}\"")) {
                    return seen;
                }
                seen.push(line);
            }
        }
    }

    /// Stops watching: the monitor's lines of the commands clients sent since
    /// [`LedgerCalls::watch`], arguments included, in order; commands functions ran and the
    /// monitor's own markers left out.
    pub fn stop_lines(mut self, redis: &RedisServer) -> Vec<String> {
        assert_eq!(redis.port, self.port, "the watched server");
        let lines = self.drain_until(redis, "spendcap-monitor-stop");
        let _ = self.child.kill();
        let _ = self.child.wait();
        lines
            .into_iter()
            .filter(|line| !line.contains(" lua] ") && !line.contains("\"spendcap-monitor-ready\""))
            .collect()
    }

    /// Stops watching: the commands clients sent since [`LedgerCalls::watch`], each as its name,
    /// with an `FCALL`'s function (`FCALL spendcap_hold`), in order; commands functions ran and
    /// the monitor's own markers left out.
    pub fn stop(self, redis: &RedisServer) -> Vec<String> {
        self.stop_lines(redis)
            .iter()
            .filter_map(|line| {
                let mut words = line.split("] ").nth(1)?.split(' ').map(|w| w.trim_matches('"'));
                let command = words.next()?.to_ascii_uppercase();
                Some(match command.as_str() {
                    "FCALL" => format!("FCALL {}", words.next()?),
                    _ => command,
                })
            })
            .collect()
    }
}

/// Commands the daemon sends on its own schedule, whatever the request (the clock guard's
/// `TIME`, the webhook consumer's stream reads), left out of a request's calls.
const BACKGROUND: [&str; 6] = ["TIME", "XREADGROUP", "XAUTOCLAIM", "XACK", "XGROUP", "PING"];

/// The quoted arguments of a monitor line (`"FCALL" "spendcap_hold" ...`), unescaped enough to
/// count them.
pub fn monitor_arguments(line: &str) -> Vec<String> {
    let mut arguments = Vec::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c != '"' {
            continue;
        }
        let mut argument = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => argument.extend(chars.next()),
                '"' => break,
                c => argument.push(c),
            }
        }
        arguments.push(argument);
    }
    arguments
}

/// `calls` without the daemon's background commands: what one request cost.
pub fn purchase_calls(calls: Vec<String>) -> Vec<String> {
    calls.into_iter().filter(|call| !BACKGROUND.contains(&call.as_str())).collect()
}
