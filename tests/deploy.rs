//! The deploy files under deploy/ checked as far as this machine can: no
//! Docker or Kubernetes runs here. Every YAML parses; the compose file and
//! the Kubernetes manifests name only known images, env keys our config
//! loader reads and `run` flags the binary accepts, and each process's
//! settings (config file + env + flags) load as `switchboard run` loads
//! them; probes hit `/healthz` and `/readyz` on a port the process serves;
//! grace periods outlast the drain; the Dockerfile builds a package that
//! exists; the systemd unit passes `systemd-analyze verify`. Each check is
//! shown to fail on a deliberately broken copy.

#[path = "support/mod.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use serde_norway::Value;
use switchboard_config::{Config, Role};

/// Images the deploy files may name: ours, and the pinned third-party ones.
const KNOWN_IMAGES: &[&str] = &[
    "switchboard",
    "switchboard:dev",
    "quay.io/coreos/etcd:v3.5.21",
    "redis:7.4-alpine",
    "scylladb/scylla:2025.1",
    "jaegertracing/all-in-one:1.76.0",
    "prom/prometheus:v3.5.0",
];

/// `SWITCHBOARD_*` variables read outside the config loader: the config
/// file's path (`run --config`) and the log filter.
const OTHER_ENV: &[&str] = &["SWITCHBOARD_CONFIG", "SWITCHBOARD_LOG"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// What the checks compare the files with, from the code and the binary.
struct Known {
    env: BTreeSet<String>,
    run_flags: BTreeSet<String>,
    drain_secs: u64,
}

impl Known {
    fn get() -> Known {
        let mut env: BTreeSet<String> = Config::env_var_names().into_iter().collect();
        env.extend(OTHER_ENV.iter().map(|s| (*s).to_owned()));
        let help = Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["run", "--help"])
            .output()
            .expect("switchboard run --help");
        assert!(help.status.success(), "run --help failed");
        let run_flags = String::from_utf8_lossy(&help.stdout)
            .split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
            .filter(|w| w.starts_with("--") && w.len() > 2)
            .map(|w| {
                w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
                    .to_owned()
            })
            .collect();
        Known {
            env,
            run_flags,
            drain_secs: drain_secs(&read("docs/operations.md")),
        }
    }
}

/// The longest graceful stop, as docs/operations.md states it ("bounded at
/// about N s").
fn drain_secs(ops: &str) -> u64 {
    let flat = ops.split_whitespace().collect::<Vec<_>>().join(" ");
    let at = flat
        .find("bounded at about ")
        .expect("docs/operations.md states the drain bound");
    flat[at + "bounded at about ".len()..]
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .expect("a number of seconds")
}

/// Every document of a YAML file, with `<<` merge keys applied.
fn yaml_docs(text: &str) -> Result<Vec<Value>, String> {
    let mut docs = Vec::new();
    for doc in serde_norway::Deserializer::from_str(text) {
        let mut value = Value::deserialize(doc).map_err(|e| e.to_string())?;
        value.apply_merge().map_err(|e| e.to_string())?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

fn str_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => String::new(),
    }
}

/// Compose interpolation: `${NAME:?…}` (required) becomes a placeholder,
/// `${NAME:-default}` its default.
fn interpolate(value: &str) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find('}') else {
            out.push_str(&rest[start..]);
            return out;
        };
        let inner = &rest[start + 2..start + end];
        match inner.split_once(":-") {
            Some((_, default)) => out.push_str(default),
            None => out.push_str("placeholder-0123456789"),
        }
        rest = &rest[start + end + 1..];
    }
    out.push_str(rest);
    out
}

/// A process's settings as `switchboard run` takes them: the config file,
/// the env, then the flags of `args` (`run --roles …`). Problems go to
/// `problems`; returns the config when it loads.
fn load_process(
    who: &str,
    config_file: Option<&str>,
    env: &BTreeMap<String, String>,
    args: &[String],
    known: &Known,
    problems: &mut Vec<String>,
) -> Option<Config> {
    for name in env.keys().filter(|k| k.starts_with("SWITCHBOARD_")) {
        if !known.env.contains(name) {
            problems.push(format!("{who}: {name} is not a setting switchboard reads"));
        }
    }
    if args.first().map(String::as_str) != Some("run") {
        problems.push(format!("{who}: the command is not `run …`: {args:?}"));
        return None;
    }
    for flag in args.iter().filter(|a| a.starts_with("--")) {
        let name = flag.split('=').next().unwrap_or(flag);
        if !known.run_flags.contains(name) {
            problems.push(format!("{who}: `run` has no flag {name}"));
        }
    }
    let mut config = match Config::from_toml_and_env(config_file.unwrap_or(""), env) {
        Ok(config) => config,
        Err(e) => {
            problems.push(format!("{who}: the config does not load: {e}"));
            return None;
        }
    };
    if let Some(at) = args.iter().position(|a| a == "--roles") {
        match args.get(at + 1).map(|r| Role::parse_list(r)) {
            Some(Ok(roles)) => config.roles = roles,
            _ => problems.push(format!("{who}: --roles needs a list of roles")),
        }
    }
    if let Err(e) = config.validate() {
        problems.push(format!("{who}: the config does not validate: {e}"));
        return None;
    }
    if !config.etcd.is_empty()
        && let Err(e) = config.advertised_mesh_url()
    {
        problems.push(format!("{who}: {e}"));
    }
    Some(config)
}

