#!/usr/bin/env python3
"""Consistency checks of the Kubernetes manifests, which no schema can see.

    check-deploy.py [ENTRY=FILE ...]     run every check; ENTRY=FILE gives the kustomize output of
                                         the entry point ENTRY (a directory under k8s/); without
                                         any, every k8s/**/kustomization.yaml is built here
    check-deploy.py --self-test [ENTRY=FILE ...]
                                         shows that every check fails on a broken copy
    check-deploy.py --write-prometheusrule
                                         rewrites k8s/monitoring/prometheusrule.yaml from
                                         deploy/prometheus/alerts.yml

The checks (CHECKS below):
  migrate-job        k8s/migrate/job.yaml's Job is named tardis-migrate-<tag>, <tag> being the
                     newTag of every image in k8s/migrate/kustomization.yaml (and, in every
                     output, the tag of the Job's images)
  fetcher-cronjobs   k8s/fetcher/cronjobs.yaml has one CronJob per source of DATA_SOURCES in
                     k8s/example-config/config.yaml (or the ConfigMap file in $TARDIS_CONFIGMAP,
                     e.g. your cluster's `kubectl get cm tardis-config -o yaml`): named fetcher-<name, _ as ->, FETCH_SOURCES
                     the source's name, schedule (and time zone) the source's
  secrets            no container takes a whole Secret (envFrom secretRef, or a tardis-secrets
                     volume without items); each secretKeyRef key is one its component needs
  pdb                every PodDisruptionBudget sets unhealthyPodEvictionPolicy: AlwaysAllow
  monitoring         the Prometheus Operator kinds are only in k8s/monitoring, each with the
                     label `release`
  prometheusrule     k8s/monitoring/prometheusrule.yaml (and its kustomize output) carries
                     exactly the groups of deploy/prometheus/alerts.yml
  compose-rules      the compose stack's Prometheus loads alerts.yml: deploy/prometheus/prometheus.yml
                     lists it under rule_files, and docker-compose.yml mounts every rule file
                     where the container's prometheus.yml finds it
"""
import copy
import json
import os
import pathlib
import posixpath
import subprocess
import sys

import yaml

REPO = pathlib.Path(__file__).resolve().parent.parent
ALERTS = "deploy/prometheus/alerts.yml"
PROMETHEUSRULE = "k8s/monitoring/prometheusrule.yaml"
MIGRATE_JOB = "k8s/migrate/job.yaml"
MIGRATE_KUSTOMIZATION = "k8s/migrate/kustomization.yaml"
CRONJOBS = "k8s/fetcher/cronjobs.yaml"
EXAMPLE_CONFIG = os.environ.get("TARDIS_CONFIGMAP", "k8s/example-config/config.yaml")
PROMETHEUS_CONFIG = "deploy/prometheus/prometheus.yml"
COMPOSE = "docker-compose.yml"
REGENERATE = ".ci/lint-deploy --write-prometheusrule"
# The entry points that need the Prometheus Operator (and directories under them). Every other
# entry point must apply on a cluster without it.
OPERATOR_ENTRY_POINTS = ("k8s/monitoring",)
OPERATOR_GROUP = "monitoring.coreos.com"
OPERATOR_KINDS = ("ServiceMonitor", "PodMonitor", "PrometheusRule")
# The keys of the Secret each component may read (a container's role: its name when that is a
# component, else its pod's app.kubernetes.io/component label). Any other container reads none.
ALLOWED_SECRET_KEYS = {
    # The sources' credential; the database password to read the written checkpoint (with the
    # optional roles: tardis_fetcher's, read-only).
    "fetcher": {"DATA_API_KEY", "DB_PASSWORD", "TARDIS_FETCHER_DB_PASSWORD"},
    "enricher": {"HOLYSHEEP_API_KEY", "LLM_API_KEY"},
    "writer": {"DB_PASSWORD", "PGPASSWORD", "TARDIS_WRITER_DB_PASSWORD"},
    # `writer migrate` in the migration Job: the owner's password, and the roles' passwords
    # it sets (k8s/overlays/db-roles).
    "migrate": {"DB_PASSWORD", "PGPASSWORD", "TARDIS_WRITER_DB_PASSWORD", "TARDIS_FETCHER_DB_PASSWORD",
                "TARDIS_READER_DB_PASSWORD"},
}
SECRET_NAME = "tardis-secrets"
POD_TEMPLATE_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "ReplicationController")


def read_docs(path):
    return [d for d in yaml.safe_load_all((REPO / path).read_text()) if d is not None]


def entry_points():
    dirs = {p.parent for name in ("kustomization.yaml", "kustomization.yml", "Kustomization")
            for p in (REPO / "k8s").rglob(name)}
    return sorted(str(d.relative_to(REPO)) for d in dirs)


