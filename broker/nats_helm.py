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


def password_variable(service: str) -> str:
    """The NATS container's environment variable that holds a service's password."""
    return f"CHATQ_{service.upper()}_PASSWORD"


def helm_values() -> dict[str, Any]:
    users = [
        {
            "user": permissions.user_name(service),
            "password": f"<< ${password_variable(service)} >>",
            "permissions": permissions.permissions(service),
        }
        for service in permissions.SERVICES
    ]
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
