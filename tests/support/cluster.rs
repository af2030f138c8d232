//! Multi-process clusters: real `switchboard` processes, one per role set,
//! finding each other through a real etcd and sharing presence in a real
//! Redis (`SWITCHBOARD_TEST_ETCD`, `SWITCHBOARD_TEST_REDIS`, started by
//! `scripts/test.sh`). Each cluster has its own key prefixes, so clusters of
//! concurrent tests never see each other.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use switchboard_config::{Config, Role};

use super::{free_port, http_get};

/// The etcd and Redis under test.
#[derive(Clone, Debug)]
pub struct Infra {
    pub etcd: String,
    pub redis: String,
}

impl Infra {
    /// From the environment; `None` (a recorded skip) when a developer
    /// runs plain `cargo test`. Under `CI=true` a missing variable is a
    /// failure.
    pub fn from_env() -> Option<Infra> {
        let found = switchboard_testenv::services(&[
            switchboard_testenv::ETCD,
            switchboard_testenv::REDIS,
        ])?;
        let [etcd, redis] = <[String; 2]>::try_from(found).ok()?;
        Some(Infra { etcd, redis })
    }
}

/// One process of a cluster.
pub struct Proc {
    pub name: String,
    pub roles: Vec<Role>,
    pub client_addr: Option<SocketAddr>,
    pub mesh_addr: SocketAddr,
    config: Config,
    config_path: PathBuf,
    child: Option<Child>,
}

impl Proc {
    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.client_addr.expect("a gateway"))
    }

    /// Its id in discovery.
    pub fn node_id(&self) -> &str {
        &self.config.node_id
    }

    /// Its extra `/metrics` listener, when its config has one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.config.metrics_addr.parse().ok()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

/// A running cluster.
pub struct Cluster {
    pub infra: Infra,
    /// etcd key prefix and Redis presence prefix of this cluster.
    pub etcd_prefix: String,
    pub redis_prefix: String,
    base: Config,
    dir: tempfile::TempDir,
    pub procs: Vec<Proc>,
    next_gateway: AtomicUsize,
}

/// The shape used to re-run the protocol tests: two gateways, delivery on
/// its own, router, groups and auth together.
pub const PROTOCOL_SHAPE: &[(&str, &str)] = &[
    ("gw1", "gateway"),
    ("gw2", "gateway"),
    ("core", "router,groups,auth"),
    ("delivery", "delivery"),
];

/// The full shape of `deploy/local`: 2 gateways, 1 delivery, 2 groups,
/// 1 router, 1 auth.
pub const FULL_SHAPE: &[(&str, &str)] = &[
    ("gw1", "gateway"),
    ("gw2", "gateway"),
    ("delivery", "delivery"),
    ("groups1", "groups"),
    ("groups2", "groups"),
    ("router", "router"),
    ("auth", "auth"),
];

/// Sharded delivery: two gateways, router, groups and auth together, and
/// three delivery processes (on a shared store).
pub const SHARDED_SHAPE: &[(&str, &str)] = &[
    ("gw1", "gateway"),
    ("gw2", "gateway"),
    ("core", "router,groups,auth"),
    ("d1", "delivery"),
    ("d2", "delivery"),
    ("d3", "delivery"),
];

pub const TEST_SECRET: &str = "test-mesh-secret";

impl Cluster {
    /// Starts every process of `shape` with settings from `edit` and waits
    /// until each gateway is ready (it knows an instance of every role).
    pub async fn start(
        infra: Infra,
        shape: &[(&str, &str)],
        edit: impl FnOnce(&mut Config),
    ) -> Cluster {
        let tag = format!(
            "{}{}",
            std::process::id(),
            switchboard_mesh::new_message_id().replace('-', "")
        );
        let mut base = Config {
            etcd: vec![infra.etcd.clone()],
            redis: infra.redis.clone(),
            mesh_secret: TEST_SECRET.into(),
            ..Config::default()
        };
        base.discovery.key_prefix = format!("/sbtest/{tag}/");
        base.discovery.lease_ttl_secs = 2;
        base.presence.key_prefix = format!("sbtest:{tag}:");
        base.presence.gateway_ttl_secs = 2;
        edit(&mut base);
        let mut cluster = Cluster {
            infra,
            etcd_prefix: base.discovery.key_prefix.clone(),
            redis_prefix: base.presence.key_prefix.clone(),
            base,
            dir: tempfile::tempdir().expect("tempdir"),
            procs: Vec::new(),
            next_gateway: AtomicUsize::new(0),
        };
        for (name, roles) in shape {
            cluster.add(name, roles, |_| {});
        }
        cluster.wait_ready().await;
        cluster
    }

