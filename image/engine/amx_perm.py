"""Ask Linux for permission to use AMX tile state (Intel Sapphire Rapids and later).

Loaded at start of every Python process in the image's venv through `_garage_amx_perm.pth`,
so vLLM's engine-core and worker subprocesses get it too, whether forked or spawned. Without
it, torch's oneDNN bf16 kernels on AMX CPUs can die with SIGILL on the first request, because
Linux (5.16+) requires arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) before AMX use.
Harmless elsewhere: on CPUs or kernels without AMX the call fails and is ignored.
Set GARAGE_NO_AMX_PERM=1 to skip.
"""

import os
import platform

if platform.machine() == "x86_64" and os.environ.get("GARAGE_NO_AMX_PERM") != "1":
    try:
        import ctypes

        _SYS_arch_prctl = 158
        _ARCH_REQ_XCOMP_PERM = 0x1023
        _XFEATURE_XTILEDATA = 18
        ctypes.CDLL(None, use_errno=True).syscall(
            _SYS_arch_prctl, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA
        )
    except Exception:  # never break interpreter start-up
        pass
