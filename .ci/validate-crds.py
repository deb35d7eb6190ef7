#!/usr/bin/env python3
"""Validates the custom resources in kustomize output against their real CRDs, strictly.

    validate-crds.py [ENTRY=]FILE...
                                   every ScaledObject, ServiceMonitor, PodMonitor and
                                   PrometheusRule in FILE (multi-document YAML: kustomize
                                   output), named ENTRY (its entry point) in messages
    validate-crds.py --self-test   shows that the validator rejects bad objects

The CRDs are read from $TARDIS_CRDS_DIR, by default ../shared/fixtures/crds beside the repo
(the published CRDs of KEDA and the Prometheus Operator; see its README.md).

It emulates an API server with strict field validation (kubectl apply's default):
  * apiVersion: the group is the CRD's, the version exists in the CRD and is served;
  * metadata: a name (DNS subdomain), string labels and annotations, no unknown field;
  * the version's openAPIV3Schema, made strict: every object node that lists `properties`
    gets `additionalProperties: false` unless it says `x-kubernetes-preserve-unknown-fields`;
    `x-kubernetes-int-or-string` accepts an integer or a string; `nullable` accepts null;
    formats int32, int64 and date-time are checked; `x-kubernetes-list-type: set|map` lists
    must not repeat an item or a key;
  * the CEL rules (`x-kubernetes-validations`) that this script translates (RULES below);
    the others are printed as skipped, never dropped silently.
A kind in CHECKED_KINDS with no CRD file fails.
"""
import copy
import datetime
import os
import pathlib
import re
import sys

import jsonschema
import yaml

REPO = pathlib.Path(__file__).resolve().parent.parent
CRDS_DIR = pathlib.Path(os.environ.get("TARDIS_CRDS_DIR") or REPO.parent / "shared" / "fixtures" / "crds")
# The kinds the manifests use: each must have its CRD file.
CHECKED_KINDS = {"ScaledObject", "ServiceMonitor", "PodMonitor", "PrometheusRule"}


def _has(obj, key):
    return isinstance(obj, dict) and obj.get(key) is not None


# CEL rules translated by hand: the rule's text (whitespace collapsed) -> a function of `self`
# (the object at the rule's node) that returns True when the rule holds.
RULES = {
    # ScaledObject .spec (KEDA): maxReplicaCount defaults to 100.
    "!has(self.minReplicaCount) || self.minReplicaCount <= (has(self.maxReplicaCount) ? self.maxReplicaCount : 100)":
        lambda s: not _has(s, "minReplicaCount")
        or s["minReplicaCount"] <= (s["maxReplicaCount"] if _has(s, "maxReplicaCount") else 100),
}

OBJECT_META_FIELDS = {
    "name", "generateName", "namespace", "labels", "annotations", "finalizers", "ownerReferences",
    "uid", "resourceVersion", "generation", "creationTimestamp", "deletionTimestamp",
    "deletionGracePeriodSeconds", "managedFields", "selfLink",
}
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")

FORMATS = jsonschema.FormatChecker(formats=())


@FORMATS.checks("int32")
def _int32(v):
    return not isinstance(v, int) or isinstance(v, bool) or -(2**31) <= v < 2**31


@FORMATS.checks("int64")
def _int64(v):
    return not isinstance(v, int) or isinstance(v, bool) or -(2**63) <= v < 2**63


