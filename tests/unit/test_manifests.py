"""The deployment manifests, checked offline (no Kubernetes or Docker here).

- Kubernetes' own kinds against the Kubernetes schemas bundled by
  kubernetes-validate (strict: an unknown field fails too);
- KEDA's ScaledObject against the schema of KEDA's CRD
  (tests/schemas/keda-scaledobject-v1alpha1.json, source named inside);
- the RabbitMQ cluster's definitions against the codec: every queue with
  exactly the arguments the clients declare, or they could not start;
- every environment variable a manifest gives the project's image is one
  the settings object reads, including those of the process's own Secret
  (deploy/kubernetes/env/<process>.env);
- each workload reads its own process's Secret and no other, so the page
  never gets a worker's or the migrations' credentials.

Each check is also run on a broken copy of a real manifest, which must fail.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from issuance.shared.settings import PREFIX, Settings
from issuance.shared.wire import codec

from tests.unit.test_deploy_env import KUBERNETES_ENV, check_identity, env_file

ROOT = Path(__file__).parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
COMPOSE = ROOT / "deploy" / "compose" / "docker-compose.yml"
KEDA_SCHEMA = json.loads((ROOT / "tests" / "schemas" / "keda-scaledobject-v1alpha1.json").read_text())
KUBERNETES_VERSION = "1.30"
IMAGE = "coupon-issuance"
# Variables the image reads that are not settings, and who reads them.
OTHER_VARIABLES = {
    "PROMETHEUS_MULTIPROC_DIR": "prometheus_client, for the workers' shared metrics",
    "SSL_CERT_FILE": "OpenSSL (pika): the CA of the broker's certificate",
}
SETTINGS_VARIABLES = {PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}
OPERATOR_KINDS = {("rabbitmq.com/v1beta1", kind) for kind in ("RabbitmqCluster", "User", "Permission")}


def documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(KUBERNETES.glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text()))


# -- the checks -------------------------------------------------------------


def check_schema(doc: dict[str, Any]) -> None:
    """Validate one document against its kind's schema."""
    if doc["apiVersion"] == "keda.sh/v1alpha1":
        jsonschema.validate(doc, KEDA_SCHEMA)
    elif (doc["apiVersion"], doc["kind"]) in OPERATOR_KINDS:
        check_rabbitmq(doc)
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def check_rabbitmq(doc: dict[str, Any]) -> None:
    """The RabbitMQ operators' kinds: the fields these manifests rely on."""
    spec = doc["spec"]
    if doc["kind"] == "RabbitmqCluster":
        # Quorum queues need a majority of an odd number of nodes.
        assert spec["replicas"] >= 3 and spec["replicas"] % 2 == 1, "a quorum needs 3, 5, ... nodes"
        assert "load_definitions" in spec["rabbitmq"]["additionalConfig"]
    else:
        assert spec["rabbitmqClusterReference"]["name"], "which cluster?"


