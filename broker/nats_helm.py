"""python -m broker.nats_helm > nats-auth-values.json: the NATS Helm chart's values for
chatq's users (deploy/k8s/README.md), from broker/permissions.py.

One user per service with its permissions, as the embedded server gets them
(stack/nats_auth.py); the passwords are not in the values: the NATS container reads each
from the Secret `chatq-nats` (key: the user name) into an environment variable, and the
chart writes `<< $VAR >>` into the server's config for it. chatq's pods take the same
keys as NATS_PASSWORD (deploy/k8s/base). JSON, which Helm reads as YAML.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from broker import permissions

SECRET = "chatq-nats"


password_variable = permissions.password_variable


def helm_values() -> dict[str, Any]:
    users = permissions.server_users(lambda service: f"<< ${password_variable(service)} >>")
    env = {
        password_variable(service): {
            "valueFrom": {"secretKeyRef": {"name": SECRET, "key": permissions.user_name(service)}}
        }
        for service in permissions.SERVICES
    }
    return {"config": {"merge": {"authorization": {"users": users}}}, "container": {"env": env}}


def main() -> int:
    json.dump(helm_values(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
