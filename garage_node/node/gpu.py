"""GPU inventory through NVML (the `pynvml` module of nvidia-ml-py).

read_inventory() never raises: a PC without a usable NVIDIA driver still joins, as a CPU node,
and a GPU that misbehaves is reported unhealthy while the others keep working.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from garage_node.core.wire import GPU

try:
    import pynvml
except ImportError:  # the node still runs (as a CPU node) and says why
    pynvml = None

_MIB = 1024 * 1024
_CPU_NODE = "this node joins as a CPU node"
# Where PCI devices are listed; tests point it at a fake tree.
SYS_PCI_DEVICES = Path("/sys/bus/pci/devices")
_NVIDIA_VENDOR = "0x10de"


@dataclass(frozen=True)
class Inventory:
    gpus: tuple[GPU, ...] = ()
    driver_version: str | None = None
    cuda_version: str | None = None  # e.g. "12.4"
    # Set when NVML could not be used at all (no driver, no GPU): the node joins as a CPU node.
    nvml_error: str | None = None
    # (NVML index, PCI bus id as /proc/driver/nvidia names it, "0000:01:00.0") per GPU whose
    # bus id NVML gave: the engine maps an index to its /dev/nvidiaN through it.
    pci_bus_ids: tuple[tuple[int, str], ...] = ()

    def bus_id(self, index: int) -> str | None:
        return next((b for i, b in self.pci_bus_ids if i == index), None)

    @property
    def healthy_gpus(self) -> tuple[GPU, ...]:
        return tuple(g for g in self.gpus if g.healthy)

    @property
    def vram_mib(self) -> int:
        return sum(g.memory_total_mib for g in self.healthy_gpus)


def read_inventory() -> Inventory:
    """What NVML says about this machine's GPUs; problems end up in the result, never raised."""
    if pynvml is None:
        return Inventory(nvml_error=f"the nvidia-ml-py package (pynvml) is not installed: {_CPU_NODE}")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        return Inventory(nvml_error=_init_error(err))
    try:
        return _read_system()
    except pynvml.NVMLError as err:
        return Inventory(nvml_error=f"NVML failed while listing GPUs ({_describe(err)}): {_CPU_NODE}")
    except Exception as err:  # a pynvml/driver mismatch must not stop the node from joining
        return Inventory(nvml_error=f"reading GPUs through NVML failed unexpectedly ({err!r}): {_CPU_NODE}")
    finally:
        _shutdown()


def _init_error(err: Exception) -> str:
    code = getattr(err, "value", None)
    if code == pynvml.NVML_ERROR_LIBRARY_NOT_FOUND:
        return f"NVIDIA driver not found (libnvidia-ml.so.1 could not be loaded): {_CPU_NODE}"
    if code == pynvml.NVML_ERROR_DRIVER_NOT_LOADED:
        if not nvidia_pci_devices():
            # The library loaded, so the driver is installed; the module has nothing to drive.
            return f"NVIDIA driver installed, no NVIDIA GPU found: {_CPU_NODE}"
        return ("NVIDIA driver is installed but not running (is the nvidia kernel module loaded?): "
                + _CPU_NODE)
    if code == pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH:
        return ("the NVIDIA driver was updated but the old one is still loaded; reboot to use the GPU: "
                + _CPU_NODE)
    if code == pynvml.NVML_ERROR_NO_PERMISSION:
        return f"no permission to open the NVIDIA device files (/dev/nvidia*): {_CPU_NODE}"
    return f"NVML could not start ({_describe(err)}): {_CPU_NODE}"


def nvidia_pci_devices(root: Path | None = None) -> list[str]:
    """PCI addresses of NVIDIA display/3D controllers (class 0x03xxxx) this machine has."""
    root = root or SYS_PCI_DEVICES
    found = []
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return []
    for dev in entries:
        try:
            vendor = (dev / "vendor").read_text().strip().lower()
            klass = (dev / "class").read_text().strip().lower()
        except OSError:
            continue
        if vendor == _NVIDIA_VENDOR and klass.startswith("0x03"):
            found.append(dev.name)
    return found


