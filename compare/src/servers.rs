//! Starting and stopping the servers on loopback, the raw disk floor, and the machine facts.

use std::fs::File;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

/// A server process the harness started; killed if still running when dropped.
pub struct Server {
    name: String,
    child: Child,
    log: PathBuf,
    pub addr: SocketAddr,
}

impl Server {
    /// Spawns `cmd` (stdout and stderr into `log`) and waits until `addr` accepts TCP.
    pub fn spawn(name: &str, mut cmd: Command, addr: SocketAddr, log: PathBuf) -> Result<Self> {
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("duplicating a log file handle")?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        let mut server = Server {
            name: name.to_string(),
            child,
            log,
            addr,
        };
        server.wait_listening(Duration::from_secs(20))?;
        Ok(server)
    }

    fn wait_listening(&mut self, limit: Duration) -> Result<()> {
        let end = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited at start ({status}); its log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > end {
                bail!(
                    "{} not listening on {} after {limit:?}; its log:\n{}",
                    self.name,
                    self.addr,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server's process id (its CPU time is read from `/proc/PID/stat`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// SIGTERM, then SIGKILL after 10 s.
    pub fn stop(mut self) -> Result<()> {
        self.terminate()
    }

    fn terminate(&mut self) -> Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("  {} did not stop within 10 s: killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A free loopback port (bound, read, released).
pub fn free_addr() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
    l.local_addr().context("reading a bound port")
}

/// The raw floor: a 300-byte append + fdatasync, `n` times, on the disk of `dir`.
#[derive(Clone, Debug, Serialize)]
pub struct Floor {
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// p50 above 1 ms: the host was throttling the disk (normally ~0.1 ms here).
    pub throttled: bool,
}

pub fn disk_floor(dir: &Path, n: usize) -> Result<Floor> {
    let path = dir.join("floor.log");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let rec = [b'x'; 300];
    let mut h = crate::drive::histogram();
    for _ in 0..n {
        let t = Instant::now();
        f.write_all(&rec).context("writing the floor file")?;
        f.sync_data().context("fdatasync of the floor file")?;
        crate::drive::record(&mut h, t.elapsed().as_micros() as u64, 1);
    }
    drop(f);
    let _ = std::fs::remove_file(&path);
    let p50 = crate::drive::quantile_ms(&h, 0.5);
    Ok(Floor {
        samples: n,
        p50_ms: p50,
        p99_ms: crate::drive::quantile_ms(&h, 0.99),
        throttled: p50 > 1.0,
    })
}

/// What the run ran on.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub cpu: String,
    pub logical_cpus: usize,
    pub memory_gib: f64,
    pub kernel: String,
    /// Device and file system holding the data directories, and whether it says it is rotational.
    pub disk: String,
    pub redis_version: String,
    pub nats_version: String,
    pub eventqueue_revision: String,
}

pub fn machine(work: &Path, redis: &Path, nats: &Path, eq_repo: Option<&Path>) -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let logical_cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_gib = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    Machine {
        cpu,
        logical_cpus,
        memory_gib,
        kernel,
        disk: disk_of(work),
        // "Redis server v=7.0.15 sha=…" → "Redis 7.0.15"
        redis_version: version_after(&first_line(Command::new(redis).arg("--version")), "v=")
            .map(|v| format!("Redis {v}"))
            .unwrap_or_else(|| "Redis (unknown version)".into()),
        // "nats-server: v2.15.1" → "NATS server 2.15.1"
        nats_version: version_after(&first_line(Command::new(nats).arg("--version")), " v")
            .map(|v| format!("NATS server {v}"))
            .unwrap_or_else(|| "NATS server (unknown version)".into()),
        eventqueue_revision: eq_repo
            .map(|repo| {
                let rev = first_line(Command::new("git").arg("-C").arg(repo).args([
                    "rev-parse",
                    "--short",
                    "HEAD",
                ]));
                let dirty = Command::new("git")
                    .arg("-C")
                    .arg(repo)
                    .args(["status", "--porcelain", "--", "src", "Cargo.toml"])
                    .output()
                    .map(|o| !o.stdout.is_empty())
                    .unwrap_or(false);
                if dirty {
                    format!("{rev} + uncommitted changes")
                } else {
                    rev
                }
            })
            .unwrap_or_else(|| "unknown".into()),
    }
}

fn version_after(line: &str, marker: &str) -> Option<String> {
    let (_, rest) = line.split_once(marker)?;
    let v: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    (!v.is_empty()).then_some(v)
}

fn first_line(cmd: &mut Command) -> String {
    cmd.output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

/// The mount holding `dir`: device, file system, and the block device's rotational flag.
fn disk_of(dir: &Path) -> String {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let best = mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?, f.next()?, f.next()?))
        })
        .filter(|(_, mnt, _)| dir.starts_with(mnt))
        .max_by_key(|(_, mnt, _)| mnt.len());
    let Some((dev, mnt, fs)) = best else {
        return "unknown".into();
    };
    let name = dev.rsplit('/').next().unwrap_or(dev);
    let rotational = std::fs::read_to_string(format!("/sys/block/{name}/queue/rotational"))
        .map(|s| match s.trim() {
            "0" => ", reports non-rotational",
            "1" => ", reports rotational",
            _ => "",
        })
        .unwrap_or("");
    let size = std::fs::read_to_string(format!("/sys/block/{name}/size"))
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .map(|sectors| format!(", {:.0} GB", sectors * 512.0 / 1e9))
        .unwrap_or_default();
    format!("{dev} mounted on {mnt} ({fs}{rotational}{size})")
}

/// The 1-minute load average (0 when unknown).
pub fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// CPU time a process has used so far, all its threads, user + system, in seconds: fields 14
/// and 15 (`utime`, `stime`) of `/proc/PID/stat`, in clock ticks. `None` when the process is
/// gone or the file cannot be read (not Linux).
pub fn process_cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    // `rest` starts at field 3 (state): utime is field 14, the 12th from here.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks() as f64)
}

/// Clock ticks per second of `/proc` times (`getconf CLK_TCK`; 100 on Linux when unknown).
fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        first_line(Command::new("getconf").arg("CLK_TCK"))
            .trim()
            .parse()
            .ok()
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}