def build(entry):
    out = subprocess.run(["kubectl", "kustomize", str(REPO / entry)], check=True, capture_output=True, text=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d is not None]


class Deploy:
    """Everything the checks read, parsed: mutate a deep copy to test a check."""

    def __init__(self, pairs):
        self.outputs = {}
        if pairs:
            for pair in pairs:
                entry, _, f = pair.partition("=")
                if not f:
                    raise SystemExit(f"check-deploy: {pair!r}: expected ENTRY=FILE")
                self.outputs[entry.rstrip("/")] = [d for d in yaml.safe_load_all(pathlib.Path(f).read_text())
                                                   if d is not None]
        else:
            self.outputs = {e: build(e) for e in entry_points()}
        self.files = {p: read_docs(p) for p in (MIGRATE_JOB, MIGRATE_KUSTOMIZATION, CRONJOBS, EXAMPLE_CONFIG,
                                                PROMETHEUSRULE)}
        self.alerts = yaml.safe_load((REPO / ALERTS).read_text())
        self.prometheus = yaml.safe_load((REPO / PROMETHEUS_CONFIG).read_text())
        self.compose = yaml.safe_load((REPO / COMPOSE).read_text())


# -- helpers -----------------------------------------------------------------------------------
def ident(obj):
    meta = obj.get("metadata") or {}
    return f"{obj.get('kind')}/{meta.get('name')}"


def unique_objects(d, entries=None):
    """(object, [entry points]) for each distinct object of the outputs (k8s repeats its parts)."""
    seen = {}
    for entry, docs in d.outputs.items():
        if entries is not None and entry not in entries:
            continue
        for obj in docs:
            if not isinstance(obj, dict):
                continue
            key = json.dumps(obj, sort_keys=True)
            seen.setdefault(key, (obj, []))[1].append(entry)
    return list(seen.values())


def pod_template(obj):
    """(pod labels, pod spec) of a workload, or None."""
    kind, spec = obj.get("kind"), obj.get("spec") or {}
    if kind == "Pod":
        return (obj.get("metadata") or {}).get("labels") or {}, spec
    if kind == "CronJob":
        spec = ((spec.get("jobTemplate") or {}).get("spec")) or {}
    elif kind not in POD_TEMPLATE_KINDS:
        return None
    tpl = spec.get("template") or {}
    return (tpl.get("metadata") or {}).get("labels") or {}, tpl.get("spec") or {}


def containers(pod_spec):
    for field in ("initContainers", "containers", "ephemeralContainers"):
        for c in pod_spec.get(field) or []:
            yield field, c


def image_tag(image):
    """(name, tag or None, digest or None) of an image reference."""
    rest, _, digest = image.partition("@")
    name, tag = rest, None
    if ":" in rest.rsplit("/", 1)[-1]:
        name, _, tag = rest.rpartition(":")
    return name, tag, digest or None


def env_value(container, name):
    for e in container.get("env") or []:
        if e.get("name") == name:
            return e.get("value")
    return None


