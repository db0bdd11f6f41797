"""A one-machine Ray whose own services listen on 127.0.0.1 only, for the commands that start a
local Ray themselves (`serve --engine ray`, `generate --renderer blender --ray` without an address).

Ray binds its services (GCS, raylet, workers, agents) to the node's IP, or to every interface when
that IP is not loopback, and ray.init deliberately turns a loopback node IP into the machine's
routable one (for clusters). A local Ray must not expose Ray's unauthenticated ports, so that one
conversion (ray._private.services.resolve_ip_for_localhost, checked against Ray 2.x) is skipped
while ray.init runs, and the node's IP is checked afterwards.
"""
from __future__ import annotations

import sys


def start_ray_on_loopback(ray, **init_kwargs) -> None:
    from ray._private import services
    resolve = services.resolve_ip_for_localhost
    services.resolve_ip_for_localhost = lambda host: host
    try:
        ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False, _node_ip_address="127.0.0.1",
                 **init_kwargs)
    finally:
        services.resolve_ip_for_localhost = resolve
    if ray.util.get_node_ip_address() != "127.0.0.1":
        print(f"warning: Ray's services listen on {ray.util.get_node_ip_address()}, not loopback", file=sys.stderr)
