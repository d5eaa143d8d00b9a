/*
 * A fake libnvidia-ml.so.1 for tests on machines without an NVIDIA GPU.
 *
 * The real pynvml bindings load it through ctypes (CDLL("libnvidia-ml.so.1")) when its
 * directory is on LD_LIBRARY_PATH, so the code under test runs unchanged.  Only the
 * symbols that garage_node.gpu calls exist, under the names pynvml looks up
 * (nvmlInitWithFlags, nvmlDeviceGetCount_v2, nvmlDeviceGetHandleByIndex_v2, ...).
 *
 * GPUs come from the text file named by GARAGE_FAKE_NVML_CONFIG, read at init time.
 * One GPU per line, '|'-separated; blank lines and lines starting with '#' are skipped:
 *
 *   name|uuid|total_mib|free_mib|cc_major|cc_minor|temp_c|power_mw|util_pct|fail[|bus_id]
 *
 * bus_id (optional) is the PCI address NVML reports, e.g. "00000000:01:00.0"; without it
 * GPU i sits on bus i+1.  A line "driver|<version>|<cuda>" (e.g. driver|535.261.03|12020)
 * sets what nvmlSystemGetDriverVersion / nvmlSystemGetCudaDriverVersion answer; the
 * default is driver 550.54.14 with CUDA 12.4 (12040).
 *
 * temp_c, power_mw or util_pct given as "-" answer NVML_ERROR_NOT_SUPPORTED (as on
 * some cards); fail=1 makes every query on that GPU answer NVML_ERROR_GPU_IS_LOST (fallen
 * off the bus), any other nonzero fail that NVML error code (e.g. 999, NVML_ERROR_UNKNOWN).
 *
 * After the fixed fields come optional key=value fields:
 *   plimit=<min_mw>:<max_mw>:<default_mw>  power limits (without it: NOT_SUPPORTED, as on
 *       cards that do not allow them). The limit set is kept, as a driver keeps it, in
 *       "<config>.limits" (one "index|mw" line per GPU), so it outlives the process that set
 *       it and a test can read it after the agent exits.
 *   xid=<n>  a critical Xid event on this GPU, delivered once to an event set that waits
 *       (nvmlEventSetWait_v2) each time the value in the file changes to a nonzero one.
 *
 * The file is read again whenever it changes (checked on every call), so a test changes a
 * temperature, a fault or an Xid of a running agent by writing the file anew (write a
 * temporary file and rename it over, so no reader sees half a file).
 * Variable unset or file missing: nvmlInit answers NVML_ERROR_DRIVER_NOT_LOADED, what
 * the real library says when it is installed but the kernel module is not loaded.
 * An empty file is a driver with zero GPUs.
 *
 * Build: gcc -shared -fPIC -o libnvidia-ml.so.1 fake_nvml.c
 */
#define _DEFAULT_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

typedef int nvmlReturn_t;
enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NO_PERMISSION = 4,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_TIMEOUT = 10,
    NVML_ERROR_DRIVER_NOT_LOADED = 9,
    NVML_ERROR_GPU_IS_LOST = 15,
    NVML_ERROR_UNKNOWN = 999,
};

#define MAX_GPUS 16
#define UNSUPPORTED (-1L) /* a reading given as "-" */

typedef struct {
    char name[96];
    char uuid[96];
    unsigned long long total_mib, free_mib;
    int cc_major, cc_minor;
    long temp_c, power_mw, util_pct;
    int fail;
    char bus_id[32];
    long plimit_min, plimit_max, plimit_default; /* mW; -1: not supported */
    long xid; /* the xid= field as last read */
} fake_gpu;

/* What the "driver" holds per GPU index, kept across re-reads of the config. */
static long limit_mw[16];     /* -1: the default */
static long pending_xid[16];  /* an Xid not yet delivered, 0: none */
static long last_xid[16];     /* the xid= value last seen in the file */
static int registered[16];    /* registered with the event set */

/* The opaque nvmlDevice_t handed to callers is a pointer into this array. */
static fake_gpu gpus[MAX_GPUS];
static unsigned gpu_count;
static int init_count; /* like the real library: init and shutdown are reference counted */
static char driver_version[80] = "550.54.14";
static int driver_cuda = 12040; /* CUDA 12.4, what driver 550.54 ships */

typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned int gpu, memory; } nvmlUtilization_t;

static long reading(const char *field)
{
    return strcmp(field, "-") == 0 ? UNSUPPORTED : strtol(field, NULL, 10);
}

/* Parse one config line into g; 0 on success. */
static int parse_line(char *line, fake_gpu *g)
{
    char *f[16];
    int n = 0, i;
    char *field;
    while (n < 16 && (field = strsep(&line, "|")) != NULL)
        f[n++] = field;
    if (n < 10 || line != NULL)
        return -1;
    /* Optional fields: a bus id (no '='), then key=value pairs. */
    int fixed = (n >= 11 && strchr(f[10], '=') == NULL) ? 11 : 10;
    memset(g, 0, sizeof *g);
    snprintf(g->name, sizeof g->name, "%s", f[0]);
    snprintf(g->uuid, sizeof g->uuid, "%s", f[1]);
    g->total_mib = strtoull(f[2], NULL, 10);
    g->free_mib = strtoull(f[3], NULL, 10);
    g->cc_major = atoi(f[4]);
    g->cc_minor = atoi(f[5]);
    g->temp_c = reading(f[6]);
    g->power_mw = reading(f[7]);
    g->util_pct = reading(f[8]);
    g->fail = atoi(f[9]);
    if (fixed == 11)
        snprintf(g->bus_id, sizeof g->bus_id, "%s", f[10]);
    else
        snprintf(g->bus_id, sizeof g->bus_id, "00000000:%02X:00.0", gpu_count + 1);
    g->plimit_min = g->plimit_max = g->plimit_default = -1;
    for (i = fixed; i < n; i++) {
        if (strncmp(f[i], "plimit=", 7) == 0) {
            if (sscanf(f[i] + 7, "%ld:%ld:%ld", &g->plimit_min, &g->plimit_max, &g->plimit_default) != 3)
                return -1;
        } else if (strncmp(f[i], "xid=", 4) == 0) {
            g->xid = strtol(f[i] + 4, NULL, 10);
        } else {
            return -1;
        }
    }
    return 0;
}

/* "driver|<version>|<cuda>": 0 when the line is one (and was applied), -1 otherwise. */
static int parse_driver(char *line)
{
    char *f[3];
    int n = 0;
    char *field;
    if (strncmp(line, "driver|", 7) != 0)
        return -1;
    while (n < 3 && (field = strsep(&line, "|")) != NULL)
        f[n++] = field;
    if (n != 3 || line != NULL)
        return -1;
    snprintf(driver_version, sizeof driver_version, "%s", f[1]);
    driver_cuda = atoi(f[2]);
    return 0;
}

static void read_limits(const char *config)
{
    char path[4096], line[128];
    unsigned i;
    long idx, mw;
    for (i = 0; i < MAX_GPUS; i++)
        limit_mw[i] = -1;
    snprintf(path, sizeof path, "%s.limits", config);
    FILE *fp = fopen(path, "r");
    if (!fp)
        return;
    while (fgets(line, sizeof line, fp))
        if (sscanf(line, "%ld|%ld", &idx, &mw) == 2 && idx >= 0 && idx < MAX_GPUS)
            limit_mw[idx] = mw;
    fclose(fp);
}

static void write_limits(void)
{
    const char *config = getenv("GARAGE_FAKE_NVML_CONFIG");
    char path[4096], tmp[4200];
    unsigned i;
    if (!config)
        return;
    snprintf(path, sizeof path, "%s.limits", config);
    snprintf(tmp, sizeof tmp, "%s.%d", path, (int)getpid());
    FILE *fp = fopen(tmp, "w");
    if (!fp)
        return;
    for (i = 0; i < gpu_count; i++)
        if (limit_mw[i] >= 0)
            fprintf(fp, "%u|%ld\n", i, limit_mw[i]);
    fclose(fp);
    rename(tmp, path);
}

static struct stat loaded; /* the config file as last read: re-read when it changes */

