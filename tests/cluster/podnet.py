"""Pod addresses for the process kubelet: one address per pod, all on this machine.

Endpoints and EndpointSlices reject loopback addresses (127.0.0.0/8), so pods cannot report
127.0.0.N. Instead POD_CIDR is added to the loopback interface once (root, `ip addr add`): every
address in it is then local and bindable, and the EndpointSlice controller accepts it, so the
address a pod reports is the address its process listens on. `ip addr del <POD_CIDR> dev lo`
removes it again.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import threading

POD_CIDR = os.environ.get("KVPILOT_POD_CIDR", "10.213.0.0/24")


class PodNetworkError(RuntimeError):
    pass


def _bindable(address: str) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((address, 0))
        except OSError:
            return False
    return True


def ensure_pod_network(cidr: str = POD_CIDR) -> None:
    network = ipaddress.ip_network(cidr)
    probe = str(network.network_address + 2)
    if _bindable(probe):
        return
    result = subprocess.run(["ip", "addr", "add", cidr, "dev", "lo"], capture_output=True, text=True)
    if not _bindable(probe):
        raise PodNetworkError(
            f"pod addresses in {cidr} are not local and `ip addr add {cidr} dev lo` failed "
            f"({result.stderr.strip() or result.returncode}); run it as root once, or set KVPILOT_POD_CIDR "
            "to a range already routed to lo"
        )


class AddressPool:
    """Hands out the pod addresses of the CIDR (.2 upward), lowest free first."""

    def __init__(self, cidr: str = POD_CIDR) -> None:
        hosts = list(ipaddress.ip_network(cidr).hosts())
        self._free = [str(ip) for ip in hosts[1:]]  # .1 stays unused, like a gateway
        self._taken: set[str] = set()
        self._lock = threading.Lock()

    def take(self) -> str:
        with self._lock:
            for address in self._free:
                if address not in self._taken:
                    self._taken.add(address)
                    return address
        raise PodNetworkError("no free pod address")

    def release(self, address: str) -> None:
        with self._lock:
            self._taken.discard(address)
