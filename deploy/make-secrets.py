#!/usr/bin/env python3
"""Generate CurveZMQ keys and print the Secrets of deploy/k8s/keys.yaml holding them.

    python deploy/make-secrets.py | kubectl apply -f -
    python deploy/make-secrets.py --keys-dir ./keys --namespace lipsync > secrets.yaml

Runs 'lipsync-cluster keys generate' (in a temporary folder unless --keys-dir names one to keep,
e.g. for clients outside the cluster) and writes three Secrets: the broker's (its secret key and
the allow-lists), the workers' (worker secret key + broker public key) and the clients'. A file
in an allow-list folder is stored under the key ``folder.file``; the pods' volume ``items`` put it
back at ``folder/file`` (broker.yaml).
"""
from __future__ import annotations

import argparse
import base64
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

# Secret name -> {Secret key: file inside the keys folder}
SECRETS = {
    "lipsync-broker-keys": {
        "broker.key_secret": "broker.key_secret", "broker.key": "broker.key",
        "allowed_workers.worker.key": "allowed_workers/worker.key",
        "allowed_clients.client.key": "allowed_clients/client.key",
        "allowed_clients.admin.key": "allowed_clients/admin.key",
        "admins.admin.key": "admins/admin.key",
    },
    "lipsync-worker-keys": {"worker.key_secret": "worker.key_secret", "broker.key": "broker.key"},
    "lipsync-client-keys": {"client.key_secret": "client.key_secret", "broker.key": "broker.key"},
}


def secrets(keys_dir: Path, namespace: str) -> list[dict]:
    out = []
    for name, files in SECRETS.items():
        data = {key: base64.b64encode((keys_dir / rel).read_bytes()).decode() for key, rel in files.items()}
        out.append({"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "data": data,
                    "metadata": {"name": name, "namespace": namespace,
                                 "labels": {"app.kubernetes.io/part-of": "lipsync-cluster"}}})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys-dir", help="write the keys here and keep them (default: a temporary folder)")
    ap.add_argument("--namespace", default="lipsync")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        keys_dir = Path(args.keys_dir) if args.keys_dir else Path(tmp) / "keys"
        made = subprocess.run([sys.executable, "-m", "lipsync_cluster.cli", "keys", "generate", str(keys_dir)],
                              capture_output=True, text=True)
        if made.returncode != 0:
            sys.stderr.write(made.stderr)
            return made.returncode
        sys.stdout.write(yaml.safe_dump_all(secrets(keys_dir, args.namespace), sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