@FORMATS.checks("date-time")
def _date_time(v):
    if not isinstance(v, str):
        return True
    if not RFC3339.match(v):
        return False
    try:
        datetime.datetime.fromisoformat(v.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return False
    return True


def strict(node):
    """A copy of an OpenAPI v3 (structural) schema node, made as strict as an API server."""
    if isinstance(node, list):
        return [strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for k, v in node.items():
        if k in ("properties", "patternProperties", "definitions"):
            out[k] = {name: strict(sub) for name, sub in v.items()}
        elif k in ("items", "additionalProperties", "not", "anyOf", "allOf", "oneOf"):
            out[k] = strict(v)
        else:
            out[k] = v
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out and "oneOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        out.pop("type", None)
    if out.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else [*out["type"], "null"]
    if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields") \
            and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def fmt_path(parts):
    s = ""
    for p in parts:
        s += f"[{p}]" if isinstance(p, int) else (f".{p}" if s else str(p))
    return s or "(root)"


def walk_extensions(schema, value, path, errors, on_rule):
    """Walks the object along its schema: list-type uniqueness and CEL rules at each node."""
    if value is None or not isinstance(schema, dict):
        return
    for rule in schema.get("x-kubernetes-validations") or []:
        on_rule(rule, value, path)
    if isinstance(value, list):
        list_type = schema.get("x-kubernetes-list-type")
        if list_type == "set":
            seen = []
            for i, item in enumerate(value):
                if item in seen:
                    errors.append(f"{fmt_path(path + [i])}: duplicate item {item!r} in a list-type=set list")
                seen.append(item)
        elif list_type == "map":
            keys = schema.get("x-kubernetes-list-map-keys") or []
            seen = {}
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    k = tuple(item.get(key) for key in keys)
                    if k in seen:
                        errors.append(f"{fmt_path(path + [i])}: duplicate key {dict(zip(keys, k))} "
                                      f"(also at [{seen[k]}]) in a list-type=map list")
                    seen[k] = i
        for i, item in enumerate(value):
            walk_extensions(schema.get("items"), item, path + [i], errors, on_rule)
    elif isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for k, v in value.items():
            if k in props:
                walk_extensions(props[k], v, path + [k], errors, on_rule)
            elif isinstance(extra, dict):
                walk_extensions(extra, v, path + [k], errors, on_rule)


def collect_rules(schema, path, out):
    """Every x-kubernetes-validations rule of a schema, with the node's path (for the report)."""
    if not isinstance(schema, dict):
        return
    for rule in schema.get("x-kubernetes-validations") or []:
        out.append((path, rule))
    for name, sub in (schema.get("properties") or {}).items():
        collect_rules(sub, f"{path}.{name}" if path else name, out)
    if isinstance(schema.get("items"), dict):
        collect_rules(schema["items"], path + "[]", out)
    if isinstance(schema.get("additionalProperties"), dict):
        collect_rules(schema["additionalProperties"], path + ".*", out)


def norm_rule(text):
    return " ".join(str(text).split())


class Crds:
    def __init__(self, directory):
        self.directory = pathlib.Path(directory)
        self.by_kind = {}  # kind -> (group, crd, file)
        if self.directory.is_dir():
            for f in sorted(self.directory.glob("*.y*ml")):
                for doc in yaml.safe_load_all(f.read_text()):
                    if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                        spec = doc["spec"]
                        self.by_kind[spec["names"]["kind"]] = (spec["group"], doc, f.name)
        self._validators = {}

    def skipped_rules(self):
        """(kind, version, path, rule) of every CEL rule that RULES does not translate."""
        out = []
        for kind, (_, crd, _) in sorted(self.by_kind.items()):
            for v in crd["spec"]["versions"]:
                rules = []
                collect_rules(v.get("schema", {}).get("openAPIV3Schema", {}), "", rules)
                for path, rule in rules:
                    if norm_rule(rule.get("rule")) not in RULES:
                        out.append((kind, v["name"], path or "(root)", rule.get("rule")))
        return out

    def validator(self, kind, version):
        key = (kind, version["name"])
        if key not in self._validators:
            schema = strict(version["schema"]["openAPIV3Schema"])
            self._validators[key] = (jsonschema.Draft4Validator(schema, format_checker=FORMATS), schema)
        return self._validators[key]

    def validate(self, obj):
        """The errors of one object (a list of strings; empty when it is valid)."""
        kind = obj.get("kind")
        if kind not in self.by_kind:
            return [f"no CRD for kind {kind} in {self.directory} (expected one of its *.yaml files to "
                    f"define it; set TARDIS_CRDS_DIR to the directory of the CRDs)"]
        group, crd, fname = self.by_kind[kind]
        errors = []
        api_version = obj.get("apiVersion") or ""
        g, _, v = api_version.rpartition("/")
        versions = {ver["name"]: ver for ver in crd["spec"]["versions"]}
        if g != group:
            errors.append(f"apiVersion: {api_version!r}: the group of {kind} is {group} ({fname})")
            return errors
        if v not in versions:
            errors.append(f"apiVersion: {api_version!r}: {fname} has no version {v!r} "
                          f"(it has {', '.join(sorted(versions))})")
            return errors
        version = versions[v]
        if not version.get("served"):
            errors.append(f"apiVersion: {api_version!r}: version {v} of {kind} is not served")
            return errors
        errors += self.validate_metadata(obj.get("metadata"))
        validator, schema = self.validator(kind, version)
        for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
            path = list(e.absolute_path)
            if e.validator == "additionalProperties" and e.validator_value is False \
                    and isinstance(e.instance, dict):
                known = set(e.schema.get("properties") or {})
                for field in sorted(set(e.instance) - known):
                    errors.append(f"{fmt_path(path + [field])}: unknown field (strict field validation; "
                                  f"known here: {', '.join(sorted(known))})")
            else:
                errors.append(f"{fmt_path(path)}: {e.message}")

        def on_rule(rule, value, path):
            fn = RULES.get(norm_rule(rule.get("rule")))
            if fn is None:
                return  # listed by skipped_rules()
            try:
                ok = fn(value)
            except (TypeError, KeyError):
                ok = True  # a value of the wrong type: the schema reports it
            if not ok:
                errors.append(f"{fmt_path(path)}: {rule.get('message') or 'rule failed'} "
                              f"(x-kubernetes-validations: {norm_rule(rule.get('rule'))})")

        walk_extensions(schema, obj, [], errors, on_rule)
        return errors

    @staticmethod
    def validate_metadata(meta):
        if not isinstance(meta, dict):
            return ["metadata: missing or not an object"]
        errors = []
        for k in sorted(set(meta) - OBJECT_META_FIELDS):
            errors.append(f"metadata.{k}: unknown field (strict field validation)")
        name = meta.get("name")
        if not isinstance(name, str) or not name:
            errors.append("metadata.name: required")
        elif len(name) > 253 or not DNS_SUBDOMAIN.match(name):
            errors.append(f"metadata.name: {name!r} is not a DNS subdomain (lowercase letters, digits, '-', '.')")
        ns = meta.get("namespace")
        if ns is not None and (not isinstance(ns, str) or len(ns) > 63 or not DNS_LABEL.match(ns)):
            errors.append(f"metadata.namespace: {ns!r} is not a DNS label")
        for field in ("labels", "annotations"):
            m = meta.get(field)
            if m is None:
                continue
            if not isinstance(m, dict):
                errors.append(f"metadata.{field}: not a map")
                continue
            for k, val in m.items():
                if not isinstance(val, str):
                    errors.append(f"metadata.{field}.{k}: {val!r} is not a string")
                if not isinstance(k, str) or not LABEL_NAME.match(k.rpartition("/")[2]):
                    errors.append(f"metadata.{field}: invalid key {k!r}")
                elif field == "labels" and isinstance(val, str) and (len(val) > 63 or not LABEL_VALUE.match(val)):
                    errors.append(f"metadata.labels.{k}: invalid label value {val!r}")
        return errors


def custom_objects(docs):
    """The objects of the kinds that must have a CRD."""
    return [d for d in docs if isinstance(d, dict) and d.get("kind") in CHECKED_KINDS]


def check_files(crds, files):
    failures, counts = [], {}
    for arg in files:
        f, _, path = arg.rpartition("=") if "=" in arg else (arg, "", arg)
        docs = [d for d in yaml.safe_load_all(pathlib.Path(path).read_text()) if d]
        for obj in custom_objects(docs):
            kind = obj.get("kind")
            name = (obj.get("metadata") or {}).get("name")
            counts[kind] = counts.get(kind, 0) + 1
            for e in crds.validate(obj):
                failures.append(f"{f}: {kind}/{name}: {e}")
        # A custom kind's CRD may be present even though CHECKED_KINDS omits it: validate it too.
        for obj in docs:
            if isinstance(obj, dict) and obj.get("kind") not in CHECKED_KINDS and obj.get("kind") in crds.by_kind \
                    and (obj.get("apiVersion") or "").rpartition("/")[0] == crds.by_kind[obj["kind"]][0]:
                counts[obj["kind"]] = counts.get(obj["kind"], 0) + 1
                for e in crds.validate(obj):
                    failures.append(f"{f}: {obj['kind']}/{(obj.get('metadata') or {}).get('name')}: {e}")
    return failures, counts


def print_rules(crds):
    total = []
    for kind, (_, crd, _) in sorted(crds.by_kind.items()):
        for v in crd["spec"]["versions"]:
            rules = []
            collect_rules(v.get("schema", {}).get("openAPIV3Schema", {}), "", rules)
            total += [(kind, path, r) for path, r in rules if norm_rule(r.get("rule")) in RULES]
    for kind, path, rule in total:
        print(f"crds: evaluated x-kubernetes-validations of {kind} at {path or '(root)'}: {norm_rule(rule.get('rule'))}")
    skipped = crds.skipped_rules()
    for kind, version, path, rule in skipped:
        print(f"crds: SKIPPED (not translated, not evaluated) x-kubernetes-validations of {kind} {version} "
              f"at {path}: {norm_rule(rule)}")
    print(f"crds: CEL rules: {len(total)} evaluated, {len(skipped)} skipped")


# ---------------------------------------------------------------------------------------------
SERVICE_MONITOR = """
apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata: {name: writer, namespace: tardis-collection, labels: {release: prometheus}}
spec:
  selector: {matchLabels: {app.kubernetes.io/name: writer}}
  endpoints:
    - {port: http, path: /metrics, interval: 15s}
"""
SCALED_OBJECT = """
apiVersion: keda.sh/v1alpha1
kind: ScaledObject
metadata: {name: enricher, namespace: tardis-collection}
spec:
  scaleTargetRef: {name: enricher}
  minReplicaCount: 0
  maxReplicaCount: 10
  triggers:
    - type: nats-jetstream
      metadata: {stream: TARDIS_RECORDS, consumer: enricher, lagThreshold: "2"}
"""
POD_MONITOR = """
apiVersion: monitoring.coreos.com/v1
kind: PodMonitor
metadata: {name: fetcher}
spec:
  selector: {matchLabels: {app.kubernetes.io/name: fetcher}}
  podMetricsEndpoints:
    - {port: http, path: /metrics, interval: 10s, targetPort: 8080}
"""
PROMETHEUS_RULE = """
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata: {name: tardis}
spec:
  groups:
    - name: g
      rules:
        - {alert: A, expr: up == 0, for: 5m, labels: {severity: warning}}
"""


def self_test():
    crds = Crds(CRDS_DIR)
    missing = sorted(CHECKED_KINDS - set(crds.by_kind))
    assert not missing, f"no CRD in {CRDS_DIR} for {missing}"
    good = {k: yaml.safe_load(t) for k, t in [("ServiceMonitor", SERVICE_MONITOR), ("ScaledObject", SCALED_OBJECT),
                                              ("PodMonitor", POD_MONITOR), ("PrometheusRule", PROMETHEUS_RULE)]}
    for kind, obj in good.items():
        errs = crds.validate(obj)
        assert not errs, f"self-test: a valid {kind} is rejected: {errs}"
    print("crds self-test: valid ServiceMonitor, PodMonitor (targetPort an int: int-or-string), "
          "PrometheusRule and ScaledObject accepted")

    def expect(label, obj, needle, c=crds):
        errs = c.validate(obj)
        hits = [e for e in errs if needle in e]
        assert hits, f"self-test: {label}: expected an error containing {needle!r}, got {errs}"
        print(f"crds self-test: {label}: rejected as expected: {hits[0]}")

    def mutated(kind, fn):
        obj = copy.deepcopy(good[kind])
        fn(obj)
        return obj

    expect("ServiceMonitor with spec.endpoints[0].intervall",
           mutated("ServiceMonitor", lambda o: o["spec"]["endpoints"][0].update(intervall="15s")),
           "spec.endpoints[0].intervall: unknown field")
    expect("ScaledObject with minReplicaCount 5 > maxReplicaCount 3",
           mutated("ScaledObject", lambda o: o["spec"].update(minReplicaCount=5, maxReplicaCount=3)),
           "minReplicaCount must be less than or equal to maxReplicaCount")
    expect("ScaledObject with minReplicaCount 150 and no maxReplicaCount (default 100)",
           mutated("ScaledObject", lambda o: (o["spec"].update(minReplicaCount=150), o["spec"].pop("maxReplicaCount"))),
           "minReplicaCount must be less than or equal to maxReplicaCount")
    expect("ScaledObject with an unknown top-level spec field",
           mutated("ScaledObject", lambda o: o["spec"].update(maxReplicas=3)), "spec.maxReplicas: unknown field")
    expect("ScaledObject with maxReplicaCount a string",
           mutated("ScaledObject", lambda o: o["spec"].update(maxReplicaCount="10")), "spec.maxReplicaCount: '10' is not of type 'integer'")
    expect("ScaledObject with an int32 overflow",
           mutated("ScaledObject", lambda o: o["spec"].update(maxReplicaCount=2**31)), "is not a 'int32'")
    expect("PodMonitor with targetPort a list (int-or-string)",
           mutated("PodMonitor", lambda o: o["spec"]["podMetricsEndpoints"][0].update(targetPort=[1])),
           "spec.podMetricsEndpoints[0].targetPort")
    expect("PrometheusRule with a rule field misspelled",
           mutated("PrometheusRule", lambda o: o["spec"]["groups"][0]["rules"][0].update(annotation={"a": "b"})),
           "spec.groups[0].rules[0].annotation: unknown field")
    expect("ServiceMonitor in an unknown version",
           mutated("ServiceMonitor", lambda o: o.update(apiVersion="monitoring.coreos.com/v2")), "has no version 'v2'")
    expect("ServiceMonitor in another group",
           mutated("ServiceMonitor", lambda o: o.update(apiVersion="monitoring.example.com/v1")), "the group of ServiceMonitor")
    expect("ServiceMonitor with no metadata.name",
           mutated("ServiceMonitor", lambda o: o["metadata"].pop("name")), "metadata.name: required")
    expect("ServiceMonitor with an unknown top-level field",
           mutated("ServiceMonitor", lambda o: o.update(specs={})), "specs: unknown field")
    no_crds = Crds(pathlib.Path("/nonexistent-crds-dir"))
    expect("a ServiceMonitor whose CRD file is missing", good["ServiceMonitor"], "no CRD for kind ServiceMonitor", no_crds)
    print("crds self-test: ok")


def main(argv):
    if argv == ["--self-test"]:
        self_test()
        return 0
    if not argv or any(a.startswith("-") for a in argv):
        print(__doc__, file=sys.stderr)
        return 2
    crds = Crds(CRDS_DIR)
    if not crds.by_kind:
        print(f"crds: no CustomResourceDefinition found in {CRDS_DIR} (set TARDIS_CRDS_DIR)", file=sys.stderr)
        return 1
    print_rules(crds)
    failures, counts = check_files(crds, argv)
    for f in failures:
        print(f"crds: {f}", file=sys.stderr)
    if failures:
        print(f"crds: {len(failures)} error(s): the objects above would be rejected by an API server with "
              f"these CRDs ({CRDS_DIR})", file=sys.stderr)
        return 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    print(f"crds: {summary} valid against the CRDs in {CRDS_DIR} (strict fields, CEL rules)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