// ---------------------------------------------------------------- compose

struct ComposeFiles {
    compose: String,
    prometheus: String,
    config: String,
}

impl ComposeFiles {
    fn real() -> ComposeFiles {
        ComposeFiles {
            compose: read("deploy/compose/compose.yaml"),
            prometheus: read("deploy/compose/prometheus.yml"),
            config: read("deploy/compose/switchboard.toml"),
        }
    }
}

fn check_compose(files: &ComposeFiles, known: &Known) -> Vec<String> {
    let mut problems = Vec::new();
    let docs = match yaml_docs(&files.compose) {
        Ok(docs) => docs,
        Err(e) => return vec![format!("compose.yaml does not parse: {e}")],
    };
    let Some(services) = docs
        .first()
        .and_then(|d| d.get("services"))
        .and_then(Value::as_mapping)
    else {
        return vec!["compose.yaml has no services".into()];
    };
    let names: BTreeSet<String> = services.keys().map(str_of).collect();
    // Where each switchboard service serves HTTP: its client port, or its
    // metrics listener.
    let mut http_ports: BTreeMap<String, u16> = BTreeMap::new();
    let mut roles_seen: BTreeMap<Role, usize> = BTreeMap::new();
    for (name, service) in services {
        let name = str_of(name);
        let image = service.get("image").map(str_of).unwrap_or_default();
        if !KNOWN_IMAGES.contains(&image.as_str()) {
            problems.push(format!("{name}: unknown image {image:?}"));
        }
        if let Some(deps) = service.get("depends_on").and_then(Value::as_mapping) {
            for dep in deps.keys().map(str_of) {
                if !names.contains(&dep) {
                    problems.push(format!("{name}: depends on unknown service {dep}"));
                }
            }
        }
        for port in service
            .get("ports")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            if !str_of(port).starts_with("127.0.0.1:") {
                problems.push(format!(
                    "{name}: port {} is published beyond 127.0.0.1",
                    str_of(port)
                ));
            }
        }
        if !image.starts_with("switchboard") {
            continue;
        }
        if service
            .get("build")
            .and_then(|b| b.get("dockerfile"))
            .map(str_of)
            != Some("deploy/docker/Dockerfile".into())
        {
            problems.push(format!("{name}: not built from deploy/docker/Dockerfile"));
        }
        let grace = service
            .get("stop_grace_period")
            .map(str_of)
            .and_then(|g| humantime::parse_duration(&g).ok())
            .map_or(0, |d| d.as_secs());
        if grace <= known.drain_secs {
            problems.push(format!(
                "{name}: stop_grace_period {grace} s is not longer than the drain ({} s)",
                known.drain_secs
            ));
        }
        let env: BTreeMap<String, String> = service
            .get("environment")
            .and_then(Value::as_mapping)
            .into_iter()
            .flatten()
            .map(|(k, v)| (str_of(k), interpolate(&str_of(v))))
            .collect();
        let args: Vec<String> = service
            .get("command")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .map(str_of)
            .collect();
        // The config file it mounts, read from the host side.
        let config_file = env.get("SWITCHBOARD_CONFIG").map(|inside| {
            let mounted = service
                .get("volumes")
                .and_then(Value::as_sequence)
                .into_iter()
                .flatten()
                .map(str_of)
                .any(|v| v.split(':').nth(1) == Some(inside.as_str()));
            if !mounted {
                problems.push(format!("{name}: {inside} is not mounted"));
            }
            files.config.as_str()
        });
        let Some(config) = load_process(&name, config_file, &env, &args, known, &mut problems)
        else {
            continue;
        };
        for role in &config.roles {
            *roles_seen.entry(*role).or_default() += 1;
        }
        let port = if config.runs(Role::Gateway) {
            Some(config.client_addr.port())
        } else {
            config
                .metrics_addr
                .rsplit(':')
                .next()
                .and_then(|p| p.parse().ok())
        };
        match port {
            Some(port) => {
                http_ports.insert(name.clone(), port);
            }
            None => problems.push(format!(
                "{name}: serves no /metrics (set SWITCHBOARD_METRICS_ADDR)"
            )),
        }
        if !config.runs(Role::Gateway) {
            let check = service
                .get("healthcheck")
                .and_then(|h| h.get("test"))
                .and_then(Value::as_sequence)
                .map(|t| t.iter().map(str_of).collect::<Vec<_>>().join(" "))
                .unwrap_or_default();
            let wanted = format!("http://127.0.0.1:{}/healthz", port.unwrap_or(0));
            if !check.contains(&wanted) {
                problems.push(format!(
                    "{name}: the health check {check:?} does not ask {wanted}"
                ));
            }
        }
    }
    if roles_seen.get(&Role::Gateway).copied().unwrap_or(0) < 2 {
        problems.push("fewer than two gateways".into());
    }
    for role in Role::ALL {
        if !roles_seen.contains_key(&role) {
            problems.push(format!("no process runs {role}"));
        }
    }
    // Prometheus scrapes every switchboard process where it serves /metrics.
    let targets: BTreeSet<String> = match yaml_docs(&files.prometheus) {
        Ok(docs) => docs
            .iter()
            .filter_map(|d| d.get("scrape_configs").and_then(Value::as_sequence))
            .flatten()
            .filter_map(|job| job.get("static_configs").and_then(Value::as_sequence))
            .flatten()
            .filter_map(|s| s.get("targets").and_then(Value::as_sequence))
            .flatten()
            .map(str_of)
            .collect(),
        Err(e) => {
            problems.push(format!("prometheus.yml does not parse: {e}"));
            BTreeSet::new()
        }
    };
    let wanted: BTreeSet<String> = http_ports
        .iter()
        .map(|(name, port)| format!("{name}:{port}"))
        .collect();
    for missing in wanted.difference(&targets) {
        problems.push(format!("prometheus does not scrape {missing}"));
    }
    for stray in targets.difference(&wanted) {
        problems.push(format!(
            "prometheus scrapes {stray}, where no switchboard process serves /metrics"
        ));
    }
    problems
}

