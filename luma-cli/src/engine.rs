//! The Docker engine, through bollard. Every engine operation Luma performs goes through this
//! type, so the transport (the local socket, or a server over SSH) is chosen once at
//! [`Engine::connect`] and `--verbose` can show each operation.
//!
//! ## Over SSH
//! A server's engine is reached the way `docker -H ssh://...` does: `docker system dial-stdio`
//! on the server carries the API over the ssh channel's stdin/stdout. We do not use bollard's
//! own `ssh` feature for two reasons:
//! - bollard 0.21.1 ignores the port in `ssh://user@host:port` (fixed upstream, unreleased),
//!   and `ssh.port` is part of luma.yml;
//! - it brings its own SSH client, so the user's agent, `~/.ssh/config` (aliases,
//!   `ProxyJump`, `IdentityFile`) and known_hosts would not all apply.
//!
//! So bollard gets a custom transport: a hyper-util client whose connector runs `ssh -S <ctl>
//! ... -- docker system dial-stdio` through the server's [`Master`] and uses that child's
//! stdout/stdin as the connection. Each pooled HTTP connection is one ssh channel on the one
//! TCP connection per server per run; the engine holds the master, so it lives as long as the
//! engine. Everything above the transport is the same code for both.
//!
//! sshd allows 10 channels per connection by default (MaxSessions), so Luma opens at most 8
//! at once per server, and a request waits for a free one. A wait must always end: a stream
//! that holds its channel until Luma ends it (`logs -f`, the deploy lock's stdin attach) takes
//! one of 6 places for such streams first, and fails at once, saying so, when they are all
//! taken. The other 2 channels are then always freed by requests that end on their own, and a
//! wait longer than 10 s says what it waits for.

use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerSummary, EndpointSettings, ExecConfig,
    HostConfig, HostConfigLogConfig, Ipam, IpamConfig, NetworkConnectRequest, NetworkCreateRequest,
    NetworkDisconnectRequest, NetworkingConfig, PortBinding, RestartPolicy, RestartPolicyNameEnum,
    VolumeCreateRequest,
};
use bollard::query_parameters::{
    AttachContainerOptions, BuildImageOptions, CreateContainerOptions, ListContainersOptions,
    LogsOptions, RemoveContainerOptions, StopContainerOptions, WaitContainerOptions,
};
use bollard::Docker;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use std::collections::HashMap;
use std::sync::Arc;

use crate::ssh::{Master, SshTarget};
use crate::transfer::RegistryAuth;

/// How Luma reaches an engine.
#[derive(Clone, Debug, PartialEq)]
pub enum Transport {
    /// `DOCKER_HOST`, or the default local socket.
    Local,
    /// A server's engine over SSH (see the module docs).
    Ssh(SshTarget),
}

pub struct Engine {
    docker: Docker,
    pub transport: Transport,
    pub verbose: bool,
    /// The server's ssh connection; the engine's channels ride on it.
    master: Option<Arc<Master>>,
    /// How many of them are open and held (see the module docs); None for the local engine.
    channels: Option<Arc<dial_stdio::Channels>>,
}

/// What [`Engine::image_info`] tells about an image.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageInfo {
    pub id: String,
    /// The engine's size of the image (its layers, uncompressed), in bytes.
    pub size: u64,
    /// `repo@sha256:...` references it has in registries it was pushed to or pulled from.
    pub repo_digests: Vec<String>,
}

/// A bridge network of the engine and its interface on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bridge {
    pub network: String,
    pub iface: String,
    /// An `--internal` network: Docker drops every packet between it and the outside.
    pub internal: bool,
    /// Its IPv4 subnets: its bridge holds an address in them on the engine's host.
    pub subnets: Vec<String>,
}

/// What [`Engine::create_network`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum NetworkCreated {
    /// Created: its ID, and its bridge's interface on the host.
    Created { id: String, bridge: String },
    /// A network of that name exists already (made by another run in between); this call
    /// left nothing behind.
    Exists,
    /// The engine refused the subnet: it overlaps one of its networks (its message).
    Overlaps(String),
}

/// A network as [`Engine::networks_named`] lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedNetwork {
    pub id: String,
    /// When the engine made it, as it writes it (RFC 3339 with nanoseconds).
    pub created: String,
    /// Its IPv4 subnets.
    pub subnets: Vec<String>,
}

/// Why a load failed: the engine refused the image (its message), or the connection (the
/// stream) broke (the cause).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum LoadFailure {
    Engine(String),
    Connection(String),
}

/// Operations that stream a whole image (save, load) may take long before the engine sends
/// the response head: a 20.10 engine writes the whole save to a temp dir before it answers,
/// and answers a load only once it has read all of it. bollard's timeout (120 s) covers
/// just that wait, so these get a long one; a dead connection still fails at once.
const STREAM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// What a new container looks like.
#[derive(Default, Clone)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub env: Vec<String>,
    pub labels: HashMap<String, String>,
    pub cmd: Option<Vec<String>>,
    /// (network, aliases); the container is created attached to it.
    pub network: Option<(String, Vec<String>)>,
    /// (host ip, host port, "port/proto"); host port 0 means any free port.
    pub ports: Vec<(Option<String>, u16, String)>,
    pub binds: Vec<String>,
    pub restart_unless_stopped: bool,
    /// Run Docker's init as PID 1, so the app gets SIGTERM's default action (apps rarely
    /// handle it as PID 1) and a stop does not wait out the whole grace period.
    pub init: bool,
    /// Seconds `docker stop` waits after SIGTERM before SIGKILL.
    pub stop_timeout: Option<i64>,
    /// Options of the `json-file` log driver (`max-size`, `max-file`); empty: the daemon's
    /// default driver with its own options.
    pub json_log_opts: HashMap<String, String>,
}

/// What to build and how to tag it.
pub struct BuildSpec {
    pub tag: String,
    pub dockerfile: String,
    pub args: HashMap<String, String>,
    pub target: Option<String>,
    pub platform: Option<String>,
    pub labels: HashMap<String, String>,
}

/// An open attach connection to a container's stdin (see [`Engine::attach_stdin`]). Holding it
/// keeps the connection open; dropping it closes it.
pub struct StdinHold {
    _input: std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>,
    /// Its place among the held channels (over ssh); given back after the connection closed.
    _held: Option<tokio::sync::OwnedSemaphorePermit>,
}

pub type Result<T> = std::result::Result<T, String>;

fn is_404(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

fn is_conflict(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 409,
            ..
        }
    )
}

impl Engine {
    /// Connects and negotiates the API version (engines differ; a server may run 20.10 with
    /// API 1.41). For [`Transport::Ssh`] this first opens the server's ssh master, so an unknown
    /// host key or a refused login fails here, with its own message.
    pub async fn connect(transport: Transport, verbose: bool) -> Result<Engine> {
        let (docker, master, channels) = match &transport {
            Transport::Local => (
                Docker::connect_with_local_defaults().map_err(|e| {
                    format!("cannot connect to the Docker engine ({e}); is Docker running, and is DOCKER_HOST right?")
                })?,
                None,
                None,
            ),
            Transport::Ssh(target) => {
                let master = Arc::new(Master::open(target).await?);
                let (docker, channels) = dial_stdio::docker(&master, verbose)?;
                (docker, Some(master), Some(channels))
            }
        };
        let docker = match docker.negotiate_version().await {
            Ok(d) => d,
            Err(e) => {
                return Err(match &master {
                    None => format!("the Docker engine does not answer ({e}); start it, or check DOCKER_HOST and your permission on the socket"),
                    Some(m) => dial_stdio::diagnose(m, &e).await,
                })
            }
        };
        Ok(Engine {
            docker,
            transport,
            verbose,
            master,
            channels,
        })
    }

