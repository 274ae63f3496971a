"""The deployment files under deploy/, checked as far as a machine without Docker, Kubernetes,
systemd or a GPU allows: every YAML file parses; the compose file is valid against the Compose
Specification's JSON schema; every liveindex command line in the compose file, the Kubernetes
manifests and the systemd units is one the real argument parser accepts; addresses, ports and
volumes agree between the files; the Grafana dashboard loads and queries only metrics the code
exports; the Dockerfile has its two images.

compose-spec.json beside this file is the Compose Specification schema
(https://github.com/compose-spec/compose-spec, schema/compose-spec.json; Apache License 2.0,
LICENSE.compose-spec beside it), copied unchanged from the copy the PyPI package
check-jsonschema 0.39.0 vendors (check_jsonschema/builtin_schemas/vendor/compose-spec.json,
sha256 d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml

from liveindex.stream.cli import build_parser
from liveindex.stream.metrics import SinkMetrics, WorkerMetrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
HERE = Path(__file__).resolve().parent

# Environments the compose file and the systemd units are expanded with: as shipped (no
# CurveZMQ), and with the keys option their comments and deploy/README.md tell users to set.
COMPOSE_ENV = {"plain": {}, "curve": {"LIVEINDEX_KEYS_OPTS": "--keys /keys"}}
SYSTEMD_ENV = {"plain": {}, "curve": {"LIVEINDEX_KEYS_OPTS": "--keys /etc/liveindex/keys"}}


# -- helpers -----------------------------------------------------------------------------------

def parse_cli(argv: list[str], where: str):
    """Parse ``liveindex ARGV`` with the real parser; fail with argparse's message if it refuses."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return build_parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `liveindex {shlex.join(argv)}` is refused by the CLI: {stderr.getvalue().strip()}")


def tcp(address: str) -> tuple[str, int]:
    url = urlparse(address)
    assert url.scheme == "tcp" and url.hostname and url.port, f"not a tcp://HOST:PORT address: {address}"
    return url.hostname, url.port