#[test]
fn the_compose_cluster_names_known_images_settings_and_ports() {
    let problems = check_compose(&ComposeFiles::real(), &Known::get());
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn broken_compose_files_are_caught() {
    let known = Known::get();
    let real = ComposeFiles::real();
    let broken = |edit: &dyn Fn(&mut ComposeFiles), expect: &str| {
        let mut files = ComposeFiles::real();
        edit(&mut files);
        let problems = check_compose(&files, &known);
        assert!(
            problems.iter().any(|p| p.contains(expect)),
            "expected a problem with {expect:?}, got {problems:#?}"
        );
    };
    assert!(real.compose.contains("image: redis:7.4-alpine"));
    broken(
        &|f| {
            f.compose = f
                .compose
                .replace("image: redis:7.4-alpine", "image: redis:latest")
        },
        "unknown image \"redis:latest\"",
    );
    broken(
        &|f| {
            f.compose = f
                .compose
                .replace("SWITCHBOARD_REDIS:", "SWITCHBOARD_REDIS_URL:")
        },
        "SWITCHBOARD_REDIS_URL is not a setting",
    );
    broken(
        &|f| {
            f.compose = f
                .compose
                .replacen("\"--roles\", \"router\"", "\"--role\", \"router\"", 1)
        },
        "has no flag --role",
    );
    broken(
        &|f| {
            f.compose = f
                .compose
                .replacen("\"--roles\", \"auth\"", "\"--roles\", \"authz\"", 1)
        },
        "--roles needs a list of roles",
    );
    broken(
        &|f| {
            f.compose = f.compose.replace(
                "SWITCHBOARD_TRACE_SAMPLING: \"0.1\"",
                "SWITCHBOARD_TRACE_SAMPLING: \"often\"",
            )
        },
        "the config does not load",
    );
    broken(
        &|f| {
            f.compose = f
                .compose
                .replace("stop_grace_period: 30s", "stop_grace_period: 5s")
        },
        "not longer than the drain",
    );
    broken(
        &|f| {
            f.prometheus = f
                .prometheus
                .replace("\"gateway2:8088\"", "\"gateway3:8088\"")
        },
        "prometheus does not scrape gateway2:8088",
    );
    broken(
        &|f| f.config = f.config.replace("[limits]", "[limit]"),
        "the config does not load",
    );
    broken(
        &|f| {
            f.compose = f.compose.replace(
                "    ports:\n      - \"127.0.0.1:8089:8088\"",
                "    ports:\n      - \"8089:8088\"",
            )
        },
        "published beyond 127.0.0.1",
    );
    broken(
        &|f| f.compose = f.compose.replace("services:", "services: [\n"),
        "does not parse",
    );
}

// ------------------------------------------------------------- kubernetes

/// The manifests, by file name, and the kustomization.
fn k8s_files() -> BTreeMap<String, String> {
    let dir = root().join("deploy/k8s");
    std::fs::read_dir(&dir)
        .expect("deploy/k8s")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .map(|p| {
            let name = p.file_name().expect("name").to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).expect("read"))
        })
        .collect()
}