    /// Writes the config of process `name` (based on the cluster's, with
    /// its own ports, node id and data dir, then `edit`).
    fn write_config(
        &self,
        name: &str,
        roles: &[Role],
        edit: impl FnOnce(&mut Config),
    ) -> (Config, PathBuf) {
        let mut config = self.base.clone();
        config.roles = roles.to_vec();
        config.node_id = format!("{name}-{}", &self.etcd_prefix[8..16]);
        config.mesh_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        config.client_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        config.data_dir = self.dir.path().join(format!("{name}-data"));
        edit(&mut config);
        let path = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, toml::to_string(&config).expect("config as TOML"))
            .expect("write config");
        (config, path)
    }

    /// Adds (and spawns) a process; `edit` changes only its config.
    pub fn add(&mut self, name: &str, roles: &str, edit: impl FnOnce(&mut Config)) -> usize {
        let roles = Role::parse_list(roles).expect("roles");
        let (config, config_path) = self.write_config(name, &roles, edit);
        let mut proc = Proc {
            name: name.to_owned(),
            client_addr: roles.contains(&Role::Gateway).then_some(config.client_addr),
            mesh_addr: config.mesh_addr,
            roles,
            config,
            config_path,
            child: None,
        };
        proc.child = Some(spawn(&proc.config_path));
        self.procs.push(proc);
        self.procs.len() - 1
    }

    /// Runs a process that is expected to exit by itself (a refused start);
    /// returns its exit status and what it wrote to stderr. Killed after
    /// `limit`.
    pub async fn run_to_exit(
        &self,
        name: &str,
        roles: &str,
        limit: Duration,
    ) -> (Option<std::process::ExitStatus>, String) {
        let roles = Role::parse_list(roles).expect("roles");
        let (_, path) = self.write_config(name, &roles, |_| {});
        let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .arg("run")
            .arg("--config")
            .arg(&path)
            .env("SWITCHBOARD_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn switchboard");
        let deadline = std::time::Instant::now() + limit;
        let status = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break Some(status);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut stderr = String::new();
        if let Some(mut pipe) = child.stderr.take() {
            use std::io::Read;
            let _ = pipe.read_to_string(&mut stderr);
        }
        (status, stderr)
    }

    /// Which of the processes `names` owns `key` (rendezvous hashing over
    /// their node ids, as the mesh's pools pick the owner of a group,
    /// topic or room).
    pub fn owner_of(&self, names: &[&str], key: &[u8]) -> String {
        let pool = switchboard_mesh::Pool::new("owner", switchboard_mesh::MeshConnector::default());
        let instances: Vec<(String, String)> = names
            .iter()
            .map(|n| {
                let p = self.proc(n);
                (p.config.node_id.clone(), format!("http://{}", p.mesh_addr))
            })
            .collect();
        assert!(pool.update(&instances), "instance addresses");
        let owner = pool.owner(key).expect("an owner");
        names
            .iter()
            .find(|n| self.proc(n).config.node_id == owner)
            .map(|n| (*n).to_owned())
            .expect("owner is one of the names")
    }

    pub fn proc(&self, name: &str) -> &Proc {
        self.procs
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no process {name}"))
    }

    fn proc_mut(&mut self, name: &str) -> &mut Proc {
        self.procs
            .iter_mut()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no process {name}"))
    }

    /// The gateways' client URLs.
    pub fn gateway_urls(&self) -> Vec<String> {
        self.procs
            .iter()
            .filter(|p| p.client_addr.is_some())
            .map(Proc::url)
            .collect()
    }

    /// A gateway URL, a different gateway on each call.
    pub fn url(&self) -> String {
        let urls = self.gateway_urls();
        urls[self.next_gateway.fetch_add(1, Ordering::Relaxed) % urls.len()].clone()
    }

    /// kill -9.
    pub fn kill9(&mut self, name: &str) {
        let proc = self.proc_mut(name);
        if let Some(mut child) = proc.child.take() {
            child.kill().expect("kill -9");
            child.wait().expect("reap");
        }
    }

    /// Starts a killed process again with the same config (ports, node id,
    /// data dir).
    pub fn restart(&mut self, name: &str) {
        self.restart_with_env(name, &[]);
    }

    /// Like [`Cluster::restart`], with extra environment variables (a
    /// failpoint) for this start only.
    pub fn restart_with_env(&mut self, name: &str, env: &[(&str, &str)]) {
        let proc = self.proc_mut(name);
        assert!(proc.child.is_none(), "{name} is running");
        proc.child = Some(spawn_with_env(&proc.config_path, env));
    }

    /// Waits (up to `limit`) until process `name` exits by itself; its exit
    /// status, the process then counts as stopped.
    pub async fn wait_exit(
        &mut self,
        name: &str,
        limit: Duration,
    ) -> Option<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + limit;
        let proc = self.proc_mut(name);
        let child = proc.child.as_mut()?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                proc.child = None;
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM and wait; returns whether it exited cleanly.
    pub fn terminate(&mut self, name: &str) -> bool {
        let proc = self.proc_mut(name);
        let Some(mut child) = proc.child.take() else {
            return false;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        child.wait().is_ok_and(|s| s.success())
    }

    /// `/readyz` of gateway `name`.
    pub async fn readyz(&self, name: &str) -> Option<(u16, serde_json::Value)> {
        http_get(self.proc(name).client_addr.expect("a gateway"), "/readyz").await
    }

    /// Waits until every running gateway answers `/readyz` with 200.
    pub async fn wait_ready(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        for i in 0..self.procs.len() {
            if self.procs[i].child.is_none() {
                continue; // killed on purpose
            }
            loop {
                let proc = &mut self.procs[i];
                // Ports come from free_port(): another process may take one
                // between its release and our bind. Such a start fails at
                // once; start it again on other ports.
                let exited = proc
                    .child
                    .as_mut()
                    .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
                if exited {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "{} keeps exiting at start-up",
                        proc.name
                    );
                    eprintln!(
                        "{} exited at start-up; starting it on other ports",
                        proc.name
                    );
                    proc.config.mesh_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
                    proc.config.client_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
                    proc.mesh_addr = proc.config.mesh_addr;
                    if !proc.config.metrics_addr.is_empty() {
                        proc.config.metrics_addr = format!("127.0.0.1:{}", free_port());
                    }
                    if proc.client_addr.is_some() {
                        proc.client_addr = Some(proc.config.client_addr);
                    }
                    std::fs::write(
                        &proc.config_path,
                        toml::to_string(&proc.config).expect("config as TOML"),
                    )
                    .expect("write config");
                    proc.child = Some(spawn(&proc.config_path));
                }
                let ready = match proc.client_addr {
                    Some(addr) => matches!(http_get(addr, "/readyz").await, Some((200, _))),
                    None => tokio::net::TcpStream::connect(proc.mesh_addr).await.is_ok(),
                };
                if ready {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    let state = match proc.client_addr {
                        Some(addr) => format!("{:?}", http_get(addr, "/readyz").await),
                        None => "mesh port closed".to_owned(),
                    };
                    panic!("{} not ready within 30 s: {state}", proc.name);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        // Gateways checked first may have been ready before a respawned
        // process registered: check them all once more.
        for proc in self.procs.iter().filter(|p| p.child.is_some()) {
            if let Some(addr) = proc.client_addr {
                let limit = tokio::time::Instant::now() + Duration::from_secs(30);
                while !matches!(http_get(addr, "/readyz").await, Some((200, _))) {
                    assert!(
                        tokio::time::Instant::now() < limit,
                        "{} not ready after a restart of another process",
                        proc.name
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        self.wait_known().await;
    }

    /// Waits until every running gateway knows at least every running
    /// instance of each role it calls (`switchboard_mesh_instances`):
    /// ready means one instance per role, and a second instance that
    /// appears later would move rooms and topics it owns by rendezvous
    /// hashing — a test that starts before that sees a ROOM_RESET.
    pub async fn wait_known(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        for proc in self.procs.iter().filter(|p| p.child.is_some()) {
            let Some(addr) = proc.client_addr else {
                continue;
            };
            loop {
                let known = match super::http_get_text(addr, "/metrics").await {
                    Some((200, _, text)) => mesh_instances(&text),
                    _ => Vec::new(),
                };
                let short: Vec<String> = known
                    .iter()
                    .filter_map(|(role, n)| {
                        let running = self
                            .procs
                            .iter()
                            .filter(|p| p.child.is_some())
                            .filter(|p| p.roles.iter().any(|r| r.as_str() == role))
                            .count();
                        (*n < running).then(|| format!("{role}: {n} of {running}"))
                    })
                    .collect();
                if short.is_empty() {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{} does not know every instance within 30 s: {short:?}",
                    proc.name
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    pub async fn shutdown(mut self) {
        for proc in &mut self.procs {
            if let Some(child) = proc.child.as_ref() {
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
            }
        }
        for proc in &mut self.procs {
            if let Some(mut child) = proc.child.take() {
                let deadline = std::time::Instant::now() + Duration::from_secs(15);
                loop {
                    match child.try_wait() {
                        Ok(Some(_)) => break,
                        _ if std::time::Instant::now() > deadline => {
                            let _ = child.kill();
                            let _ = child.wait();
                            panic!("{} did not stop within 15 s of SIGTERM", proc.name);
                        }
                        _ => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for proc in &mut self.procs {
            if let Some(mut child) = proc.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn spawn(config: &std::path::Path) -> Child {
    spawn_with_env(config, &[])
}

fn spawn_with_env(config: &std::path::Path, env: &[(&str, &str)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .arg("run")
        .arg("--config")
        .arg(config)
        .env(
            "SWITCHBOARD_LOG",
            std::env::var("SWITCHBOARD_TEST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn switchboard")
}

/// `(role, instances)` from the `switchboard_mesh_instances` lines of a
/// Prometheus scrape.
fn mesh_instances(scrape: &str) -> Vec<(String, usize)> {
    scrape
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("switchboard_mesh_instances{role=\"")?;
            let (role, rest) = rest.split_once('"')?;
            let value = rest.rsplit(' ').next()?.parse::<f64>().ok()?;
            Some((role.to_owned(), value as usize))
        })
        .collect()
}
