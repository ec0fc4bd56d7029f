#!/usr/bin/env python3
"""Validates every manifest under k8s/ offline and checks the rules the
deployment promises (docs/operations.md):

- every resource document validates, strictly, against the Kubernetes
  OpenAPI schemas shipped in the kubernetes-validate package (no cluster);
- every path a kustomization.yaml names exists (generated Secrets' source
  files excepted: they are the operator's, never committed);
- every container runs as non-root with a read-only root filesystem, no
  privilege escalation, all capabilities dropped, resource requests and a
  memory limit, and every service container has gRPC readiness and liveness
  probes;
- the gate runs at least two replicas, with an HPA (min >= 2) and a PDB;
- facematch is denied ALL egress and admits ingress only from gate and
  consent pods.

Usage: validate.py [K8S_DIR] [KUBERNETES_VERSION]
"""

import pathlib
import sys

import kubernetes_validate
import yaml

ROOT = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "k8s")
VERSION = sys.argv[2] if len(sys.argv) > 2 else "1.31.0"
errors = []


def fail(where, msg):
    errors.append(f"{where}: {msg}")


def documents():
    for path in sorted(ROOT.rglob("*.yaml")):
        if path.name == "kustomization.yaml" or "patches" in path.parts:
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc


def check_kustomizations():
    for k in sorted(ROOT.rglob("kustomization.yaml")):
        spec = yaml.safe_load(k.read_text())
        for res in spec.get("resources", []):
            if not (k.parent / res).exists():
                fail(k, f"resource {res} does not exist")
        for patch in spec.get("patches", []):
            if not (k.parent / patch["path"]).exists():
                fail(k, f"patch {patch['path']} does not exist")
        for patch in spec.get("patches", []):
            for doc in yaml.safe_load_all((k.parent / patch["path"]).read_text()):
                if doc and not {"apiVersion", "kind", "metadata"} <= doc.keys():
                    fail(k, f"patch {patch['path']} lacks apiVersion/kind/metadata")


def pod_spec(doc):
    kind = doc["kind"]
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        return doc["spec"]["template"]["spec"]
    return None


def check_pods(path, doc):
    spec = pod_spec(doc)
    if spec is None:
        return
    where = f"{path} {doc['kind']}/{doc['metadata']['name']}"
    psc = spec.get("securityContext", {})
    if not psc.get("runAsNonRoot"):
        fail(where, "pod securityContext.runAsNonRoot must be true")
    if spec.get("automountServiceAccountToken") is not False:
        fail(where, "automountServiceAccountToken must be false (no service uses the Kubernetes API)")
    for c in spec.get("initContainers", []) + spec.get("containers", []):
        cw = f"{where} container {c['name']}"
        sc = c.get("securityContext", {})
        if sc.get("readOnlyRootFilesystem") is not True:
            fail(cw, "readOnlyRootFilesystem must be true")
        if sc.get("allowPrivilegeEscalation") is not False:
            fail(cw, "allowPrivilegeEscalation must be false")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            fail(cw, "capabilities must drop ALL")
        res = c.get("resources", {})
        if not res.get("requests") or "memory" not in res.get("limits", {}):
            fail(cw, "needs resource requests and a memory limit")
        if doc["kind"] == "Deployment":
            for probe in ("readinessProbe", "livenessProbe"):
                if "grpc" not in c.get(probe, {}):
                    fail(cw, f"{probe} must be a gRPC health probe")


def main():
    check_kustomizations()
    docs = list(documents())
    for path, doc in docs:
        try:
            kubernetes_validate.validate(doc, VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            fail(path, f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}: {e.message} at {list(e.path)}")
        except Exception as e:  # unknown kind / version
            fail(path, f"{doc.get('kind')}: {e}")
        check_pods(path, doc)

    by_kind = {}
    for _, doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    gate = [d for d in by_kind.get("Deployment", []) if d["metadata"]["name"] == "estate-gate"]
    if not gate or gate[0]["spec"].get("replicas", 1) < 2:
        fail("gate", "the gate Deployment must run at least two replicas")
    if not any(h["spec"]["scaleTargetRef"]["name"] == "estate-gate" and h["spec"].get("minReplicas", 1) >= 2
               for h in by_kind.get("HorizontalPodAutoscaler", [])):
        fail("gate", "an HPA with minReplicas >= 2 must scale the gate")
    if not any(p["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/name") == "estate-gate"
               for p in by_kind.get("PodDisruptionBudget", [])):
        fail("gate", "a PodDisruptionBudget must cover the gate")

    policies = [p for p in by_kind.get("NetworkPolicy", [])
                if p["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name") == "estate-facematch"]
    if len(policies) != 1:
        fail("facematch", "exactly one NetworkPolicy must select the facematch pods")
    for p in policies:
        if "Egress" not in p["spec"].get("policyTypes", []) or p["spec"].get("egress"):
            fail("facematch", "the NetworkPolicy must list Egress and allow no egress at all")
        allowed = set()
        for rule in p["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                name = peer.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/name")
                if name is None or "ipBlock" in peer:
                    fail("facematch", f"ingress peer {peer} is not a gate or consent pod")
                allowed.add(name)
        if allowed != {"estate-gate", "estate-consent"}:
            fail("facematch", f"ingress must come from the gate and consent pods only, not {sorted(allowed)}")

    if errors:
        for e in errors:
            print("k8s:", e, file=sys.stderr)
        sys.exit(1)
    print(f"k8s: {len(docs)} resources valid against Kubernetes {VERSION}; deployment rules hold")


if __name__ == "__main__":
    main()