def containers(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = doc.get("spec", {})
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    if "template" in spec:
        yield from spec["template"]["spec"].get("containers", [])


def check_environment(docs: list[dict[str, Any]]) -> None:
    """Every variable set for the project's image is one it reads."""
    config_maps = {doc["metadata"]["name"]: doc.get("data", {}) for doc in of_kind(docs, "ConfigMap")}
    for doc in docs:
        for container in containers(doc):
            if not container["image"].startswith(IMAGE):
                continue
            names = {item["name"] for item in container.get("env", [])}
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    names |= set(config_maps[source["configMapRef"]["name"]])
                else:
                    names |= set(env_file(secret_file(source["secretRef"]["name"])))
            unknown = names - SETTINGS_VARIABLES - set(OTHER_VARIABLES)
            assert not unknown, f"{doc['metadata']['name']} sets variables nothing reads: {sorted(unknown)}"


# The process each workload runs, and so the one Secret it may read.
PROCESS_OF_WORKLOAD = {
    "issuance-web": "page",
    "issuance-worker-claims": "worker",
    "issuance-worker-events": "worker",
    "issuance-sweeper": "sweeper",
    "issuance-exporter": "exporter",
    "issuance-dead-letters": "dead-letters",
    "issuance-db-upgrade": "migrations",
}


def secret_file(name: str) -> Path:
    """The env file a process's Secret is made from (README.md)."""
    assert name.startswith("issuance-"), name
    return KUBERNETES_ENV / f"{name.removeprefix('issuance-')}.env"


def check_secrets(docs: list[dict[str, Any]]) -> None:
    """Each workload of the image reads exactly its process's Secret, whose
    env file gives that process its own identities only."""
    for doc in docs:
        for container in containers(doc):
            if not container["image"].startswith(IMAGE):
                continue
            process = PROCESS_OF_WORKLOAD[doc["metadata"]["name"]]
            read = {s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s}
            read |= {
                item["valueFrom"]["secretKeyRef"]["name"]
                for item in container.get("env", [])
                if "secretKeyRef" in item.get("valueFrom", {})
            }
            assert read == {f"issuance-{process}"}, (
                f"{doc['metadata']['name']} reads the Secrets {sorted(read)}"
            )
            check_identity(process, env_file(secret_file(f"issuance-{process}")))


def check_compose_environment(services: dict[str, Any]) -> None:
    for name, service in services.items():
        if service.get("image", "").startswith(IMAGE):
            unknown = set(service.get("environment", {})) - SETTINGS_VARIABLES - set(OTHER_VARIABLES)
            assert not unknown, f"compose service {name} sets variables nothing reads: {sorted(unknown)}"


def check_scaling(docs: list[dict[str, Any]]) -> None:
    """Each ScaledObject scales a Deployment on the queues that Deployment consumes."""
    deployments = {doc["metadata"]["name"]: doc for doc in of_kind(docs, "Deployment")}
    for scaled in of_kind(docs, "ScaledObject"):
        target = deployments[scaled["spec"]["scaleTargetRef"]["name"]]
        args = next(containers(target))["args"]
        consumed = set(args[args.index("--queues") + 1 :])
        for trigger in scaled["spec"]["triggers"]:
            assert trigger["type"] == "rabbitmq"
            assert trigger["metadata"]["queueName"] in consumed & set(codec.QUEUES), trigger


def check_definitions(definitions: dict[str, Any]) -> None:
    """Queues as the clients declare them on a cluster (quorum), else PRECONDITION_FAILED."""
    queues = {queue["name"]: queue["arguments"] for queue in definitions["queues"]}
    for queue in codec.QUEUES:
        assert queues[queue] == codec.queue_arguments(queue, "quorum"), queue
        assert queues[codec.dq_name(queue)] == codec.queue_arguments(queue, "quorum"), queue
        assert queues[codec.xq_name(queue)] == codec.xq_arguments("quorum"), queue
    assert queues[codec.LEDGER_QUEUE] == codec.ledger_arguments(), "as a publisher declares it"
    ledger_bindings = [b for b in definitions["bindings"] if b["destination"] == codec.LEDGER_QUEUE]
    assert [(b["source"], b["routing_key"]) for b in ledger_bindings] == [
        (codec.LEDGER_EXCHANGE, codec.LEDGER_ROUTE)
    ], "claims reach the ledger in the publish that reaches their queue"


def kubernetes_definitions(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (config,) = [doc for doc in of_kind(docs, "ConfigMap") if doc["metadata"]["name"].endswith("definitions")]
    return dict(json.loads(config["data"]["definitions.json"]))


# -- the manifests as they are ----------------------------------------------


@pytest.mark.parametrize("doc", documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_manifest_matches_its_schema(doc: dict[str, Any]) -> None:
    check_schema(doc)


def test_every_kind_an_sre_expects_is_there() -> None:
    kinds = {doc["kind"] for doc in documents()}
    assert {"Deployment", "PodDisruptionBudget", "ScaledObject", "RabbitmqCluster", "CronJob"} <= kinds
    deployments = {doc["metadata"]["name"] for doc in of_kind(documents(), "Deployment")}
    assert {"issuance-web", "issuance-exporter", "issuance-sweeper"} <= deployments
    scaled = {doc["spec"]["scaleTargetRef"]["name"] for doc in of_kind(documents(), "ScaledObject")}
    budgets = of_kind(documents(), "PodDisruptionBudget")
    protected = {doc["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] for doc in budgets}
    workers = {name for name in deployments if name.startswith("issuance-worker")}
    assert workers and scaled == workers and workers | {"issuance-web"} <= protected
    queues = {
        t["metadata"]["queueName"]
        for d in of_kind(documents(), "ScaledObject")
        for t in d["spec"]["triggers"]
    }
    assert queues == set(codec.QUEUES), "every queue scales its workers"


def test_workers_and_page_have_probes() -> None:
    for doc in of_kind(documents(), "Deployment"):
        if doc["metadata"]["name"] in ("issuance-web", "issuance-worker-claims", "issuance-worker-events"):
            container = next(containers(doc))
            assert "livenessProbe" in container, doc["metadata"]["name"]
    web = next(containers(next(d for d in documents() if d["metadata"]["name"] == "issuance-web")))
    assert web["readinessProbe"]["httpGet"]["path"] == "/healthz"


def test_manifests_set_only_variables_the_settings_read() -> None:
    check_environment(documents())
    check_compose_environment(compose()["services"])


def test_every_workload_reads_its_own_process_secret_only() -> None:
    check_secrets(documents())
    names = {doc["metadata"]["name"] for doc in documents() if any(containers(doc))}
    assert set(PROCESS_OF_WORKLOAD) <= names


# The process each compose service runs.
PROCESS_OF_SERVICE = {
    "web": "page",
    "worker": "worker",
    "sweeper": "sweeper",
    "exporter": "exporter",
    "migrate": "migrations",
}


def check_compose_identities(services: dict[str, Any]) -> None:
    """Each compose service of the image has an environment of its own."""
    ours = {name for name, s in services.items() if s.get("image", "").startswith(IMAGE)}
    assert ours == set(PROCESS_OF_SERVICE), sorted(ours)
    for name, process in PROCESS_OF_SERVICE.items():
        check_identity(process, {k: str(v) for k, v in services[name]["environment"].items()})


def acl_rules(path: Path) -> list[str]:
    """The ACL rules of a users.acl file, passwords (>...) left out."""
    lines = [line.split() for line in path.read_text().splitlines() if line.startswith("user ")]
    return [" ".join(word for word in line if not word.startswith(">")) for line in lines]


def test_compose_gives_each_process_its_own_identities() -> None:
    check_compose_identities(compose()["services"])
    # Redis: the reference ACL rules, with development passwords added.
    assert acl_rules(COMPOSE.parent / "users.acl") == acl_rules(ROOT / "deploy" / "redis" / "users.acl")
    enabled = [line for line in (COMPOSE.parent / "users.acl").read_text().splitlines() if " on " in line]
    assert enabled and all(">" in line for line in enabled)


def test_queues_scale_the_deployments_that_consume_them() -> None:
    check_scaling(documents())


def test_cluster_definitions_declare_the_queues_as_the_clients_do() -> None:
    check_definitions(kubernetes_definitions(documents()))
    check_definitions(json.loads((COMPOSE.parent / "definitions.json").read_text()))


def test_compose_runs_three_nodes_and_gives_every_client_all_of_them() -> None:
    from issuance.shared.wire import amqp

    services = compose()["services"]
    nodes = [name for name in services if name.startswith("rabbitmq-")]
    assert len(nodes) == 3
    clients = [
        s
        for s in services.values()
        if s.get("image", "").startswith(IMAGE) and "ISSUANCE_AMQP_URL" in s["environment"]
    ]
    assert len(clients) >= 4
    for service in clients:
        environment = service["environment"]
        hosts = [p.host for p in amqp.connection_parameters(environment["ISSUANCE_AMQP_URL"])]
        assert sorted(hosts) == sorted(nodes)
        assert environment["ISSUANCE_QUEUE_TYPE"] == "quorum"


# -- and broken on purpose: each check must catch its fault -----------------


def _broken(kind: str, name: str, breaks: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
    docs = copy.deepcopy(documents())
    breaks(next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name))
    return docs


def _first(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


BROKEN: dict[
    str, tuple[str, str, Callable[[dict[str, Any]], None], Callable[[list[dict[str, Any]]], None]]
] = {
    "replicas as a word": (
        "Deployment",
        "issuance-web",
        lambda d: d["spec"].__setitem__("replicas", "three"),
        lambda docs: check_schema(_first(docs, "Deployment", "issuance-web")),
    ),
    "a probe field misspelt": (
        "Deployment",
        "issuance-worker-claims",
        lambda d: d["spec"]["template"]["spec"]["containers"][0]["livenessProbe"].__setitem__(
            "periodSecond", 5
        ),
        lambda docs: check_schema(_first(docs, "Deployment", "issuance-worker-claims")),
    ),
    "a PDB field misspelt": (
        "PodDisruptionBudget",
        "issuance-web",
        lambda d: d["spec"].__setitem__("minAvailabe", 1),
        lambda docs: check_schema(_first(docs, "PodDisruptionBudget", "issuance-web")),
    ),
    "a KEDA trigger without metadata": (
        "ScaledObject",
        "issuance-worker-claims",
        lambda d: d["spec"]["triggers"][0].pop("metadata"),
        lambda docs: check_schema(_first(docs, "ScaledObject", "issuance-worker-claims")),
    ),
    "a KEDA queue length as a number": (
        "ScaledObject",
        "issuance-worker-events",
        lambda d: d["spec"]["triggers"][0]["metadata"].__setitem__("value", 2000),
        lambda docs: check_schema(_first(docs, "ScaledObject", "issuance-worker-events")),
    ),
    "a setting misspelt": (
        "ConfigMap",
        "issuance-config",
        lambda d: d["data"].__setitem__("ISSUANCE_QUEUE_TIPE", "quorum"),
        check_environment,
    ),
    "a variable nothing reads": (
        "Deployment",
        "issuance-exporter",
        lambda d: d["spec"]["template"]["spec"]["containers"][0]["env"].append(
            {"name": "RABBITMQ_URL", "value": "x"}
        ),
        check_environment,
    ),
    "the page reading the workers' Secret": (
        "Deployment",
        "issuance-web",
        lambda d: d["spec"]["template"]["spec"]["containers"][0]["envFrom"][1]["secretRef"].__setitem__(
            "name", "issuance-worker"
        ),
        check_secrets,
    ),
    "the page given one variable of the migrations' Secret": (
        "Deployment",
        "issuance-web",
        lambda d: (
            d["spec"]["template"]["spec"]["containers"][0]
            .setdefault("env", [])
            .append(
                {
                    "name": "ISSUANCE_DATABASE_URL",
                    "valueFrom": {
                        "secretKeyRef": {"name": "issuance-migrations", "key": "ISSUANCE_DATABASE_URL"}
                    },
                }
            )
        ),
        check_secrets,
    ),
    "a queue scaled that the workers do not consume": (
        "ScaledObject",
        "issuance-worker-events",
        lambda d: d["spec"]["triggers"][0]["metadata"].__setitem__("queueName", "claims"),
        check_scaling,
    ),
    "a classic queue on the cluster": (
        "ConfigMap",
        "issuance-rabbitmq-definitions",
        lambda d: d["data"].__setitem__(
            "definitions.json", d["data"]["definitions.json"].replace('"x-queue-type": "quorum",', "", 1)
        ),
        lambda docs: check_definitions(kubernetes_definitions(docs)),
    ),
    "an even number of RabbitMQ nodes": (
        "RabbitmqCluster",
        "issuance-rabbitmq",
        lambda d: d["spec"].__setitem__("replicas", 2),
        lambda docs: check_schema(_first(docs, "RabbitmqCluster", "issuance-rabbitmq")),
    ),
}


@pytest.mark.parametrize("fault", list(BROKEN))
def test_a_broken_copy_fails(fault: str) -> None:
    kind, name, breaks, check = BROKEN[fault]
    docs = _broken(kind, name, breaks)
    with pytest.raises((AssertionError, jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        check(docs)
    # The same check passes on the manifests as committed.
    check(documents())