static nvmlReturn_t load_config(void)
{
    const char *path = getenv("GARAGE_FAKE_NVML_CONFIG");
    FILE *fp = path ? fopen(path, "r") : NULL;
    char line[512];
    if (!fp)
        return NVML_ERROR_DRIVER_NOT_LOADED;
    fstat(fileno(fp), &loaded);
    read_limits(path);
    gpu_count = 0;
    while (fgets(line, sizeof line, fp)) {
        line[strcspn(line, "\r\n")] = '\0';
        if (line[0] == '\0' || line[0] == '#')
            continue;
        if (strncmp(line, "driver|", 7) == 0) {
            if (parse_driver(line) != 0) {
                fprintf(stderr, "fake_nvml: bad driver line in %s\n", path);
                fclose(fp);
                return NVML_ERROR_UNKNOWN;
            }
            continue;
        }
        /* A bad line is a bug in the test, so say so instead of guessing. */
        if (gpu_count == MAX_GPUS || parse_line(line, &gpus[gpu_count]) != 0) {
            fprintf(stderr, "fake_nvml: bad line in %s: %s\n", path, line);
            fclose(fp);
            return NVML_ERROR_UNKNOWN;
        }
        /* A new nonzero xid= value is an event that happened now. */
        if (gpus[gpu_count].xid != last_xid[gpu_count] && gpus[gpu_count].xid != 0)
            pending_xid[gpu_count] = gpus[gpu_count].xid;
        last_xid[gpu_count] = gpus[gpu_count].xid;
        gpu_count++;
    }
    fclose(fp);
    return NVML_SUCCESS;
}

/* Called by every query: a test that rewrote the file is seen at once. */
static void maybe_reload(void)
{
    const char *path = getenv("GARAGE_FAKE_NVML_CONFIG");
    struct stat now;
    if (!init_count || !path || stat(path, &now) != 0)
        return;
    if (now.st_ino != loaded.st_ino || now.st_size != loaded.st_size
        || now.st_mtim.tv_sec != loaded.st_mtim.tv_sec || now.st_mtim.tv_nsec != loaded.st_mtim.tv_nsec)
        load_config();
}

nvmlReturn_t nvmlInitWithFlags(unsigned int flags)
{
    (void)flags;
    nvmlReturn_t ret = load_config();
    if (ret == NVML_SUCCESS)
        init_count++;
    return ret;
}

nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
nvmlReturn_t nvmlInit(void) { return nvmlInitWithFlags(0); }

nvmlReturn_t nvmlShutdown(void)
{
    if (init_count == 0)
        return NVML_ERROR_UNINITIALIZED;
    init_count--;
    return NVML_SUCCESS;
}

const char *nvmlErrorString(nvmlReturn_t result)
{
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
    case NVML_ERROR_TIMEOUT: return "Timeout";
    default: return "Unknown Error";
    }
}

static nvmlReturn_t copy_text(const char *src, char *buf, unsigned int len)
{
    if (!init_count)
        return NVML_ERROR_UNINITIALIZED;
    if (!buf)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(src) + 1 > len)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(buf, src, strlen(src) + 1);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length)
{
    return copy_text(driver_version, version, length);
}

static nvmlReturn_t cuda_version(int *v)
{
    if (!init_count)
        return NVML_ERROR_UNINITIALIZED;
    if (!v)
        return NVML_ERROR_INVALID_ARGUMENT;
    *v = driver_cuda;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *v) { return cuda_version(v); }
nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *v) { return cuda_version(v); }

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count)
{
    if (!init_count)
        return NVML_ERROR_UNINITIALIZED;
    maybe_reload();
    if (!count)
        return NVML_ERROR_INVALID_ARGUMENT;
    *count = gpu_count;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, fake_gpu **device)
{
    if (!init_count)
        return NVML_ERROR_UNINITIALIZED;
    if (!device || index >= gpu_count)
        return NVML_ERROR_INVALID_ARGUMENT;
    *device = &gpus[index];
    return NVML_SUCCESS;
}