fn labels_match(selector: Option<&Value>, labels: Option<&Value>) -> bool {
    let (Some(selector), Some(labels)) = (
        selector.and_then(Value::as_mapping),
        labels.and_then(Value::as_mapping),
    ) else {
        return false;
    };
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn check_k8s(files: &BTreeMap<String, String>, known: &Known) -> Vec<String> {
    let mut problems = Vec::new();
    let mut docs = Vec::new();
    for (name, text) in files {
        match yaml_docs(text) {
            Ok(parsed) => docs.extend(parsed.into_iter().map(|d| (name.clone(), d))),
            Err(e) => problems.push(format!("{name} does not parse: {e}")),
        }
    }
    let kind_of = |d: &Value| d.get("kind").map(str_of).unwrap_or_default();
    let name_of = |d: &Value| {
        d.get("metadata")
            .and_then(|m| m.get("name"))
            .map(str_of)
            .unwrap_or_default()
    };
    // The kustomization lists exactly the other files.
    let listed: BTreeSet<String> = docs
        .iter()
        .filter(|(_, d)| kind_of(d) == "Kustomization")
        .filter_map(|(_, d)| d.get("resources").and_then(Value::as_sequence))
        .flatten()
        .map(str_of)
        .collect();
    let manifests: BTreeSet<String> = files
        .keys()
        .filter(|f| *f != "kustomization.yaml")
        .cloned()
        .collect();
    if listed != manifests {
        problems.push(format!(
            "kustomization resources {listed:?} are not the files {manifests:?}"
        ));
    }
    // The ConfigMap's config files, by ConfigMap name and key.
    let mut config_maps: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for (_, d) in docs.iter().filter(|(_, d)| kind_of(d) == "ConfigMap") {
        let data = d
            .get("data")
            .and_then(Value::as_mapping)
            .into_iter()
            .flatten()
            .map(|(k, v)| (str_of(k), str_of(v)))
            .collect();
        config_maps.insert(name_of(d), data);
    }
    let mut workloads = Vec::new();
    for (file, d) in &docs {
        let kind = kind_of(d);
        let known_kinds = [
            "Kustomization",
            "ConfigMap",
            "Deployment",
            "StatefulSet",
            "Service",
            "PodDisruptionBudget",
        ];
        if !known_kinds.contains(&kind.as_str()) {
            problems.push(format!("{file}: unexpected kind {kind:?}"));
        }
        if kind != "Deployment" && kind != "StatefulSet" {
            continue;
        }
        let who = format!("{file} {kind} {}", name_of(d));
        let spec = d.get("spec");
        let pod_labels = spec
            .and_then(|s| s.get("template"))
            .and_then(|t| t.get("metadata"))
            .and_then(|m| m.get("labels"));
        if !labels_match(
            spec.and_then(|s| s.get("selector"))
                .and_then(|s| s.get("matchLabels")),
            pod_labels,
        ) {
            problems.push(format!("{who}: the selector does not match the pod labels"));
        }
        workloads.push((who.clone(), kind.clone(), pod_labels.cloned(), d.clone()));
        let pod = spec
            .and_then(|s| s.get("template"))
            .and_then(|t| t.get("spec"));
        let grace = pod
            .and_then(|p| p.get("terminationGracePeriodSeconds"))
            .and_then(Value::as_u64)
            .unwrap_or(30);
        if grace <= known.drain_secs {
            problems.push(format!(
                "{who}: terminationGracePeriodSeconds {grace} is not longer than the drain ({} s)",
                known.drain_secs
            ));
        }
        // Volumes: name → the ConfigMap it holds, or a claim template.
        let volumes: BTreeMap<String, Value> = pod
            .and_then(|p| p.get("volumes"))
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .map(|v| (v.get("name").map(str_of).unwrap_or_default(), v.clone()))
            .collect();
        let claims: BTreeSet<String> = spec
            .and_then(|s| s.get("volumeClaimTemplates"))
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .filter_map(|c| c.get("metadata").and_then(|m| m.get("name")).map(str_of))
            .collect();
        for c in pod
            .and_then(|p| p.get("containers"))
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            let image = c.get("image").map(str_of).unwrap_or_default();
            if !KNOWN_IMAGES.contains(&image.as_str()) {
                problems.push(format!("{who}: unknown image {image:?}"));
            }
            let ports: BTreeMap<String, u16> = c
                .get("ports")
                .and_then(Value::as_sequence)
                .into_iter()
                .flatten()
                .map(|p| {
                    (
                        p.get("name").map(str_of).unwrap_or_default(),
                        p.get("containerPort")
                            .and_then(Value::as_u64)
                            .and_then(|n| u16::try_from(n).ok())
                            .unwrap_or(0),
                    )
                })
                .collect();
            // The env as the pod gets it: values from the API or a Secret
            // become placeholders; $(VAR) is expanded.
            let mut env: BTreeMap<String, String> = BTreeMap::new();
            for e in c
                .get("env")
                .and_then(Value::as_sequence)
                .into_iter()
                .flatten()
            {
                let name = e.get("name").map(str_of).unwrap_or_default();
                let value = match e.get("value") {
                    Some(v) => {
                        let mut v = str_of(v);
                        for (k, known_value) in &env {
                            v = v.replace(&format!("$({k})"), known_value);
                        }
                        v
                    }
                    None => "10.0.0.7".to_owned(),
                };
                env.insert(name, value);
            }
            let args: Vec<String> = c
                .get("args")
                .and_then(Value::as_sequence)
                .into_iter()
                .flatten()
                .map(str_of)
                .collect();
            // The config file: a ConfigMap key mounted at SWITCHBOARD_CONFIG.
            let mut config_file = None;
            if let Some(path) = env.get("SWITCHBOARD_CONFIG") {
                let path = Path::new(path);
                let mount = c
                    .get("volumeMounts")
                    .and_then(Value::as_sequence)
                    .into_iter()
                    .flatten()
                    .find(|m| {
                        m.get("mountPath").map(str_of).as_deref().map(Path::new) == path.parent()
                    });
                let map = mount
                    .and_then(|m| m.get("name"))
                    .map(str_of)
                    .and_then(|v| volumes.get(&v).cloned())
                    .and_then(|v| v.get("configMap").and_then(|m| m.get("name")).map(str_of));
                let key = path.file_name().map(|f| f.to_string_lossy().into_owned());
                config_file = map
                    .as_ref()
                    .zip(key.as_ref())
                    .and_then(|(m, k)| config_maps.get(m).and_then(|data| data.get(k)))
                    .cloned();
                if config_file.is_none() {
                    problems.push(format!(
                        "{who}: no ConfigMap key is mounted at {}",
                        path.display()
                    ));
                }
            }
            let Some(config) = load_process(
                &who,
                config_file.as_deref(),
                &env,
                &args,
                known,
                &mut problems,
            ) else {
                continue;
            };
            // Where this process answers HTTP: the client port, or the
            // metrics listener.
            let http_port = if config.runs(Role::Gateway) {
                Some(config.client_addr.port())
            } else {
                config
                    .metrics_addr
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse().ok())
            };
            for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
                let Some(get) = c.get(probe).and_then(|p| p.get("httpGet")) else {
                    problems.push(format!("{who}: no {probe}"));
                    continue;
                };
                if get.get("path").map(str_of).as_deref() != Some(path) {
                    problems.push(format!("{who}: {probe} does not ask {path}"));
                }
                let port = match get.get("port") {
                    Some(Value::Number(n)) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
                    Some(named) => ports.get(&str_of(named)).copied(),
                    None => None,
                };
                if port.is_none() || port != http_port {
                    problems.push(format!(
                        "{who}: {probe} port {:?} is not where the process serves HTTP ({http_port:?})",
                        get.get("port").map(str_of)
                    ));
                }
            }
            if !ports.values().any(|p| *p == config.mesh_addr.port()) {
                problems.push(format!(
                    "{who}: the mesh port {} is not declared",
                    config.mesh_addr.port()
                ));
            }
            if config.runs(Role::Delivery) && !config.store.engine.is_shared() {
                let replicas = spec.and_then(|s| s.get("replicas")).and_then(Value::as_u64);
                if kind != "StatefulSet" || replicas != Some(1) {
                    problems.push(format!(
                        "{who}: delivery on the embedded store must be a StatefulSet of one pod"
                    ));
                }
                let data_mount = c
                    .get("volumeMounts")
                    .and_then(Value::as_sequence)
                    .into_iter()
                    .flatten()
                    .find(|m| {
                        m.get("mountPath").map(str_of).as_deref().map(Path::new)
                            == Some(config.data_dir.as_path())
                    });
                let persistent = data_mount
                    .and_then(|m| m.get("name"))
                    .map(str_of)
                    .is_some_and(|n| claims.contains(&n));
                if !persistent {
                    problems.push(format!(
                        "{who}: the data dir {} is not on a persistent volume",
                        config.data_dir.display()
                    ));
                }
            }
        }
    }
    // Every workload has a PodDisruptionBudget; every Service selects one.
    for (who, _, labels, _) in &workloads {
        let covered = docs.iter().any(|(_, d)| {
            kind_of(d) == "PodDisruptionBudget"
                && labels_match(
                    d.get("spec")
                        .and_then(|s| s.get("selector"))
                        .and_then(|s| s.get("matchLabels")),
                    labels.as_ref(),
                )
        });
        if !covered {
            problems.push(format!("{who}: no PodDisruptionBudget"));
        }
    }
    for (file, d) in docs.iter().filter(|(_, d)| kind_of(d) == "Service") {
        let selector = d.get("spec").and_then(|s| s.get("selector"));
        let target = workloads
            .iter()
            .find(|(_, _, labels, _)| labels_match(selector, labels.as_ref()));
        let Some((_, _, _, workload)) = target else {
            problems.push(format!(
                "{file}: Service {} selects no workload",
                name_of(d)
            ));
            continue;
        };
        let declared: BTreeSet<String> = workload
            .get("spec")
            .and_then(|s| s.get("template"))
            .and_then(|t| t.get("spec"))
            .and_then(|p| p.get("containers"))
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .filter_map(|c| c.get("ports").and_then(Value::as_sequence))
            .flatten()
            .flat_map(|p| {
                [
                    p.get("name").map(str_of),
                    p.get("containerPort").map(str_of),
                ]
            })
            .flatten()
            .collect();
        for port in d
            .get("spec")
            .and_then(|s| s.get("ports"))
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            let target = port.get("targetPort").map(str_of).unwrap_or_default();
            if !declared.contains(&target) {
                problems.push(format!(
                    "{file}: Service {} targets undeclared port {target:?}",
                    name_of(d)
                ));
            }
        }
    }
    let roles: BTreeSet<String> = workloads
        .iter()
        .filter_map(|(_, _, labels, _)| {
            labels
                .as_ref()
                .and_then(|l| l.get("app.kubernetes.io/component"))
                .map(str_of)
        })
        .collect();
    for role in Role::ALL {
        if !roles.contains(role.as_str()) {
            problems.push(format!("no workload runs {role}"));
        }
    }
    problems
}

