"""The test harness, not shipped in the wheel or the image: the namespace testbed (region), the
NVML test double (nvml_double + fake_nvml.c), in-process fakes for the agent's edges (fakes),
and the demo."""