/* Common checks of every per-device query: initialised, a handle we gave out, not lost. */
static nvmlReturn_t check(const fake_gpu *g, const void *out)
{
    if (!init_count)
        return NVML_ERROR_UNINITIALIZED;
    if (!out || g < gpus || g >= gpus + gpu_count)
        return NVML_ERROR_INVALID_ARGUMENT;
    maybe_reload();
    if (g->fail == 1)
        return NVML_ERROR_GPU_IS_LOST;
    return g->fail ? g->fail : NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetName(fake_gpu *g, char *name, unsigned int length)
{
    nvmlReturn_t ret = check(g, name);
    return ret ? ret : copy_text(g->name, name, length);
}

nvmlReturn_t nvmlDeviceGetUUID(fake_gpu *g, char *uuid, unsigned int length)
{
    nvmlReturn_t ret = check(g, uuid);
    return ret ? ret : copy_text(g->uuid, uuid, length);
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(fake_gpu *g, nvmlMemory_t *mem)
{
    nvmlReturn_t ret = check(g, mem);
    if (ret)
        return ret;
    mem->total = g->total_mib << 20;
    mem->free = g->free_mib << 20;
    mem->used = mem->total - mem->free;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCudaComputeCapability(fake_gpu *g, int *major, int *minor)
{
    nvmlReturn_t ret = check(g, minor);
    if (ret || !major)
        return ret ? ret : NVML_ERROR_INVALID_ARGUMENT;
    *major = g->cc_major;
    *minor = g->cc_minor;
    return NVML_SUCCESS;
}

/* A reading of "-" in the config stands for a card that does not report it. */
static nvmlReturn_t reading_of(const fake_gpu *g, const void *out, const long *field, long *value)
{
    nvmlReturn_t ret = check(g, out);
    if (ret)
        return ret;
    *value = *field; /* field points into g, safe only once check() accepted g */
    return *value == UNSUPPORTED ? NVML_ERROR_NOT_SUPPORTED : NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetTemperature(fake_gpu *g, int sensor, unsigned int *temp)
{
    long v;
    nvmlReturn_t ret = reading_of(g, temp, g ? &g->temp_c : NULL, &v);
    if (!ret && sensor != 0) /* NVML_TEMPERATURE_GPU is the only sensor */
        ret = NVML_ERROR_INVALID_ARGUMENT;
    if (!ret)
        *temp = (unsigned int)v;
    return ret;
}

nvmlReturn_t nvmlDeviceGetPowerUsage(fake_gpu *g, unsigned int *milliwatts)
{
    long v;
    nvmlReturn_t ret = reading_of(g, milliwatts, g ? &g->power_mw : NULL, &v);
    if (!ret)
        *milliwatts = (unsigned int)v;
    return ret;
}

nvmlReturn_t nvmlDeviceGetUtilizationRates(fake_gpu *g, nvmlUtilization_t *util)
{
    long v;
    nvmlReturn_t ret = reading_of(g, util, g ? &g->util_pct : NULL, &v);
    if (!ret) {
        util->gpu = (unsigned int)v;
        util->memory = 0;
    }
    return ret;
}

/* nvmlPciInfo_t as NVML 9.0+ lays it out (pynvml's nvmlPciInfo_t). */
typedef struct {
    char busIdLegacy[16];
    unsigned int domain, bus, device, pciDeviceId, pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;

nvmlReturn_t nvmlDeviceGetPciInfo_v3(fake_gpu *g, nvmlPciInfo_t *pci)
{
    unsigned int domain = 0, bus = 0, device = 0, function = 0;
    nvmlReturn_t ret = check(g, pci);
    if (ret)
        return ret;
    memset(pci, 0, sizeof *pci);
    sscanf(g->bus_id, "%x:%x:%x.%x", &domain, &bus, &device, &function);
    pci->domain = domain;
    pci->bus = bus;
    pci->device = device;
    pci->pciDeviceId = 0x268410DE; /* an NVIDIA device id; nothing reads it */
    snprintf(pci->busId, sizeof pci->busId, "%s", g->bus_id);
    snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "%.15s", g->bus_id);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetPciInfo_v2(fake_gpu *g, nvmlPciInfo_t *pci) { return nvmlDeviceGetPciInfo_v3(g, pci); }

/* ---- power limits (mW) ---- */

static nvmlReturn_t limits_of(fake_gpu *g, const void *out)
{
    nvmlReturn_t ret = check(g, out);
    if (ret)
        return ret;
    return g->plimit_default < 0 ? NVML_ERROR_NOT_SUPPORTED : NVML_SUCCESS;
}

static long current_limit(fake_gpu *g)
{
    long mw = limit_mw[g - gpus];
    return mw >= 0 ? mw : g->plimit_default;
}

nvmlReturn_t nvmlDeviceGetPowerManagementLimit(fake_gpu *g, unsigned int *limit)
{
    nvmlReturn_t ret = limits_of(g, limit);
    if (!ret)
        *limit = (unsigned int)current_limit(g);
    return ret;
}

nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(fake_gpu *g, unsigned int *limit)
{
    return nvmlDeviceGetPowerManagementLimit(g, limit);
}

nvmlReturn_t nvmlDeviceGetPowerManagementDefaultLimit(fake_gpu *g, unsigned int *limit)
{
    nvmlReturn_t ret = limits_of(g, limit);
    if (!ret)
        *limit = (unsigned int)g->plimit_default;
    return ret;
}

nvmlReturn_t nvmlDeviceGetPowerManagementLimitConstraints(fake_gpu *g, unsigned int *min, unsigned int *max)
{
    nvmlReturn_t ret = limits_of(g, max);
    if (!ret && !min)
        ret = NVML_ERROR_INVALID_ARGUMENT;
    if (!ret) {
        *min = (unsigned int)g->plimit_min;
        *max = (unsigned int)g->plimit_max;
    }
    return ret;
}

nvmlReturn_t nvmlDeviceSetPowerManagementLimit(fake_gpu *g, unsigned int limit)
{
    nvmlReturn_t ret = limits_of(g, g);
    if (ret)
        return ret;
    if (geteuid() != 0) /* as the real library: root only */
        return NVML_ERROR_NO_PERMISSION;
    if ((long)limit < g->plimit_min || (long)limit > g->plimit_max)
        return NVML_ERROR_INVALID_ARGUMENT;
    limit_mw[g - gpus] = limit;
    write_limits();
    return NVML_SUCCESS;
}

/* ---- events: one event set, critical Xids only ---- */

typedef struct {
    fake_gpu *device;
    unsigned long long eventType, eventData;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlEventData_t;

#define XID_CRITICAL 0x8ULL
static int event_set; /* its address is the opaque nvmlEventSet_t */

nvmlReturn_t nvmlEventSetCreate(int **set)
{
    if (!init_count)
        return NVML_ERROR_UNINITIALIZED;
    if (!set)
        return NVML_ERROR_INVALID_ARGUMENT;
    *set = &event_set;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetSupportedEventTypes(fake_gpu *g, unsigned long long *types)
{
    nvmlReturn_t ret = check(g, types);
    if (!ret)
        *types = XID_CRITICAL;
    return ret;
}

nvmlReturn_t nvmlDeviceRegisterEvents(fake_gpu *g, unsigned long long types, int *set)
{
    nvmlReturn_t ret = check(g, g);
    if (ret)
        return ret;
    if (set != &event_set || (types & ~XID_CRITICAL))
        return NVML_ERROR_NOT_SUPPORTED;
    registered[g - gpus] = 1;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlEventSetWait_v2(int *set, nvmlEventData_t *data, unsigned int timeout_ms)
{
    unsigned i;
    if (!init_count)
        return NVML_ERROR_UNINITIALIZED;
    if (set != &event_set || !data)
        return NVML_ERROR_INVALID_ARGUMENT;
    maybe_reload();
    for (i = 0; i < gpu_count; i++) {
        if (registered[i] && pending_xid[i]) {
            memset(data, 0, sizeof *data);
            data->device = &gpus[i];
            data->eventType = XID_CRITICAL;
            data->eventData = (unsigned long long)pending_xid[i];
            pending_xid[i] = 0;
            return NVML_SUCCESS;
        }
    }
    if (timeout_ms)
        usleep(timeout_ms > 100 ? 100000 : timeout_ms * 1000); /* nothing will come: a short nap */
    return NVML_ERROR_TIMEOUT;
}

nvmlReturn_t nvmlEventSetWait(int *set, nvmlEventData_t *data, unsigned int timeout_ms)
{
    return nvmlEventSetWait_v2(set, data, timeout_ms);
}

nvmlReturn_t nvmlEventSetFree(int *set)
{
    unsigned i;
    if (set != &event_set)
        return NVML_ERROR_INVALID_ARGUMENT;
    for (i = 0; i < MAX_GPUS; i++)
        registered[i] = 0;
    return NVML_SUCCESS;
}
