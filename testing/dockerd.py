"""A dockerd of its own for a simulated PC: one per engine node, inside that node's network
namespace, so each PC of a testbed publishes its engine's port 8000 on its own overlay address,
as a real PC's Docker does.

Layout of one daemon (a "slot"; at most `MAX_SLOTS` testbeds engines at once on a machine):
- data root (images, layers, containerd's content): `CACHE/<slot>` (default
  /var/lib/garage-testbed-docker/<slot>), kept between runs, so the vLLM CPU image is loaded
  (`docker save | docker load`, ~45 s for the 2.6 GB image here) only the first time, or when
  the root dockerd's image changed (compared by image id);
- exec root, pidfile and API socket: under the testbed's own directory (gone with it);
- its own containerd, started by dockerd itself (managed) with state under the exec root;
- its own mount namespace (a slave of the machine's): a fresh sysfs for the node's network
  namespace (with the machine's cgroup hierarchies put back under it), and a private tmpfs on
  /run/containerd, so this dockerd neither finds nor disturbs the machine's own containerd and
  shim sockets. Container mounts live only in that namespace and vanish with its processes;
- containers under the cgroup parent `/garage-testbed-docker-<slot>`: a container whose
  daemon was killed is still found, by that name, and killed.

A slot is held with an flock on `CACHE/<slot>.lock` for as long as the testbed lives (a dead
holder releases it): two test runs on one machine never share a data root.
The machine's own dockerd is only read from (`docker save`); it is never stopped or changed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import IO, Any

CACHE = Path(os.environ.get("GARAGE_TESTBED_DOCKER_CACHE", "/var/lib/garage-testbed-docker"))
MAX_SLOTS = 8
CGROUP_ROOT = Path("/sys/fs/cgroup")


class DockerdError(RuntimeError):
    pass


def cgroup_name(slot: int) -> str:
    return f"garage-testbed-docker-{slot}"


def cgroup_dirs(slot: int) -> list[Path]:
    """Every cgroup directory of a slot's containers (v1: one per hierarchy; v2: one tree)."""
    name = cgroup_name(slot)
    dirs = []
    for top in [CGROUP_ROOT, *CGROUP_ROOT.glob("*")]:
        d = top / name
        if d.is_dir():
            dirs.extend(sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)))
            dirs.append(d)
    return dirs


def kill_slot_containers(slot: int) -> int:
    """SIGKILL every process left in a slot's container cgroups (a daemon killed before it
    could stop its containers leaves them running) and remove the empty cgroups. Returns how
    many processes were killed."""
    killed = 0
    for _ in range(50):
        pids = set()
        for d in cgroup_dirs(slot):
            try:
                pids.update(int(p) for p in (d / "cgroup.procs").read_text().split())
            except OSError:
                pass
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    for d in cgroup_dirs(slot):
        try:
            d.rmdir()
        except OSError:
            pass
    return killed


def weigh_slot(slot: int, tasks: int) -> None:
    """Give the slot's cgroup parent the CPU weight of `tasks` busy tasks. The testbed's own
    processes (head, hubs, agents, Ray, loads) sit in the root cgroup, where each thread weighs
    as much as a whole child cgroup: a starting engine, one cgroup, got 8 s of CPU in 8 minutes
    against them, where a real PC's engine has a machine of its own. Created before dockerd
    starts, so runc puts the containers under it; removed by name like the rest of the slot."""
    name = cgroup_name(slot)
    v1 = CGROUP_ROOT / "cpu"
    if (v1 / "cpu.shares").exists():
        d, file, value = v1 / name, "cpu.shares", 1024 * tasks
    elif (CGROUP_ROOT / "cgroup.controllers").exists():  # v2: cpu.weight exists once cpu is on for the root's children
        d, file, value = CGROUP_ROOT / name, "cpu.weight", min(100 * tasks, 10_000)
    else:
        return
    d.mkdir(exist_ok=True)
    if (d / file).exists():
        (d / file).write_text(f"{value}\n")