def first_diff(a, b, path="spec.groups", names=("the PrometheusRule", ALERTS)):
    """The first place where two parsed YAML values differ, for a failure message."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if k not in b:
                return f"{path}.{k} only in {names[0]}"
            if k not in a:
                return f"{path}.{k} only in {names[1]}"
            if a[k] != b[k]:
                return first_diff(a[k], b[k], f"{path}.{k}", names)
    elif isinstance(a, list) and isinstance(b, list):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                label = (x.get("alert") or x.get("record") or x.get("name")) if isinstance(x, dict) else None
                return first_diff(x, y, f"{path}[{i}]" + (f" ({label})" if label else ""), names)
        if len(a) != len(b):
            return f"{path}: {len(a)} items in {names[0]}, {len(b)} in {names[1]}"
    return f"{path}: {a!r} in {names[0]}, {b!r} in {names[1]}"


# -- a. the migration Job ------------------------------------------------------------------------
def check_migrate_job(d):
    errors = []
    kust = d.files[MIGRATE_KUSTOMIZATION][0]
    images = kust.get("images") or []
    if not images:
        return [f"{MIGRATE_KUSTOMIZATION}: no `images:`; the Job's name must follow the images' newTag"]
    tags = {}
    for img in images:
        if not img.get("newTag"):
            errors.append(f"{MIGRATE_KUSTOMIZATION}: image {img.get('name')} has no newTag "
                          f"(the Job is named tardis-migrate-<newTag>)")
        else:
            tags.setdefault(str(img["newTag"]), []).append(img.get("name"))
    if len(tags) > 1:
        errors.append(f"{MIGRATE_KUSTOMIZATION}: the images' newTag differ ({tags}); the migration Job runs one "
                      f"version: give every image the same newTag")
    jobs = [o for o in d.files[MIGRATE_JOB] if o.get("kind") == "Job"]
    if len(jobs) != 1:
        return errors + [f"{MIGRATE_JOB}: expected one Job, found {len(jobs)}"]
    job = jobs[0]
    name = (job.get("metadata") or {}).get("name")
    for tag in tags:
        want = f"tardis-migrate-{tag}"
        if name != want:
            errors.append(f"{MIGRATE_JOB}: the Job is named {name!r} but the images' newTag in "
                          f"{MIGRATE_KUSTOMIZATION} is {tag}: rename it {want!r} (a new version must be a new "
                          f"Job, or `kubectl apply` fails on the old Job's immutable pod template), and the "
                          f"`kubectl wait ... job/{want}` in its comment")
    names = {img.get("name") for img in images}
    _, pod = pod_template(job)
    for _, c in containers(pod):
        img_name = image_tag(c.get("image") or "")[0]
        if img_name not in names:
            errors.append(f"{MIGRATE_JOB}: container {c.get('name')}'s image {img_name} is not under `images:` in "
                          f"{MIGRATE_KUSTOMIZATION}, so its tag does not follow the Job's name: add it")
    # In every output (an overlay may set other images): the Job's name ends with its images' tag.
    for obj, entries in unique_objects(d):
        name = (obj.get("metadata") or {}).get("name") or ""
        if obj.get("kind") != "Job" or not name.startswith("tardis-migrate-"):
            continue
        suffix = name[len("tardis-migrate-"):]
        for _, c in containers(pod_template(obj)[1]):
            img, tag, digest = image_tag(c.get("image") or "")
            if tag is None:
                print(f"check-deploy: note: {', '.join(entries)}: Job/{name} container {c.get('name')} image "
                      f"{c.get('image')} has no tag to compare with the Job's name")
            elif tag != suffix:
                errors.append(f"{', '.join(entries)}: Job/{name} runs {img}:{tag}: its name must be "
                              f"tardis-migrate-{tag} (set the name with the images, e.g. a patch in the overlay)")
    return errors


# -- b. the fetcher CronJobs ---------------------------------------------------------------------
def data_sources(d):
    cms = [o for o in d.files[EXAMPLE_CONFIG] if o.get("kind") == "ConfigMap"]
    if len(cms) != 1 or "DATA_SOURCES" not in ((cms[0].get("data")) or {}):
        raise ValueError(f"{EXAMPLE_CONFIG}: expected one ConfigMap with data.DATA_SOURCES")
    return json.loads(cms[0]["data"]["DATA_SOURCES"])


def fetcher_container(cj):
    cs = [c for _, c in containers(pod_template(cj)[1])]
    named = [c for c in cs if c.get("name") == "fetcher"]
    return (named or cs or [None])[0]


def check_fetcher_cronjobs(d):
    errors = []
    try:
        sources = data_sources(d)
    except (ValueError, json.JSONDecodeError) as e:
        return [f"{EXAMPLE_CONFIG}: DATA_SOURCES: {e}"]
    cronjobs = [o for o in d.files[CRONJOBS] if o.get("kind") == "CronJob"]
    by_source = {}
    for cj in cronjobs:
        c = fetcher_container(cj)
        fs = env_value(c, "FETCH_SOURCES") if c else None
        if not fs:
            errors.append(f"{CRONJOBS}: {ident(cj)} sets no FETCH_SOURCES on its fetcher container: set it to the "
                          f"name of its source in DATA_SOURCES ({EXAMPLE_CONFIG})")
            continue
        by_source.setdefault(fs, []).append(cj)
    names = []
    for src in sources:
        name = src.get("name")
        names.append(name)
        want = "fetcher-" + str(name).replace("_", "-")
        schedule = src.get("schedule")
        tz = (src.get("timezone") or src.get("time_zone") or "").strip()
        found = by_source.get(name, [])
        if not found:
            errors.append(f"{CRONJOBS}: no CronJob for source {name!r} of DATA_SOURCES ({EXAMPLE_CONFIG}): copy a "
                          f"CronJob, name it {want}, set FETCH_SOURCES to {name!r} and schedule to {schedule!r} "
                          f"(and its tardis/source labels to {name!r})")
            continue
        if len(found) > 1:
            errors.append(f"{CRONJOBS}: {len(found)} CronJobs run source {name!r} "
                          f"({', '.join(ident(c) for c in found)}): keep one")
        for cj in found:
            meta, spec = cj.get("metadata") or {}, cj.get("spec") or {}
            if meta.get("name") != want:
                errors.append(f"{CRONJOBS}: {ident(cj)} runs source {name!r}: name it {want}")
            if not schedule:
                errors.append(f"{EXAMPLE_CONFIG}: source {name!r} has no \"schedule\" (it would run every "
                              f"COLLECTION_INTERVAL in daemon mode): give it a cron schedule, and its CronJob "
                              f"{want} the same")
            elif spec.get("schedule") != schedule:
                errors.append(f"{CRONJOBS}: {ident(cj)} has schedule {spec.get('schedule')!r} but source {name!r} "
                              f"has \"schedule\": {schedule!r} in DATA_SOURCES ({EXAMPLE_CONFIG}): set the "
                              f"CronJob's schedule to {schedule!r}")
            want_tz = {tz} if tz and tz not in ("UTC", "Etc/UTC") else {"UTC", "Etc/UTC"}
            if spec.get("timeZone") not in want_tz:
                errors.append(f"{CRONJOBS}: {ident(cj)} has timeZone {spec.get('timeZone')!r} but source {name!r} "
                              f"runs in {tz or 'UTC (no timezone)'}: set timeZone to {sorted(want_tz)[-1]!r}")
            labelled = [("metadata", meta), ("jobTemplate", (spec.get("jobTemplate") or {}).get("metadata") or {}),
                        ("pod template", ((((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {})
                                          .get("metadata") or {}))]
            for where, m in labelled:
                got = (m.get("labels") or {}).get("tardis/source")
                if got is not None and got != name:
                    errors.append(f"{CRONJOBS}: {ident(cj)}: the {where} label tardis/source is {got!r}: "
                                  f"set it to {name!r}")
    for fs, cjs in sorted(by_source.items()):
        if fs not in names:
            errors.append(f"{CRONJOBS}: {', '.join(ident(c) for c in cjs)} runs FETCH_SOURCES={fs!r}, which is no "
                          f"source of DATA_SOURCES ({EXAMPLE_CONFIG}; sources: {names}): remove the CronJob or "
                          f"add the source")
    return errors


# -- c. secrets ----------------------------------------------------------------------------------
def check_secrets(d):
    errors = []
    for obj, entries in unique_objects(d):
        tpl = pod_template(obj)
        if tpl is None:
            continue
        labels, pod = tpl
        where = f"{', '.join(entries)}: {ident(obj)}"
        component = labels.get("app.kubernetes.io/component")
        secret_volumes = {}
        for v in pod.get("volumes") or []:
            srcs = []
            if v.get("secret"):
                srcs.append((v["secret"].get("secretName"), v["secret"].get("items")))
            for s in ((v.get("projected") or {}).get("sources") or []):
                if s.get("secret"):
                    srcs.append((s["secret"].get("name"), s["secret"].get("items")))
            for secret, items in srcs:
                if secret == SECRET_NAME:
                    secret_volumes.setdefault(v.get("name"), []).append(items)
        for field, c in containers(pod):
            cname = c.get("name")
            role = cname if cname in ALLOWED_SECRET_KEYS else component
            if component == "migrate" and cname == "writer":
                role = "migrate"
            allowed = ALLOWED_SECRET_KEYS.get(role, set())
            what = f"{where} {field[:-1]} {cname}"
            for ef in c.get("envFrom") or []:
                if ef.get("secretRef"):
                    errors.append(f"{what}: envFrom secretRef {ef['secretRef'].get('name')!r} gives it every key "
                                  f"of the Secret: read only the keys it needs with env[].valueFrom.secretKeyRef")
            for e in c.get("env") or []:
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref and ref.get("key") not in allowed:
                    errors.append(f"{what}: secretKeyRef key {ref.get('key')!r} (env {e.get('name')}): "
                                  + (f"a {role} container may read only {sorted(allowed)}" if allowed else
                                   "this container may read no secret key") +
                                  " (ALLOWED_SECRET_KEYS in .ci/check-deploy.py)")
            for m in c.get("volumeMounts") or []:
                for items in secret_volumes.get(m.get("name"), []):
                    if not items:
                        errors.append(f"{what}: mounts the whole Secret {SECRET_NAME} (volume {m.get('name')} "
                                      f"without items): list only the keys it needs")
                        continue
                    for it in items:
                        if it.get("key") not in allowed:
                            errors.append(f"{what}: mounts key {it.get('key')!r} of {SECRET_NAME}: it may read "
                                          + (f"only {sorted(allowed)}" if allowed else "no secret key"))
    return errors


# -- d. PodDisruptionBudgets --------------------------------------------------------------------
def check_pdbs(d):
    errors = []
    for obj, entries in unique_objects(d):
        if obj.get("kind") == "PodDisruptionBudget":
            got = (obj.get("spec") or {}).get("unhealthyPodEvictionPolicy")
            if got != "AlwaysAllow":
                errors.append(f"{', '.join(entries)}: {ident(obj)} has unhealthyPodEvictionPolicy {got!r}: set "
                              f"`unhealthyPodEvictionPolicy: AlwaysAllow` (a pod that is not ready must not block "
                              f"a node drain)")
    return errors


# -- e. monitoring objects --------------------------------------------------------------------
def is_operator_entry(entry):
    return any(entry == e or entry.startswith(e + "/") for e in OPERATOR_ENTRY_POINTS)


def check_monitoring(d):
    errors = []
    if not any(is_operator_entry(e) for e in d.outputs):
        errors.append(f"no output of {', '.join(OPERATOR_ENTRY_POINTS)}: the monitoring entry point is missing")
    count = 0
    for entry, docs in sorted(d.outputs.items()):
        for obj in docs:
            group = (obj.get("apiVersion") or "").rpartition("/")[0]
            if group != OPERATOR_GROUP:
                continue
            if not is_operator_entry(entry):
                errors.append(f"{entry}: {ident(obj)} ({OPERATOR_GROUP}) is in a workload entry point, so "
                              f"`kubectl apply -k {entry}` fails without the Prometheus Operator: move it to "
                              f"k8s/monitoring (or, if {entry} is meant to need the operator, add it to "
                              f"OPERATOR_ENTRY_POINTS in .ci/check-deploy.py)")
            elif obj.get("kind") in OPERATOR_KINDS:
                count += 1
                if not ((obj.get("metadata") or {}).get("labels") or {}).get("release"):
                    errors.append(f"{entry}: {ident(obj)} has no label `release`: kube-prometheus-stack selects "
                                  f"it by that label; k8s/monitoring/kustomization.yaml sets it with `labels:`")
    if count == 0:
        errors.append(f"{', '.join(OPERATOR_ENTRY_POINTS)}: no ServiceMonitor, PodMonitor or PrometheusRule")
    return errors


# -- the PrometheusRule, generated from alerts.yml -----------------------------------------------
HEADER = f"""\
# Generated from {ALERTS} (the source, with comments and the promtool tests):
# do not edit; edit {ALERTS}, then regenerate with
#   {REGENERATE}
# CI fails when the two differ. kustomization.yaml sets the namespace and the `release` label.
"""


class Dumper(yaml.SafeDumper):
    """Sequences indented under their key (yamllint's default `indentation` rule)."""

    def increase_indent(self, flow=False, indentless=False):
        return super().increase_indent(flow, False)


# Long annotations are folded at this width, below yamllint's line-length (140); PyYAML's
# default (80) would fold much shorter lines.
WIDTH = 110


class Folded(str):
    """An annotation too long for one line: written folded (>-), as in alerts.yml."""


def _str(dumper, s):
    # Multi-line strings (PromQL) as literal blocks (|), as in alerts.yml. PyYAML falls back
    # to quotes where a block cannot hold the string exactly.
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)