def _shutdown() -> None:
    # Pairs with the nvmlInit above; a failure here changes nothing for the caller.
    try:
        pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        pass


def _read_system() -> Inventory:
    driver = _optional(lambda: _text(pynvml.nvmlSystemGetDriverVersion()))
    cuda = _optional(lambda: _cuda_version(pynvml.nvmlSystemGetCudaDriverVersion()))
    count = pynvml.nvmlDeviceGetCount()
    if count == 0:
        return Inventory(driver_version=driver, cuda_version=cuda,
                         nvml_error=f"NVIDIA driver {driver} is loaded but sees no GPU: {_CPU_NODE}")
    gpus = tuple(_read_gpu(i) for i in range(count))
    buses = tuple((i, b) for i in range(count) if (b := _bus_id(i)) is not None)
    return Inventory(gpus=gpus, driver_version=driver, cuda_version=cuda, pci_bus_ids=buses)


def _bus_id(index: int) -> str | None:
    # Best effort: a GPU whose bus id NVML will not tell is still inventoried; only the
    # engine's device passthrough needs it (and says so).
    info = _quiet(lambda: pynvml.nvmlDeviceGetPciInfo(pynvml.nvmlDeviceGetHandleByIndex(index)))
    return None if info is None else normalize_bus_id(_text(info.busId))


def normalize_bus_id(text: str) -> str | None:
    """NVML's "00000000:0A:00.0" as the kernel names it, "0000:0a:00.0"; None if malformed."""
    m = re.fullmatch(r"([0-9a-fA-F]{1,8}):([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])", text.strip())
    if m is None:
        return None
    domain, bus, device, function = (int(x, 16) for x in m.groups())
    return f"{domain:04x}:{bus:02x}:{device:02x}.{function:x}"



def _read_gpu(index: int) -> GPU:
    # Any failure on one GPU marks only that GPU unhealthy: the node keeps serving with the rest.
    handle = None
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        return _healthy_gpu(index, handle)
    except pynvml.NVMLError as err:
        return _unhealthy_gpu(index, handle, err)


def _healthy_gpu(index: int, handle) -> GPU:
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
    power_mw = _optional(lambda: pynvml.nvmlDeviceGetPowerUsage(handle))
    limit_mw = _optional(lambda: pynvml.nvmlDeviceGetPowerManagementLimit(handle))
    return GPU(
        index=index,
        name=_text(pynvml.nvmlDeviceGetName(handle)),
        uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
        memory_total_mib=memory.total // _MIB,
        memory_free_mib=memory.free // _MIB,
        compute_capability=f"{major}.{minor}",
        temperature_c=_optional(
            lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)),
        power_w=None if power_mw is None else round(power_mw / 1000, 1),
        utilization_pct=_optional(lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
        power_limit_w=None if limit_mw is None else round(limit_mw / 1000, 1),
    )


def _unhealthy_gpu(index: int, handle, err: Exception) -> GPU:
    # Name and UUID are best effort: they tell a person which card to look at, if NVML still says.
    name = uuid = None
    if handle is not None:
        name = _quiet(lambda: _text(pynvml.nvmlDeviceGetName(handle)))
        uuid = _quiet(lambda: _text(pynvml.nvmlDeviceGetUUID(handle)))
    return GPU(index=index, name=name or f"GPU {index}", uuid=uuid or "", memory_total_mib=0,
               memory_free_mib=0, compute_capability=None, temperature_c=None, power_w=None,
               utilization_pct=None, healthy=False,
               error=f"NVML could not read GPU {index}: {_describe(err)}")