    /// `local`, or the server as written in luma.yml.
    pub fn server(&self) -> &str {
        match &self.transport {
            Transport::Local => "local",
            Transport::Ssh(t) => &t.server,
        }
    }

    /// The server's ssh connection (None for the local engine), to run other commands there.
    pub fn master(&self) -> Option<&Master> {
        self.master.as_deref()
    }

    /// Takes a place for a stream that holds its channel until Luma ends it (over ssh; the
    /// local engine has no limit). Err at once when all such places are taken, instead of a
    /// wait that would never end.
    fn hold_channel(&self, what: &str) -> Result<Option<tokio::sync::OwnedSemaphorePermit>> {
        self.channels.as_ref().map(|c| c.hold(what)).transpose()
    }

    fn trace(&self, what: impl std::fmt::Display) {
        if self.verbose {
            eprintln!("    docker: {what}");
        }
    }

    pub async fn server_version(&self) -> Result<String> {
        let v = self
            .docker
            .version()
            .await
            .map_err(|e| format!("docker version: {e}"))?;
        Ok(v.version.unwrap_or_default())
    }

    /// The daemon's default log driver (`json-file` unless its admin chose another).
    pub async fn default_log_driver(&self) -> Result<String> {
        self.trace("info (default log driver)");
        let info = self
            .docker
            .info()
            .await
            .map_err(|e| format!("docker info: {e}"))?;
        Ok(info.logging_driver.unwrap_or_default())
    }