def _folded(dumper, s):
    return dumper.represent_scalar("tag:yaml.org,2002:str", str(s), style="|" if "\n" in s else ">")


Dumper.add_representer(str, _str)
Dumper.add_representer(Folded, _folded)


def fold_annotations(groups):
    """A copy of the groups whose annotations longer than a line (at their indentation) fold."""
    out = copy.deepcopy(groups)
    for g in out:
        for r in g.get("rules") or []:
            for k, v in (r.get("annotations") or {}).items():
                if isinstance(v, str) and len(v) + 14 + len(k) > WIDTH:
                    r["annotations"][k] = Folded(v)
    return out


def prometheusrule_doc(alerts):
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "tardis", "labels": {"app.kubernetes.io/part-of": "tardis"}},
        "spec": {"groups": alerts["groups"]},
    }


def render_prometheusrule(alerts):
    doc = prometheusrule_doc(alerts)
    doc["spec"]["groups"] = fold_annotations(doc["spec"]["groups"])
    return HEADER + yaml.dump(doc, Dumper=Dumper, sort_keys=False, width=WIDTH,
                              allow_unicode=True, default_flow_style=False)


def write_prometheusrule():
    alerts = yaml.safe_load((REPO / ALERTS).read_text())
    text = render_prometheusrule(alerts)
    assert yaml.safe_load(text) == prometheusrule_doc(alerts), "the generated YAML does not read back the same"
    (REPO / PROMETHEUSRULE).write_text(text)
    n = sum(len(g.get("rules") or []) for g in alerts["groups"])
    print(f"wrote {PROMETHEUSRULE}: {len(alerts['groups'])} groups, {n} rules from {ALERTS}")


