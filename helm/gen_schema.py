"""Generate helm/serving/values.schema.json.

Run from the repository root after changing values.yaml or serving/config.py:

    .venv/bin/python helm/gen_schema.py          # rewrite the schema
    .venv/bin/python helm/gen_schema.py --check  # exit 1 when the file is stale (tests do this too)

Why generated: `models`, `gateway`, `cache`, `responses`, `files`, `batches`, `auth`, `limits` and
`redis.config` ARE the sections of the configuration model (serving/config.py: ModelConfig,
GatewayConfig, ...), so their schema comes from pydantic and cannot drift from what `serving up`
accepts. The chart's own keys (`fileStorage`, `redis` but its `config`, ...) are declared below;
their descriptions are the `# --` comments of values.yaml, so each field is documented once and both editors
and `helm install` show the text.
Every object is closed (additionalProperties: false) so a typo is an error, not a silent no-op.
The output is JSON Schema draft-07 with everything inlined, which Helm 3 and Helm 4 both read.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "serving"
SCHEMA_PATH = CHART / "values.schema.json"
VALUES_PATH = CHART / "values.yaml"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

Schema = dict[str, Any]


# --- small builders --------------------------------------------------------------------------

def obj(props: dict[str, Schema], required: list[str] | None = None) -> Schema:
    out: Schema = {"type": "object", "additionalProperties": False, "properties": props}
    if required:
        out["required"] = required
    return out


def string(pattern: str | None = None, enum: list[str] | None = None, min_length: int | None = None) -> Schema:
    out: Schema = {"type": "string"}
    if pattern:
        out["pattern"] = pattern
    if enum:
        out["enum"] = enum
    if min_length is not None:
        out["minLength"] = min_length
    return out


def integer(minimum: int | None = None) -> Schema:
    return {"type": "integer"} if minimum is None else {"type": "integer", "minimum": minimum}


def boolean() -> Schema:
    return {"type": "boolean"}


def string_map() -> Schema:
    return {"type": "object", "additionalProperties": {"type": "string"}}


def free_object() -> Schema:
    """A Kubernetes structure passed through as-is (affinity, probes, ...): checked by Kubernetes."""
    return {"type": "object"}


def array(items: Schema) -> Schema:
    return {"type": "array", "items": items}


QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$"
OPTIONAL_QUANTITY = r"^([0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?)?$"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"


def resources() -> Schema:
    quantity = {"type": ["string", "number"]}
    return obj({
        "limits": {"type": "object", "additionalProperties": quantity, "description": "Resource limits."},
        "requests": {"type": "object", "additionalProperties": quantity, "description": "Resource requests."},
        "claims": {"type": "array", "items": free_object(), "description": "Dynamic resource claims."},
    }) | {"description": "Kubernetes container resources (limits, requests)."}


def group_settings() -> Schema:
    return obj({
        "gpusPerPod": integer(1) | {"description": "GPUs per pod (nvidia.com/gpu limit); default: the largest "
                                                   "model's GPUs per replica, rounded up."},
        "cpusPerPod": integer(1) | {"description": "Ray logical CPUs per pod; default: enough for the group's models "
                                                   "to fill the pod's GPUs."},
        "minReplicas": integer(0) | {"description": "Fewest pods; default: what the models' minimum replicas need."},
        "maxReplicas": integer(1) | {"description": "Most pods; default: what the models' maximum replicas need."},
        "shmSize": string(QUANTITY) | {"description": "Size of the /dev/shm memory volume (vLLM's NCCL and Ray's "
                                                      "object store; counts against pod memory)."},
        "nodeSelector": string_map() | {"description": "Node selector of the group's pods."},
        "tolerations": array(free_object()) | {"description": "Tolerations of the group's pods."},
        "affinity": free_object() | {"description": "Affinity of the group's pods."},
        "resources": resources(),
        "rayStartParams": string_map() | {"description": "Extra `ray start` parameters (strings)."},
        "podLabels": string_map() | {"description": "Extra labels of the group's pods."},
        "podAnnotations": string_map() | {"description": "Extra annotations of the group's pods."},
    })


def probe_set() -> Schema:
    return obj({name: free_object() for name in ("startupProbe", "livenessProbe", "readinessProbe")})


def monitor(extra: dict[str, Schema] | None = None) -> Schema:
    return obj({"enabled": boolean(), "labels": string_map(), **(extra or {})})


# --- the chart's values ----------------------------------------------------------------------

def chart_schema() -> Schema:
    peers = array(free_object())
    config = config_sections()
    top_level = {name: s for name, s in config.items() if name not in NESTED_SECTIONS}
    return obj({
        "nameOverride": string(),
        "fullnameOverride": string(),
        **top_level,
        "image": obj({
            "repository": string(min_length=1),
            "tag": string(),
            "variant": string(enum=["gpu", "cpu"]),
            "pullPolicy": string(enum=["Always", "IfNotPresent", "Never"]),
        }, required=["repository", "variant"]),
        "imagePullSecrets": array(obj({"name": string(min_length=1)
                                               | {"description": "Name of a docker-registry Secret."}},
                                      required=["name"])),
        "ray": obj({
            "version": string(pattern=r"^[0-9]+\.[0-9]+\.[0-9]+$"),
            "upgradeStrategy": string(enum=["NewCluster", "None"]),
            "haproxy": boolean(),
            "autoscaler": obj({
                "enabled": boolean(),
                "idleTimeoutSeconds": integer(0),
                "upscalingMode": string(enum=["Default", "Aggressive", "Conservative"]),
                "resources": resources(),
            }),
            "auth": obj({
                "mode": string(enum=["token", "disabled"]),
                "existingSecret": string(),
            }, required=["mode"]),
            "gcsFaultTolerance": obj({"enabled": boolean()}),
        }, required=["version", "auth"]),
        "podLabels": string_map(),
        "podAnnotations": string_map(),
        "podSecurityContext": free_object(),
        "securityContext": free_object(),
        "serviceAccountName": string(),
        "priorityClassName": string(),
        "env": array({"type": "object", "required": ["name"],
                      "properties": {"name": string(min_length=1) | {"description": "Variable name."}}}),
        "probes": obj({"head": probe_set(), "worker": probe_set()}),
        "head": obj({
            "resources": resources(),
            "shmSize": string(QUANTITY),
            "rayStartParams": string_map(),
            "nodeSelector": string_map(),
            "tolerations": array(free_object()),
            "affinity": free_object(),
        }),
        "workers": obj({
            "gpuDefaults": group_settings(),
            "cpuDefaults": group_settings(),
            "groups": {"type": "object", "propertyNames": {"pattern": DNS_LABEL},
                       "additionalProperties": group_settings()},
        }),
        "huggingface": obj({
            "token": string(),
            "existingSecret": string(),
            "existingSecretKey": string(min_length=1),
            "offline": boolean(),
        }),
        "modelCache": obj({
            "enabled": boolean(),
            "existingClaim": string(),
            "size": string(QUANTITY),
            "storageClass": string(),
            "accessModes": array(string(enum=["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"])),
            "mountPath": string(pattern=r"^/[^:]*$"),
            "emptyDirSizeLimit": string(OPTIONAL_QUANTITY),
        }),
        "fileStorage": obj({
            "mountPath": string(pattern=r"^/[^:]*$"),
            "persistence": obj({
                "enabled": boolean(),
                "existingClaim": string(),
                "size": string(QUANTITY),
                "storageClass": string(),
                "accessModes": array(string(enum=["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany",
                                                  "ReadWriteOncePod"])) | {"minItems": 1},
            }),
        }),
        "redis": obj({
            "enabled": boolean(),
            "config": config["redis"],
            "external": obj({
                "url": string(pattern=r"^(rediss?://\S+)?$"),
                "existingSecret": string(),
                "existingSecretPasswordKey": string(min_length=1),
                "tls": obj({"caSecret": string(), "caSecretKey": string(pattern=r"^[-._a-zA-Z0-9]+$"),
                            "clientCertSecret": string()}),
            }),
            "auth": obj({
                "password": string(),
                "existingSecret": string(),
                "existingSecretPasswordKey": string(min_length=1),
            }),
            "image": obj({
                "repository": string(min_length=1),
                "tag": string(min_length=1) | {"not": {"const": "latest"}},
                "pullPolicy": string(enum=["Always", "IfNotPresent", "Never"]),
            }, required=["repository", "tag"]),
            "persistence": obj({"enabled": boolean(), "size": string(QUANTITY), "storageClass": string()}),
            "resources": resources(),
            "maxmemory": string(pattern=r"^[0-9]+([bB]|[kKmMgG][bB]?)?$"),
            # allkeys-* would evict API keys and counters: not offered
            "maxmemoryPolicy": string(enum=["volatile-lru", "volatile-lfu", "volatile-ttl", "volatile-random",
                                            "noeviction"]),
            "nodeSelector": string_map(),
            "tolerations": array(free_object()),
            "affinity": free_object(),
        }),
        "apiKeys": obj({
            "existingSecret": string(),
            "existingSecretKey": string(min_length=1),
            "keys": array(obj({
                "name": string(min_length=1) | {"description": "Name of the key (shown in usage)."},
                "key": string(min_length=16)
                       | {"description": "The secret value clients send as `Authorization: Bearer <key>`."},
                "models": array(string()) | {"description": "Model names this key may use; empty or absent: all."},
                "rpm": integer(1) | {"description": "Requests per minute."},
                "tpm": integer(1) | {"description": "Tokens per minute."},
            }, required=["name", "key"])),
            "generateTestKey": boolean(),
        }),
        "service": obj({
            "type": string(enum=["ClusterIP", "NodePort", "LoadBalancer"]),
            "annotations": string_map(),
        }),
        "ingress": obj({
            "enabled": boolean(),
            "className": string(),
            "annotations": string_map(),
            "hosts": array(obj({
                "host": string() | {"description": "Host name (empty: any host)."},
                "paths": array(obj({
                    "path": string(pattern=r"^/") | {"description": "URL path."},
                    "pathType": string(enum=["Prefix", "Exact", "ImplementationSpecific"])
                                | {"description": "How the path matches."},
                }, required=["path"])) | {"description": "Paths of this host routed to the gateway."},
            }, required=["paths"])),
            "tls": array(obj({
                "secretName": string() | {"description": "TLS Secret."},
                "hosts": array(string()) | {"description": "Hosts the certificate covers."},
            })),
        }),
        "httpRoute": obj({
            "enabled": boolean(),
            "annotations": string_map(),
            "parentRefs": array(obj({
                "name": string(min_length=1) | {"description": "Name of the Gateway."},
                "namespace": string() | {"description": "Namespace of the Gateway (default: the release's)."},
                "sectionName": string() | {"description": "Listener of the Gateway."},
                "port": integer(1) | {"description": "Port of the Gateway listener."},
                "group": string() | {"description": "API group of the parent (default gateway.networking.k8s.io)."},
                "kind": string() | {"description": "Kind of the parent (default Gateway)."},
            }, required=["name"])),
            "hostnames": array(string()),
            "requestTimeout": string(pattern=r"^([0-9]+(h|m|s|ms))*$"),
        }),
        "networkPolicy": obj({
            "enabled": boolean(),
            "gatewayFrom": peers,
            "metricsFrom": peers,
            "dashboardFrom": peers,
            "kuberayOperator": obj({"namespaceSelector": free_object(), "podSelector": free_object()}),
        }),
        "podDisruptionBudget": obj({
            "enabled": boolean(),
            "headMaxUnavailable": integer(0),
            "workerMaxUnavailable": integer(0),
        }),
        "monitoring": obj({
            "podMonitor": monitor({"interval": string(pattern=r"^[0-9]+(ms|s|m|h)$")}),
            "serviceMonitor": monitor({"interval": string(pattern=r"^[0-9]+(ms|s|m|h)$")}),
            "prometheusRule": monitor(),
            "grafanaDashboard": monitor({"annotations": string_map()}),
        }),
        "tests": obj({
            # a pinned image: an explicit tag that is not `latest`, or a digest
            "image": string(pattern=r"^\S+(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}|@sha256:[0-9a-f]{64})$")
            | {"not": {"pattern": ":latest$"}},
            "timeoutSeconds": integer(10),
        }),
    }, required=["models", "gateway", "image", "ray"])


# --- the configuration model's part ----------------------------------------------------------

# Fields that never go through values (they would land in the RayService spec, readable by anyone
# who may read the custom resource): the chart feeds them from Secrets as SERVING_* variables.
SECRET_FIELDS = {"auth": {"keys"}, "redis": {"url", "password"}}
# Configuration sections whose chart key differs from their name: the chart's `redis` deploys Redis,
# the configuration's `redis` section (client settings) is `redis.config`.
NESTED_SECTIONS = {"redis": ("redis", "config")}


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """Resolve $ref against $defs and drop pydantic's titles: Helm 3 and editors read it plainly."""
    if isinstance(node, dict):
        if "$ref" in node:
            target = defs[node["$ref"].rsplit("/", 1)[-1]]
            merged = {**copy.deepcopy(target), **{k: v for k, v in node.items() if k != "$ref"}}
            return _inline(merged, defs)
        return {k: _inline(v, defs) for k, v in node.items() if k not in ("title", "$defs")}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def config_sections() -> dict[str, Schema]:
    """Every section of the configuration model (ServingConfig), as JSON schema, secrets left out."""
    from serving.config import ServingConfig

    raw = ServingConfig.model_json_schema()
    sections = _inline(raw, raw.get("$defs", {}))["properties"]
    for name, fields in SECRET_FIELDS.items():
        for field in fields:
            sections[name]["properties"].pop(field)
            if field in sections[name].get("required", []):
                sections[name]["required"].remove(field)
        sections[name]["description"] += f" ({', '.join(sorted(fields))}: from Secrets, not values)"
    for section in sections.values():
        if section.get("type") == "object":
            section.setdefault("additionalProperties", False)  # extra="forbid" says so; keep it explicit
    return sections


