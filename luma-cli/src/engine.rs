//! The Docker engine, through bollard. Every engine operation Luma performs goes through this
//! type, so a transport (the local socket today, SSH next) slots in at [`Engine::connect`] and
//! `--verbose` can show each operation.

use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerSummary, EndpointSettings, ExecConfig,
    HostConfig, NetworkConnectRequest, NetworkCreateRequest, NetworkDisconnectRequest,
    NetworkingConfig, PortBinding, RestartPolicy, RestartPolicyNameEnum, VolumeCreateRequest,
};
use bollard::query_parameters::{
    AttachContainerOptions, BuildImageOptions, CreateContainerOptions, ListContainersOptions,
    LogsOptions, RemoveContainerOptions, StopContainerOptions, WaitContainerOptions,
};
use bollard::Docker;
use futures_util::StreamExt;
use std::collections::HashMap;

/// How Luma reaches an engine.
#[derive(Clone, Debug, PartialEq)]
pub enum Transport {
    /// `DOCKER_HOST`, or the default local socket.
    Local,
}

pub struct Engine {
    docker: Docker,
    pub transport: Transport,
    pub verbose: bool,
}

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
    /// (host ip, host port, "port/proto").
    pub ports: Vec<(Option<String>, u16, String)>,
    pub binds: Vec<String>,
    pub restart_unless_stopped: bool,
    /// Run Docker's init as PID 1, so the app gets SIGTERM's default action (apps rarely
    /// handle it as PID 1) and a stop does not wait out the whole grace period.
    pub init: bool,
    /// Seconds `docker stop` waits after SIGTERM before SIGKILL.
    pub stop_timeout: Option<i64>,
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
    /// Connects and negotiates the API version (engines differ).
    pub async fn connect(transport: Transport, verbose: bool) -> Result<Engine> {
        let docker = match &transport {
            Transport::Local => Docker::connect_with_local_defaults(),
        }
        .map_err(|e| format!("cannot connect to the Docker engine ({e}); is Docker running, and is DOCKER_HOST right?"))?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| format!("the Docker engine does not answer ({e}); start it, or check DOCKER_HOST and your permission on the socket"))?;
        Ok(Engine {
            docker,
            transport,
            verbose,
        })
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

    pub async fn network_exists(&self, name: &str) -> Result<bool> {
        self.trace(format_args!("inspect network {name}"));
        match self
            .docker
            .inspect_network(
                name,
                None::<bollard::query_parameters::InspectNetworkOptions>,
            )
            .await
        {
            Ok(n) => Ok(n.name.as_deref() == Some(name)),
            Err(e) if is_404(&e) => Ok(false),
            Err(e) => Err(format!("inspect network {name}: {e}")),
        }
    }

    pub async fn create_network(&self, name: &str, labels: HashMap<String, String>) -> Result<()> {
        self.trace(format_args!("create network {name}"));
        self.docker
            .create_network(NetworkCreateRequest {
                name: name.to_string(),
                driver: Some("bridge".into()),
                labels: Some(labels),
                ..Default::default()
            })
            .await
            .map(|_| ())
            .map_err(|e| format!("create network {name}: {e}"))
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
        Ok(StdinHold { _input: r.input })
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
        let mut s = self.docker.logs(
            name,
            Some(LogsOptions {
                stdout: true,
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
                host_port: Some(host.to_string()),
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
            ..Default::default()
        }),
        networking_config: networking,
        ..Default::default()
    }
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