def check_prometheusrule(d):
    errors = []
    groups = (d.alerts or {}).get("groups")
    if not groups:
        return [f"{ALERTS}: no groups"]
    want = prometheusrule_doc(d.alerts)
    rules = [o for o in d.files[PROMETHEUSRULE] if o.get("kind") == "PrometheusRule"]
    if len(rules) != 1:
        return [f"{PROMETHEUSRULE}: expected one PrometheusRule, found {len(rules)}: regenerate it with {REGENERATE}"]
    got = rules[0]
    if (got.get("spec") or {}).get("groups") != groups:
        errors.append(f"{PROMETHEUSRULE}: spec.groups differ from the groups of {ALERTS} "
                      f"(first difference: {first_diff((got.get('spec') or {}).get('groups'), groups)}): "
                      f"edit {ALERTS} (the source) and regenerate with {REGENERATE}")
    for field in ("apiVersion", "kind", "metadata"):
        if got.get(field) != want[field]:
            errors.append(f"{PROMETHEUSRULE}: {field} is {got.get(field)!r}, generated: {want[field]!r}: "
                          f"regenerate with {REGENERATE}")
    if errors:
        return errors  # the kustomize output follows the file
    for entry, docs in sorted(d.outputs.items()):
        if not is_operator_entry(entry):
            continue
        for obj in docs:
            if obj.get("kind") == "PrometheusRule" and (obj.get("metadata") or {}).get("name") == "tardis" \
                    and (obj.get("spec") or {}).get("groups") != groups:
                errors.append(f"{entry}: the kustomize output's {ident(obj)} differs from {ALERTS} "
                              f"({first_diff(obj['spec'].get('groups'), groups)}), though {PROMETHEUSRULE} does not: does a "
                              f"kustomize patch change it?")
    return errors