    pub async fn image_exists(&self, image: &str) -> Result<bool> {
        self.trace(format_args!("inspect image {image}"));
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(e) if is_404(&e) => Ok(false),
            Err(e) => Err(format!("inspect image {image}: {e}")),
        }
    }

    /// Builds an image from a tar'd context; `progress` gets each output line.
    pub async fn build(
        &self,
        context_tar: Vec<u8>,
        b: &BuildSpec,
        mut progress: impl FnMut(&str),
    ) -> Result<()> {
        let tag = b.tag.as_str();
        self.trace(format_args!("build {tag}"));
        let opts = BuildImageOptions {
            dockerfile: b.dockerfile.clone(),
            t: Some(tag.to_string()),
            rm: true,
            forcerm: true,
            buildargs: Some(b.args.clone()),
            labels: Some(b.labels.clone()),
            target: b.target.clone().unwrap_or_default(),
            platform: b.platform.clone().unwrap_or_default(),
            ..Default::default()
        };
        let mut stream =
            self.docker
                .build_image(opts, None, Some(bollard::body_full(context_tar.into())));
        while let Some(item) = stream.next().await {
            let info = item.map_err(|e| format!("build {tag}: {e}"))?;
            if let Some(err) = info.error_detail.and_then(|d| d.message) {
                return Err(format!("build {tag} failed: {err}"));
            }
            if let Some(s) = info.stream {
                for line in s.lines().filter(|l| !l.trim().is_empty()) {
                    progress(line.trim_end());
                }
            }
        }
        if !self.image_exists(tag).await? {
            return Err(format!("build {tag} finished without producing the image"));
        }
        Ok(())
    }

    pub async fn remove_image(&self, image: &str) -> Result<()> {
        self.trace(format_args!("remove image {image}"));
        match self
            .docker
            .remove_image(
                image,
                None::<bollard::query_parameters::RemoveImageOptions>,
                None,
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_404(&e) || is_conflict(&e) => Ok(()),
            Err(e) => Err(format!("remove image {image}: {e}")),
        }
    }

    /// The IPv4 subnets of the network called `name` (none for a network without one), or
    /// None when there is no such network.
    pub async fn network_subnets(&self, name: &str) -> Result<Option<Vec<String>>> {
        self.trace(format_args!("inspect network {name}"));
        match self
            .docker
            .inspect_network(
                name,
                None::<bollard::query_parameters::InspectNetworkOptions>,
            )
            .await
        {
            // The engine also finds a network by a prefix of its ID: only the name counts.
            Ok(n) if n.name.as_deref() == Some(name) => Ok(Some(ipv4_subnets(n.ipam.as_ref()))),
            Ok(_) => Ok(None),
            Err(e) if is_404(&e) => Ok(None),
            Err(e) => Err(format!("inspect network {name} on {}: {e}", self.server())),
        }
    }

    /// Every network on the engine, as the engine lists them.
    async fn all_networks(&self) -> Result<Vec<bollard::models::Network>> {
        self.trace("list networks");
        self.docker
            .list_networks(None::<bollard::query_parameters::ListNetworksOptions>)
            .await
            .map_err(|e| format!("list networks on {}: {e}", self.server()))
    }

    /// Every network on the engine, whatever its driver, with its IPv4 subnets: (name,
    /// subnet) pairs.
    pub async fn network_subnets_in_use(&self) -> Result<Vec<(String, String)>> {
        Ok(self
            .all_networks()
            .await?
            .into_iter()
            .flat_map(|n| {
                let name = n.name.clone().or(n.id.clone()).unwrap_or_default();
                ipv4_subnets(n.ipam.as_ref())
                    .into_iter()
                    .map(move |s| (name.clone(), s))
            })
            .collect())
    }

    /// Every bridge network of the engine with the interface its bridge has on the host:
    /// the `com.docker.network.bridge.name` option when set (the default network's is
    /// `docker0`), else `br-` and the first 12 characters of its ID, as the driver names it.
    pub async fn bridges(&self) -> Result<Vec<Bridge>> {
        Ok(self
            .all_networks()
            .await?
            .into_iter()
            .filter(|n| n.driver.as_deref() == Some("bridge"))
            .filter_map(|n| {
                let id = n.id?;
                let iface = n
                    .options
                    .as_ref()
                    .and_then(|o| o.get("com.docker.network.bridge.name"))
                    .filter(|b| !b.is_empty())
                    .cloned()
                    .unwrap_or_else(|| format!("br-{}", id.get(..12).unwrap_or(&id)));
                let subnets = ipv4_subnets(n.ipam.as_ref());
                Some(Bridge {
                    network: n.name.unwrap_or(id),
                    iface,
                    internal: n.internal.unwrap_or(false),
                    subnets,
                })
            })
            .collect())
    }

    /// Every network called exactly `name`: one, or several on an engine before API 1.44,
    /// which creates a second network of a name when two creates of it meet.
    pub async fn networks_named(&self, name: &str) -> Result<Vec<NamedNetwork>> {
        self.trace(format_args!("list networks named {name}"));
        let filters = HashMap::from([("name".to_string(), vec![name.to_string()])]);
        let list = self
            .docker
            .list_networks(Some(bollard::query_parameters::ListNetworksOptions {
                filters: Some(filters),
            }))
            .await
            .map_err(|e| format!("list networks named {name} on {}: {e}", self.server()))?;
        Ok(list
            .into_iter()
            // The engine's name filter matches parts of names too (`shop` finds
            // `shop-network` and `myshop`): only the whole name counts.
            .filter(|n| n.name.as_deref() == Some(name))
            .map(|n| NamedNetwork {
                subnets: ipv4_subnets(n.ipam.as_ref()),
                id: n.id.unwrap_or_default(),
                created: n.created.unwrap_or_default(),
            })
            .collect())
    }

    /// The IPv4 routing table of the engine's host, as the kernel shows it in
    /// `/proc/net/route`: this machine's for the local engine (it runs here), the server's,
    /// read through its ssh connection, for a server.
    pub async fn host_routes(&self) -> Result<String> {
        const TABLE: &str = "/proc/net/route";
        self.trace(format_args!("read {TABLE}"));
        match &self.master {
            None => tokio::fs::read_to_string(TABLE)
                .await
                .map_err(|e| format!("cannot read {TABLE} on this machine ({e})")),
            Some(m) => {
                m.output(&["cat", TABLE], std::time::Duration::from_secs(15))
                    .await
            }
        }
    }

    /// Runs `argv` on the engine's host and returns its stdout: here for the local engine (it
    /// runs here), through the server's ssh connection for a server. Err says why not: its exit
    /// status and stderr, or that it took longer than `limit` (it is killed then).
    pub async fn host_output(&self, argv: &[&str], limit: std::time::Duration) -> Result<String> {
        self.trace(format_args!("run {} on the host", argv.join(" ")));
        if let Some(m) = &self.master {
            return m.output(argv, limit).await;
        }
        let (what, server) = (argv.join(" "), self.server());
        let Some((program, args)) = argv.split_first() else {
            return Err("no command to run on the host".into());
        };
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        match tokio::time::timeout(limit, cmd.output()).await {
            Err(_) => Err(format!(
                "`{what}` on {server} did not finish within {}s",
                limit.as_secs_f64()
            )),
            Ok(Err(e)) => Err(format!("cannot run `{what}` on {server} ({e})")),
            Ok(Ok(out)) => crate::ssh::finished(&what, server, out),
        }
    }

    /// Creates a bridge network with the given labels, and the subnet when one is given
    /// (else the engine picks one from its default pools). Says when the engine refused the
    /// subnet because it overlaps one of its networks, and when a network of that name
    /// exists already: an engine before API 1.44 creates a second one of the same name, so
    /// this one is removed again then.
    pub async fn create_network(
        &self,
        name: &str,
        labels: HashMap<String, String>,
        subnet: Option<&str>,
    ) -> Result<NetworkCreated> {
        self.trace(format_args!(
            "create network {name}{}",
            subnet
                .map(|s| format!(" with subnet {s}"))
                .unwrap_or_default()
        ));
        let ipam = subnet.map(|s| Ipam {
            config: Some(vec![IpamConfig {
                subnet: Some(s.to_string()),
                ..Default::default()
            }]),
            ..Default::default()
        });
        match self
            .docker
            .create_network(NetworkCreateRequest {
                name: name.to_string(),
                driver: Some("bridge".into()),
                labels: Some(labels),
                ipam,
                ..Default::default()
            })
            .await
        {
            Ok(r) if r.warning.contains("already exists") => {
                self.remove_network(&r.id).await?;
                Ok(NetworkCreated::Exists)
            }
            Ok(r) => Ok(NetworkCreated::Created {
                // The bridge driver names its interface so unless told otherwise.
                bridge: format!("br-{}", r.id.get(..12).unwrap_or(&r.id)),
                id: r.id,
            }),
            Err(e) if is_conflict(&e) => Ok(NetworkCreated::Exists),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 403,
                message,
            }) if message.to_ascii_lowercase().contains("overlap") => {
                Ok(NetworkCreated::Overlaps(message))
            }
            Err(e) => Err(format!("create network {name} on {}: {e}", self.server())),
        }
    }

    pub async fn remove_network(&self, name: &str) -> Result<()> {
        self.trace(format_args!("remove network {name}"));
        match self.docker.remove_network(name).await {
            Ok(()) => Ok(()),
            Err(e) if is_404(&e) => Ok(()),
            Err(e) => Err(format!("remove network {name}: {e}")),
        }
    }

    pub async fn create_volume(&self, name: &str, labels: HashMap<String, String>) -> Result<()> {
        self.trace(format_args!("create volume {name}"));
        self.docker
            .create_volume(VolumeCreateRequest {
                name: Some(name.to_string()),
                labels: Some(labels),
                ..Default::default()
            })
            .await
            .map(|_| ())
            .map_err(|e| format!("create volume {name}: {e}"))
    }

    /// Containers (running or not) whose labels match every `key=value` given.
    pub async fn containers(&self, labels: &[(&str, &str)]) -> Result<Vec<ContainerSummary>> {
        let filters: HashMap<String, Vec<String>> = HashMap::from([(
            "label".to_string(),
            labels
                .iter()
                .map(|(k, v)| {
                    if v.is_empty() {
                        k.to_string()
                    } else {
                        format!("{k}={v}")
                    }
                })
                .collect(),
        )]);
        self.docker
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(|e| format!("list containers: {e}"))
    }

    /// Every running container (for host-port clash checks).
    pub async fn running_containers(&self) -> Result<Vec<ContainerSummary>> {
        self.docker
            .list_containers(Some(ListContainersOptions::default()))
            .await
            .map_err(|e| format!("list containers: {e}"))
    }

    pub async fn inspect(&self, name: &str) -> Result<Option<ContainerInspectResponse>> {
        match self
            .docker
            .inspect_container(
                name,
                None::<bollard::query_parameters::InspectContainerOptions>,
            )
            .await
        {
            Ok(c) => Ok(Some(c)),
            Err(e) if is_404(&e) => Ok(None),
            Err(e) => Err(format!("inspect container {name}: {e}")),
        }
    }

    /// Creates a container; Err(None-ish) on a name conflict is reported as `Ok(false)`.
    pub async fn create(&self, spec: &ContainerSpec) -> Result<bool> {
        self.trace(format_args!(
            "create container {} from {}",
            spec.name, spec.image
        ));
        Ok(self
            .create_from(&spec.name, create_body(spec))
            .await?
            .is_some())
    }

    /// Creates a container whose process lives exactly as long as one attach connection: stdin
    /// is open (`OpenStdin`), the daemon closes it when the one attached client goes away
    /// (`StdinOnce`), and removes the container once its process exits (`AutoRemove`). Attach
    /// with [`Engine::attach_stdin`] *before* starting it. Returns the new container's ID, or
    /// `None` when the name is taken (Docker's name check is atomic).
    pub async fn create_stdin_bound(&self, spec: &ContainerSpec) -> Result<Option<String>> {
        self.trace(format_args!(
            "create stdin-bound container {} from {}",
            spec.name, spec.image
        ));
        let mut body = create_body(spec);
        body.open_stdin = Some(true);
        body.stdin_once = Some(true);
        body.attach_stdin = Some(true);
        if let Some(h) = body.host_config.as_mut() {
            h.auto_remove = Some(true);
        }
        self.create_from(&spec.name, body).await
    }

    /// `Ok(Some(id))` when created, `Ok(None)` on a name conflict.
    async fn create_from(&self, name: &str, body: ContainerCreateBody) -> Result<Option<String>> {
        match self
            .docker
            .create_container(
                Some(CreateContainerOptions {
                    name: Some(name.to_string()),
                    ..Default::default()
                }),
                body,
            )
            .await
        {
            Ok(r) => Ok(Some(r.id)),
            Err(e) if is_conflict(&e) => Ok(None),
            Err(e) => Err(format!("create container {name}: {e}")),
        }
    }

    /// Attaches to a container's stdin (stream, nothing else). The returned handle is the
    /// connection: dropping it, or the process that holds it dying, closes it; with
    /// `StdinOnce` the daemon then closes the container's stdin.
    pub async fn attach_stdin(&self, id: &str) -> Result<StdinHold> {
        self.trace(format_args!("attach to the stdin of {id}"));
        let held = self.hold_channel(&format!("the attach to the stdin of container {id}"))?;
        let r = self
            .docker
            .attach_container(
                id,
                Some(AttachContainerOptions {
                    stdin: true,
                    stream: true,
                    ..Default::default()
                }),
            )
            .await
            .map_err(|e| format!("attach to container {id}: {e}"))?;
        // The read half is not needed: the shared connection lives while the write half does.
        drop(r.output);
        Ok(StdinHold {
            _input: r.input,
            _held: held,
        })
    }

    /// Force-removes one container by ID (never by name: a name may already belong to a
    /// newer container). Gone already is fine; a removal already in progress is waited for,
    /// so the name is free when this returns.
    pub async fn remove_id(&self, id: &str) -> Result<()> {
        self.trace(format_args!("remove {id}"));
        match self
            .docker
            .remove_container(
                id,
                Some(RemoveContainerOptions {
                    force: true,
                    v: true,
                    link: false,
                }),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_404(&e) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409,
                message,
            }) if message.contains("already in progress") => self.wait_removed(id).await,
            Err(e) => Err(format!("remove container {id}: {e}")),
        }
    }

    /// Returns once the container is removed (at once when there is no such container). Uses
    /// the engine's wait (`condition=removed`), no polling.
    pub async fn wait_removed(&self, id: &str) -> Result<()> {
        self.trace(format_args!("wait until {id} is removed"));
        let mut s = self.docker.wait_container(
            id,
            Some(WaitContainerOptions {
                condition: "removed".into(),
            }),
        );
        match s.next().await {
            None | Some(Ok(_)) => Ok(()),
            // A non-zero exit status of the removed container.
            Some(Err(bollard::errors::Error::DockerContainerWaitError { .. })) => Ok(()),
            Some(Err(e)) if is_404(&e) => Ok(()),
            Some(Err(e)) => Err(format!("wait for the removal of container {id}: {e}")),
        }
    }

    pub async fn start(&self, name: &str) -> Result<()> {
        self.trace(format_args!("start {name}"));
        match self
            .docker
            .start_container(
                name,
                None::<bollard::query_parameters::StartContainerOptions>,
            )
            .await
        {
            Ok(()) => Ok(()),
            // Already running.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            Err(e) => Err(format!("start container {name}: {e}")),
        }
    }

    /// Graceful stop: SIGTERM, then SIGKILL after `grace_s`.
    pub async fn stop(&self, name: &str, grace_s: i32) -> Result<()> {
        self.trace(format_args!("stop {name}"));
        match self
            .docker
            .stop_container(
                name,
                Some(StopContainerOptions {
                    t: Some(grace_s),
                    signal: None,
                }),
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_404(&e) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 304, ..
            }) => Ok(()),
            Err(e) => Err(format!("stop container {name}: {e}")),
        }
    }

    pub async fn restart(&self, name: &str) -> Result<()> {
        self.trace(format_args!("restart {name}"));
        self.docker
            .restart_container(
                name,
                None::<bollard::query_parameters::RestartContainerOptions>,
            )
            .await
            .map_err(|e| format!("restart container {name}: {e}"))
    }

    /// Force-removes a container by name (with its anonymous volumes); gone already is fine.
    pub async fn remove(&self, name: &str) -> Result<()> {
        self.remove_id(name).await
    }

    pub async fn rename(&self, name: &str, to: &str) -> Result<()> {
        self.trace(format_args!("rename {name} -> {to}"));
        self.docker
            .rename_container(
                name,
                bollard::query_parameters::RenameContainerOptions {
                    name: to.to_string(),
                },
            )
            .await
            .map_err(|e| format!("rename container {name}: {e}"))
    }

    pub async fn connect_network(
        &self,
        network: &str,
        container: &str,
        aliases: Vec<String>,
    ) -> Result<()> {
        self.trace(format_args!(
            "connect {container} to {network} as {aliases:?}"
        ));
        self.docker
            .connect_network(
                network,
                NetworkConnectRequest {
                    container: container.to_string(),
                    endpoint_config: Some(EndpointSettings {
                        aliases: Some(aliases),
                        ..Default::default()
                    }),
                },
            )
            .await
            .map_err(|e| format!("connect {container} to network {network}: {e}"))
    }

    pub async fn disconnect_network(&self, network: &str, container: &str) -> Result<()> {
        self.trace(format_args!("disconnect {container} from {network}"));
        match self
            .docker
            .disconnect_network(
                network,
                NetworkDisconnectRequest {
                    container: container.to_string(),
                    force: Some(true),
                },
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if is_404(&e) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError { message, .. })
                if message.contains("is not connected") =>
            {
                Ok(())
            }
            Err(e) => Err(format!(
                "disconnect {container} from network {network}: {e}"
            )),
        }
    }

    /// The last `n` lines of a container's output.
    pub async fn logs_tail(&self, name: &str, n: usize) -> Result<String> {
        self.tail(name, n, true).await
    }

    /// The last `n` lines a container wrote to stderr only (the proxy's diagnostics; its stdout
    /// is the access log, with users' URLs and addresses).
    pub async fn stderr_tail(&self, name: &str, n: usize) -> Result<String> {
        self.tail(name, n, false).await
    }

    async fn tail(&self, name: &str, n: usize, stdout: bool) -> Result<String> {
        let mut s = self.docker.logs(
            name,
            Some(LogsOptions {
                stdout,
                stderr: true,
                tail: n.to_string(),
                ..Default::default()
            }),
        );
        let mut out = String::new();
        while let Some(item) = s.next().await {
            match item {
                Ok(o) => out.push_str(&o.to_string()),
                Err(e) => return Err(format!("logs {name}: {e}")),
            }
        }
        Ok(out)
    }

    /// Streams a container's logs to stdout, prefixed; follows when asked.
    pub async fn stream_logs(
        &self,
        name: &str,
        prefix: &str,
        follow: bool,
        tail: usize,
    ) -> Result<()> {
        // Following holds a channel until Luma ends it.
        let _held = if follow {
            self.hold_channel(&format!("following the logs of {name}"))?
        } else {
            None
        };
        let mut s = self.docker.logs(
            name,
            Some(LogsOptions {
                stdout: true,
                stderr: true,
                follow,
                tail: tail.to_string(),
                ..Default::default()
            }),
        );
        while let Some(item) = s.next().await {
            let o = item.map_err(|e| format!("logs {name}: {e}"))?;
            for line in o.to_string().lines() {
                println!("{prefix} {line}");
            }
        }
        Ok(())
    }

    /// The ID of an image, if it is on the engine.
    pub async fn image_id(&self, image: &str) -> Result<Option<String>> {
        self.trace(format_args!("inspect image {image}"));
        match self.docker.inspect_image(image).await {
            Ok(i) => Ok(i.id),
            Err(e) if is_404(&e) => Ok(None),
            Err(e) => Err(format!("inspect image {image}: {e}")),
        }
    }

    /// ID, size and registry digests of an image, if it is on the engine.
    pub async fn image_info(&self, image: &str) -> Result<Option<ImageInfo>> {
        self.trace(format_args!("inspect image {image}"));
        match self.docker.inspect_image(image).await {
            Ok(i) => Ok(Some(ImageInfo {
                id: i.id.unwrap_or_default(),
                size: i.size.unwrap_or(0).max(0) as u64,
                repo_digests: i.repo_digests.unwrap_or_default(),
            })),
            Err(e) if is_404(&e) => Ok(None),
            Err(e) => Err(format!("inspect image {image} on {}: {e}", self.server())),
        }
    }

    /// Removes the name `image` (`repo:tag`) even when a container uses the image: the image
    /// itself stays while anything needs it. For a tag that must not be used any more.
    pub async fn untag_image(&self, image: &str) -> Result<()> {
        self.trace(format_args!("untag {image}"));
        match self
            .docker
            .remove_image(
                image,
                Some(bollard::query_parameters::RemoveImageOptions {
                    force: true,
                    noprune: true,
                    ..Default::default()
                }),
                None,
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_404(&e) => Ok(()),
            Err(e) => Err(format!("remove the tag {image} on {}: {e}", self.server())),
        }
    }

    /// The engine's `docker save` of one image, as a stream of tar bytes. Nothing is buffered
    /// beyond what the connection holds.
    pub fn export_image(
        &self,
        image: &str,
    ) -> impl Stream<Item = std::result::Result<Bytes, String>> + Send + Unpin + 'static {
        self.trace(format_args!("export image {image}"));
        let what = format!("export {image} from {}", self.server());
        self.docker
            .clone()
            .with_timeout(STREAM_TIMEOUT)
            .export_image(image)
            .map(move |r| r.map_err(|e| format!("{what}: {}", error_chain(&e))))
    }

    /// `docker load` from a stream of tar bytes: the request body is the stream itself (no temp
    /// file, no copy in memory). An error in `stream` aborts the load; the engine then tags
    /// nothing.
    pub async fn load_image(
        &self,
        stream: impl Stream<Item = std::result::Result<Bytes, String>> + Send + 'static,
    ) -> Result<()> {
        self.load_image_detailed(stream).await.map_err(|f| match f {
            LoadFailure::Engine(m) => m,
            LoadFailure::Connection(m) => format!(
                "the connection to the Docker engine on {} broke during docker load: {m}",
                self.server()
            ),
        })
    }

    /// [`Engine::load_image`], saying whether the engine or the connection failed.
    pub(crate) async fn load_image_detailed(
        &self,
        stream: impl Stream<Item = std::result::Result<Bytes, String>> + Send + 'static,
    ) -> std::result::Result<(), LoadFailure> {
        self.trace("load image (streamed)");
        let server = self.server().to_string();
        let mut s = self
            .docker
            .clone()
            .with_timeout(STREAM_TIMEOUT)
            .import_image_stream(
                bollard::query_parameters::ImportImageOptions {
                    quiet: true,
                    ..Default::default()
                },
                stream,
                None,
            );
        // The engine answers with JSON lines ("Loaded image: ..."), or an error line.
        while let Some(item) = s.next().await {
            match item {
                Ok(info) => {
                    if let Some(m) = info.error_detail.and_then(|d| d.message) {
                        return Err(LoadFailure::Engine(format!(
                            "docker load on {server} failed: {m}"
                        )));
                    }
                    if let Some(line) = info.stream {
                        self.trace(line.trim());
                    }
                }
                Err(bollard::errors::Error::DockerStreamError { error }) => {
                    return Err(LoadFailure::Engine(format!(
                        "docker load on {server} failed: {error}"
                    )))
                }
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code,
                    message,
                }) => {
                    return Err(LoadFailure::Engine(format!(
                        "docker load on {server} failed ({status_code}): {message}"
                    )))
                }
                Err(e) => return Err(LoadFailure::Connection(error_chain(&e))),
            }
        }
        Ok(())
    }

    /// Tags `image` (a name or an ID) as `repo:tag`.
    pub async fn tag_image(&self, image: &str, repo: &str, tag: &str) -> Result<()> {
        self.trace(format_args!("tag {image} as {repo}:{tag}"));
        self.docker
            .tag_image(
                image,
                Some(bollard::query_parameters::TagImageOptions {
                    repo: Some(repo.to_string()),
                    tag: Some(tag.to_string()),
                }),
            )
            .await
            .map_err(|e| format!("tag {image} as {repo}:{tag} on {}: {e}", self.server()))
    }

    /// Pushes `name` (`registry/repo:tag`) to its registry.
    pub async fn push_image(&self, name: &str, auth: Option<&RegistryAuth>) -> Result<()> {
        self.trace(format_args!("push {name}"));
        let (repo, tag) = split_reference(name);
        let mut s = self.docker.push_image(
            repo,
            Some(bollard::query_parameters::PushImageOptions {
                tag: Some(tag.to_string()),
                ..Default::default()
            }),
            auth.map(RegistryAuth::credentials),
        );
        while let Some(item) = s.next().await {
            let info = item.map_err(|e| {
                format!("push {name} from {}: {}", self.server(), registry_error(&e))
            })?;
            if let Some(status) = info.status {
                self.trace(format_args!("push {name}: {status}"));
            }
        }
        Ok(())
    }

    /// Pulls `name` (`registry/repo:tag` or `registry/repo@sha256:...`).
    pub async fn pull_image(&self, name: &str, auth: Option<&RegistryAuth>) -> Result<()> {
        self.trace(format_args!("pull {name}"));
        let (repo, tag) = split_reference(name);
        let mut s = self.docker.create_image(
            Some(bollard::query_parameters::CreateImageOptions {
                from_image: Some(repo.to_string()),
                tag: Some(tag.to_string()),
                ..Default::default()
            }),
            None,
            auth.map(RegistryAuth::credentials),
        );
        while let Some(item) = s.next().await {
            let info = item
                .map_err(|e| format!("pull {name} on {}: {}", self.server(), registry_error(&e)))?;
            if let Some(status) = info.status {
                self.trace(format_args!("pull {name}: {status}"));
            }
        }
        Ok(())
    }

    /// Images whose labels match every `key=value` given, as (id, repo:tag names).
    pub async fn images(&self, labels: &[(&str, &str)]) -> Result<Vec<(String, Vec<String>)>> {
        let filters: HashMap<String, Vec<String>> = HashMap::from([(
            "label".to_string(),
            labels.iter().map(|(k, v)| format!("{k}={v}")).collect(),
        )]);
        let list = self
            .docker
            .list_images(Some(bollard::query_parameters::ListImagesOptions {
                all: false,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(|e| format!("list images: {e}"))?;
        Ok(list
            .into_iter()
            .map(|i| {
                let tags = i
                    .repo_tags
                    .into_iter()
                    .filter(|t| t != "<none>:<none>")
                    .collect();
                (i.id, tags)
            })
            .collect())
    }

    /// Runs a command in a container; returns (exit code, stdout, stderr).
    pub async fn exec(&self, container: &str, cmd: &[&str]) -> Result<(i64, String, String)> {
        self.exec_with_stdin(container, cmd, None).await
    }

    /// Runs a command in a container, writing `stdin` to it first (then closing it), so
    /// structured input never travels in argv (where `ps` would show it).
    pub async fn exec_with_stdin(
        &self,
        container: &str,
        cmd: &[&str],
        stdin: Option<&[u8]>,
    ) -> Result<(i64, String, String)> {
        use tokio::io::AsyncWriteExt;
        self.trace(format_args!("exec {container} {}", cmd.join(" ")));
        let created = self
            .docker
            .create_exec(
                container,
                ExecConfig {
                    attach_stdin: Some(stdin.is_some()),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    cmd: Some(cmd.iter().map(|s| s.to_string()).collect()),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| format!("exec in {container}: {e}"))?;
        let started = self
            .docker
            .start_exec(&created.id, None)
            .await
            .map_err(|e| format!("exec in {container}: {e}"))?;
        let (mut out, mut err) = (String::new(), String::new());
        if let bollard::exec::StartExecResults::Attached {
            mut output,
            mut input,
        } = started
        {
            let streamed = async {
                if let Some(bytes) = stdin {
                    input
                        .write_all(bytes)
                        .await
                        .map_err(|e| format!("exec stdin: {e}"))?;
                    input
                        .shutdown()
                        .await
                        .map_err(|e| format!("exec stdin: {e}"))?;
                }
                while let Some(item) = output.next().await {
                    match item.map_err(|e| format!("exec output: {e}"))? {
                        bollard::container::LogOutput::StdErr { message } => {
                            err.push_str(&String::from_utf8_lossy(&message))
                        }
                        other => out.push_str(&other.to_string()),
                    }
                }
                Ok::<_, String>(())
            }
            .await;
            if let Err(e) = streamed {
                // The stream broke, not necessarily the command: close our side (so it sees
                // EOF on stdin) and wait until it has ended, so a caller that goes on to ask
                // what happened never races it.
                drop(input);
                drop(output);
                while let Ok(i) = self.docker.inspect_exec(&created.id).await {
                    if i.running != Some(true) {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                return Err(e);
            }
        }
        let code = self
            .docker
            .inspect_exec(&created.id)
            .await
            .map_err(|e| format!("exec inspect: {e}"))?
            .exit_code
            .unwrap_or(-1);
        Ok((code, out, err))
    }
}

/// The create body of a plain container from a [`ContainerSpec`].
fn create_body(spec: &ContainerSpec) -> ContainerCreateBody {
    let mut exposed: Vec<String> = Vec::new();
    let mut bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
    for (ip, host, cport) in &spec.ports {
        exposed.push(cport.clone());
        bindings
            .entry(cport.clone())
            .or_insert_with(|| Some(Vec::new()))
            .get_or_insert_with(Vec::new)
            .push(PortBinding {
                host_ip: ip.clone(),
                // Port 0: any free host port (Docker picks one for an empty HostPort).
                host_port: Some(if *host == 0 {
                    String::new()
                } else {
                    host.to_string()
                }),
            });
    }
    let networking = spec
        .network
        .as_ref()
        .map(|(net, aliases)| NetworkingConfig {
            endpoints_config: Some(HashMap::from([(
                net.clone(),
                EndpointSettings {
                    aliases: Some(aliases.clone()),
                    ..Default::default()
                },
            )])),
        });
    ContainerCreateBody {
        image: Some(spec.image.clone()),
        env: Some(spec.env.clone()),
        labels: Some(spec.labels.clone()),
        cmd: spec.cmd.clone(),
        stop_timeout: spec.stop_timeout,
        exposed_ports: (!exposed.is_empty()).then_some(exposed),
        host_config: Some(HostConfig {
            port_bindings: (!bindings.is_empty()).then_some(bindings),
            binds: (!spec.binds.is_empty()).then(|| spec.binds.clone()),
            network_mode: spec.network.as_ref().map(|(n, _)| n.clone()),
            restart_policy: spec.restart_unless_stopped.then_some(RestartPolicy {
                name: Some(RestartPolicyNameEnum::UNLESS_STOPPED),
                maximum_retry_count: None,
            }),
            init: spec.init.then_some(true),
            log_config: (!spec.json_log_opts.is_empty()).then(|| HostConfigLogConfig {
                typ: Some("json-file".into()),
                config: Some(spec.json_log_opts.clone()),
            }),
            ..Default::default()
        }),
        networking_config: networking,
        ..Default::default()
    }
}

/// The IPv4 subnets of a network's IPAM config (IPv6 ones are left out).
fn ipv4_subnets(ipam: Option<&Ipam>) -> Vec<String> {
    ipam.and_then(|i| i.config.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|c| c.subnet.clone())
        .filter(|s| !s.contains(':'))
        .collect()
}

/// The IPv4 address of a container on a network, if attached.
pub fn ip_on(c: &ContainerInspectResponse, network: &str) -> Option<String> {
    c.network_settings
        .as_ref()?
        .networks
        .as_ref()?
        .get(network)?
        .ip_address
        .clone()
        .filter(|ip| !ip.is_empty())
}

pub fn label<'a>(c: &'a ContainerSummary, key: &str) -> Option<&'a str> {
    c.labels.as_ref()?.get(key).map(String::as_str)
}

pub fn name_of(c: &ContainerSummary) -> String {
    c.names
        .as_ref()
        .and_then(|n| n.first())
        .map(|n| n.trim_start_matches('/').to_string())
        .unwrap_or_default()
}

pub fn is_running(c: &ContainerSummary) -> bool {
    c.state
        .as_ref()
        .map(|s| format!("{s:?}").to_lowercase().contains("running"))
        .unwrap_or(false)
}

/// `repo:tag` -> (repo, tag); `repo@sha256:...` -> (repo, digest); no tag -> `latest`. A
/// registry's `host:port/` is part of the repo.
pub fn split_reference(name: &str) -> (&str, &str) {
    if let Some((repo, digest)) = name.split_once('@') {
        return (repo, digest);
    }
    match name.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo, tag),
        _ => (name, "latest"),
    }
}

/// An error with its sources: hyper's own messages ("client error (SendRequest)") say little
/// until their cause ("broken pipe") is shown.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// A push or pull error, with the hint a registry's refusal needs. The password is never in
/// it (it travels only in the X-Registry-Auth header).
fn registry_error(e: &bollard::errors::Error) -> String {
    let m = error_chain(e);
    if m.contains("unauthorized") || m.contains("authentication required") || m.contains("denied") {
        format!("{m} (check docker.username in luma.yml and the secret named by docker.password)")
    } else {
        m
    }
}

/// The SSH transport: a hyper-util client over `docker system dial-stdio` channels.
mod dial_stdio {
    use super::{error_chain, Master};
    use hyper::Uri;
    use hyper_util::client::legacy::connect::{Connected, Connection};
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use std::future::Future;
    use std::pin::Pin;
    use std::process::Stdio;
    use std::sync::{Arc, Mutex, Weak};
    use std::task::{Context, Poll};
    use std::time::Duration;
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio::process::{Child, ChildStdin, ChildStdout};
    use tokio::sync::{OwnedSemaphorePermit, Semaphore};
    use tokio::time::Instant;

    /// sshd's default MaxSessions: channels it allows on one connection.
    const SSHD_MAX_SESSIONS: usize = 10;
    /// Channels open at once on one master. Beyond sshd's limit a new channel would be
    /// refused, so a request waits for a free one instead. Two are left for other commands
    /// through the master.
    const MAX_CHANNELS: usize = SSHD_MAX_SESSIONS - 2;
    /// Of those, how many streams that hold their channel until Luma ends them may have at
    /// once. The rest always turn over, so a wait for a channel always ends.
    const MAX_HELD: usize = MAX_CHANNELS - 2;
    // Held streams never take every channel, and Luma never takes all of sshd's.
    const _: () = assert!(MAX_HELD < MAX_CHANNELS && MAX_CHANNELS < SSHD_MAX_SESSIONS);
    /// Idle channels kept for reuse; the others close once their request is done. An idle
    /// one goes to a waiting request before any new channel is opened, and closes after
    /// [`IDLE_TIMEOUT`] anyway.
    const MAX_IDLE: usize = MAX_CHANNELS / 2;
    const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
    /// A request that waited this long for a channel says so (and again every
    /// [`NOTICE_EVERY`] per server, not once per request).
    const NOTICE_AFTER: Duration = Duration::from_secs(10);
    const NOTICE_EVERY: Duration = Duration::from_secs(60);

    /// bollard over `ssh ... docker system dial-stdio`, and the server's channel budget.
    pub(super) fn docker(
        master: &Arc<Master>,
        verbose: bool,
    ) -> Result<(bollard::Docker, Arc<Channels>), String> {
        let server = master.target().server.clone();
        let channels = Arc::new(Channels::new(&server, NOTICE_AFTER, NOTICE_EVERY));
        let connector = Connector {
            master: Arc::downgrade(master),
            channels: channels.clone(),
            verbose,
        };
        let client = Arc::new(
            hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                // An idle channel is a process on each side, and holds one of the server's
                // channels: keep few, and let them go after a while.
                .pool_max_idle_per_host(MAX_IDLE)
                .pool_idle_timeout(IDLE_TIMEOUT)
                .pool_timer(TokioTimer::new())
                .build(connector),
        );
        bollard::Docker::connect_with_custom_transport(
            move |req: bollard::BollardRequest| {
                let (client, server) = (client.clone(), server.clone());
                async move {
                    // hyper's own message ("client error (SendRequest)") hides the cause.
                    client
                        .request(req)
                        .await
                        .map_err(|e| bollard::errors::Error::IOError {
                            err: std::io::Error::other(format!(
                                "via ssh to {server}: {}",
                                error_chain(&e)
                            )),
                        })
                }
            },
            // The host is never resolved: every connection is a dial-stdio channel.
            Some("http://docker"),
            120,
            bollard::API_DEFAULT_VERSION,
        )
        .map(|docker| (docker, channels))
        .map_err(|e| format!("set up the Docker client over ssh: {e}"))
    }

    /// One server's channel budget: [`MAX_CHANNELS`] open at once, of which at most
    /// [`MAX_HELD`] held by streams that end only when Luma ends them.
    pub(super) struct Channels {
        server: String,
        open: Arc<Semaphore>,
        held: Arc<Semaphore>,
        notice_after: Duration,
        notice_every: Duration,
        last_notice: Mutex<Option<Instant>>,
    }

    impl Channels {
        pub(super) fn new(server: &str, notice_after: Duration, notice_every: Duration) -> Self {
            Channels {
                server: server.to_string(),
                open: Arc::new(Semaphore::new(MAX_CHANNELS)),
                held: Arc::new(Semaphore::new(MAX_HELD)),
                notice_after,
                notice_every,
                last_notice: Mutex::new(None),
            }
        }

        /// A place for one open channel, once one is free (first come, first served). Every
        /// wait ends: at least `MAX_CHANNELS - MAX_HELD` channels belong to requests that end
        /// on their own. A long wait is never silent: `notice` gets why.
        pub(super) async fn open(
            &self,
            notice: impl Fn(&str),
        ) -> Result<OwnedSemaphorePermit, std::io::Error> {
            let wait = self.open.clone().acquire_owned();
            tokio::pin!(wait);
            loop {
                // Polling the same acquire again keeps its place in the queue.
                match tokio::time::timeout(self.notice_after, &mut wait).await {
                    Ok(permit) => return permit.map_err(std::io::Error::other),
                    Err(_) => {
                        let mut last = self.last_notice.lock().unwrap_or_else(|p| p.into_inner());
                        if notice_due(*last, Instant::now(), self.notice_every) {
                            *last = Some(Instant::now());
                            notice(&self.busy());
                        }
                    }
                }
            }
        }

        /// Why a request waits.
        fn busy(&self) -> String {
            let held = MAX_HELD - self.held.available_permits();
            format!(
                "  … {server}: waiting for a free ssh channel: all {MAX_CHANNELS} that luma \
                 opens at once on its one connection to {server} are busy ({held} held by log \
                 streams or the deploy lock, the others by requests that end on their own); \
                 sshd allows {SSHD_MAX_SESSIONS} per connection by default (MaxSessions)",
                server = self.server
            )
        }

        /// Takes a place for a stream that holds its channel until Luma ends it, or says why
        /// there is none: waiting would never end.
        pub(super) fn hold(&self, what: &str) -> Result<OwnedSemaphorePermit, String> {
            self.held.clone().try_acquire_owned().map_err(|_| {
                format!(
                    "{what} on {server} would hold an ssh channel for as long as it runs, and \
                     {MAX_HELD} such streams are open there already: luma opens at most \
                     {MAX_CHANNELS} channels at once on its one ssh connection to a server \
                     (sshd allows {SSHD_MAX_SESSIONS} per connection by default, MaxSessions) \
                     and keeps {} for its other requests. End another stream first; `luma logs \
                     -f` follows at most {MAX_HELD} containers per server (without -f it shows \
                     the last lines of all of them)",
                    MAX_CHANNELS - MAX_HELD,
                    server = self.server
                )
            })
        }
    }

    /// Whether a wait notice is due: the first, then one per `every`.
    fn notice_due(last: Option<Instant>, now: Instant, every: Duration) -> bool {
        last.is_none_or(|t| now.saturating_duration_since(t) >= every)
    }

    /// Why the engine on a server does not answer: runs one `docker system dial-stdio` by
    /// hand and shows what it says (docker missing, no permission on its socket, ...).
    pub(super) async fn diagnose(master: &Master, e: &bollard::errors::Error) -> String {
        let server = &master.target().server;
        let mut cmd = master.command(&["docker", "system", "dial-stdio"]);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let run = async { crate::ssh::spawn_tied(cmd).await?.wait_with_output().await };
        let said = match tokio::time::timeout(Duration::from_secs(15), run).await {
            Ok(Ok(out)) if !out.status.success() => {
                let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
                format!(
                    "`docker system dial-stdio` there failed ({}): {}",
                    out.status,
                    if err.is_empty() { "no message" } else { &err }
                )
            }
            _ => error_chain(e),
        };
        format!(
            "the Docker engine on {server} does not answer over ssh: {said}. Is Docker installed \
             and running there, and may the ssh user use it (member of the docker group)?"
        )
    }

    #[derive(Clone)]
    struct Connector {
        /// Weak: the engine owns the master, so it closes when the engine goes, even while
        /// a connect still waits here for a free channel.
        master: Weak<Master>,
        channels: Arc<Channels>,
        verbose: bool,
    }

    impl tower_service::Service<Uri> for Connector {
        type Response = TokioIo<DialStdio>;
        type Error = std::io::Error;
        type Future =
            Pin<Box<dyn Future<Output = Result<TokioIo<DialStdio>, std::io::Error>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Uri) -> Self::Future {
            let this = self.clone();
            Box::pin(async move {
                let permit = this.channels.open(|m| eprintln!("{m}")).await?;
                let master = match this.master.upgrade() {
                    Some(m) if !m.is_closed() => m,
                    Some(m) => {
                        return Err(std::io::Error::other(format!(
                            "the ssh connection to {} has closed",
                            m.target().server
                        )))
                    }
                    None => return Err(std::io::Error::other("the ssh connection has closed")),
                };
                let server = master.target().server.clone();
                let mut cmd = master.command(&["docker", "system", "dial-stdio"]);
                drop(master);
                cmd.stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                let mut child = crate::ssh::spawn_tied(cmd)
                    .await
                    .map_err(|e| std::io::Error::other(format!("run ssh to {server}: {e}")))?;
                let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
                    return Err(std::io::Error::other("ssh without stdio pipes"));
                };
                // What ssh or the remote docker says goes to --verbose; a request that fails
                // because of it fails on its own (the channel closes).
                if let Some(mut err) = child.stderr.take() {
                    let verbose = this.verbose;
                    tokio::spawn(async move {
                        use tokio::io::AsyncBufReadExt;
                        let mut lines = tokio::io::BufReader::new(&mut err).lines();
                        while let Ok(Some(l)) = lines.next_line().await {
                            if verbose {
                                eprintln!("    ssh {server}: {l}");
                            }
                        }
                    });
                }
                Ok(TokioIo::new(DialStdio {
                    _child: child,
                    stdin: Some(stdin),
                    stdout,
                    _permit: permit,
                }))
            })
        }
    }

    /// One HTTP connection: the stdout/stdin of `ssh ... docker system dial-stdio`. Dropping
    /// it kills that ssh (kill_on_drop), which closes the channel and ends the remote
    /// process.
    pub(super) struct DialStdio {
        _child: Child,
        /// None once shut down: closing the pipe is the half-close (EOF) the other side
        /// sees; dial-stdio passes it on to the engine. An exec's or attach's stdin ends that
        /// way. tokio's own shutdown of a pipe closes nothing.
        stdin: Option<ChildStdin>,
        stdout: ChildStdout,
        _permit: OwnedSemaphorePermit,
    }

    impl DialStdio {
        fn stdin(&mut self) -> std::io::Result<&mut ChildStdin> {
            self.stdin.as_mut().ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::BrokenPipe, "write after shutdown")
            })
        }
    }

    impl Connection for DialStdio {
        fn connected(&self) -> Connected {
            Connected::new()
        }
    }

    impl AsyncRead for DialStdio {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.stdout).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for DialStdio {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            match self.stdin() {
                Ok(w) => Pin::new(w).poll_write(cx, buf),
                Err(e) => Poll::Ready(Err(e)),
            }
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> Poll<std::io::Result<usize>> {
            match self.stdin() {
                Ok(w) => Pin::new(w).poll_write_vectored(cx, bufs),
                Err(e) => Poll::Ready(Err(e)),
            }
        }

        fn is_write_vectored(&self) -> bool {
            self.stdin.as_ref().is_some_and(|w| w.is_write_vectored())
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            match self.stdin.as_mut() {
                Some(w) => Pin::new(w).poll_flush(cx),
                None => Poll::Ready(Ok(())),
            }
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            if let Some(w) = self.stdin.as_mut() {
                std::task::ready!(Pin::new(w).poll_flush(cx))?;
            }
            self.stdin = None;
            Poll::Ready(Ok(()))
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn held_streams_never_take_every_channel() {
            let c = Channels::new("web1", NOTICE_AFTER, NOTICE_EVERY);
            let held: Vec<_> = (0..MAX_HELD)
                .map(|_| c.hold("following the logs of web-1").expect("a place"))
                .collect();
            let e = c
                .hold("following the logs of web-7")
                .expect_err("one stream too many");
            assert!(e.starts_with("following the logs of web-7 on web1 "), "{e}");
            assert!(e.contains("6 such streams are open there already"), "{e}");
            assert!(e.contains("MaxSessions"), "{e}");
            assert!(e.contains("follows at most 6 containers per server"), "{e}");
            drop(held);
            assert!(c.hold("following the logs of web-7").is_ok());
        }

        #[tokio::test]
        async fn a_long_wait_for_a_channel_says_why_and_ends_when_one_is_free() {
            let c = Arc::new(Channels::new(
                "web1",
                Duration::from_millis(20),
                Duration::from_secs(3600),
            ));
            let _held = c.hold("following the logs of web-1").expect("a place");
            let mut busy: Vec<_> = (0..MAX_CHANNELS)
                .map(|_| c.open.clone().try_acquire_owned().expect("a free channel"))
                .collect();
            let (tx, mut said) = tokio::sync::mpsc::unbounded_channel();
            let waiter = tokio::spawn({
                let c = c.clone();
                async move {
                    c.open(move |m| {
                        let _ = tx.send(m.to_string());
                    })
                    .await
                    .map(drop)
                }
            });
            let notice = tokio::time::timeout(Duration::from_secs(10), said.recv())
                .await
                .expect("a notice while waiting")
                .expect("the waiter still runs");
            assert!(
                notice.starts_with("  … web1: waiting for a free ssh channel"),
                "{notice}"
            );
            assert!(notice.contains("all 8 that luma opens"), "{notice}");
            assert!(notice.contains("(1 held by log streams"), "{notice}");
            assert!(notice.contains("MaxSessions"), "{notice}");
            assert!(!waiter.is_finished());
            busy.pop();
            let opened = tokio::time::timeout(Duration::from_secs(10), waiter)
                .await
                .expect("the wait ends once a channel is free")
                .expect("join");
            assert!(opened.is_ok(), "{opened:?}");
        }

        #[test]
        fn wait_notices_are_rate_limited_per_server() {
            let t = Instant::now();
            let every = Duration::from_secs(60);
            assert!(notice_due(None, t, every));
            assert!(!notice_due(Some(t), t + Duration::from_secs(59), every));
            assert!(notice_due(Some(t), t + every, every));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_references() {
        assert_eq!(split_reference("web:1"), ("web", "1"));
        assert_eq!(split_reference("web"), ("web", "latest"));
        assert_eq!(
            split_reference("127.0.0.1:5000/luma/web:abc"),
            ("127.0.0.1:5000/luma/web", "abc")
        );
        assert_eq!(
            split_reference("127.0.0.1:5000/luma/web"),
            ("127.0.0.1:5000/luma/web", "latest")
        );
        assert_eq!(
            split_reference("reg:5000/web@sha256:00ff"),
            ("reg:5000/web", "sha256:00ff")
        );
    }

    #[test]
    fn port_zero_means_any_host_port() {
        let body = create_body(&ContainerSpec {
            ports: vec![
                (Some("127.0.0.1".into()), 0, "80/tcp".into()),
                (None, 8443, "443/tcp".into()),
            ],
            ..Default::default()
        });
        let b = body
            .host_config
            .and_then(|h| h.port_bindings)
            .expect("bindings");
        let port = |k: &str| b[k].as_ref().expect("binding")[0].host_port.clone();
        assert_eq!(port("80/tcp").as_deref(), Some(""));
        assert_eq!(port("443/tcp").as_deref(), Some("8443"));
    }
}