_INTERPOLATION = re.compile(r"\$\$|\$\{(?P<braced>\w+)(?:(?P<op>:?-)(?P<default>[^}]*))?\}|\$(?P<bare>\w+)")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation: $$, ${VAR}, ${VAR:-default}, ${VAR-default}, $VAR."""
    def sub(m):
        if m.group(0) == "$$":
            return "$"
        name = m.group("braced") or m.group("bare")
        value = env.get(name)
        if m.group("op") == ":-" and not value:
            return m.group("default")
        if m.group("op") == "-" and value is None:
            return m.group("default")
        return value or ""
    return _INTERPOLATION.sub(sub, text)


def load_compose(env: dict[str, str]) -> dict:
    return yaml.safe_load(interpolate((DEPLOY / "compose.yaml").read_text(), env))


def compose_argv(service: dict) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def liveindex_services(compose: dict) -> dict[str, dict]:
    return {name: s for name, s in compose["services"].items()
            if s.get("build", {}).get("dockerfile") == "deploy/docker/Dockerfile"}


def parsed_services(compose: dict, variant: str) -> dict[str, object]:
    return {name: parse_cli(compose_argv(s), f"compose.yaml ({variant}) service {name}")
            for name, s in liveindex_services(compose).items()}


def by_command(parsed: dict[str, object], command: str) -> dict[str, object]:
    return {name: args for name, args in parsed.items() if args.command == command}


def volume_target(entry) -> tuple[str | None, str]:
    """(source, target) of a compose volume entry, short or long syntax."""
    if isinstance(entry, dict):
        return entry.get("source"), entry["target"]
    parts = entry.split(":")
    return (parts[0], parts[1]) if len(parts) > 1 else (None, parts[0])


def is_under(path: str, folder: str) -> bool:
    return PurePosixPath(path) == PurePosixPath(folder) or PurePosixPath(folder) in PurePosixPath(path).parents


def exported_metric_names() -> set[str]:
    """Every name a Prometheus scrape of the sink or a worker can show."""
    names = set()
    for registry in (SinkMetrics().registry, WorkerMetrics().registry):
        for family in registry.collect():
            names.add(family.name)
            names.update(sample.name for sample in family.samples)
            if family.type == "counter":  # a labelled counter with no children has no samples
                names.add(family.name + "_total")
            if family.type == "histogram":
                names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


def k8s_docs() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return docs


def k8s_workloads() -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for _, doc in k8s_docs()
            if doc["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet")}


def liveindex_container(workload: dict) -> dict:
    (container,) = [c for c in workload["spec"]["template"]["spec"]["containers"] if c.get("args")]
    return container


def container_args(workload: dict):
    container = liveindex_container(workload)
    assert "command" not in container, "the image's ENTRYPOINT is liveindex; give args only"
    return parse_cli([str(a) for a in container["args"]], f"k8s {workload['metadata']['name']}")


def container_port(container: dict, name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert name in ports, f"container {container['name']} has no port named {name}"
    return ports[name]


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit as {section: [(key, value), ...]}, keeping repeated keys in order."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        while line.endswith("\\") and i + 1 < len(lines):  # continuation lines
            i += 1
            line = line[:-1] + " " + lines[i].strip()
        i += 1
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            assert line.endswith("]"), f"{path.name}: bad section header {line!r}"
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None and "=" in line, f"{path.name}: bad line {line!r}"
        key, value = line.split("=", 1)
        current.append((key.strip(), value.strip()))
    return sections


def unit_values(unit, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def parse_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        key, value = line.split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()), f"{path.name}: bad name {key!r}"
        env[key.strip()] = value
    return env


SPECIFIERS = {"i": "0", "I": "0", "H": "gpu-host", "C": "/var/cache", "S": "/var/lib", "%": "%"}


def expand_specifiers(text: str, instance: str = "0") -> str:
    def sub(m):
        assert m.group(1) in SPECIFIERS, f"specifier %{m.group(1)} not known to this test"
        return instance if m.group(1) in "iI" else SPECIFIERS[m.group(1)]
    return re.sub(r"%(.)", sub, text)


def unit_environment(unit, env_file: dict[str, str], instance: str) -> dict[str, str]:
    env = dict(env_file)
    for value in unit_values(unit, "Service", "Environment"):
        for assignment in shlex.split(expand_specifiers(value, instance)):
            key, val = assignment.split("=", 1)
            env[key] = val
    return env


def exec_start_argv(unit, env: dict[str, str], instance: str = "0") -> list[str]:
    """ExecStart as systemd runs it: specifiers, then ${VAR} as one word and $VAR split."""
    (line,) = unit_values(unit, "Service", "ExecStart")
    argv = []
    for token in shlex.split(expand_specifiers(line.lstrip("-@:+!"), instance)):
        bare = re.fullmatch(r"\$(\w+)", token)
        if bare:
            assert bare.group(1) in env, f"ExecStart uses ${bare.group(1)}, which nothing defines"
            argv += env[bare.group(1)].split()
            continue

        def sub(m):
            assert m.group(1) in env, f"ExecStart uses ${{{m.group(1)}}}, which nothing defines"
            return env[m.group(1)]
        argv.append(re.sub(r"\$\{(\w+)\}", sub, token))
    return argv


# -- every YAML file -----------------------------------------------------------------------------

YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def test_deploy_folder_has_its_files():
    expected = ["compose.yaml", "docker/Dockerfile", "prometheus/prometheus.yml",
                "grafana/dashboards/liveindex.json", "grafana/provisioning/datasources/prometheus.yaml",
                "grafana/provisioning/dashboards/liveindex.yaml", "k8s/kustomization.yaml",
                "systemd/liveindex-sink.service", "systemd/liveindex-worker@.service",
                "systemd/liveindex-publisher.service", "systemd/liveindex.env", "README.md"]
    missing = [f for f in expected if not (DEPLOY / f).is_file()]
    assert not missing, missing
    assert (ROOT / ".dockerignore").is_file()


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


# -- compose -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose_schema():
    schema = json.loads((HERE / "compose-spec.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


@pytest.mark.parametrize("variant", COMPOSE_ENV)
def test_compose_is_valid_against_the_compose_spec(compose_schema, variant):
    compose = load_compose(COMPOSE_ENV[variant])
    errors = sorted(jsonschema.Draft202012Validator(compose_schema).iter_errors(compose), key=str)
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_compose_schema_check_can_fail(compose_schema):
    compose = load_compose({})
    compose["services"]["sink"]["ports"] = {"8080": 8080}  # a mapping where the spec wants a list
    compose["services"]["sink"]["restart_policy"] = "always"  # not a service property
    assert len(list(jsonschema.Draft202012Validator(compose_schema).iter_errors(compose))) >= 2


def test_compose_has_the_services():
    compose = load_compose({})
    services = compose["services"]
    assert {"sink", "publisher", "prometheus", "grafana"} <= set(services)
    parsed = parsed_services(compose, "plain")
    assert set(by_command(parsed, "sink")) == {"sink"}
    assert set(by_command(parsed, "publish")) == {"publisher"}
    assert len(by_command(parsed, "worker")) >= 2


@pytest.mark.parametrize("variant", COMPOSE_ENV)
def test_compose_commands_parse(variant):
    compose = load_compose(COMPOSE_ENV[variant])
    parsed = parsed_services(compose, variant)
    for name, args in parsed.items():
        target = liveindex_services(compose)[name]["build"]["target"]
        assert target == ("worker" if args.command == "worker" else "slim"), name
        if variant == "curve":
            assert args.keys == "/keys", name
            mounts = dict(volume_target(v)[::-1] for v in compose["services"][name]["volumes"])
            assert "/keys" in mounts, f"{name} does not mount the keys folder"


def test_compose_wiring():
    compose = load_compose({})
    services = compose["services"]
    parsed = parsed_services(compose, "plain")
    (sink_name, sink), = by_command(parsed, "sink").items()
    (pub_name, pub), = by_command(parsed, "publish").items()
    # Inside a container 127.0.0.1 is that container only: bind every listener on 0.0.0.0.
    assert tcp(sink.bind)[0] == "0.0.0.0" and sink.http_host == "0.0.0.0"
    assert tcp(pub.bind)[0] == "0.0.0.0"
    assert tcp(pub.sink) == (sink_name, tcp(sink.bind)[1])
    # The sink's output (and journal) is on a named volume.
    named_volumes = set(compose.get("volumes") or {})
    sink_volumes = {target: source for source, target in map(volume_target, services[sink_name]["volumes"])}
    assert any(is_under(sink.out, target) and source in named_volumes for target, source in sink_volumes.items()), \
        f"sink --out {sink.out} is not on a named volume"
    assert any(p.split(":")[-1] == str(sink.http_port) for p in services[sink_name]["ports"])
    gpus = []
    for name, worker in by_command(parsed, "worker").items():
        assert tcp(worker.dispatcher) == (pub_name, tcp(pub.bind)[1]), name
        assert tcp(worker.sink) == (sink_name, tcp(sink.bind)[1]), name
        assert worker.metrics_host == "0.0.0.0" and worker.metrics_port, name
        assert worker.providers == "cuda", name
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        gpus += device["device_ids"]
    assert len(gpus) == len(set(gpus)), f"two workers reserve the same GPU: {gpus}"


def test_compose_bind_mounts_and_build_context_exist():
    compose = load_compose({})
    for name, service in compose["services"].items():
        if "build" in service:
            context = (DEPLOY / service["build"]["context"]).resolve()
            assert (context / service["build"]["dockerfile"]).is_file(), name
        for entry in service.get("volumes", []):
            source, _ = volume_target(entry)
            if isinstance(entry, dict) and entry.get("bind", {}).get("create_host_path"):
                continue  # made on first start (the optional keys folder)
            if source and source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"


def test_grafana_provisioning_matches_compose():
    compose = load_compose({})
    grafana = compose["services"]["grafana"]
    mounts = {(DEPLOY / source).resolve(): target for source, target in map(volume_target, grafana["volumes"])
              if source and source.startswith(".")}
    provisioning = mounts[(DEPLOY / "grafana/provisioning").resolve()]
    assert provisioning == "/etc/grafana/provisioning"
    (provider,) = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/liveindex.yaml").read_text())["providers"]
    assert provider["options"]["path"] == mounts[(DEPLOY / "grafana/dashboards").resolve()]
    (datasource,) = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())["datasources"]
    url = urlparse(datasource["url"])
    assert url.hostname in compose["services"] and url.port == 9090


# -- Prometheus ----------------------------------------------------------------------------------

def prometheus_jobs() -> dict[str, dict]:
    config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    return {job["job_name"]: job for job in config["scrape_configs"]}


def job_targets(job) -> set[str]:
    return {t for group in job.get("static_configs", []) for t in group["targets"]}


def test_prometheus_scrapes_the_sink_and_every_worker():
    jobs = prometheus_jobs()
    assert {"liveindex-sink", "liveindex-worker"} <= set(jobs)
    for name in ("liveindex-sink", "liveindex-worker"):
        assert jobs[name].get("metrics_path", "/metrics") == "/metrics"
    parsed = parsed_services(load_compose({}), "plain")
    assert job_targets(jobs["liveindex-sink"]) == {f"{n}:{a.http_port}" for n, a in by_command(parsed, "sink").items()}
    assert job_targets(jobs["liveindex-worker"]) == {
        f"{n}:{a.metrics_port}" for n, a in by_command(parsed, "worker").items()}


# -- Grafana -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dashboard():
    return json.loads((DEPLOY / "grafana/dashboards/liveindex.json").read_text())


def dashboard_exprs(dashboard) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_is_a_grafana_dashboard(dashboard):
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 30
    assert dashboard["uid"] and dashboard["title"]
    (datasource,) = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())["datasources"]
    panels = dashboard["panels"]
    assert len(panels) >= 6
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    for p in panels:
        grid = p["gridPos"]
        assert all(isinstance(grid[k], int) for k in "xywh") and grid["x"] + grid["w"] <= 24, p["title"]
        assert p["type"] and p["title"] and p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(set(refs)) == len(refs), p["title"]
        for thing in (p, *p["targets"]):
            assert thing["datasource"]["uid"] == datasource["uid"], p["title"]
            assert thing["datasource"]["type"] == datasource["type"], p["title"]
        assert all(t["expr"].strip() for t in p["targets"]), p["title"]


def test_dashboard_queries_only_exported_metrics(dashboard):
    exported = exported_metric_names()
    assert {"liveindex_frames_received_total", "liveindex_frame_latency_seconds_bucket",
            "liveindex_worker_page_seconds_bucket", "liveindex_frames_by_method_total"} <= exported
    jobs = set(prometheus_jobs())
    for expr in dashboard_exprs(dashboard):
        unknown = set(re.findall(r"(?<![\w:])liveindex_\w+", expr)) - exported
        assert not unknown, f"{expr}: not exported by the sink or the workers: {sorted(unknown)}"
        for job in re.findall(r'\bjob\s*=~?\s*"([^"]+)"', expr):
            assert job in jobs, f"{expr}: no scrape job {job} in prometheus.yml"
        if re.search(r"(?<![\w:])up\b(?!\s*\()", expr):
            assert re.search(r'(?<![\w:])up\s*\{[^}]*job\s*=', expr), f"{expr}: `up` without a job"


def test_dashboard_shows_what_the_issue_asks(dashboard):
    exprs = "\n".join(dashboard_exprs(dashboard))
    assert "rate(liveindex_frames_received_total" in exprs  # throughput
    assert "rate(liveindex_worker_frames_total" in exprs  # per-worker throughput
    for q in ("0.5", "0.95", "0.99"):  # latency percentiles
        assert f"histogram_quantile({q}, sum by (le) (rate(liveindex_frame_latency_seconds_bucket" in exprs, q
    for gauge in ("liveindex_backlog_frames", "liveindex_backlog_spilled_frames", "liveindex_queue_depth_frames"):
        assert gauge in exprs  # backlog
    assert 'liveindex_frames_by_method_total{method=~"tm.*"}' in exprs  # fallback ratio
    assert "liveindex_workers_up" in exprs and 'up{job="liveindex-worker"}' in exprs  # workers up


# -- Kubernetes ----------------------------------------------------------------------------------

def test_k8s_documents_are_named_and_namespace_agnostic():
    docs = k8s_docs()
    assert len(docs) >= 6
    for file, doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), file
        if doc["kind"] == "Kustomization":
            for resource in doc["resources"]:
                assert (DEPLOY / "k8s" / resource).is_file(), resource
            assert not any("example" in r for r in doc["resources"])
            continue
        assert doc.get("metadata", {}).get("name"), f"{file}: {doc['kind']} without metadata.name"
        assert "namespace" not in doc["metadata"], f"{file}: {doc['metadata']['name']} names a namespace"


def test_k8s_container_args_parse():
    workloads = k8s_workloads()
    commands = {name: container_args(w).command for name, w in workloads.items()}
    assert sorted(commands.values()) == ["publish", "sink", "worker"]


def test_k8s_worker_requests_a_gpu():
    (worker,) = [w for w in k8s_workloads().values() if container_args(w).command == "worker"]
    assert worker["kind"] == "Deployment"
    container = liveindex_container(worker)
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    args = container_args(worker)
    assert args.metrics_host == "0.0.0.0" and args.providers == "cuda"
    assert container_port(container, "metrics") == args.metrics_port
    annotations = worker["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == args.metrics_port
    assert annotations["prometheus.io/path"] == "/metrics"


def test_k8s_sink_is_a_statefulset_with_its_volume():
    (sink,) = [w for w in k8s_workloads().values() if container_args(w).command == "sink"]
    assert sink["kind"] == "StatefulSet"
    args = container_args(sink)
    container = liveindex_container(sink)
    claims = {c["metadata"]["name"] for c in sink["spec"]["volumeClaimTemplates"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert any(is_under(args.out, mounts[c]) for c in claims if c in mounts), \
        f"sink --out {args.out} is not on a volumeClaimTemplate"
    assert tcp(args.bind)[0] == "0.0.0.0" and args.http_host == "0.0.0.0"
    assert container_port(container, "zmq") == tcp(args.bind)[1]
    assert container_port(container, "http") == args.http_port
    annotations = sink["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == args.http_port
    services = {doc["metadata"]["name"]: doc for _, doc in k8s_docs() if doc["kind"] == "Service"}
    assert services[sink["spec"]["serviceName"]]["spec"].get("clusterIP") == "None"


def test_k8s_services_reach_their_pods_and_addresses_match():
    docs = k8s_docs()
    workloads = k8s_workloads()
    services = {doc["metadata"]["name"]: doc for _, doc in docs if doc["kind"] == "Service"}
    for name, service in services.items():
        selector = service["spec"]["selector"]
        matches = [w for w in workloads.values()
                   if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matches) == 1, f"Service {name} selects {len(matches)} workloads"
        container = liveindex_container(matches[0])
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if isinstance(target, str):
                target = container_port(container, target)
            assert target in {p["containerPort"] for p in container["ports"]}, f"{name}: {port}"

    def service_port(address: str) -> tuple[str, int]:
        host, port = tcp(address)
        assert host in services, f"{address}: no Service {host}"
        assert port in {p["port"] for p in services[host]["spec"]["ports"]}, address
        return host, port

    role = {container_args(w).command: w for w in workloads.values()}
    sink, pub, worker = (container_args(role[c]) for c in ("sink", "publish", "worker"))
    sink_service = service_port(worker.sink)
    assert service_port(pub.sink) == sink_service
    assert services[sink_service[0]]["spec"]["selector"].items() <= \
        role["sink"]["spec"]["template"]["metadata"]["labels"].items()
    dispatcher_service = service_port(worker.dispatcher)
    assert services[dispatcher_service[0]]["spec"]["selector"].items() <= \
        role["publish"]["spec"]["template"]["metadata"]["labels"].items()
    assert tcp(pub.bind) == ("0.0.0.0", container_port(liveindex_container(role["publish"]), "zmq"))


# Which CurveZMQ key files each role needs (server: its secret and the clients' public key;
# client: its secret and the server's public key; the publisher is both).
KEY_FILES = {
    "sink": {"server.key_secret", "client.key"},
    "worker": {"client.key_secret", "server.key"},
    "publish": {"server.key_secret", "client.key", "client.key_secret", "server.key"},
}


def test_k8s_pods_mount_the_keys_they_need():
    example = yaml.safe_load((DEPLOY / "k8s/curve-keys-secret.example.yaml").read_text())
    assert example["kind"] == "Secret"
    assert set(example["stringData"]) == set().union(*KEY_FILES.values())
    for name, workload in k8s_workloads().items():
        args = container_args(workload)
        container = liveindex_container(workload)
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == args.keys]
        assert mount.get("readOnly") is True, name
        (volume,) = [v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
        secret = volume["secret"]
        assert secret["secretName"] == example["metadata"]["name"], name
        files = {i["path"] for i in secret["items"]} if "items" in secret else set(example["stringData"])
        assert files == KEY_FILES[args.command], name


# -- systemd -------------------------------------------------------------------------------------

UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
ROLE_OF_UNIT = {"liveindex-sink.service": "sink", "liveindex-worker@.service": "worker",
                "liveindex-publisher.service": "publish"}


@pytest.fixture(scope="module")
def env_file():
    return parse_env_file(DEPLOY / "systemd/liveindex.env")


def test_systemd_units_are_the_expected_ones():
    assert sorted(p.name for p in UNITS) == sorted(ROLE_OF_UNIT)


@pytest.mark.parametrize("variant", SYSTEMD_ENV)
@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_systemd_unit(path, variant, env_file):
    unit = parse_unit(path)
    assert {"Unit", "Service", "Install"} <= set(unit), path.name
    assert unit_values(unit, "Unit", "Description")
    assert unit_values(unit, "Install", "WantedBy") == ["multi-user.target"]
    (env_path,) = unit_values(unit, "Service", "EnvironmentFile")
    assert PurePosixPath(env_path.lstrip("-")).name == "liveindex.env"
    # Hardening: a system user without privileges, read-only system.
    assert unit_values(unit, "Service", "User") == ["liveindex"] or unit_values(unit, "Service", "DynamicUser") == ["yes"]
    assert unit_values(unit, "Service", "NoNewPrivileges") == ["yes"]
    assert unit_values(unit, "Service", "ProtectSystem") == ["strict"]

    env = unit_environment(unit, {**env_file, **SYSTEMD_ENV[variant]}, "0")
    argv = exec_start_argv(unit, env)
    assert PurePosixPath(argv[0]).name == "liveindex", argv[0]
    args = parse_cli(argv[1:], f"{path.name} ({variant})")
    assert args.command == ROLE_OF_UNIT[path.name]
    if variant == "curve":
        assert args.keys == "/etc/liveindex/keys"

    writable = {f"/var/lib/{d}" for v in unit_values(unit, "Service", "StateDirectory") for d in v.split()}
    writable |= {f"/var/cache/{d}" for v in unit_values(unit, "Service", "CacheDirectory") for d in v.split()}
    if args.command == "sink":
        assert any(is_under(args.out, d) for d in writable if d.startswith("/var/lib/")), \
            f"sink --out {args.out} is not in a StateDirectory"
    if args.command == "publish":
        assert any(is_under(args.spill_dir, d) for d in writable), f"--spill-dir {args.spill_dir} is not writable"
    if args.command == "worker":
        assert env["CUDA_VISIBLE_DEVICES"] == "0"
        assert env["LIVEINDEX_CACHE"] in writable
        ports = {parse_cli(exec_start_argv(unit, unit_environment(unit, env, i), i)[1:], path.name).metrics_port
                 for i in ("0", "1", "2")}
        assert len(ports) == 3, "worker instances must serve metrics on different ports"


def test_systemd_env_file_defaults_are_loopback(env_file):
    # One host by default: nothing listens beyond the machine until the user says so.
    for key in ("LIVEINDEX_SINK_BIND", "LIVEINDEX_DISPATCHER_BIND"):
        assert tcp(env_file[key])[0] == "127.0.0.1", key
    assert env_file["LIVEINDEX_HTTP_HOST"] == "127.0.0.1"
    assert tcp(env_file["LIVEINDEX_SINK"])[1] == tcp(env_file["LIVEINDEX_SINK_BIND"])[1]
    assert tcp(env_file["LIVEINDEX_DISPATCHER"])[1] == tcp(env_file["LIVEINDEX_DISPATCHER_BIND"])[1]


# -- Dockerfile ----------------------------------------------------------------------------------

def dockerfile_stages() -> dict[str, dict]:
    text = (DEPLOY / "docker/Dockerfile").read_text()
    lines = re.sub(r"\\\n", " ", text).splitlines()
    args, stages, current = {}, {}, None
    for line in (l.strip() for l in lines):
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "ARG" and current is None:  # global ARGs usable in FROM
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
        elif instruction == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", rest.strip(), re.IGNORECASE)
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda g: args[g.group(1) or g.group(2)], m.group(1))
            current = stages.setdefault(m.group(2) or f"stage{len(stages)}", {"from": image, "lines": []})
        elif current is not None:
            current["lines"].append((instruction, rest.strip()))
    return stages


def test_dockerfile_has_a_cuda_worker_and_a_slim_image():
    stages = dockerfile_stages()
    assert {"worker", "slim"} <= set(stages)
    assert re.fullmatch(r"nvidia/cuda:[\w.-]*cudnn[\w.-]*-runtime-ubuntu[\d.]+", stages["worker"]["from"]), \
        stages["worker"]["from"]
    assert re.fullmatch(r"python:3\.\d+-slim", stages["slim"]["from"]), stages["slim"]["from"]
    for name in ("worker", "slim"):
        entrypoints = [rest for instruction, rest in stages[name]["lines"] if instruction == "ENTRYPOINT"]
        assert entrypoints and json.loads(entrypoints[-1]) == ["liveindex"], name
        assert any(i == "USER" and r not in ("root", "0") for i, r in stages[name]["lines"]), f"{name} runs as root"
    targets = {s["build"]["target"] for s in load_compose({})["services"].values() if "build" in s}
    assert targets <= set(stages)


def test_dockerfile_copies_what_exists_and_dockerignore_keeps_it():
    stages = dockerfile_stages()
    ignored = {l.strip() for l in (ROOT / ".dockerignore").read_text().splitlines()
               if l.strip() and not l.startswith("#")}
    assert {".git", ".venv"} <= ignored
    for stage in stages.values():
        for instruction, rest in stage["lines"]:
            if instruction == "COPY" and not rest.startswith("--from"):
                *sources, _ = rest.split()
                for source in sources:
                    assert (ROOT / source).exists(), source
                    assert source not in ignored, f"{source} is copied but .dockerignore drops it"