# -- the compose stack's Prometheus loads the rules ------------------------------------------------
def compose_mounts(service):
    """(host path relative to the repo, container path) of a compose service's bind mounts."""
    out = []
    for v in service.get("volumes") or []:
        if isinstance(v, str):
            parts = v.split(":")
            if len(parts) >= 2 and parts[0].startswith((".", "/")):
                out.append((parts[0], parts[1]))
        elif isinstance(v, dict) and v.get("type") == "bind":
            out.append((v.get("source"), v.get("target")))
    return [(posixpath.normpath(src), posixpath.normpath(dst)) for src, dst in out if src and dst]


def check_compose_rules(d):
    errors = []
    prom_dir = posixpath.dirname(PROMETHEUS_CONFIG)
    rule_files = (d.prometheus or {}).get("rule_files") or []
    alerts_name = posixpath.relpath(ALERTS, prom_dir)
    if alerts_name not in rule_files:
        errors.append(f"{PROMETHEUS_CONFIG}: rule_files does not list {alerts_name} (it lists {rule_files}): the "
                      f"compose stack's Prometheus evaluates no alert; add `rule_files: [{alerts_name}]`")
    service = ((d.compose or {}).get("services") or {}).get("prometheus")
    if service is None:
        return errors + [f"{COMPOSE}: no service prometheus"]
    command = service.get("command") or []
    command = command.split() if isinstance(command, str) else command
    config = next((c.split("=", 1)[1] for c in command if str(c).startswith("--config.file=")),
                  "/etc/prometheus/prometheus.yml")
    mounts = compose_mounts(service)
    for rf in rule_files:
        target = posixpath.normpath(posixpath.join(posixpath.dirname(config), rf))
        want = posixpath.normpath(posixpath.join(prom_dir, rf))
        host = None
        for src, dst in mounts:
            if target == dst or target.startswith(dst.rstrip("/") + "/"):
                host = posixpath.normpath(posixpath.join(src, posixpath.relpath(target, dst)))
        if host is None:
            errors.append(f"{COMPOSE}: service prometheus does not mount {target}, the rule file {rf} of its "
                          f"{config}: add `- ./{want}:{target}:ro` to its volumes (or mount ./{prom_dir} on "
                          f"{posixpath.dirname(config)})")
        elif host != want:
            errors.append(f"{COMPOSE}: service prometheus mounts {host} on {target}, the rule file {rf}: "
                          f"expected ./{want}")
    return errors


CHECKS = [
    ("migrate-job", check_migrate_job),
    ("fetcher-cronjobs", check_fetcher_cronjobs),
    ("secrets", check_secrets),
    ("pdb", check_pdbs),
    ("monitoring", check_monitoring),
    ("prometheusrule", check_prometheusrule),
    ("compose-rules", check_compose_rules),
]