#[test]
fn the_kubernetes_manifests_probe_serve_and_stop_as_the_binary_does() {
    let problems = check_k8s(&k8s_files(), &Known::get());
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn broken_kubernetes_manifests_are_caught() {
    let known = Known::get();
    let broken = |file: &str, from: &str, to: &str, expect: &str| {
        let mut files = k8s_files();
        let text = files.get_mut(file).expect("file");
        assert!(text.contains(from), "{file} has no {from:?}");
        *text = text.replacen(from, to, 1);
        let problems = check_k8s(&files, &known);
        assert!(
            problems.iter().any(|p| p.contains(expect)),
            "{file}: expected a problem with {expect:?}, got {problems:#?}"
        );
    };
    broken(
        "gateway.yaml",
        "path: /readyz",
        "path: /ready",
        "readinessProbe does not ask /readyz",
    );
    broken(
        "router.yaml",
        "path: /healthz",
        "path: /health",
        "livenessProbe does not ask /healthz",
    );
    broken(
        "gateway.yaml",
        "port: client\n",
        "port: mesh\n",
        "is not where the process serves HTTP",
    );
    broken(
        "auth.yaml",
        "value: 0.0.0.0:9464",
        "value: 0.0.0.0:9465",
        "is not where the process serves HTTP",
    );
    broken(
        "groups.yaml",
        "terminationGracePeriodSeconds: 30",
        "terminationGracePeriodSeconds: 10",
        "not longer than the drain",
    );
    broken(
        "groups.yaml",
        "name: SWITCHBOARD_METRICS_ADDR",
        "name: SWITCHBOARD_METRIC_ADDR",
        "SWITCHBOARD_METRIC_ADDR is not a setting",
    );
    // Valid for one process running every role, not for --roles gateway.
    broken(
        "configmap.yaml",
        "redis = \"redis://redis:6379\"",
        "",
        "the config does not validate: invalid config: etcd is set but redis is not",
    );
    broken(
        "configmap.yaml",
        "trace_sampling = 0.1",
        "trace_sampling = 2.0",
        "trace_sampling must be within",
    );
    broken(
        "configmap.yaml",
        "[limits]",
        "[limitz]",
        "the config does not load",
    );
    broken(
        "delivery.yaml",
        "replicas: 1",
        "replicas: 2",
        "StatefulSet of one pod",
    );
    broken(
        "router.yaml",
        "kind: PodDisruptionBudget",
        "kind: PodDisruptionBudgetz",
        "unexpected kind",
    );
    broken(
        "router.yaml",
        "kind: PodDisruptionBudget",
        "kind: ConfigMap",
        "no PodDisruptionBudget",
    );
    broken(
        "gateway.yaml",
        "targetPort: client",
        "targetPort: web",
        "targets undeclared port \"web\"",
    );
    broken(
        "auth.yaml",
        "image: switchboard",
        "image: nginx",
        "unknown image \"nginx\"",
    );
    broken(
        "gateway.yaml",
        "args: [\"run\", \"--roles\", \"gateway\"]",
        "args: [\"serve\"]",
        "is not `run",
    );
    broken(
        "kustomization.yaml",
        "  - auth.yaml\n",
        "",
        "kustomization resources",
    );
    broken(
        "router.yaml",
        "kind: Deployment",
        "kind: [Deployment",
        "does not parse",
    );
}

// ------------------------------------------------------------- Dockerfile

fn workspace_packages() -> BTreeSet<String> {
    let manifest: toml::Table = toml::from_str(&read("Cargo.toml")).expect("Cargo.toml");
    manifest["workspace"]["members"]
        .as_array()
        .expect("members")
        .iter()
        .filter_map(|m| m.as_str())
        .filter_map(|m| {
            let text = std::fs::read_to_string(root().join(m).join("Cargo.toml")).ok()?;
            let package: toml::Table = toml::from_str(&text).ok()?;
            package
                .get("package")?
                .get("name")?
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

fn check_dockerfile(text: &str, ignore: &str, known: &Known) -> Vec<String> {
    let mut problems = Vec::new();
    // Continuation lines joined: one instruction per entry.
    let joined = text.replace("\\\n", " ");
    let instructions: Vec<(String, String)> = joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once(char::is_whitespace))
        .map(|(i, rest)| (i.to_ascii_uppercase(), rest.trim().to_owned()))
        .collect();
    let packages = workspace_packages();
    let build = instructions
        .iter()
        .find(|(i, rest)| i == "RUN" && rest.contains("cargo build"));
    match build {
        None => problems.push("no RUN cargo build".into()),
        Some((_, rest)) => {
            let words: Vec<&str> = rest.split_whitespace().collect();
            for flag in ["--release", "--locked"] {
                if !words.contains(&flag) {
                    problems.push(format!("cargo build without {flag}"));
                }
            }
            match words
                .iter()
                .position(|w| *w == "-p")
                .and_then(|at| words.get(at + 1))
            {
                Some(p) if packages.contains(*p) => {}
                other => problems.push(format!(
                    "cargo build -p {other:?} names no workspace package"
                )),
            }
        }
    }
    // The runtime stage: what comes after the last FROM.
    let last_from = instructions
        .iter()
        .rposition(|(i, _)| i == "FROM")
        .unwrap_or(0);
    let runtime = &instructions[last_from..];
    match runtime.iter().rev().find(|(i, _)| i == "USER") {
        Some((_, user)) if !["root", "0", "0:0", "root:root"].contains(&user.as_str()) => {}
        _ => problems.push("the runtime stage does not run as a non-root USER".into()),
    }
    let mut env = BTreeMap::new();
    for (_, rest) in runtime.iter().filter(|(i, _)| i == "ENV") {
        for pair in rest.split_whitespace() {
            if let Some((k, v)) = pair.split_once('=') {
                env.insert(k.to_owned(), v.to_owned());
            }
        }
    }
    let config = load_process(
        "Dockerfile",
        None,
        &env,
        &["run".to_owned()],
        known,
        &mut problems,
    );
    let exposed: BTreeSet<u16> = runtime
        .iter()
        .filter(|(i, _)| i == "EXPOSE")
        .flat_map(|(_, rest)| {
            rest.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<_>>()
        })
        .collect();
    if let Some(config) = config {
        for (what, port) in [
            ("client", config.client_addr.port()),
            ("mesh", config.mesh_addr.port()),
        ] {
            if !exposed.contains(&port) {
                problems.push(format!("the {what} port {port} is not EXPOSEd"));
            }
        }
        let health = runtime
            .iter()
            .find(|(i, _)| i == "HEALTHCHECK")
            .map(|(_, rest)| rest.clone())
            .unwrap_or_default();
        let wanted = format!("127.0.0.1:{}/healthz", config.client_addr.port());
        if !health.contains(&wanted) {
            problems.push(format!("the HEALTHCHECK does not ask {wanted}"));
        }
    }
    // COPY sources (from the context, not from a stage) exist and are not
    // excluded by .dockerignore.
    let ignored: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for (_, rest) in instructions.iter().filter(|(i, _)| i == "COPY") {
        if rest.starts_with("--from") {
            continue;
        }
        let words: Vec<&str> = rest
            .split_whitespace()
            .filter(|w| !w.starts_with("--"))
            .collect();
        for source in &words[..words.len().saturating_sub(1)] {
            if !root().join(source).exists() {
                problems.push(format!("COPY {source}: no such file in the build context"));
            }
            if ignored
                .iter()
                .any(|i| source.starts_with(i.trim_start_matches("**/")))
            {
                problems.push(format!("COPY {source}: excluded by .dockerignore"));
            }
        }
    }
    for needed in ["target", ".git"] {
        if !ignored.contains(&needed) {
            problems.push(format!(".dockerignore does not exclude {needed}"));
        }
    }
    problems
}

#[test]
fn the_dockerfile_builds_the_binary_and_runs_it_as_non_root() {
    let problems = check_dockerfile(
        &read("deploy/docker/Dockerfile"),
        &read(".dockerignore"),
        &Known::get(),
    );
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn broken_dockerfiles_are_caught() {
    let known = Known::get();
    let real = read("deploy/docker/Dockerfile");
    let ignore = read(".dockerignore");
    let broken = |from: &str, to: &str, expect: &str| {
        assert!(real.contains(from), "the Dockerfile has no {from:?}");
        let problems = check_dockerfile(&real.replace(from, to), &ignore, &known);
        assert!(
            problems.iter().any(|p| p.contains(expect)),
            "expected a problem with {expect:?}, got {problems:#?}"
        );
    };
    broken(
        "-p switchboard",
        "-p switchbored",
        "names no workspace package",
    );
    broken("--locked ", "", "without --locked");
    broken("USER 10001:10001", "USER root", "non-root USER");
    broken(
        "EXPOSE 8088 9089",
        "EXPOSE 8088",
        "mesh port 9089 is not EXPOSEd",
    );
    broken(
        "SWITCHBOARD_DATA_DIR=",
        "SWITCHBOARD_DATADIR=",
        "SWITCHBOARD_DATADIR is not a setting",
    );
    broken(
        "127.0.0.1:8088/healthz",
        "127.0.0.1:8080/healthz",
        "HEALTHCHECK does not ask",
    );
    broken(
        "COPY deploy/switchboard.example.toml",
        "COPY deploy/missing.toml",
        "no such file",
    );
    let problems = check_dockerfile(&real, &ignore.replace("target\n", ""), &known);
    assert!(
        problems
            .iter()
            .any(|p| p.contains("does not exclude target")),
        "{problems:#?}"
    );
}

// ---------------------------------------------------------------- systemd

/// `systemd-analyze verify` on a copy of `unit` whose binary path is the
/// one just built (verify checks that it exists); its complaints, or
/// `None` when systemd-analyze is not installed.
fn verify_unit(unit: &str) -> Option<Vec<String>> {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("switchboard.service");
    let unit = unit.replace(
        "/usr/local/bin/switchboard",
        env!("CARGO_BIN_EXE_switchboard"),
    );
    std::fs::write(&path, unit).expect("write unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze verify");
    // Unknown keys and bad values are warnings with status 0: any line
    // about the unit counts.
    let mut complaints: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .chain(String::from_utf8_lossy(&out.stdout).lines())
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect();
    if !out.status.success() {
        complaints.push(format!("systemd-analyze verify exited with {}", out.status));
    }
    Some(complaints)
}

fn check_unit_settings(unit: &str, known: &Known) -> Vec<String> {
    let mut problems = Vec::new();
    let value = |key: &str| {
        unit.lines()
            .filter_map(|l| l.trim().strip_prefix(&format!("{key}=")))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let stop = value("TimeoutStopSec").first().map_or(0, |v| {
        v.parse::<u64>()
            .ok()
            .or_else(|| humantime::parse_duration(v).ok().map(|d| d.as_secs()))
            .unwrap_or(0)
    });
    if stop <= known.drain_secs {
        problems.push(format!(
            "TimeoutStopSec {stop} s is not longer than the drain ({} s)",
            known.drain_secs
        ));
    }
    let mut env = BTreeMap::new();
    for pair in value("Environment") {
        if let Some((k, v)) = pair.split_once('=') {
            env.insert(k.to_owned(), v.to_owned());
        }
    }
    let args: Vec<String> = value("ExecStart")
        .first()
        .map(|l| l.split_whitespace().skip(1).map(str::to_owned).collect())
        .unwrap_or_default();
    let file = read("deploy/switchboard.example.toml");
    load_process(
        "switchboard.service",
        Some(&file),
        &env,
        &args,
        known,
        &mut problems,
    );
    for needed in [
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "StateDirectory=switchboard",
        "LimitNOFILE=",
    ] {
        if !unit.lines().any(|l| l.starts_with(needed)) {
            problems.push(format!("no {needed}"));
        }
    }
    problems
}

#[test]
fn the_systemd_unit_verifies_and_outlasts_the_drain() {
    let unit = read("deploy/systemd/switchboard.service");
    let problems = check_unit_settings(&unit, &Known::get());
    assert!(problems.is_empty(), "{problems:#?}");
    match verify_unit(&unit) {
        Some(complaints) => assert!(complaints.is_empty(), "{complaints:#?}"),
        None => switchboard_testenv::record_skip(
            "systemd-analyze is not installed (scripts/test.sh installs systemd)",
        ),
    }
}

#[test]
fn broken_systemd_units_are_caught() {
    let known = Known::get();
    let unit = read("deploy/systemd/switchboard.service");
    let broken = |from: &str, to: &str, expect: &str| {
        assert!(unit.contains(from), "the unit has no {from:?}");
        let problems = check_unit_settings(&unit.replacen(from, to, 1), &known);
        assert!(
            problems.iter().any(|p| p.contains(expect)),
            "expected a problem with {expect:?}, got {problems:#?}"
        );
    };
    broken(
        "TimeoutStopSec=45",
        "TimeoutStopSec=10",
        "not longer than the drain",
    );
    broken(
        "ProtectSystem=strict",
        "ProtectSystem=full",
        "no ProtectSystem=strict",
    );
    broken("run --config", "run --conf", "has no flag --conf");
    broken(
        "SWITCHBOARD_DATA_DIR=",
        "SWITCHBOARD_DATA=",
        "SWITCHBOARD_DATA is not a setting",
    );
    if let Some(complaints) =
        verify_unit(&unit.replacen("ProtectSystem=strict", "ProtectSystem=sometimes", 1))
    {
        assert!(
            !complaints.is_empty(),
            "systemd-analyze accepted ProtectSystem=sometimes"
        );
    }
    if let Some(complaints) = verify_unit(&unit.replacen("[Service]", "[Service]\nBogusKey=1", 1)) {
        assert!(
            !complaints.is_empty(),
            "systemd-analyze accepted an unknown key"
        );
    }
}

// ------------------------------------------------ probes on a real process

/// The probe paths the manifests use answer on a real node: `/healthz`
/// and `/readyz` on the client port and on the metrics listener (where
/// processes without a client port are probed).
#[tokio::test]
async fn healthz_and_readyz_answer_on_the_client_port_and_the_metrics_listener() {
    let port = support::free_port();
    let node = support::TestNode::start_with(
        |c| c.metrics_addr = format!("127.0.0.1:{port}"),
        Default::default(),
    )
    .await;
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    for addr in [node.client_addr, metrics] {
        let deadline = tokio::time::Instant::now() + support::WAIT;
        let (status, body) = loop {
            if let Some(answer) = support::http_get(addr, "/readyz").await {
                break answer;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{addr} does not answer /readyz"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        assert_eq!(status, 200, "{addr}: {body}");
        assert_eq!(body["checks"]["store"], "ok", "{addr}: {body}");
        let (status, body) = support::http_get(addr, "/healthz").await.expect("healthz");
        assert_eq!((status, body["status"].as_str()), (200, Some("ok")));
    }
    node.shutdown().await;
}