# --- descriptions from values.yaml -----------------------------------------------------------

_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.-]+):(\s|$)")


def values_descriptions(text: str) -> dict[tuple[str, ...], str]:
    """`# -- text` comment blocks (with `#` continuation lines) above a mapping key, by key path.

    List items (`- ...`) end the path: their fields are described by the schema itself.
    """
    out: dict[tuple[str, ...], str] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] | None = None
    in_list_at: int | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped == "# --" or stripped.startswith("# -- "):  # not the "# -----" banners
            pending = [stripped[4:].strip()]
            continue
        if stripped.startswith("#"):
            if pending is not None and stripped != "#":
                pending.append(stripped[1:].strip())
            continue
        if not stripped:
            pending = None
            continue
        indent = len(line) - len(line.lstrip(" "))
        if in_list_at is not None and indent > in_list_at:
            pending = None
            continue
        in_list_at = None
        if stripped.startswith("- "):
            in_list_at = indent
            pending = None
            continue
        match = _KEY.match(line)
        if not match:
            pending = None
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match["key"]))
        if pending:
            out[tuple(k for _, k in stack)] = " ".join(pending)
        pending = None
    return out


def _from_config(path: tuple[str, ...]) -> bool:
    from serving.config import ServingConfig

    nested = {v: k for k, v in NESTED_SECTIONS.items()}
    return (len(path) > 1 and path[0] in ServingConfig.model_fields and path[0] not in NESTED_SECTIONS) or (
        len(path) > 2 and tuple(path[:2]) in nested)


def _attach(schema: Schema, docs: dict[tuple[str, ...], str], path: tuple[str, ...] = ()) -> None:
    for key, sub in schema.get("properties", {}).items():
        here = path + (key,)
        if here in docs and not _from_config(here):
            # fields of the configuration model keep its own descriptions
            sub["description"] = docs[here]
        _attach(sub, docs, here)


def build() -> Schema:
    schema = chart_schema()
    _attach(schema, values_descriptions(VALUES_PATH.read_text()))
    schema["description"] = "Values of the `serving` Helm chart (generated by helm/gen_schema.py)."
    return {"$schema": "http://json-schema.org/draft-07/schema#", **schema}


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=False) + "\n"


def write_or_check(path: Path, text: str, doc: str, argv: list[str] | None) -> int:
    """The command line of a generator: write `path`, or with --check exit 1 when it differs from `text`."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help=f"fail when {path.name} is stale")
    args = parser.parse_args(argv)
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0].endswith(".py") else "the generator"
    if args.check:
        if not path.exists() or path.read_text() != text:
            print(f"{path} is stale: run python helm/{script}", file=sys.stderr)
            return 1
        return 0
    path.write_text(text)
    print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return write_or_check(SCHEMA_PATH, render(), __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