def _not_available_codes() -> set[int]:
    # Cards (GeForce especially) and older drivers lack some readings; that is not a fault.
    names = ("NVML_ERROR_NOT_SUPPORTED", "NVML_ERROR_FUNCTION_NOT_FOUND", "NVML_ERROR_DEPRECATED")
    return {getattr(pynvml, n) for n in names if hasattr(pynvml, n)}


def _optional(read):
    """read(), or None when this card or driver does not offer it; other NVML errors propagate."""
    try:
        return read()
    except pynvml.NVMLError as err:
        if err.value in _not_available_codes():
            return None
        raise


def _quiet(read):
    try:
        return read()
    except pynvml.NVMLError:
        return None


_HINTS = {
    "NVML_ERROR_GPU_IS_LOST": "the GPU stopped responding or fell off the bus; it needs a reboot "
                              "and, if it happens again, a check of its seating, power and heat",
    "NVML_ERROR_RESET_REQUIRED": "the GPU needs a reset or a reboot",
}


def _describe(err: Exception) -> str:
    """'GPU is lost (NVML_ERROR_GPU_IS_LOST): <hint>' — readable, and searchable by its code."""
    code = getattr(err, "value", None)
    name = next((n for n in dir(pynvml) if n.startswith("NVML_ERROR_")
                 and getattr(pynvml, n) == code), f"NVML error {code}")
    hint = _HINTS.get(name)
    return f"{err} ({name})" + (f": {hint}" if hint else "")


def _cuda_version(value: int) -> str:
    # NVML encodes CUDA 12.4 as 12040 (1000 * major + 10 * minor).
    return f"{value // 1000}.{value % 1000 // 10}"


def _text(value) -> str:
    # Some pynvml versions return bytes, newer ones str.
    return value.decode() if isinstance(value, bytes) else value


# ---------------------------------------------------------------- power limits and Xid events

# Xids that an application's own bug causes (a bad kernel, a page fault, a killed context):
# the card is fine, so they are logged, not held against it. Every other critical Xid
# (ECC double-bit 48, fallen off the bus 79, GSP 119/120, ...) quarantines the GPU.
APPLICATION_XIDS = frozenset({13, 31, 43, 45, 63})
XID_NAMES = {48: "double-bit ECC error", 61: "internal micro-controller breakpoint", 62: "internal micro-controller halt",
             64: "ECC page retirement failure", 74: "NVLink error", 79: "GPU has fallen off the bus",
             92: "high single-bit ECC error rate", 94: "contained ECC error", 95: "uncontained ECC error",
             119: "GSP RPC timeout", 120: "GSP error"}


@dataclass(frozen=True)
class PowerLimit:
    """What became of [gpu] power_limit_w on one GPU."""

    index: int
    applied_w: float | None  # the limit set; None when NVML would not
    note: str = ""  # clamped to the card's range, refused, not supported