class SlotLock:
    """The first free slot, held by an flock until release() (or until this process dies)."""

    def __init__(self) -> None:
        CACHE.mkdir(parents=True, exist_ok=True)
        self.slot = -1
        self._file: IO[str] | None = None
        for slot in range(MAX_SLOTS):
            f = (CACHE / f"{slot}.lock").open("a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                continue
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
            self.slot, self._file = slot, f
            return
        raise DockerdError(f"all {MAX_SLOTS} testbed dockerd slots under {CACHE} are in use")

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None


class NamespacedDockerd:
    """A dockerd in network namespace `netns` (a name under /run/netns), its files in
    `run_dir` (exec root, socket, log) and its data in the slot's persistent data root."""

    def __init__(self, netns: str, run_dir: Path, cpu_tasks: int | None = None) -> None:
        """`cpu_tasks`: weigh the slot's containers, together, as this many busy tasks against
        the machine's other processes (None: the kernel's default, one task's worth)."""
        self.netns = netns
        self.cpu_tasks = cpu_tasks
        self.run_dir = run_dir
        self.lock = SlotLock()
        self.slot = self.lock.slot
        self.data_root = CACHE / str(self.slot)
        self.socket = run_dir / "docker.sock"
        self.pidfile = run_dir / "docker.pid"
        self.log = run_dir / "dockerd.log"
        self.proc: subprocess.Popen | None = None
        self.timings: dict[str, float] = {}  # "start_s", "load_s" (only when it loaded)

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    # -- lifecycle

    def start(self, timeout: float = 60) -> float:
        """Start the daemon and wait until it answers; returns the seconds it took."""
        kill_slot_containers(self.slot)  # what a killed run left in this slot
        if self.cpu_tasks is not None:
            weigh_slot(self.slot, self.cpu_tasks)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.data_root.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "cgroup").mkdir(exist_ok=True)
        config = self.run_dir / "daemon.json"
        config.write_text("{}\n")  # never the machine's /etc/docker/daemon.json
        d = self.run_dir
        script = (
            # nsenter joins only the network namespace: mount a sysfs of that namespace (what
            # `ip netns exec` does), keeping the machine's cgroup hierarchies under it.
            f'mount --rbind /sys/fs/cgroup "{d}/cgroup" && mount -t sysfs garage-sysfs /sys && '
            f'mount --move "{d}/cgroup" /sys/fs/cgroup && '
            # Hide the machine's containerd socket: dockerd starts a containerd of its own.
            'mkdir -p /run/containerd && mount -t tmpfs -o mode=0711 garage-containerd /run/containerd && '
            'exec "$@"'
        )
        argv = [
            "nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--mount", "--propagation", "slave",
            "sh", "-c", script, "sh",
            "dockerd", "--config-file", str(config), "--data-root", str(self.data_root),
            "--exec-root", str(d / "x"), "--pidfile", str(self.pidfile), "--host", self.host,
            "--cgroup-parent", f"/{cgroup_name(self.slot)}", "--storage-driver", "overlay2",
        ]
        t0 = time.monotonic()
        with self.log.open("ab") as log:
            # nsenter, unshare and sh each exec the next: this PID is dockerd's.
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = t0 + timeout
        while self.docker("version", check=False).returncode != 0:
            if self.proc.poll() is not None:
                raise DockerdError(f"dockerd in {self.netns} exited ({self.proc.returncode}):\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise DockerdError(f"dockerd in {self.netns} did not answer within {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.1)
        self.timings["start_s"] = time.monotonic() - t0
        # A container a killed run left in this data root: gone before the agent looks.
        self.remove_containers()
        return self.timings["start_s"]

    def stop(self, timeout: float = 30) -> None:
        """Remove every container, stop the daemon by its PID (SIGTERM, then SIGKILL), kill
        whatever is left in the slot's cgroups, release the slot. Safe to call twice."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.remove_containers()
            except (DockerdError, subprocess.TimeoutExpired):
                pass
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        kill_slot_containers(self.slot)
        self.lock.release()

    # -- use

    def docker(self, *args: str, check: bool = True, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess:
        """The docker CLI against this daemon (from this machine's namespace: only the socket
        is needed)."""
        res = subprocess.run(["docker", "--host", self.host, *args], capture_output=True, text=True,
                             timeout=timeout, **kw)
        if check and res.returncode != 0:
            raise DockerdError(f"docker {' '.join(args)} (daemon in {self.netns}) failed: {res.stderr.strip()}")
        return res

    def remove_containers(self) -> None:
        ids = self.docker("ps", "-aq", timeout=30).stdout.split()
        if ids:
            self.docker("rm", "-f", *ids, check=False, timeout=120)

    def ensure_image(self, ref: str) -> float | None:
        """Make `ref` present with the same id as in the machine's dockerd, loading it from there
        when it is missing or differs; returns the seconds a load took, None when none was needed."""
        want = subprocess.run(["docker", "image", "inspect", "-f", "{{.Id}}", ref], capture_output=True, text=True)
        if want.returncode != 0:
            raise DockerdError(f"image {ref} is not in the machine's dockerd (image/engine/build-vllm-cpu-image.sh)")
        have = self.docker("image", "inspect", "-f", "{{.Id}}", ref, check=False)
        if have.returncode == 0 and have.stdout.strip() == want.stdout.strip():
            return None
        t0 = time.monotonic()
        save = subprocess.Popen(["docker", "save", ref], stdout=subprocess.PIPE)
        try:
            load = subprocess.run(["docker", "--host", self.host, "load", "-q"], stdin=save.stdout,
                                  capture_output=True, text=True, timeout=1200)
        finally:
            assert save.stdout is not None
            save.stdout.close()
            save_rc = save.wait()
        if save_rc != 0 or load.returncode != 0:
            raise DockerdError(f"loading {ref} into the dockerd in {self.netns} failed: {load.stderr.strip()}")
        # An older build of the same tag, now untagged: its layers would only fill the disk.
        self.docker("image", "prune", "-f", check=False)
        self.timings["load_s"] = time.monotonic() - t0
        return self.timings["load_s"]

    def container_memory(self, name: str) -> dict[str, int]:
        """A container's memory from its cgroup (bytes): rss (anonymous memory of all its
        processes, counted once), cache (page cache, e.g. the image's files read), and
        rss_sum, the plain sum of its processes' VmRSS (shared pages counted in each)."""
        info = json.loads(self.docker("inspect", name).stdout)[0]
        cid, pid = info["Id"], info["State"]["Pid"]
        out: dict[str, int] = {}
        stat = CGROUP_ROOT / "memory" / cgroup_name(self.slot) / cid / "memory.stat"
        if stat.exists():  # cgroup v1
            values = dict(line.split() for line in stat.read_text().splitlines())
            out["rss"], out["cache"] = int(values["total_rss"]), int(values["total_cache"])
        else:  # v2
            values = dict(line.split() for line in (CGROUP_ROOT / cgroup_name(self.slot) / cid / "memory.stat").read_text().splitlines())
            out["rss"], out["cache"] = int(values["anon"]), int(values["file"])
        procs = self._cgroup_pids(cid) or ([pid] if pid else [])
        total = 0
        for p in procs:
            try:
                for line in Path(f"/proc/{p}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except OSError:
                pass
        out["rss_sum"] = total
        return out

    def _cgroup_pids(self, cid: str) -> list[int]:
        for d in (CGROUP_ROOT / "pids" / cgroup_name(self.slot) / cid, CGROUP_ROOT / cgroup_name(self.slot) / cid):
            try:
                return [int(p) for p in (d / "cgroup.procs").read_text().split()]
            except OSError:
                continue
        return []

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def reap_free_slots() -> list[int]:
    """Kill the containers of every slot no live testbed holds (its maker was killed together
    with its namespaces, and its engines kept running). Returns the slots that had some."""
    reaped = []
    if not CACHE.is_dir():
        return reaped
    for slot in range(MAX_SLOTS):
        if not cgroup_dirs(slot):
            continue
        with (CACHE / f"{slot}.lock").open("a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # held: a live testbed's
            if kill_slot_containers(slot):
                reaped.append(slot)
    return reaped


# -- what an engine PC of the testbed serves: the vLLM CPU image and a tiny dummy-weight Llama

ROOT = Path(__file__).resolve().parents[1]
TEST_IMAGE = os.environ.get("GARAGE_ENGINE_TEST_IMAGE", "garage-node/vllm-cpu:test")
TINY_MODEL = "garage/tiny-llama-test"


def tiny_model_dir(image: str = TEST_IMAGE) -> Path:
    """The tiny model's directory (config and tokenizer; weights are dummy), made once per
    image build with image/engine/make-tiny-model.sh and kept in CACHE, shared read-only by
    every engine PC and every run."""
    image_id = subprocess.run(["docker", "image", "inspect", "-f", "{{.Id}}", image], capture_output=True,
                              text=True, check=True).stdout.strip().split(":")[-1][:12]
    out = CACHE / f"tiny-model-{image_id}"
    if not (out / "config.json").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = CACHE / f".tiny-model-{image_id}-{os.getpid()}"
        subprocess.run([str(ROOT / "image/engine/make-tiny-model.sh"), str(tmp), image], check=True,
                       capture_output=True, timeout=600)
        try:
            tmp.rename(out)
        except OSError:  # another run made it first
            subprocess.run(["rm", "-rf", str(tmp)], check=False)
    return out


def engine_toml(model_dir: Path, cpus: str | None = None, **over: str) -> str:
    """An [engine] section body for the CPU image and the tiny model, as tests/integration/
    test_engine.py uses; vLLM kept small (1 GiB KV cache, 2048 tokens, eager, dummy weights).
    `over` replaces or adds keys (values are TOML: max_model_len="1024", image='"other:tag"').

    `cpus` ("0", "1"): the host CPUs the engine's compute threads are bound to. Several engine
    PCs on one machine must each get their own: left to vLLM's automatic binding they all bind
    to the same CPU, and one engine starves the other (measured: 3 tokens/s against 660 for its
    neighbour, for as long as both were busy) — which real PCs, each with its own CPU and GPU,
    never see."""
    if cpus and not set(map(int, cpus.split(","))) <= os.sched_getaffinity(0):
        cpus = None  # a machine without that CPU: vLLM would refuse the binding; let it choose
    env = 'VLLM_CPU_KVCACHE_SPACE = "1"' + (f", VLLM_CPU_OMP_THREADS_BIND = {json.dumps(cpus)}" if cpus else "")
    values = {
        "enabled": "true",
        "device": '"cpu"',
        "image": json.dumps(TEST_IMAGE),
        "model": json.dumps(TINY_MODEL),
        "model_dir": json.dumps(str(model_dir)),
        "max_model_len": "2048",
        "shm_size_mib": "1024",
        "extra_args": '["--load-format", "dummy", "--enforce-eager"]',
        "env": f"{{ {env} }}",
        "drain_grace_s": "60",
        "stop_timeout_s": "20",
        "startup_timeout_s": "300",
        **over,
    }
    return "".join(f"{k} = {v}\n" for k, v in values.items())


# -- tiny models with real (trained) weights, for the audits (issue #20)

AUDIT_VARIANTS = ("honest", "other", "q3", "q4", "q8", "layer")


def audit_model_dirs(image: str = TEST_IMAGE) -> dict[str, Path]:
    """The trained tiny models of image/engine/make_audit_models.py, one directory per variant
    (honest; other: another model under the same name; q3/q4/q8: honest rounded to 3/4/8 bits;
    layer: one layer scaled by 1.1). Made once per image build and version of the script (about
    a minute on 2 cores) and kept in CACHE, shared read-only by every engine and run."""
    image_id = subprocess.run(["docker", "image", "inspect", "-f", "{{.Id}}", image], capture_output=True,
                              text=True, check=True).stdout.strip().split(":")[-1][:12]
    src = ROOT / "image/engine"
    digest = hashlib.sha256(b"".join((src / f).read_bytes() for f in ("make_audit_models.py", "make_tiny_model.py")))
    out = CACHE / f"audit-models-{image_id}-{digest.hexdigest()[:8]}"
    if not all((out / v / "model.safetensors").exists() for v in AUDIT_VARIANTS):
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = CACHE / f".audit-models-{image_id}-{os.getpid()}"
        tmp.mkdir()
        try:
            subprocess.run(["docker", "run", "--rm", "--pull", "never", "--network", "none", "--entrypoint",
                            "/opt/venv/bin/python", "-v", f"{src}:/src:ro", "-v", f"{tmp}:/out", image,
                            "/src/make_audit_models.py", "/out"], check=True, capture_output=True, timeout=900)
            tmp.rename(out)
        except OSError:  # another run made it first
            pass
        finally:
            subprocess.run(["rm", "-rf", str(tmp)], check=False)
    return {v: out / v for v in AUDIT_VARIANTS}


# Any request with logprobs or prompt_logprobs (what a verifier asks) runs vLLM's
# @torch.compile'd batched_count_greater_than, and the CPU image has no C++ compiler for
# inductor: the engine dies (EngineDeadError) and answers 500 from then on. Without dynamo it
# runs eagerly. (--enforce-eager does not cover it: it is outside the model.)
NO_COMPILE = {"TORCHDYNAMO_DISABLE": "1"}


def audit_engine_toml(model_dir: Path, cpus: str | None = None, **over: str) -> str:
    """engine_toml for a trained model: its real weights loaded (no --load-format dummy), and
    logprobs that do not kill the engine (NO_COMPILE)."""
    env = 'VLLM_CPU_KVCACHE_SPACE = "1", TORCHDYNAMO_DISABLE = "1"'
    if cpus and set(map(int, cpus.split(","))) <= os.sched_getaffinity(0):
        env += f", VLLM_CPU_OMP_THREADS_BIND = {json.dumps(cpus)}"
    return engine_toml(model_dir, cpus, **{"extra_args": '["--enforce-eager"]', "env": f"{{ {env} }}", **over})


class EngineContainer:
    """A vLLM CPU engine in the machine's own dockerd, published on 127.0.0.1:`port` only, its
    compute threads bound to `cpus`: for benches that need engines but no region around them."""

    def __init__(self, name: str, model_dir: Path, port: int, cpus: str, image: str = TEST_IMAGE,
                 model: str = TINY_MODEL, api_key: str = "") -> None:
        self.name, self.model_dir, self.port, self.cpus = name, model_dir, port, cpus
        self.image, self.model, self.api_key = image, model, api_key

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        subprocess.run(["docker", "rm", "-f", self.name], capture_output=True, check=False)
        env = ["-e", "VLLM_CPU_KVCACHE_SPACE=1", "-e", f"VLLM_CPU_OMP_THREADS_BIND={self.cpus}",
               "-e", f"TORCHDYNAMO_DISABLE={NO_COMPILE['TORCHDYNAMO_DISABLE']}"]
        if self.api_key:
            env += ["-e", f"VLLM_API_KEY={self.api_key}"]
        subprocess.run(["docker", "run", "-d", "--pull", "never", "--name", self.name, "--shm-size", "1g",
                        "-p", f"127.0.0.1:{self.port}:8000", "-v", f"{self.model_dir}:/models/served:ro", *env,
                        self.image, "--model", "/models/served", "--served-model-name", self.model,
                        "--max-model-len", "2048", "--enforce-eager", "--host", "0.0.0.0", "--port", "8000"],
                       check=True, capture_output=True, timeout=120)

    def wait_ready(self, timeout: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            state = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", self.name],
                                   capture_output=True, text=True).stdout.strip()
            if state == "false":
                break
            time.sleep(1)
        logs = subprocess.run(["docker", "logs", "--tail", "30", self.name], capture_output=True, text=True)
        raise DockerdError(f"engine {self.name} not ready within {timeout:.0f} s:\n{logs.stdout}{logs.stderr}")

    def cpu_usec(self) -> int:
        """CPU time the container used so far (its cgroup's cpuacct/cpu.stat), in microseconds."""
        cid = subprocess.run(["docker", "inspect", "-f", "{{.Id}}", self.name], capture_output=True, text=True,
                             check=True).stdout.strip()
        return container_cpu_usec(cid)

    def stop(self) -> None:
        subprocess.run(["docker", "rm", "-f", self.name], capture_output=True, check=False, timeout=120)


def container_cpu_usec(cid: str, parent: str = "docker") -> int:
    """A container's CPU time in microseconds from its cgroup: v2 cpu.stat usage_usec, or v1
    cpuacct.usage (nanoseconds). `parent`: the cgroup parent (docker's default, or a testbed
    slot's cgroup_name())."""
    for d in (CGROUP_ROOT / parent / cid, CGROUP_ROOT / "system.slice" / f"docker-{cid}.scope"):
        stat = d / "cpu.stat"
        if stat.exists():
            values = dict(line.split() for line in stat.read_text().splitlines())
            if "usage_usec" in values:
                return int(values["usage_usec"])
    for d in (CGROUP_ROOT / "cpuacct" / parent / cid, CGROUP_ROOT / "cpu,cpuacct" / parent / cid):
        if (d / "cpuacct.usage").exists():
            return int((d / "cpuacct.usage").read_text()) // 1000
    raise DockerdError(f"no CPU accounting found for container {cid[:12]} under {CGROUP_ROOT}")