def run_checks(d):
    return {name: fn(d) for name, fn in CHECKS}


# -- self-test -----------------------------------------------------------------------------------
def find(docs, kind, name=None):
    for o in docs:
        if o.get("kind") == kind and (name is None or (o.get("metadata") or {}).get("name") == name):
            return o
    raise AssertionError(f"self-test: no {kind}/{name} to mutate")


def first_output_with(d, kind, name=None, operator=False):
    for entry, docs in d.outputs.items():
        if is_operator_entry(entry) != operator:
            continue
        try:
            return entry, find(docs, kind, name)
        except AssertionError:
            pass
    raise AssertionError(f"self-test: no output has a {kind}/{name}")


def main_container(obj, name=None):
    cs = [c for _, c in containers(pod_template(obj)[1]) if name is None or c.get("name") == name]
    assert cs, f"self-test: {ident(obj)} has no container {name}"
    return cs[0]


def self_test(d):
    base = run_checks(d)
    cases = []

    def case(label, check, needle, prepare=None):
        """A broken copy: `prepare` (optional) first makes the copy pass that check, whatever the
        repo's state; `mutate` then breaks it, and the check must report a new error with `needle`."""
        def deco(mutate):
            cases.append((label, check, needle, prepare, mutate))
            return mutate
        return deco

    def compose_loads_alerts(m):
        m.prometheus["rule_files"] = ["alerts.yml"]
        m.compose["services"]["prometheus"]["volumes"] = [
            "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro",
            "./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro"]

    @case("Job named after another version", "migrate-job", "rename it 'tardis-migrate-")
    def _(m):
        find(m.files[MIGRATE_JOB], "Job")["metadata"]["name"] = "tardis-migrate-0.0.0-old"

    @case("a newTag bumped in k8s/migrate/kustomization.yaml, not the Job's name", "migrate-job", "newTag")
    def _(m):
        for img in m.files[MIGRATE_KUSTOMIZATION][0]["images"]:
            img["newTag"] = "9.9.9"

    @case("one image's newTag differs from the other's", "migrate-job", "newTag differ")
    def _(m):
        m.files[MIGRATE_KUSTOMIZATION][0]["images"][0]["newTag"] = "9.9.9"

    @case("an overlay sets the migrate image tag but not the Job's name", "migrate-job", "its name must be")
    def _(m):
        entry, job = first_output_with(m, "Job")
        main_container(job)["image"] = image_tag(main_container(job)["image"])[0] + ":7.7.7"

    @case("a CronJob's schedule differs from DATA_SOURCES", "fetcher-cronjobs", "set the CronJob's schedule")
    def _(m):
        find(m.files[CRONJOBS], "CronJob")["spec"]["schedule"] = "0 3 * * *"

    @case("a source added to DATA_SOURCES without a CronJob", "fetcher-cronjobs", "no CronJob for source 'new_source'")
    def _(m):
        cm = find(m.files[EXAMPLE_CONFIG], "ConfigMap")
        srcs = json.loads(cm["data"]["DATA_SOURCES"])
        srcs.append({"name": "new_source", "url": "https://example.com", "schedule": "0 * * * *"})
        cm["data"]["DATA_SOURCES"] = json.dumps(srcs)

    @case("a CronJob whose FETCH_SOURCES names no source", "fetcher-cronjobs", "which is no source")
    def _(m):
        cj = find(m.files[CRONJOBS], "CronJob")
        for e in fetcher_container(cj)["env"]:
            if e["name"] == "FETCH_SOURCES":
                e["value"] = "market-data"

    @case("a CronJob named with '_'", "fetcher-cronjobs", ": name it fetcher-")
    def _(m):
        cj = find(m.files[CRONJOBS], "CronJob")
        cj["metadata"]["name"] = "fetcher-" + env_value(fetcher_container(cj), "FETCH_SOURCES")

    @case("envFrom secretRef on the enricher", "secrets", "envFrom secretRef")
    def _(m):
        _, dep = first_output_with(m, "Deployment", "enricher")
        main_container(dep, "enricher").setdefault("envFrom", []).append({"secretRef": {"name": SECRET_NAME}})

    @case("the fetcher reads the LLM key", "secrets", "secretKeyRef key 'HOLYSHEEP_API_KEY'")
    def _(m):
        _, cj = first_output_with(m, "CronJob")
        main_container(cj, "fetcher")["env"].append(
            {"name": "HOLYSHEEP_API_KEY", "valueFrom": {"secretKeyRef": {"name": SECRET_NAME, "key": "HOLYSHEEP_API_KEY"}}})

    @case("the migrate Job's enricher-provision init container reads LLM_API_KEY", "secrets", "'LLM_API_KEY'")
    def _(m):
        _, job = first_output_with(m, "Job")
        main_container(job, "enricher-provision").setdefault("env", []).append(
            {"name": "LLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": SECRET_NAME, "key": "LLM_API_KEY"}}})

    @case("the writer mounts the whole Secret", "secrets", "mounts the whole Secret")
    def _(m):
        _, sts = first_output_with(m, "StatefulSet", "writer")
        pod = pod_template(sts)[1]
        pod.setdefault("volumes", []).append({"name": "s", "secret": {"secretName": SECRET_NAME}})
        main_container(sts, "writer").setdefault("volumeMounts", []).append({"name": "s", "mountPath": "/s"})

    @case("a PDB without unhealthyPodEvictionPolicy", "pdb", "unhealthyPodEvictionPolicy None")
    def _(m):
        _, pdb = first_output_with(m, "PodDisruptionBudget")
        pdb["spec"].pop("unhealthyPodEvictionPolicy")

    @case("a ServiceMonitor without the release label", "monitoring", "has no label `release`")
    def _(m):
        _, sm = first_output_with(m, "ServiceMonitor", operator=True)
        sm["metadata"]["labels"].pop("release")

    @case("a ServiceMonitor in the k8s entry point", "monitoring", "is in a workload entry point")
    def _(m):
        _, sm = first_output_with(m, "ServiceMonitor", operator=True)
        m.outputs.setdefault("k8s", []).append(copy.deepcopy(sm))

    @case("an alert's expr edited in the PrometheusRule only", "prometheusrule", "spec.groups differ")
    def _(m):
        pr = find(m.files[PROMETHEUSRULE], "PrometheusRule")
        pr["spec"]["groups"][-1]["rules"][-1]["expr"] += " > 1"

    @case("an alert added to alerts.yml only", "prometheusrule", REGENERATE)
    def _(m):
        m.alerts["groups"][-1]["rules"].append({"alert": "New", "expr": "vector(1)"})

    @case("a kustomize patch that changes the PrometheusRule's groups", "prometheusrule", "kustomize output")
    def _(m):
        _, pr = first_output_with(m, "PrometheusRule", operator=True)
        pr["spec"]["groups"][0]["rules"][0]["expr"] = "vector(0)"

    @case("prometheus.yml without rule_files", "compose-rules", "rule_files does not list alerts.yml",
          prepare=compose_loads_alerts)
    def _(m):
        m.prometheus.pop("rule_files", None)

    @case("a rule file that the compose Prometheus does not mount", "compose-rules",
          "does not mount /etc/prometheus/more.yml", prepare=compose_loads_alerts)
    def _(m):
        m.prometheus["rule_files"].append("more.yml")

    for label, check, needle, prepare, mutate in cases:
        m = copy.deepcopy(d)
        if prepare:
            prepare(m)
            before = dict(CHECKS)[check](m)
            assert not before, f"check-deploy self-test: {label}: the prepared copy fails already: {before}"
        else:
            before = base[check]
        mutate(m)
        errs = dict(CHECKS)[check](m)
        new = [e for e in errs if e not in before]
        hits = [e for e in new if needle in e]
        assert hits, f"check-deploy self-test: {label}: expected a new {check} error containing {needle!r}, got {new}"
        print(f"check-deploy self-test: {label}: {check} fails as expected: {hits[0]}")

    # The generator's output reads back as the same document and keeps to yamllint's layout.
    text = render_prometheusrule(d.alerts)
    assert yaml.safe_load(text) == prometheusrule_doc(d.alerts)
    assert "\n    - name:" in text, "sequences must be indented under their key"
    print(f"check-deploy self-test: ok ({len(cases)} broken copies rejected)")


def main(argv):
    if argv == ["--write-prometheusrule"]:
        write_prometheusrule()
        return 0
    if argv and argv[0] == "--self-test":
        self_test(Deploy(argv[1:]))
        return 0
    if any(a.startswith("-") for a in argv):
        print(__doc__, file=sys.stderr)
        return 2
    d = Deploy(argv)
    failed = 0
    for name, errors in run_checks(d).items():
        for e in errors:
            print(f"check-deploy: {name}: {e}", file=sys.stderr)
        if errors:
            failed += 1
        else:
            print(f"check-deploy: {name}: ok")
    if failed:
        print(f"check-deploy: {failed} of {len(CHECKS)} checks failed (above)", file=sys.stderr)
        return 1
    print(f"check-deploy: {len(CHECKS)} checks pass on {len(d.outputs)} entry points ({', '.join(sorted(d.outputs))})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