class NvmlSession:
    """NVML held open for the agent's lifetime, for what a one-off read cannot do: power limits
    (set once, undone when the agent stops) and Xid events (delivered only to an event set
    registered beforehand). NVML counts inits, so read_inventory's own init/shutdown beside it
    stays correct. Nothing here raises: a failure is a note, and the node serves on."""

    def __init__(self) -> None:
        self._open = False
        self._events: Any = None  # the event set (an NVML handle), once registered
        self._handles: dict[int, object] = {}
        self._changed: dict[int, int] = {}  # index -> default limit (mW) to restore at exit
        self.note: str | None = None  # why events or limits are unavailable, for the log

    def _ensure_open(self) -> bool:
        if self._open:
            return True
        if pynvml is None:
            return False
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError:
            return False  # read_inventory says why (CPU node); nothing to limit or watch
        self._open = True
        return True

    def _handle(self, index: int):
        if index not in self._handles:
            self._handles[index] = pynvml.nvmlDeviceGetHandleByIndex(index)
        return self._handles[index]

    def watch(self, indices: list[int]) -> None:
        """Register each GPU for critical Xid events (once; GPUs that cannot are left out)."""
        if not indices or self._events is not None or not self._ensure_open():
            return
        try:
            events = pynvml.nvmlEventSetCreate()
        except pynvml.NVMLError as err:
            self.note = f"Xid events unavailable: {_describe(err)}"
            return
        for index in indices:
            try:
                pynvml.nvmlDeviceRegisterEvents(self._handle(index), pynvml.nvmlEventTypeXidCriticalError, events)
            except pynvml.NVMLError as err:
                # Not supported on this card, or the GPU is already lost: the others are watched.
                self.note = f"Xid events unavailable on GPU {index}: {_describe(err)}"
        self._events = events

    def xids(self) -> list[tuple[int, int]]:
        """(GPU index, Xid) for every event NVML has queued; never waits."""
        if self._events is None:
            return []
        found: list[tuple[int, int]] = []
        by_handle = {ctypes_address(h): i for i, h in self._handles.items()}
        for _ in range(64):  # bounded: a storm of events must not hold the pass
            try:
                data = pynvml.nvmlEventSetWait_v2(self._events, 0)
            except pynvml.NVMLError as err:
                if err.value != pynvml.NVML_ERROR_TIMEOUT:
                    self.note = f"reading Xid events failed: {_describe(err)}"
                break
            if data.eventType & pynvml.nvmlEventTypeXidCriticalError:
                found.append((by_handle.get(ctypes_address(data.device), -1), int(data.eventData)))
        return found

    def set_power_limit(self, index: int, watts: int) -> PowerLimit:
        """Set `watts` on GPU `index`, clamped to the card's range; remembered for restore()."""
        if not self._ensure_open():
            return PowerLimit(index, None, "NVML is not available")
        try:
            handle = self._handle(index)
            low, high = pynvml.nvmlDeviceGetPowerManagementLimitConstraints(handle)
            default = pynvml.nvmlDeviceGetPowerManagementDefaultLimit(handle)
            current = pynvml.nvmlDeviceGetPowerManagementLimit(handle)
            target = min(max(watts * 1000, low), high)
            note = "" if target == watts * 1000 else (
                f"{watts} W is outside this card's {low / 1000:.0f}-{high / 1000:.0f} W: set {target / 1000:.0f} W")
            if current != target:
                pynvml.nvmlDeviceSetPowerManagementLimit(handle, target)
                self._changed.setdefault(index, default)
            return PowerLimit(index, target / 1000, note)
        except pynvml.NVMLError as err:
            code = getattr(err, "value", None)
            if code == pynvml.NVML_ERROR_NO_PERMISSION:
                why = "NVML refused (setting a power limit needs root)"
            elif code in _not_available_codes():
                why = "this card does not allow its power limit to be set"
            else:
                why = f"NVML failed: {_describe(err)}"
            return PowerLimit(index, None, f"power limit not applied on GPU {index}: {why}")

    def restore(self) -> None:
        """Every limit this agent changed back to the card's default (the agent is stopping)."""
        for index, default in list(self._changed.items()):
            try:
                pynvml.nvmlDeviceSetPowerManagementLimit(self._handle(index), default)
            except pynvml.NVMLError:
                pass  # a lost GPU keeps whatever it has; a reboot resets it anyway
            del self._changed[index]

    def close(self) -> None:
        self.restore()
        if not self._open:
            return
        if self._events is not None:
            try:
                pynvml.nvmlEventSetFree(self._events)
            except pynvml.NVMLError:
                pass
            self._events = None
        self._handles.clear()
        self._open = False
        _shutdown()


def ctypes_address(handle) -> int:
    """A device handle's pointer value: events name the device by the same pointer."""
    return ctypes.cast(handle, ctypes.c_void_p).value or 0


def describe_xid(xid: int) -> str:
    name = XID_NAMES.get(xid)
    return f"Xid {xid}" + (f" ({name})" if name else "")
