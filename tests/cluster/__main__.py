"""`make cluster`: a local control plane, the process kubelet and the operator, for people.

    python -m tests.cluster up [--workdir DIR] [--nodes 2] [--gpus 1]   # runs until Ctrl-C
    python -m tests.cluster down [--workdir DIR]                         # stops a killed `up`'s leftovers
    python -m tests.cluster build                                        # only build the binaries

`up` applies the CRD, offers the default model as PVC `default/models` (so
`kubectl apply -f examples/cpu-smollm2.yaml` works as is) and prints the kubeconfig path. A
development aid, not a cluster: pods are local processes, each on its own address in 10.213.0.0/24.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import threading
from pathlib import Path

from tests.cluster.build import BuildError, ensure_binaries
from tests.cluster.controlplane import ControlPlane, stop_recorded
from tests.cluster.harness import OperatorProcess, ProcessKubeletRunner, provide_model_volume
from tests.cluster.kubectl import Kubectl
from tests.cluster.tools import find_kubectl

DEFAULT_WORKDIR = Path.home() / ".cache" / "kvpilot" / "cluster"
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cpu-smollm2.yaml"


def _offer_default_model(kubelet: ProcessKubeletRunner, workdir: Path) -> None:
    import yaml
    from kvpilot.serving.default_model import default_model_path

    uri = yaml.safe_load(EXAMPLE.read_text())["spec"]["model"]["uri"]
    claim, _, file_name = uri.removeprefix("pvc://").partition("/")
    models = workdir / "models"
    models.mkdir(parents=True, exist_ok=True)
    link = models / file_name
    if not link.exists():
        link.symlink_to(default_model_path())
    provide_model_volume(kubelet.api, "default", models, claim=claim)


def up(args: argparse.Namespace) -> int:
    stop_recorded(args.workdir)
    shutil.rmtree(args.workdir, ignore_errors=True)
    plane = ControlPlane(args.workdir)
    plane.start()
    kubelet = ProcessKubeletRunner(plane, nodes=args.nodes, gpus=args.gpus)
    operator = OperatorProcess(plane)
    try:
        kubelet.start()
        kubectl = Kubectl(plane.kubeconfig)
        kubectl.apply("-f", str(Path(__file__).resolve().parents[2] / "crds" / "inferenceservice.yaml"))
        kubectl.run("wait", "--for=condition=Established", "crd/inferenceservices.kvpilot.dev")
        _offer_default_model(kubelet, args.workdir)
        operator.start()
        pids = {
            **plane.pids(),
            "process-kubelet": kubelet.process.pid,
            "kvpilot-operator": operator.process.pid,
        }
        (args.workdir / "pids").write_text(json.dumps(pids, indent=1))
        print(
            f"\nkubeconfig: {plane.kubeconfig}\n"
            f"  export KUBECONFIG={plane.kubeconfig}\n"
            f"  kubectl apply -f examples/{EXAMPLE.name}   # kubectl: {find_kubectl()}\n"
            "  kubectl get isvc,pods -o wide   # then: curl http://<pod IP>:8000/v1/models\n"
            f"logs: {args.workdir / 'logs'}, pods' output: {kubelet.workdir / 'pods'}\n"
            "Ctrl-C stops everything.",
            flush=True,
        )
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(1):
                if kubelet.process.exited() or operator.process.exited():
                    print("the process kubelet or the operator exited; stopping", file=sys.stderr)
                    return 1
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        print("stopping ...", flush=True)
        operator.stop()
        kubelet.stop()
        plane.stop()


def down(args: argparse.Namespace) -> int:
    stopped = stop_recorded(args.workdir)
    print(f"stopped {len(stopped)} process(es)" if stopped else "nothing running")
    return 0


def build(args: argparse.Namespace) -> int:
    print(ensure_binaries())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, func in (("up", up), ("down", down), ("build", build)):
        command = commands.add_parser(name)
        command.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
        command.set_defaults(func=func)
        if name == "up":
            command.add_argument("--nodes", type=int, default=2)
            command.add_argument("--gpus", type=int, default=1, help="nvidia.com/gpu per node")
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
